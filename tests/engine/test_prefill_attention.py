"""The varlen attention reference must reach SDPA's fused kernels: with 3-D inputs or a
materialised bool mask SDPA silently falls back to its math path (fp32 bmm + softmax,
O(T * ctx) memory), which took 30% of the GPU's kernel time serving fp8 at 12 req/s."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from sluice.engine.layers.attention import paged_varlen_attention


@pytest.mark.parametrize("t,ctx", [(40, 40), (10, 40), (1, 17)])
def test_varlen_reference_runs_in_the_flash_kernel(t, ctx):
    torch.manual_seed(t)
    k_cache = torch.randn(4, 16, 2, 64, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    table = torch.tensor([[2, 0, 3]], dtype=torch.int32)
    q = torch.randn(t + 3, 8, 64, dtype=torch.bfloat16)  # 3 padding rows past the sequence
    query_start = torch.tensor([0, t], dtype=torch.int32)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises "No available kernel" on the math-only path
        out = paged_varlen_attention(q, k_cache, v_cache, query_start, torch.tensor([ctx], dtype=torch.int32),
                                     table, 64**-0.5)
    # against plain attention with the mask spelled out: query i sees keys 0..ctx - t + i
    k = k_cache[table[0].long()].flatten(0, 1)[:ctx].repeat_interleave(4, dim=1).float()  # (ctx, 8, 64)
    v = v_cache[table[0].long()].flatten(0, 1)[:ctx].repeat_interleave(4, dim=1).float()
    scores = torch.einsum("thd,chd->htc", q[:t].float(), k) * 64**-0.5
    mask = torch.ones(t, ctx, dtype=torch.bool).tril(diagonal=ctx - t)
    want = torch.einsum("htc,chd->thd", scores.masked_fill(~mask, float("-inf")).softmax(-1), v)
    assert out.shape == q.shape
    assert (out[:t].float() - want).abs().max().item() < 2e-2
    assert torch.all(out[t:] == 0)
