"""Attention over a paged KV cache.

Cache layout per layer: k_cache, v_cache of shape (num_blocks, block_size, Hkv, D).
A token's slot is block_id * block_size + offset. Tokens of one step are laid
out as [decode tokens (one per sequence) | prefill chunks (varlen)]; decode goes
through ``paged_decode_attention`` (a triton kernel can replace it), prefill
through SDPA per sequence against everything cached so far (prefix hits included).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right


@dataclass
class AttentionMetadata:
    """What attention needs to know about one step's batch (built by the model runner)."""

    slot_mapping: torch.Tensor  # (N,) int64: cache slot of each new token
    num_decode: int  # the first num_decode tokens are decodes, one per sequence
    decode_block_tables: torch.Tensor | None = None  # (B, max_blocks) int32
    decode_context_lens: torch.Tensor | None = None  # (B,) int32, new token included
    prefill_query_lens: list[int] = field(default_factory=list)  # per prefill sequence
    prefill_context_lens: list[int] = field(default_factory=list)  # cached + new tokens
    prefill_block_tables: list[torch.Tensor] = field(default_factory=list)  # (n_blocks,) each


def paged_decode_attention(
    q: torch.Tensor,  # (B, Hq, D)
    k_cache: torch.Tensor,  # (num_blocks, block_size, Hkv, D)
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # (B, max_blocks) int32
    context_lens: torch.Tensor,  # (B,) int32
    scale: float,
) -> torch.Tensor:  # (B, Hq, D)
    """Torch reference: one query token per sequence attends to its whole cached context."""
    B, Hq, D = q.shape
    _, block_size, Hkv, _ = k_cache.shape
    blocks = block_tables.long()
    k = k_cache[blocks].flatten(1, 2)  # (B, L, Hkv, D), L = max_blocks * block_size
    v = v_cache[blocks].flatten(1, 2)
    L = k.shape[1]
    qg = q.view(B, Hkv, Hq // Hkv, D).float()  # (B, Hkv, G, D)
    scores = torch.einsum("bhgd,blhd->bhgl", qg, k.float()) * scale  # (B, Hkv, G, L)
    valid = torch.arange(L, device=q.device)[None, :] < context_lens[:, None]  # (B, L)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1)
    out = torch.einsum("bhgl,blhd->bhgd", probs, v.float())  # (B, Hkv, G, D)
    return out.reshape(B, Hq, D).to(q.dtype)


DecodeAttentionFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor
]


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write new keys/values (N, Hkv, D) into their slots (graph-safe: no data-dependent shapes)."""
    Hkv, D = k.shape[1], k.shape[2]
    k_cache.view(-1, Hkv, D).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, Hkv, D).index_copy_(0, slot_mapping, v)


class Attention(nn.Module):
    """Caches this layer's K/V and attends; the runner assigns k_cache/v_cache."""

    decode_fn: DecodeAttentionFn = staticmethod(paged_decode_attention)

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q (N, Hq, D), k/v (N, Hkv, D) -> (N, Hq, D)."""
        store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        return self.attend(q, meta)

    def attend(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Attention of q (N, Hq, D) over the cache, this step's K/V already stored."""
        nd = meta.num_decode
        parts = []
        if nd:
            parts.append(self.decode_fn(q[:nd], self.k_cache, self.v_cache, meta.decode_block_tables,
                                        meta.decode_context_lens, self.scale))
        start = nd
        for qlen, ctx, table in zip(meta.prefill_query_lens, meta.prefill_context_lens, meta.prefill_block_tables):
            parts.append(self._prefill(q[start:start + qlen], ctx, table))
            start += qlen
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _prefill(self, q: torch.Tensor, ctx: int, table: torch.Tensor) -> torch.Tensor:
        """q (T, Hq, D) are the last T of ctx positions; keys come from the cache.

        Query i sits at position ctx - T + i and sees keys 0..ctx - T + i: a causal mask
        aligned to the bottom right (``causal_lower_right``; plain ``is_causal`` when
        T == ctx). Both run in SDPA's fused kernels (flash / memory-efficient), which take
        only 4-D (batch, heads, len, dim) inputs: 3-D ones, or a materialised bool mask,
        send SDPA to its math path (fp32 bmm + softmax, O(T * ctx) memory)."""
        T = q.shape[0]
        k = self.k_cache[table].flatten(0, 1)[:ctx]  # (ctx, Hkv, D)
        v = self.v_cache[table].flatten(0, 1)[:ctx]
        groups = self.num_heads // self.num_kv_heads
        k = k.repeat_interleave(groups, dim=1).transpose(0, 1)[None]  # (1, Hq, ctx, D)
        v = v.repeat_interleave(groups, dim=1).transpose(0, 1)[None]
        q = q.transpose(0, 1)[None]  # (1, Hq, T, D)
        if T == ctx:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(T, ctx), scale=self.scale)
        return out[0].transpose(0, 1)  # (T, Hq, D)
