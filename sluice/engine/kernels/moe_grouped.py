"""FP8 MoE for prefill through torch._scaled_grouped_mm (CUTLASS FP8 grouped GEMM, Hopper).

Legend: T tokens, k experts per token, S = T*k slots, E experts, D hidden, I intermediate,
R rows of the grouped operand (S, or S plus per-expert padding when ``align`` > 1).

Pipeline, no host sync (the per-expert row counts stay on the device, so it can be
captured in a CUDA graph):
1. x (T, D) -> e4m3 + per-token scale (one triton launch).
2. slots sorted by expert (argsort), counts per expert by scatter_add, ends by cumsum:
   the grouped GEMM's ``offs`` (E,) int32. Each sorted slot gathers its token's fp8 row.
3. gu = grouped(xq_sorted, w13^T) -> (R, 2I) bf16, row-wise scales (token x channel).
4. silu(gate) * up -> e4m3 + per-row scale (`silu_mul_quant_fp8`, one launch).
5. y = grouped(hq, w2^T) -> (R, D) bf16.
6. out[t] = sum_j w[t, j] * y[row of slot (t, j)] in fp32, rounded once (`moe_combine`).

The weights are used as stored: w13 (E, 2I, D) row-major is, transposed, the (E, D, 2I)
column-major operand CUTLASS wants, with the per-channel scales (E, 2I) as they are.
Where it wins over the fused triton W8A8 kernel is measured per token count
(Fp8FusedExperts.path, bench/moe_prefill.py).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch
import triton
import triton.language as tl

from sluice.engine.kernels._common import FP8_DTYPE, check, check_tensor, interpreting
from sluice.engine.kernels.act_quant import per_token_quant_fp8, per_token_quant_reference
from sluice.engine.kernels.moe_prefill import silu_mul_quant_fp8, silu_mul_quant_reference

GroupedMM = Callable[..., torch.Tensor]


def grouped_mm_available(device: torch.device | None = None) -> bool:
    """torch has the op and the GPU is a Hopper (sm_90; CUTLASS's kernel is built for it)."""
    if not hasattr(torch, "_scaled_grouped_mm") or not torch.cuda.is_available():
        return False
    index = device.index if device is not None and device.index is not None else torch.cuda.current_device()
    return _is_sm90(index)


@lru_cache(maxsize=None)
def _is_sm90(index: int) -> bool:
    return torch.cuda.get_device_capability(index) == (9, 0)


def scaled_grouped_mm_reference(
    a: torch.Tensor,  # (R, K) e4m3
    b: torch.Tensor,  # (E, K, N) e4m3, any strides
    scale_a: torch.Tensor,  # (R,) fp32
    scale_b: torch.Tensor,  # (E, N) fp32
    offs: torch.Tensor,  # (E,) int32, end row of each group
    out_dtype: torch.dtype = torch.bfloat16,
    use_fast_accum: bool = False,
) -> torch.Tensor:
    """torch._scaled_grouped_mm's 2-D x 3-D case in fp32: rows offs[g-1]:offs[g] of ``a``
    times group g of ``b``; rows past offs[-1] are left zero."""
    out = torch.zeros((a.shape[0], b.shape[2]), dtype=torch.float32, device=a.device)
    start = 0
    for g, end in enumerate(offs.tolist()):
        if end > start:
            lhs = a[start:end].float() * scale_a[start:end, None]
            out[start:end] = lhs @ (b[g].float() * scale_b[g][None, :])
        start = end
    return out.to(out_dtype)


def sort_by_expert(topk_ids: torch.Tensor, num_experts: int, align: int = 1
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """topk_ids (T, k) -> (order (S,) int64: slots sorted by expert, stable;
    row (S,) int64: the grouped operand's row of each sorted slot; offs (E,) int32: end
    row of each expert's group; R: rows of the grouped operand).

    With ``align`` > 1 every group starts on a multiple of ``align`` rows (R = S +
    E * (align - 1), fixed by the shapes); the rows between groups are padding."""
    flat = topk_ids.reshape(-1).long()
    s = flat.numel()
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # bincount would sync for its size
    if align == 1:
        return order, torch.arange(s, device=flat.device), torch.cumsum(counts, 0).to(torch.int32), s
    padded = (counts + align - 1) // align * align
    start = torch.cumsum(counts, 0) - counts  # first sorted slot of each expert
    pstart = torch.cumsum(padded, 0) - padded  # first row of each expert's group
    expert_sorted = flat[order]
    row = torch.arange(s, device=flat.device) - start[expert_sorted] + pstart[expert_sorted]
    offs = (pstart + counts).to(torch.int32)  # each group ends after its real rows
    return order, row, offs, s + num_experts * (align - 1)


@triton.jit
def _combine_kernel(y_ptr, pos_ptr, w_ptr, out_ptr, D, stride_y, stride_o,
                    TOP_K: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = offs < D
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        row = tl.load(pos_ptr + t * TOP_K + j)
        w = tl.load(w_ptr + t * TOP_K + j)
        acc += w * tl.load(y_ptr + row * stride_y + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_o + offs, acc.to(out_ptr.dtype.element_ty), mask=m)


def moe_combine(y: torch.Tensor, pos: torch.Tensor, topk_weights: torch.Tensor,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y (R, D), pos (T*k,) int64: the row of y holding slot (t, j) at t*k + j,
    topk_weights (T, k) fp32 -> (T, D): out[t] = sum_j w[t, j] * y[pos[t*k + j]],
    accumulated in fp32 and rounded once."""
    check_tensor(y, "y", 2, (torch.bfloat16, torch.float16, torch.float32))
    check_tensor(topk_weights, "topk_weights", 2, (torch.float32,))
    t, k = topk_weights.shape
    check(pos.dtype == torch.int64 and pos.numel() == t * k and pos.is_contiguous(),
          f"pos must be {t * k} contiguous int64, got {pos.dtype} {tuple(pos.shape)}")
    check(topk_weights.is_contiguous(), "topk_weights must be contiguous")
    d = y.shape[1]
    out = torch.empty((t, d), dtype=out_dtype or y.dtype, device=y.device)
    if t:
        block = min(1024, triton.next_power_of_2(max(d, 16)))
        _combine_kernel[(t, triton.cdiv(d, block))](y, pos, topk_weights, out, d, y.stride(0), out.stride(0),
                                                    TOP_K=k, BLOCK=block, num_warps=4)
    return out


def moe_combine_reference(y: torch.Tensor, pos: torch.Tensor, topk_weights: torch.Tensor,
                          out_dtype: torch.dtype | None = None) -> torch.Tensor:
    t, k = topk_weights.shape
    out = (y[pos].view(t, k, -1).float() * topk_weights.unsqueeze(-1)).sum(1)
    return out.to(out_dtype or y.dtype)


def fp8_moe_grouped(
    x: torch.Tensor,  # (T, D) bf16
    w13: torch.Tensor,  # (E, 2I, D) e4m3
    w13_scale: torch.Tensor,  # (E, 2I) fp32
    w2: torch.Tensor,  # (E, D, I) e4m3
    w2_scale: torch.Tensor,  # (E, D) fp32
    topk_weights: torch.Tensor,  # (T, k) fp32
    topk_ids: torch.Tensor,  # (T, k) int
    fast_accum: bool = True,
    align: int = 1,
    grouped_mm: GroupedMM | None = None,
) -> torch.Tensor:  # (T, D) in x's dtype
    """W8A8 MoE as two grouped GEMMs (see the module doc). ``grouped_mm`` defaults to
    torch._scaled_grouped_mm on CUDA and to its fp32 reference elsewhere."""
    t, d = x.shape
    e = w13.shape[0]
    k = topk_ids.shape[1]
    if t == 0:
        return torch.empty_like(x)
    out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    on_gpu = x.is_cuda and not interpreting()
    mm = grouped_mm or (torch._scaled_grouped_mm if on_gpu else scaled_grouped_mm_reference)
    quant, act_quant = ((per_token_quant_fp8, silu_mul_quant_fp8) if x.is_cuda or interpreting()
                        else (per_token_quant_reference, silu_mul_quant_reference))
    xq, xs = quant(x.contiguous())  # (T, D) e4m3, (T,)
    order, row, offs, rows = sort_by_expert(topk_ids, e, align)
    token_of = order // k  # (S,) token of each sorted slot
    if align == 1:
        a = xq.view(torch.uint8).index_select(0, token_of).view(FP8_DTYPE)  # (S, D)
        a_scale = xs.index_select(0, token_of)
    else:  # padding rows: zeros with scale 1 (finite; their outputs are never read)
        a = torch.zeros((rows, d), dtype=torch.uint8, device=x.device)
        a[row] = xq.view(torch.uint8).index_select(0, token_of)
        a = a.view(FP8_DTYPE)
        a_scale = torch.ones((rows,), dtype=torch.float32, device=x.device)
        a_scale[row] = xs.index_select(0, token_of)
    gu = mm(a, w13.transpose(1, 2), a_scale, w13_scale, offs=offs, out_dtype=out_dtype,
            use_fast_accum=fast_accum)  # (R, 2I)
    hq, hs = act_quant(gu)  # (R, I) e4m3, (R,)
    y = mm(hq, w2.transpose(1, 2), hs, w2_scale, offs=offs, out_dtype=out_dtype,
           use_fast_accum=fast_accum)  # (R, D)
    pos = torch.empty_like(row)
    pos[order] = row  # slot (t, j) at t*k + j -> its row of y
    combine = moe_combine if x.is_cuda or interpreting() else moe_combine_reference
    return combine(y, pos, topk_weights.float().contiguous(), out_dtype=x.dtype)
