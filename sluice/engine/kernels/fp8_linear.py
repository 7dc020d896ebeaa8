"""Small-M FP8 linear: y = x @ (W_fp8 * w_scale)^T for decode-sized batches.

Legend: M tokens, N output features, K input features, S split-K slices.

At M <= 64 the product is bound by reading the fp8 weight (N*K bytes) once, and
cuBLAS fp8 reaches only ~43% of HBM bandwidth there. This kernel streams the weight
with wide tiles and enough programs to fill the chip:
- swap-AB: each program computes out^T tile = W[BLOCK_N, K] @ x^T[K, BLOCK_M], so the
  weight rows sit in the MMA's large dimension and the few tokens in the small one;
- optional split-K: each program covers K / S of the reduction and writes fp32
  partials that a tiny kernel sums (measured slower at Mixtral shapes: off by default);
- two activation modes: bf16/fp16 activations (weights widened in registers,
  "W8A16", no activation-quant launch; a bf16 x is rounded to fp16 in the kernel, so
  the dots run in fp16: e4m3 -> fp16 is one packed conversion on Hopper, -> bf16
  several) or fp8 activations with a per-token scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sluice.engine.kernels._common import FP8_DTYPE, check, check_tensor, dot_in_fp32

ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class SmallMConfig:
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 4


@triton.jit
def _fp8_linear_small_m_kernel(
    x_ptr, w_ptr, w_scale_ptr, x_scale_ptr, out_ptr,
    M, N, K, K_PER_SPLIT,
    stride_xm, stride_wn, stride_om, stride_os,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    A_FP8: tl.constexpr, DOT_F32: tl.constexpr, EVEN_K: tl.constexpr, PARTIAL: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    m_mask = offs_m < M
    # Clamp out-of-range weight rows instead of masking them: keeps the weight
    # loads unmasked (full-width) on the hot path; their results are never stored.
    rows_n = tl.where(n_mask, offs_n, 0)
    k0 = pid_s * K_PER_SPLIT
    w_ptrs = w_ptr + rows_n.to(tl.int64)[:, None] * stride_wn + (k0 + offs_k)[None, :]
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for kk in range(0, K_PER_SPLIT, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs, eviction_policy="evict_first")
            x = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
        else:
            k_mask = (k0 + kk + offs_k) < K
            w = tl.load(w_ptrs, mask=k_mask[None, :], other=0.0, eviction_policy="evict_first")
            x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if A_FP8:
            acc += tl.dot(w, tl.trans(x))
        elif DOT_F32 or x.dtype == tl.float32:
            acc += tl.dot(w.to(tl.float32), tl.trans(x.to(tl.float32)))
        else:  # 16-bit x: fp16 dots; x saturated to fp16's range rather than overflowing to inf
            xh = tl.minimum(tl.maximum(x.to(tl.float32), -65504.0), 65504.0).to(tl.float16)
            acc += tl.dot(w.to(tl.float16), tl.trans(xh))
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    acc = acc * tl.load(w_scale_ptr + rows_n)[:, None]
    if A_FP8:
        acc = acc * tl.load(x_scale_ptr + offs_m, mask=m_mask, other=0.0)[None, :]
    out_ptrs = out_ptr + pid_s * stride_os + offs_m[None, :] * stride_om + offs_n[:, None]
    mask = n_mask[:, None] & m_mask[None, :]
    if PARTIAL:
        tl.store(out_ptrs, acc, mask=mask)
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_splits_kernel(part_ptr, out_ptr, total, SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLITS):
        acc += tl.load(part_ptr + s * total + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def small_m_config(m: int, n: int, k: int) -> SmallMConfig:
    """Tiles measured on an H100 (docs/kernels.md, run 2): split-K lost to its extra
    reduce launch at both Mixtral shapes, so one K pass per program; wider n-tiles once
    M > 16 on wide outputs. Six stages at every K: at the attention projections (K 4096,
    N 6144 and 4096, M 1 and 16) they beat four by 6-11% on the H200 (bench.decode_sweep,
    2026-12-03: qkv 12.35 -> 11.66 us, o 11.45 -> 10.14 us at M=1)."""
    if m > 16 and n >= 8192:
        return SmallMConfig(block_n=128, block_k=256, split_k=1, num_warps=4, num_stages=3)
    return SmallMConfig(block_n=64, block_k=256, split_k=1, num_warps=4, num_stages=6)


def fp8_linear_small_m(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    x_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    config: SmallMConfig | None = None,
) -> torch.Tensor:
    """(M, K) activations @ (N, K) e4m3 weight with (N,) fp32 scales -> (M, N).

    x is bf16/fp16/fp32 (weights are widened in registers), or e4m3 with x_scale (M,)
    fp32 per-token scales. out_dtype defaults to x's dtype (bf16 for fp8 x).
    """
    check_tensor(weight, "weight", 2, (FP8_DTYPE,))
    check(weight.is_contiguous(), f"weight must be contiguous, strides {weight.stride()}")
    n, k = weight.shape
    check_tensor(x, "x", 2, ACT_DTYPES + (FP8_DTYPE,), device=weight.device)
    m = x.shape[0]
    check(x.shape[1] == k, f"x has {x.shape[1]} features, weight expects {k}")
    check_tensor(weight_scale, "weight_scale", 1, (torch.float32,), device=weight.device)
    check(weight_scale.shape[0] == n and weight_scale.is_contiguous(),
          f"weight_scale must be contiguous ({n},), got {tuple(weight_scale.shape)}")
    a_fp8 = x.dtype == FP8_DTYPE
    if a_fp8:
        check(x_scale is not None, "fp8 x needs x_scale (M,) float32")
        assert x_scale is not None
        check_tensor(x_scale, "x_scale", 1, (torch.float32,), device=weight.device)
        check(x_scale.shape[0] == m and x_scale.is_contiguous(),
              f"x_scale must be contiguous ({m},), got {tuple(x_scale.shape)}")
    else:
        check(x_scale is None, "x_scale is only taken with fp8 x")
    out_dtype = out_dtype or (torch.bfloat16 if a_fp8 else x.dtype)
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m == 0:
        return out
    cfg = config or small_m_config(m, n, k)
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    splits = triton.cdiv(k, k_per_split)
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    even_k = k % k_per_split == 0
    # Pipeline depth within shared memory (H100: 227 KiB per block): a bf16 x tile at
    # M=64 with 6 stages needed 272 KiB and failed to launch (check_gpu run 3).
    stage_bytes = (cfg.block_n + block_m * x.element_size()) * cfg.block_k
    num_stages = max(2, min(cfg.num_stages, (200 * 1024) // stage_bytes))
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, block_m), splits)
    partial = splits > 1
    target = torch.empty((splits, m, n), dtype=torch.float32, device=x.device) if partial else out
    _fp8_linear_small_m_kernel[grid](
        x, weight, weight_scale, x_scale if a_fp8 else weight_scale, target,
        m, n, k, k_per_split,
        x.stride(0), weight.stride(0), n, m * n,
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        A_FP8=a_fp8, DOT_F32=dot_in_fp32(), EVEN_K=even_k, PARTIAL=partial,
        num_warps=cfg.num_warps, num_stages=num_stages,
    )
    if partial:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(m * n, block),)](target, out, m * n, SPLITS=splits, BLOCK=block)
    return out


def fp8_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    x_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Plain torch: dequantize both operands to fp32 and multiply."""
    xf = x.float()
    if x_scale is not None:
        xf = xf * x_scale.float()[:, None]
    w = weight.float() * weight_scale.float()[:, None]
    out_dtype = out_dtype or (torch.bfloat16 if x.dtype == FP8_DTYPE else x.dtype)
    return (xf @ w.t()).to(out_dtype)
