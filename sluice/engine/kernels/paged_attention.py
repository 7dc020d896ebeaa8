"""Paged decode attention for GQA.

Legend: B sequences, Hq query heads, Hkv kv heads, G = Hq/Hkv group size, D head dim,
NB cache blocks, BS tokens per block, S sequence splits.

One program per (sequence, kv head, split): it loads each K/V row of its range once
and scores the whole query group against it (the G query rows padded up to the MMA's
16), so KV bytes are read once per group, not once per query head. When B*Hkv is
too small to fill the GPU the context is split S ways (each program takes ceil(len/S)
tokens of its own sequence, so the split follows the real length at run time); a
second kernel merges the partial outputs by their log-sum-exp.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sluice.engine.kernels._common import check, check_tensor, dot_in_fp32

KV_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_LOG2E = 1.4426950408889634


def check_paged_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int]:
    """Checks shared by the paged attention launchers: q (..., Hq, D) against caches
    [NB, BS, Hkv, D]. Returns (BS, Hkv)."""
    check_tensor(q, "q", 3, KV_DTYPES)
    hq, d = q.shape[1], q.shape[2]
    check_tensor(k_cache, "k_cache", 4, KV_DTYPES, device=q.device)
    check_tensor(v_cache, "v_cache", 4, KV_DTYPES, device=q.device)
    check(k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride(),
          f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must match in shape and strides")
    check(k_cache.dtype == v_cache.dtype == q.dtype,
          f"q, k_cache, v_cache dtypes differ: {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    _, page, hkv, dk = k_cache.shape
    check(dk == d, f"cache head dim {dk} != q head dim {d}")
    check(d >= 16 and d & (d - 1) == 0, f"head dim must be a power of two >= 16, got {d}")
    check(hq % hkv == 0, f"query heads {hq} not a multiple of kv heads {hkv}")
    check(page & (page - 1) == 0, f"block size must be a power of two, got {page}")
    return page, hkv


@triton.jit
def load_kv_tile(k_ptr, v_ptr, table, pos, valid, hk, stride_cb, stride_ct, stride_ch, offs_d,
                 PAGE: tl.constexpr, DOT_F32: tl.constexpr):
    """K and V rows (BN, D) of kv head ``hk`` at positions ``pos`` through a block table
    (zeros where not ``valid``); widened to fp32 when the dots must be."""
    blk = tl.load(table + pos // PAGE, mask=valid, other=0).to(tl.int64)
    row = blk * stride_cb + (pos % PAGE) * stride_ct + hk * stride_ch
    k = tl.load(k_ptr + row[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
    v = tl.load(v_ptr + row[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
    if DOT_F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr, part_o_ptr, part_lse_ptr,
    qk_scale,  # softmax scale * log2(e): scores live in base 2
    stride_qb, stride_qh, stride_cb, stride_ct, stride_ch, stride_tb, stride_ob, stride_oh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE: tl.constexpr, SPLITS: tl.constexpr, DOT_F32: tl.constexpr,
):
    b = tl.program_id(0)
    hk = tl.program_id(1)
    s = tl.program_id(2)
    n_ctx = tl.load(lens_ptr + b)
    per_split = tl.cdiv(tl.cdiv(n_ctx, SPLITS), BLOCK_N) * BLOCK_N
    start = s * per_split
    end = tl.minimum(start + per_split, n_ctx)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    g_mask = offs_g < GROUP
    heads = hk * GROUP + offs_g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None], other=0.0)  # (BG, D)
    if DOT_F32:
        q = q.to(tl.float32)
    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, HEAD_DIM), dtype=tl.float32)
    table = tables_ptr + b.to(tl.int64) * stride_tb
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        valid = pos < end
        k, v = load_kv_tile(k_ptr, v_ptr, table, pos, valid, hk, stride_cb, stride_ct, stride_ch, offs_d,
                            PAGE, DOT_F32)
        scores = tl.dot(q, tl.trans(k)) * qk_scale  # (BG, BN)
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        p = tl.math.exp2(scores - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    o_off = b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
    if SPLITS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
    else:
        # partials: o (B, Hq, S, D) normalised, lse (B, Hq, S) in base 2; empty split -> -inf
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        lse = tl.where(l_i > 0, m_i + tl.math.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        bh = b * (GROUP * tl.num_programs(1)) + heads
        tl.store(part_o_ptr + (bh[:, None] * SPLITS + s) * HEAD_DIM + offs_d[None, :], out,
                 mask=g_mask[:, None])
        tl.store(part_lse_ptr + bh * SPLITS + s, lse, mask=g_mask)


@triton.jit
def _merge_splits_kernel(
    part_o_ptr, part_lse_ptr, out_ptr, num_heads, stride_ob, stride_oh,
    SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    bh = tl.program_id(0)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    s_mask = offs_s < SPLITS
    lse = tl.load(part_lse_ptr + bh * SPLITS + offs_s, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)  # zero-length sequence: all splits empty
    w = tl.where(s_mask, tl.math.exp2(lse - m), 0.0)
    o = tl.load(part_o_ptr + (bh * SPLITS + offs_s[:, None]) * HEAD_DIM + offs_d[None, :],
                mask=s_mask[:, None], other=0.0)
    out = tl.sum(o * w[:, None], axis=0) / tl.maximum(tl.sum(w, axis=0), 1e-30)
    b = bh // num_heads
    h = bh % num_heads
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty))


def num_splits_for(batch: int, kv_heads: int, max_tokens: int, block_n: int = 64,
                   num_sms: int = 132) -> int:
    """Enough (batch, kv head, split) programs for ~2 waves; never more splits than
    BLOCK_N-token tiles in the longest possible context. Shapes only: graph-safe."""
    want = triton.cdiv(2 * num_sms, batch * kv_heads)
    return max(1, min(16, want, triton.cdiv(max_tokens, block_n)))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """q (B, Hq, D), caches [NB, BS, Hkv, D], block_tables (B, max_blocks) int32,
    context_lens (B,) int32 -> (B, Hq, D). Zero-length sequences give zeros.
    num_splits/block_n/num_warps/num_stages override the tile choice (tuning)."""
    page, hkv = check_paged_inputs(q, k_cache, v_cache)
    bsz, hq, d = q.shape
    check_tensor(block_tables, "block_tables", 2, (torch.int32,), device=q.device)
    check(block_tables.shape[0] == bsz, f"block_tables has {block_tables.shape[0]} rows for batch {bsz}")
    check_tensor(context_lens, "context_lens", 1, (torch.int32,), device=q.device)
    check(context_lens.shape[0] == bsz and context_lens.is_contiguous(),
          f"context_lens must be contiguous ({bsz},), got {tuple(context_lens.shape)}")
    group = hq // hkv
    block_n = block_n or 64
    max_tokens = block_tables.shape[1] * page
    splits = num_splits or num_splits_for(bsz, hkv, max_tokens, block_n)
    out = torch.empty_like(q)
    if bsz == 0:
        return out
    if splits > 1:
        part_o = torch.empty((bsz, hq, splits, d), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((bsz, hq, splits), dtype=torch.float32, device=q.device)
    else:
        part_o = part_lse = out
    _paged_decode_kernel[(bsz, hkv, splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part_o, part_lse,
        scale * _LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=d,
        BLOCK_N=block_n, PAGE=page, SPLITS=splits, DOT_F32=dot_in_fp32(),
        num_warps=num_warps, num_stages=num_stages,
    )
    if splits > 1:
        _merge_splits_kernel[(bsz * hq,)](
            part_o, part_lse, out, hq, out.stride(0), out.stride(1),
            SPLITS=splits, BLOCK_S=triton.next_power_of_2(splits), HEAD_DIM=d,
        )
    return out


def paged_decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Gather each sequence's K/V through its block table and attend in fp32."""
    bsz, hq, d = q.shape
    page, hkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros((bsz, hq, d), dtype=torch.float32, device=q.device)
    for b in range(bsz):
        n = int(context_lens[b])
        if n == 0:
            continue
        blocks = block_tables[b, : math.ceil(n / page)].long()
        k = k_cache[blocks].reshape(-1, hkv, d)[:n].float()  # (n, Hkv, D)
        v = v_cache[blocks].reshape(-1, hkv, d)[:n].float()
        k = k.repeat_interleave(hq // hkv, dim=1)  # (n, Hq, D)
        v = v.repeat_interleave(hq // hkv, dim=1)
        att = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale
        out[b] = torch.einsum("hn,nhd->hd", att.softmax(-1), v)
    return out.to(q.dtype)
