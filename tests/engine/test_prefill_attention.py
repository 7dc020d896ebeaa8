"""Prefill attention must reach SDPA's fused kernels: with 3-D inputs or a materialised
bool mask SDPA silently falls back to its math path (fp32 bmm + softmax, O(T * ctx)
memory), which took 30% of the GPU's kernel time serving fp8 at 12 req/s."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from engine.layers.attention import Attention


@pytest.mark.parametrize("t,ctx", [(40, 40), (10, 40), (1, 17)])
def test_prefill_attention_runs_in_the_flash_kernel(t, ctx):
    torch.manual_seed(t)
    attn = Attention(num_heads=8, num_kv_heads=2, head_dim=64)
    attn.k_cache = torch.randn(4, 16, 2, 64, dtype=torch.bfloat16)
    attn.v_cache = torch.randn_like(attn.k_cache)
    table = torch.tensor([2, 0, 3])
    q = torch.randn(t, 8, 64, dtype=torch.bfloat16)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises "No available kernel" on the math-only path
        out = attn._prefill(q, ctx, table)
    # against plain attention with the mask spelled out: query i sees keys 0..ctx - t + i
    k = attn.k_cache[table].flatten(0, 1)[:ctx].repeat_interleave(4, dim=1).float()  # (ctx, 8, 64)
    v = attn.v_cache[table].flatten(0, 1)[:ctx].repeat_interleave(4, dim=1).float()
    scores = torch.einsum("thd,chd->htc", q.float(), k) * attn.scale
    mask = torch.ones(t, ctx, dtype=torch.bool).tril(diagonal=ctx - t)
    want = torch.einsum("htc,chd->thd", scores.masked_fill(~mask, float("-inf")).softmax(-1), v)
    assert out.shape == (t, 8, 64)
    assert (out.float() - want).abs().max().item() < 2e-2
