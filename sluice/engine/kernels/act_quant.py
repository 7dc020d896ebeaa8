"""Per-token dynamic FP8 (e4m3) activation quantization in one launch.

x (M, K) -> x_q (M, K) e4m3, scale (M,) fp32 with x ~= x_q * scale[:, None];
scale = absmax(row) / 448, or a given static scale (checkpoint input_scale).
One program per row: the row is read twice (absmax pass, then quantize pass), the
second time from L1/L2, so HBM sees K*2 bytes in and K bytes out per row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sluice.engine.kernels._common import FP8_DTYPE, FP8_MAX, check, check_tensor, interpreting

ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _per_token_quant_kernel(
    x_ptr, q_ptr, scale_ptr, static_scale_ptr, K, stride_xm, stride_qm,
    STATIC: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    q_row = q_ptr + row.to(tl.int64) * stride_qm
    offs = tl.arange(0, BLOCK_K)
    if STATIC:
        scale = tl.load(static_scale_ptr)
    else:
        amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.maximum(tl.max(amax, axis=0) / 448.0, 1e-12)
    tl.store(scale_ptr + row, scale)
    inv = 1.0 / scale
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        y = tl.minimum(tl.maximum(x * inv, -448.0), 448.0)
        tl.store(q_row + k0 + offs, y.to(q_ptr.dtype.element_ty), mask=k0 + offs < K)


def per_token_quant_fp8(
    x: torch.Tensor, static_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) bf16/fp16/fp32 -> (e4m3 (M, K), fp32 scale (M,)).

    Under the triton interpreter the kernel writes the scaled, clamped fp32 values and
    torch rounds them to e4m3: the interpreter's own fp32->e4m3 cast (triton 3.9, CPU)
    mis-rounds values whose rounding carries into the exponent (-125.5 -> -64).
    """
    check_tensor(x, "x", 2, ACT_DTYPES)
    m, k = x.shape
    if static_scale is not None:
        check(static_scale.numel() == 1 and static_scale.dtype == torch.float32,
              f"static_scale must be one float32 value, got {static_scale.dtype} {tuple(static_scale.shape)}")
        check(static_scale.device == x.device, f"static_scale is on {static_scale.device}, x on {x.device}")
    cast_in_torch = interpreting()
    q = torch.empty((m, k), dtype=torch.float32 if cast_in_torch else FP8_DTYPE, device=x.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m > 0:
        block_k = min(4096, triton.next_power_of_2(max(k, 16)))
        _per_token_quant_kernel[(m,)](
            x, q, scale, static_scale if static_scale is not None else scale, k, x.stride(0), q.stride(0),
            STATIC=static_scale is not None, BLOCK_K=block_k, num_warps=4 if block_k <= 2048 else 8,
        )
    if cast_in_torch:
        q = q.to(FP8_DTYPE)
    return q, scale


def per_token_quant_reference(
    x: torch.Tensor, static_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    if static_scale is not None:
        scale = static_scale.float().reshape(1).expand(x.shape[0]).contiguous()
    else:
        scale = (x.float().abs().amax(dim=-1) / FP8_MAX).clamp(min=1e-12)
    q = (x.float() * (1.0 / scale)[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale
