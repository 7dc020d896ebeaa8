"""FP8 MoE for prefill-sized token counts, W8A8 per expert through torch._scaled_mm (opt-in).

The fused MoE (fused_moe.py) widens fp8 weights to bf16 in registers: ideal while
decode is bound by weight bytes, compute-bound past ~128 tokens (T=256: 0.93 TB/s).
Here activations are quantized per token to e4m3 as well, so each expert's two GEMMs
run fp8 x fp8 on the tensor cores through cuBLASLt with row-wise scales (per token
for activations, per output channel for weights):

1. x (T, D) -> e4m3 + per-token scale (one triton launch); slots (T*k) sorted by expert.
2. per expert e: gu = scaled_mm(xq[slots of e], w13[e]^T) -> (n_e, 2I) bf16, each
   expert's rows padded to a 16-row aligned segment (cuBLASLt fp8 needs it).
3. silu(gate) * up -> e4m3 + per-slot scale in one triton launch (`silu_mul_quant_fp8`).
4. per expert e: y = scaled_mm(hq[slots of e], w2[e]^T) -> (n_e, D) bf16.
5. out = sum_k topk_weight * y, in fp32, rounded once.

Needs the per-expert token counts on the host (one sync), so it is not for CUDA-graph
capture. The engine's default prefill path is now the fused kernel in W8A8 mode
(fused_moe.py, `moe_prefill_config`: 1101 against 1739 us at T=1024 on the H200); this
one runs with SLUICE_MOE_PREFILL=scaled_mm, for T >= PREFILL_MIN_TOKENS outside capture.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sluice.engine.kernels._common import FP8_DTYPE, check, interpreting
from sluice.engine.kernels.act_quant import per_token_quant_fp8, per_token_quant_reference

# Token count from which fp8 experts run W8A8 (triton, or this module's _scaled_mm loop).
# H200 2026-11-29: triton W8A8 385 us against W8A16's 577 at T=128, level at T=64 (379/388).
PREFILL_MIN_TOKENS = 128
ALIGN = 16  # rows per expert segment and its offset, for cuBLASLt fp8


@triton.jit
def _silu_mul_quant_kernel(
    gu_ptr, q_ptr, scale_ptr, I, stride_g, stride_q, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    g_row = gu_ptr + row * stride_g
    q_row = q_ptr + row * stride_q
    offs = tl.arange(0, BLOCK)
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, I, BLOCK):
        m = k0 + offs < I
        g = tl.load(g_row + k0 + offs, mask=m, other=0.0).to(tl.float32)
        u = tl.load(g_row + I + k0 + offs, mask=m, other=0.0).to(tl.float32)
        h = g * tl.sigmoid(g) * u
        amax = tl.maximum(amax, tl.abs(h))
    scale = tl.maximum(tl.max(amax, axis=0) / 448.0, 1e-12)
    tl.store(scale_ptr + row, scale)
    inv = 1.0 / scale
    for k0 in range(0, I, BLOCK):  # second pass re-reads the row from L2
        m = k0 + offs < I
        g = tl.load(g_row + k0 + offs, mask=m, other=0.0).to(tl.float32)
        u = tl.load(g_row + I + k0 + offs, mask=m, other=0.0).to(tl.float32)
        h = tl.minimum(tl.maximum(g * tl.sigmoid(g) * u * inv, -448.0), 448.0)
        tl.store(q_row + k0 + offs, h.to(q_ptr.dtype.element_ty), mask=m)


def silu_mul_quant_fp8(gu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gu (M, 2I) [gate | up] -> (e4m3 (M, I) of silu(gate) * up, fp32 per-row scale (M,))."""
    check(gu.dim() == 2 and gu.shape[1] % 2 == 0 and gu.stride(1) == 1, "gu must be (M, 2I), unit last stride")
    m, i = gu.shape[0], gu.shape[1] // 2
    cast_in_torch = interpreting()  # see act_quant: the interpreter's e4m3 cast mis-rounds
    q = torch.empty((m, i), dtype=torch.float32 if cast_in_torch else FP8_DTYPE, device=gu.device)
    scale = torch.empty((m,), dtype=torch.float32, device=gu.device)
    if m:
        block = min(2048, triton.next_power_of_2(max(i, 16)))
        _silu_mul_quant_kernel[(m,)](gu, q, scale, i, gu.stride(0), q.stride(0), BLOCK=block, num_warps=8)
    if cast_in_torch:
        q = q.to(FP8_DTYPE)
    return q, scale


def silu_mul_quant_reference(gu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    i = gu.shape[1] // 2
    g, u = gu.float()[:, :i], gu.float()[:, i:]
    return per_token_quant_reference(torch.nn.functional.silu(g) * u)


_OUT_OK = [True]  # whether torch._scaled_mm(out=...) works here; a copy otherwise


def _scaled_mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor) -> None:
    if _OUT_OK[0]:
        try:
            torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=out.dtype, out=out)
            return
        except RuntimeError:
            _OUT_OK[0] = False
    out.copy_(torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=out.dtype))


def fp8_moe_prefill(
    x: torch.Tensor,  # (T, D) bf16
    w13: torch.Tensor,  # (E, 2I, D) e4m3
    w13_scale: torch.Tensor,  # (E, 2I) fp32
    w2: torch.Tensor,  # (E, D, I) e4m3
    w2_scale: torch.Tensor,  # (E, D) fp32
    topk_weights: torch.Tensor,  # (T, k) fp32
    topk_ids: torch.Tensor,  # (T, k) int
) -> torch.Tensor:  # (T, D) in x's dtype
    """W8A8 MoE, one pair of torch._scaled_mm per expert with tokens (see module doc)."""
    t, d = x.shape
    e, two_i, _ = w13.shape
    k = topk_ids.shape[1]
    out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    if t == 0:
        return torch.empty_like(x)
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # slots sorted by expert
    counts = torch.bincount(flat, minlength=e).tolist()  # the one host sync
    token_of = order // k
    if x.is_cuda:
        xq, xs = per_token_quant_fp8(x.contiguous())
        act_quant = silu_mul_quant_fp8
    else:  # CPU: the torch references, same math
        xq, xs = per_token_quant_reference(x)
        act_quant = silu_mul_quant_reference
    # Each expert's rows start on a multiple of ALIGN and span a multiple of ALIGN rows
    # (cuBLASLt's fp8 row-wise path rejects other sizes/offsets: CUBLAS_STATUS_NOT_SUPPORTED
    # on the H100 with n=252). Padding rows are zero with scale 1; their outputs are dropped.
    nk = t * k
    spans, dest_start, src_start, pos = [], [], [], 0
    for ex, n in enumerate(counts):
        dest_start.append(pos)
        src_start.append(sum(counts[:ex]))
        if n:
            n_pad = -(-n // ALIGN) * ALIGN
            spans.append((ex, pos, pos + n_pad))
            pos += n_pad
    sorted_expert = flat[order].long()
    shift = torch.tensor([d_ - s_ for d_, s_ in zip(dest_start, src_start)], device=x.device)
    dest = torch.arange(nk, device=x.device) + shift[sorted_expert]  # padded row of each sorted slot
    xq_p = torch.zeros((pos, d), dtype=torch.uint8, device=x.device)
    xq_p[dest] = xq.view(torch.uint8)[token_of]
    xq_p = xq_p.view(FP8_DTYPE)
    xs_p = torch.ones((pos, 1), dtype=torch.float32, device=x.device)
    xs_p[dest, 0] = xs[token_of]
    gu = torch.empty((pos, two_i), dtype=out_dtype, device=x.device)
    for ex, a, b in spans:
        _scaled_mm_into(gu[a:b], xq_p[a:b], w13[ex].t(), xs_p[a:b], w13_scale[ex].view(1, -1))
    hq, hs = act_quant(gu)
    hs = hs.unsqueeze(1)
    y = torch.empty((pos, d), dtype=out_dtype, device=x.device)
    for ex, a, b in spans:
        _scaled_mm_into(y[a:b], hq[a:b], w2[ex].t(), hs[a:b], w2_scale[ex].view(1, -1))
    y = y[dest]  # (T*k, D) in expert-sorted slot order
    y_slot = torch.empty_like(y)
    y_slot[order] = y  # back to (token, k) order
    out = (y_slot.view(t, k, d).float() * topk_weights.float().unsqueeze(-1)).sum(dim=1)
    return out.to(x.dtype)


def fp8_moe_prefill_supported(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """cuBLASLt fp8 wants K and N multiples of 16."""
    return w13.shape[2] % 16 == 0 and w2.shape[2] % 16 == 0 and x.shape[1] % 16 == 0
