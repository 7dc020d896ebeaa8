"""The MoE router of a decode step in one launch: gate GEMM, softmax, top-k, alignment.

Unfused, a layer's routing is four launches: the gate GEMM (cuBLAS, split-K: two),
`fused_small.router_topk`, and `fused_moe.moe_align_block_size` inside the MoE. Here:

- a grid of (T, S) programs, program (t, s) computes token t's E logits over the s-th
  slice of D (x row slice · each gate row slice, fp32) and stores them to a workspace;
- the last program to arrive (an acq_rel atomic counter, set back to 0 by that program
  so the next launch and every CUDA-graph replay start from 0) sums each token's S
  partials in a fixed order, rounds the logits to x's dtype (as the 16-bit GEMM's output
  is), takes the fp32 softmax, the top k (lowest index first among ties, as torch.topk),
  renormalises, writes weights and ids, and then aligns the T*k ids for the fused MoE
  (`fused_moe.align_slots`, the body of `moe_align_block_size`).

Why this split: the gate is E x D (64 KB in bf16 at Mixtral's 8 x 4096) and a token's x
8 KB. One program reading all of it would be bound by one SM's load bandwidth, so the
grid spreads the D slices over ~128 programs (enough to cover the SMs once; more only
lengthens the queue on the one counter). The tail's work (T*S*E partials, T*k ids) is
small at decode sizes (layers/moe.py takes this path up to FUSED_DECODE_MAX_TOKENS).
No host sync: graph-capturable. Legend: T tokens, D hidden, E experts, k top-k, S slices.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sluice.engine.kernels._common import check, check_tensor
from sluice.engine.kernels.fused_moe import _align_sizes, align_chunk, align_slots
from sluice.engine.kernels.fused_small import softmax_topk

SUB_D = 512  # columns a program multiplies at a time


@triton.jit
def _route_tokens(
    part_ptr, x_ptr, w_ptr, ids_ptr, T,
    E: tl.constexpr, K: tl.constexpr, S: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """The epilogue's routing: logits from the partials, then fused_small.softmax_topk."""
    offs_e = tl.arange(0, BLOCK_E)
    offs_s = tl.arange(0, BLOCK_S)
    offs_k = tl.arange(0, BLOCK_K)
    for t0 in range(0, T, BLOCK_T):
        toks = t0 + tl.arange(0, BLOCK_T)
        t_ok = toks < T
        # (BLOCK_T, BLOCK_S, BLOCK_E) partials, all loads issued at once; .cg: past L1, to
        # the L2 the other programs wrote them to
        p_ptrs = part_ptr + ((toks[:, None, None] * S + offs_s[None, :, None]) * BLOCK_E + offs_e[None, None, :])
        p_mask = t_ok[:, None, None] & (offs_s < S)[None, :, None]
        parts = tl.load(p_ptrs, mask=p_mask, other=0.0, cache_modifier=".cg")
        logits = tl.sum(parts, axis=1).to(x_ptr.dtype.element_ty).to(tl.float32)  # (BLOCK_T, BLOCK_E)
        ws, ids = softmax_topk(logits, E, K, BLOCK_E, BLOCK_K)
        out = toks[:, None] * K + offs_k[None, :]
        o_mask = t_ok[:, None] & (offs_k < K)[None, :]
        tl.store(w_ptr + out, ws, mask=o_mask)
        tl.store(ids_ptr + out, ids, mask=o_mask)


@triton.jit(do_not_specialize=["T", "max_padded", "max_blocks"])
def _route_kernel(
    x_ptr, gate_ptr, part_ptr, counter_ptr, w_ptr, ids_ptr,
    sorted_ids_ptr, expert_ids_ptr, num_post_ptr,
    T, stride_x, max_padded, max_blocks,
    D: tl.constexpr, E: tl.constexpr, K: tl.constexpr, S: tl.constexpr,
    BLOCK_D: tl.constexpr, SUB: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr,
    ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr,
):
    tok = tl.program_id(0)
    sl = tl.program_id(1)
    offs_e = tl.arange(0, BLOCK_E)
    acc = tl.zeros((BLOCK_E, SUB), dtype=tl.float32)
    for d0 in tl.static_range(0, BLOCK_D, SUB):  # unrolled: every load issued up front
        offs_d = sl * BLOCK_D + d0 + tl.arange(0, SUB)
        d_ok = offs_d < D
        x = tl.load(x_ptr + tok.to(tl.int64) * stride_x + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        g = tl.load(gate_ptr + offs_e[:, None] * D + offs_d[None, :],
                    mask=(offs_e < E)[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        acc += g * x[None, :]
    tl.store(part_ptr + (tok * S + sl) * BLOCK_E + offs_e, tl.sum(acc, axis=1))
    tl.debug_barrier()  # every thread's store before the arrival (released by the atomic)
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    if arrived == T * S - 1:  # the last program: every partial is in
        tl.store(counter_ptr, 0)
        _route_tokens(part_ptr, x_ptr, w_ptr, ids_ptr, T,
                      E, K, S, BLOCK_E, BLOCK_K, BLOCK_S, BLOCK_T)
        if ALIGN:
            tl.debug_barrier()  # the ids just stored, visible to every thread of this program
            align_slots(ids_ptr, sorted_ids_ptr, expert_ids_ptr, num_post_ptr, T * K, max_padded, max_blocks,
                        E, BLOCK_E, BLOCK_M, CHUNK)


def _block_d(num_tokens: int, d: int) -> int:
    """Columns per program: ~128 programs in all, at least SUB_D columns each."""
    want = triton.next_power_of_2(triton.cdiv(d * num_tokens, 128))
    return max(SUB_D, min(want, triton.next_power_of_2(d)))


def route(
    x: torch.Tensor,  # (T, D)
    gate: torch.Tensor,  # (E, D), x's dtype
    top_k: int,
    counter: torch.Tensor,  # (1,) int32, zero: the launch's arrival counter (left at zero)
    block_m: int | None = None,
    block_d: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
    """-> topk_weights (T, k) fp32, topk_ids (T, k) int32 and, given ``block_m``, the
    alignment ``moe_align_block_size(topk_ids, E, block_m)`` returns (else None).
    ``counter`` must be left to this launcher: a launch that does not complete would
    leave it off zero. Launches sharing a counter must not run concurrently."""
    check_tensor(x, "x", 2, (torch.bfloat16, torch.float16, torch.float32))
    t, d = x.shape
    check_tensor(gate, "gate", 2, (x.dtype,), device=x.device)
    e = gate.shape[0]
    check(gate.shape[1] == d and gate.is_contiguous(), f"gate must be contiguous ({e}, {d}), got {tuple(gate.shape)}")
    check(0 < top_k <= e, f"top_k {top_k} must be in [1, {e}]")
    check_tensor(counter, "counter", 1, (torch.int32,), device=x.device)
    check(counter.numel() == 1, "counter must hold one int32")
    dev = x.device
    w = torch.empty((t, top_k), dtype=torch.float32, device=dev)
    ids = torch.empty((t, top_k), dtype=torch.int32, device=dev)
    align = None
    numel = t * top_k
    padded, max_blocks = _align_sizes(numel, e, block_m) if block_m is not None else (0, 0)
    if block_m is not None:
        check(block_m > 0 and block_m & (block_m - 1) == 0, f"block_m {block_m} must be a power of two")
        align = (torch.empty(padded, dtype=torch.int32, device=dev),
                 torch.empty(max_blocks, dtype=torch.int32, device=dev),
                 (torch.zeros if t == 0 else torch.empty)(1, dtype=torch.int32, device=dev))
    if t == 0:
        return w, ids, align
    block_e = triton.next_power_of_2(e)
    block_d = block_d or _block_d(t, d)
    check(block_d & (block_d - 1) == 0, f"block_d {block_d} must be a power of two")
    sub = min(SUB_D, block_d)
    s = triton.cdiv(d, block_d)
    block_s = triton.next_power_of_2(s)
    block_t = max(1, min(triton.next_power_of_2(t), 4096 // (block_s * block_e)))
    part = torch.empty((t, s, block_e), dtype=torch.float32, device=dev)
    sorted_ids, expert_ids, num_post = align or (ids, ids, ids)  # stand-ins when not aligning
    _route_kernel[(t, s)](
        x, gate, part, counter, w, ids, sorted_ids, expert_ids, num_post,
        t, x.stride(0), padded, max_blocks,
        D=d, E=e, K=top_k, S=s, BLOCK_D=block_d, SUB=sub, BLOCK_E=block_e,
        BLOCK_K=triton.next_power_of_2(top_k), BLOCK_S=block_s, BLOCK_T=block_t,
        ALIGN=block_m is not None, BLOCK_M=block_m or 16, CHUNK=align_chunk(numel, block_e),
        num_warps=4,
    )
    return w, ids, align


def route_reference(x: torch.Tensor, gate: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch code the launch replaces (MoE.route): 16-bit logits, fp32 softmax, top-k."""
    logits = (x.float() @ gate.float().t()).to(x.dtype)
    probs = torch.softmax(logits.float(), dim=-1)
    w, ids = torch.topk(probs, top_k, dim=-1)
    return w / w.sum(dim=-1, keepdim=True), ids
