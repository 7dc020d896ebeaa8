"""Attention over a paged KV cache.

Cache layout per layer: k_cache, v_cache of shape (num_blocks, block_size, Hkv, D).
A token's slot is block_id * block_size + offset. A step is either decode-only (one
token per sequence: ``paged_decode_attention``) or varlen: sequence s owns query rows
query_start[s]:query_start[s+1], the last of its seq_lens[s] positions, decodes
(one row) and prefill chunks alike (``paged_varlen_attention``). Each has a torch
reference here; the model runner passes the triton kernels on CUDA in the metadata.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AttentionMetadata:
    """What attention needs to know about one step's batch (built by the model runner)."""

    slot_mapping: torch.Tensor  # (N,) int64: cache slot of each new token
    # decode-only steps: token b is sequence b's next token
    decode_block_tables: torch.Tensor | None = None  # (B, max_blocks) int32
    decode_context_lens: torch.Tensor | None = None  # (B,) int32, new token included
    # varlen steps (any prefill chunk): set instead of the two above
    query_start: torch.Tensor | None = None  # (S+1,) int32: sequence s owns rows [qs[s], qs[s+1])
    seq_lens: torch.Tensor | None = None  # (S,) int32: cached + new tokens
    block_tables: torch.Tensor | None = None  # (S, max_blocks) int32
    # The attention functions the runner chose for this engine (None: the layer's own,
    # the torch references below).
    kernels: AttentionKernels | None = None


@dataclass(frozen=True)
class AttentionKernels:
    decode: DecodeAttentionFn
    varlen: VarlenAttentionFn


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
    Hkv = k_cache.shape[2]
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


def paged_varlen_attention(
    q: torch.Tensor,  # (N, Hq, D)
    k_cache: torch.Tensor,  # (num_blocks, block_size, Hkv, D)
    v_cache: torch.Tensor,
    query_start: torch.Tensor,  # (S+1,) int32
    seq_lens: torch.Tensor,  # (S,) int32
    block_tables: torch.Tensor,  # (S, max_blocks) int32
    scale: float,
) -> torch.Tensor:  # (N, Hq, D); rows no sequence owns are zero
    """Torch reference (reads the lengths on the host): SDPA per sequence against its
    cached keys, query i of T at position ctx - T + i seeing keys 0..ctx - T + i, a
    causal mask aligned to the bottom right (``causal_lower_right``; plain ``is_causal``
    when T == ctx). Inputs are 4-D (batch, heads, len, dim), the only layout SDPA's
    fused kernels take: 3-D ones, or a materialised bool mask, send it to its math path
    (fp32 bmm + softmax, O(T * ctx) memory)."""
    out = torch.zeros_like(q)
    block_size, hkv = k_cache.shape[1], k_cache.shape[2]
    groups = q.shape[1] // hkv
    starts = query_start.tolist()
    for s, ctx in enumerate(seq_lens.tolist()):
        a, b = starts[s], starts[s + 1]
        T = b - a
        if T == 0:
            continue
        table = block_tables[s, : -(-ctx // block_size)].long()
        k = k_cache[table].flatten(0, 1)[:ctx]  # (ctx, Hkv, D)
        v = v_cache[table].flatten(0, 1)[:ctx]
        k = k.repeat_interleave(groups, dim=1).transpose(0, 1)[None]  # (1, Hq, ctx, D)
        v = v.repeat_interleave(groups, dim=1).transpose(0, 1)[None]
        qs = q[a:b].transpose(0, 1)[None]  # (1, Hq, T, D)
        if T == ctx:
            mask = {"is_causal": True}
        else:  # imported here: torch.nn.attention.bias imports torch._dynamo (~2 s at start-up)
            from torch.nn.attention.bias import causal_lower_right

            mask = {"attn_mask": causal_lower_right(T, ctx)}
        o = F.scaled_dot_product_attention(qs, k, v, scale=scale, **mask)
        out[a:b] = o[0].transpose(0, 1)
    return out


DecodeAttentionFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor
]
VarlenAttentionFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor
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
    varlen_fn: VarlenAttentionFn = staticmethod(paged_varlen_attention)

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
        if meta.query_start is None:
            decode = meta.kernels.decode if meta.kernels else self.decode_fn
            return decode(q, self.k_cache, self.v_cache, meta.decode_block_tables, meta.decode_context_lens,
                          self.scale)
        varlen = meta.kernels.varlen if meta.kernels else self.varlen_fn
        return varlen(q, self.k_cache, self.v_cache, meta.query_start, meta.seq_lens, meta.block_tables,
                      self.scale)
