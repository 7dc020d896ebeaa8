"""Paged attention for a mixed step: prefill chunks and decodes in one launch.

Legend: N query tokens in the step, S sequence rows, Hq query heads, Hkv kv heads,
G = Hq/Hkv group size, D head dim, BS tokens per cache block, BQ query tokens per
program, BM = BQ * next_pow2(G) rows of its score tile.

Sequence s owns the query rows q[qstart[s]:qstart[s+1]]: the last qlen of its
seq_lens[s] positions, so query i sits at position seq_lens[s] - qlen + i and sees keys
0..that position (a decode is a sequence with qlen 1; a chunk after a prefix hit or an
earlier chunk is the bottom-right corner of a causal mask). Keys and values come from
the paged cache, this step's already stored.

One program per (query block, kv head): it scores BQ tokens x the G query heads that
share the kv head against each K/V tile, so each KV row is read once per group. Query
block b of sequence s has program index qstart[s] // BQ + s + b, so the total stays
below N // BQ + S whatever the lengths: the grid depends on (N, S) only, and a CUDA
graph captured at a padded N and a fixed S replays any batch that fits it. A program
finds its sequence by binary search over qstart; the ones past their sequence's last
block (and padding rows with qlen 0) return at once. Rows no sequence owns are zero.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sluice.engine.kernels._common import check, check_tensor, dot_in_fp32
from sluice.engine.kernels.paged_attention import check_paged_inputs, load_kv_tile

_LOG2E = 1.4426950408889634


@triton.jit
def _find_sequence(qstart_ptr, num_seqs, pid, BLOCK_Q: tl.constexpr):
    """The last sequence s with qstart[s] // BLOCK_Q + s <= pid."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_block = tl.load(qstart_ptr + mid) // BLOCK_Q + mid
        if first_block <= pid:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _paged_varlen_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, qstart_ptr, seq_lens_ptr, tables_ptr,
    qk_scale,  # softmax scale * log2(e): scores live in base 2
    num_seqs,
    stride_qt, stride_qh, stride_cb, stride_ct, stride_ch, stride_tb, stride_ot, stride_oh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_Q: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE: tl.constexpr, DOT_F32: tl.constexpr,
):
    pid = tl.program_id(0)
    hk = tl.program_id(1)
    s = _find_sequence(qstart_ptr, num_seqs, pid, BLOCK_Q)
    q_begin = tl.load(qstart_ptr + s)
    q_len = tl.load(qstart_ptr + s + 1) - q_begin
    qb = pid - (q_begin // BLOCK_Q + s)
    if qb * BLOCK_Q >= q_len:
        return
    ctx = tl.load(seq_lens_ptr + s)
    BLOCK_M: tl.constexpr = BLOCK_Q * BLOCK_G
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    t = qb * BLOCK_Q + offs_m // BLOCK_G  # token within the sequence's chunk
    g = offs_m % BLOCK_G
    row_ok = (t < q_len) & (g < GROUP)
    heads = hk * GROUP + g
    tok = (q_begin + t).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)  # (BM, D)
    if DOT_F32:
        q = q.to(tl.float32)
    q_pos = ctx - q_len + t  # each row's position: it sees keys 0..q_pos
    kv_end = tl.minimum(ctx, ctx - q_len + (qb + 1) * BLOCK_Q)  # the block's last row sees up to here
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    table = tables_ptr + s.to(tl.int64) * stride_tb
    for n0 in range(0, kv_end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        k_ok = pos < kv_end
        k, v = load_kv_tile(k_ptr, v_ptr, table, pos, k_ok, hk, stride_cb, stride_ct, stride_ch, offs_d,
                            PAGE, DOT_F32)  # (BN, D) each
        scores = tl.dot(q, tl.trans(k)) * qk_scale  # (BM, BN)
        seen = k_ok[None, :] & (pos[None, :] <= q_pos[:, None])
        scores = tl.where(seen, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet
        p = tl.math.exp2(scores - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + tok[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def paged_varlen_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    query_start: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    block_m: int | None = None,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """q (N, Hq, D), caches [NB, BS, Hkv, D], query_start (S+1,) int32 nondecreasing,
    seq_lens (S,) int32, block_tables (S, max_blocks) int32 -> (N, Hq, D).

    Rows past query_start[S] (padding) are zero. Shapes alone set the launch, so the
    call is CUDA-graph safe. block_m/block_n/num_warps/num_stages override the tiles
    (block_m: rows per program, BQ tokens x the group padded to a power of two)."""
    page, hkv = check_paged_inputs(q, k_cache, v_cache)
    n, hq, d = q.shape
    check_tensor(seq_lens, "seq_lens", 1, (torch.int32,), device=q.device)
    num_seqs = seq_lens.shape[0]
    check_tensor(query_start, "query_start", 1, (torch.int32,), device=q.device)
    check(query_start.shape[0] == num_seqs + 1 and query_start.is_contiguous() and seq_lens.is_contiguous(),
          f"query_start must be contiguous ({num_seqs + 1},) for {num_seqs} sequences, got {tuple(query_start.shape)}")
    check_tensor(block_tables, "block_tables", 2, (torch.int32,), device=q.device)
    check(block_tables.shape[0] == num_seqs, f"block_tables has {block_tables.shape[0]} rows for {num_seqs} sequences")
    group = hq // hkv
    block_g = triton.next_power_of_2(group)
    block_m = block_m or max(64, block_g)  # 64 rows unless one kv head's group needs more
    check(block_m % block_g == 0 and block_m >= 16, f"block_m {block_m} must be >= 16 and a multiple of {block_g}")
    block_q = block_m // block_g
    out = torch.zeros_like(q)
    if n == 0 or num_seqs == 0:
        return out
    grid = (triton.cdiv(n, block_q) + num_seqs, hkv)
    _paged_varlen_kernel[grid](
        q, k_cache, v_cache, out, query_start, seq_lens, block_tables,
        scale * _LOG2E, num_seqs,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, BLOCK_G=block_g, BLOCK_Q=block_q, HEAD_DIM=d,
        BLOCK_N=block_n, PAGE=page, DOT_F32=dot_in_fp32(),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
