"""FP8 (e4m3) quantization: Fp8Linear, Fp8FusedExperts and the `quantize_fp8` swap.

Weights: e4m3 with a float32 scale per output channel (per-tensor checkpoint scales
are broadcast to channels). Activations on CUDA: per-token dynamic e4m3 (or the
checkpoint's static input_scale) from one triton launch, then
- M <= SMALL_M tokens: the triton split-K small-M kernel (fp8 x fp8 tensor cores; with
  SLUICE_LINEAR_W8A16=1, 16-bit activations and no quant launch);
- larger M: torch._scaled_mm with row-wise scales.
On the CPU: dequantized weight, plain matmul (the reference path).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from sluice.engine.errors import ConfigError
from sluice.engine.kernels._common import FP8_DTYPE, FP8_MAX
from sluice.engine.kernels.act_quant import per_token_quant_fp8
from sluice.engine.kernels.fp8_linear import fp8_linear_small_m
from sluice.engine.kernels.fused_moe import MoeConfig, fused_moe, fused_moe_reference, moe_config, moe_prefill_config
from sluice.engine.kernels.moe_grouped import fp8_moe_grouped, grouped_mm_available
from sluice.engine.kernels.moe_prefill import PREFILL_MIN_TOKENS, fp8_moe_prefill, fp8_moe_prefill_supported
from sluice.engine.layers.moe import Experts

SMALL_M = 64
# Decode-sized batches (M <= SMALL_M) through the small-M kernel with 16-bit activations
# (W8A16: weights widened in registers, fp16 dots) instead of quantizing them per token
# first: one launch less per projection and no activation rounding. Off until timed on
# the H200 (bench.decode_sweep's linear section times both).
LINEAR_W8A16 = os.environ.get("SLUICE_LINEAR_W8A16", "0") == "1"
# Token count from which "auto" takes the CUTLASS grouped GEMM (moe_grouped.py) over the
# fused triton W8A8 kernel. H200 2026-12-03 (bench/moe_prefill.py, docs/kernels.md), us per
# layer grouped / triton: 1349/1193 at T=1024, 1411/1719 at 1536, 1997/2074 at 2048,
# 3500/3936 at 4096, 6141/7327 at 8192.
GROUPED_MIN_TOKENS = int(os.environ.get("SLUICE_MOE_GROUPED_MIN_TOKENS", 1536))


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., out, in] float -> (e4m3 same shape, float32 scale [..., out]).
    Stacked experts go one at a time: the fp32 temporaries of a whole Mixtral w13
    stack would take ~15 GB."""
    if w.dim() == 3:
        parts = [quantize_per_channel(x) for x in w]
        return torch.stack([q for q, _ in parts]), torch.stack([s for _, s in parts])
    amax = w.float().abs().amax(dim=-1).clamp(min=1e-12)
    scale = amax / FP8_MAX
    q = (w.float() / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def channel_scale(scale: torch.Tensor, out_features: int) -> torch.Tensor:
    """Checkpoint weight_scale (scalar, [1], [out] or [out, 1]) -> float32 [out]."""
    s = scale.float().reshape(-1)
    if s.numel() == 1:
        return s.expand(out_features).contiguous()
    if s.numel() != out_features:
        raise ValueError(f"weight_scale has {s.numel()} values for {out_features} output channels")
    return s.clone()  # its own storage: a view would keep its base alive through sleep()


class Fp8Linear(nn.Module):
    """Drop-in for nn.Linear with an e4m3 weight [out, in] and fp32 scale [out]."""

    def __init__(
        self,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None = None,
        input_scale: torch.Tensor | None = None,
        out_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        super().__init__()
        if weight.dtype != FP8_DTYPE or weight.dim() != 2:
            raise ValueError(f"Fp8Linear needs a 2-D {FP8_DTYPE} weight, got {weight.dtype} {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.out_dtype = out_dtype
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("weight_scale", channel_scale(weight_scale, self.out_features))
        self.register_buffer("input_scale", None if input_scale is None else input_scale.float().reshape(1))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(out_dtype), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fp8Linear:
        q, scale = quantize_per_channel(linear.weight.detach())
        return cls(q, scale, linear.bias, out_dtype=linear.weight.dtype)

    @classmethod
    def from_prequantized(
        cls,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        input_scale: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        out_dtype: torch.dtype = torch.bfloat16,
    ) -> Fp8Linear:
        """From a checkpoint's F8_E4M3 `weight`, `weight_scale` (scalar or [out, 1])
        and optional static `input_scale` (used on the large-M path)."""
        return cls(weight, weight_scale, bias, input_scale, out_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        if x2.is_cuda and LINEAR_W8A16 and x2.shape[0] <= SMALL_M:
            y = fp8_linear_small_m(x2, self.weight, self.weight_scale, out_dtype=self.out_dtype)
        elif x2.is_cuda:
            xq, xs = per_token_quant_fp8(x2, self.input_scale)  # (M, K) e4m3, (M,)
            if x2.shape[0] <= SMALL_M:
                y = fp8_linear_small_m(xq, self.weight, self.weight_scale, x_scale=xs,
                                       out_dtype=self.out_dtype)
            else:
                y = torch._scaled_mm(xq, self.weight.t(), scale_a=xs.view(-1, 1),
                                     scale_b=self.weight_scale.view(1, -1), out_dtype=self.out_dtype)
        else:
            w = self.weight.to(self.out_dtype) * self.weight_scale.to(self.out_dtype)[:, None]
            y = x2.to(self.out_dtype) @ w.t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8_e4m3"


PREFILL_KERNELS = ("auto", "triton", "grouped", "scaled_mm", "w8a16")


class Fp8FusedExperts(nn.Module):
    """Stacked e4m3 experts: w13 [E, 2I, D] (w1 rows, then w3), w2 [E, D, I], with
    fp32 per-channel scales [E, 2I] / [E, D]. Call as (x (T, D), topk_weights (T, k)
    fp32, topk_ids (T, k)) -> (T, D). On CUDA: the triton fused MoE, W8A16 for decode
    sizes, W8A8 (fp8 x fp8 dots) for T >= ``prefill_min_tokens``. SLUICE_MOE_PREFILL
    picks the prefill path: "auto" (default: the CUTLASS grouped GEMM from
    ``grouped_min_tokens`` where torch has it on a Hopper GPU, the triton W8A8 kernel
    below that), "triton" (triton W8A8 at every prefill size), "grouped" (grouped GEMM
    at every prefill size), "scaled_mm" (one torch._scaled_mm pair per expert,
    moe_prefill.py; not under graph capture) or "w8a16" (16-bit activations at every
    size: less error, 2.8x the prefill MoE time at T=1024 on the H200). On the CPU: the
    fp32 reference loop."""

    prefill_min_tokens = PREFILL_MIN_TOKENS
    grouped_min_tokens = GROUPED_MIN_TOKENS
    prefill_kernel = os.environ.get("SLUICE_MOE_PREFILL", "auto")

    def __init__(self, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor,
                 w2_scale: torch.Tensor) -> None:
        super().__init__()
        if self.prefill_kernel not in PREFILL_KERNELS:
            raise ConfigError(f"SLUICE_MOE_PREFILL={self.prefill_kernel!r}: use one of {', '.join(PREFILL_KERNELS)}")
        e, two_i, d = w13.shape
        if w13.dtype != FP8_DTYPE or w2.dtype != FP8_DTYPE or tuple(w2.shape) != (e, d, two_i // 2):
            raise ValueError(f"need e4m3 w13 [E, 2I, D] and w2 [E, D, I], got {w13.dtype} "
                             f"{tuple(w13.shape)} and {w2.dtype} {tuple(w2.shape)}")
        self.register_buffer("w13", w13.contiguous())
        self.register_buffer("w13_scale", self._expert_scale(w13_scale, e, two_i))
        self.register_buffer("w2", w2.contiguous())
        self.register_buffer("w2_scale", self._expert_scale(w2_scale, e, d))

    @staticmethod
    def _expert_scale(scale: torch.Tensor, experts: int, rows: int) -> torch.Tensor:
        """Accepts per-channel [E, rows] (or [E, rows, 1]) and per-tensor [E] / [E, 1] scales."""
        s = scale.float().reshape(experts, -1)
        if s.shape[1] == 1:
            s = s.expand(experts, rows)
        if s.shape[1] != rows:
            raise ValueError(f"expert scale {tuple(scale.shape)} does not fit [{experts}, {rows}]")
        return s.clone()  # its own storage (see channel_scale)

    @classmethod
    def from_weights(cls, w13: torch.Tensor, w2: torch.Tensor) -> Fp8FusedExperts:
        """Quantize bf16/fp32 stacked experts per output channel."""
        q13, s13 = quantize_per_channel(w13.detach())
        q2, s2 = quantize_per_channel(w2.detach())
        return cls(q13, s13, q2, s2)

    @classmethod
    def from_prequantized(cls, w1: list[torch.Tensor], w1_scale: list[torch.Tensor],
                          w3: list[torch.Tensor], w3_scale: list[torch.Tensor],
                          w2: list[torch.Tensor], w2_scale: list[torch.Tensor],
                          device: torch.device | str | None = None) -> Fp8FusedExperts:
        """From per-expert checkpoint tensors (F8_E4M3 weights, scalar or [out, 1] scales),
        stacked straight into tensors on ``device`` (default: where the parts are)."""
        i, d = w1[0].shape
        device = torch.device(device) if device is not None else w1[0].device
        s1 = torch.stack([channel_scale(s, i) for s in w1_scale])
        s3 = torch.stack([channel_scale(s, i) for s in w3_scale])
        s2 = torch.stack([channel_scale(s, d) for s in w2_scale])
        e = len(w1)
        w13 = torch.empty((e, 2 * i, d), dtype=w1[0].dtype, device=device)
        w2s = torch.empty((e, d, i), dtype=w2[0].dtype, device=device)
        for x in range(e):  # each part copied once (asynchronously when it is page-locked)
            w13[x, :i].copy_(w1[x], non_blocking=True)
            w13[x, i:].copy_(w3[x], non_blocking=True)
            w2s[x].copy_(w2[x], non_blocking=True)
        return cls(w13, torch.cat([s1, s3], dim=1).to(device), w2s, s2.to(device))

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                align: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                reduce: bool = True) -> torch.Tensor:
        """(T, D). Fused paths only (see fused_block_m): align, the slots already aligned for
        fused_block_m(x); reduce=False, the (T, k, D) per-slot outputs."""
        args = (x.contiguous(), self.w13, self.w13_scale, self.w2, self.w2_scale,
                topk_weights.float().contiguous(), topk_ids.contiguous())
        path = self._cuda_path(x)
        if path in ("w8a16", "w8a8"):
            return fused_moe(*args, config=self._fused_config(x.shape[0], path), align=align, reduce=reduce)
        if not reduce or align is not None:
            raise ValueError("align and reduce=False are for the fused paths (see fused_block_m)")
        if path is None:
            return fused_moe_reference(*args)
        return fp8_moe_prefill(*args) if path == "scaled_mm" else fp8_moe_grouped(*args)

    def fused_block_m(self, x: torch.Tensor) -> int | None:
        """The fused triton MoE's block_m for x, or None where x takes another path."""
        path = self._cuda_path(x)
        return self._fused_config(x.shape[0], path).block_m if path in ("w8a16", "w8a8") else None

    def _cuda_path(self, x: torch.Tensor) -> str | None:
        """``path`` for x on its device (None on the CPU: the fp32 reference loop)."""
        if not x.is_cuda:
            return None
        return self.path(x.shape[0], torch.cuda.is_current_stream_capturing(),
                         fp8_moe_prefill_supported(x, self.w13, self.w2), grouped_mm_available(x.device))

    @staticmethod
    def _fused_config(num_tokens: int, path: str) -> MoeConfig:
        return moe_prefill_config(num_tokens) if path == "w8a8" else moe_config(num_tokens)

    def graph_max_tokens(self) -> int | None:
        """Every path but "scaled_mm" (a host sync per expert) is graph-safe as chosen."""
        return self.prefill_min_tokens - 1 if self.prefill_kernel == "scaled_mm" else None

    def path(self, num_tokens: int, capturing: bool = False, scaled_mm_ok: bool = True,
             grouped_ok: bool = False) -> str:
        """Which CUDA kernel a batch of ``num_tokens`` takes: "w8a16" (fused, 16-bit
        activations), "w8a8" (fused, e4m3 activations), "grouped" (CUTLASS grouped GEMM,
        no host sync, so also under capture) or "scaled_mm" (per expert)."""
        if num_tokens < self.prefill_min_tokens or self.prefill_kernel == "w8a16":
            return "w8a16"
        if self.prefill_kernel == "scaled_mm" and not capturing and scaled_mm_ok:
            return "scaled_mm"
        if grouped_ok and scaled_mm_ok and (
                self.prefill_kernel == "grouped"
                or (self.prefill_kernel == "auto" and num_tokens >= self.grouped_min_tokens)):
            return "grouped"
        return "w8a8"


def _is_router(parent: nn.Module, child_name: str) -> bool:
    cls = type(parent).__name__.lower()
    return child_name == "gate" and ("moe" in cls or "sparsemoe" in cls)


def _swap_experts(module: nn.Module) -> bool:
    """A 16-bit ``Experts`` child of ``module`` becomes an Fp8FusedExperts (a module swap;
    the 16-bit stacks go with the old submodule)."""
    experts = getattr(module, "experts", None)
    if not isinstance(experts, Experts):
        return False
    install_fp8_experts(module, Fp8FusedExperts.from_weights(experts.w13, experts.w2))
    return True


def install_fp8_experts(module: nn.Module, fp8: Fp8FusedExperts) -> None:
    """Make ``fp8`` the ``experts`` submodule of MoE block ``module``."""
    module.experts = fp8


def quantize_fp8(model: nn.Module) -> nn.Module:
    """Swap every nn.Linear (except MoE routers `*.gate` and `lm_head`) for Fp8Linear and
    every stacked ``Experts`` for Fp8FusedExperts, in place. Returns the model."""
    for name, parent in list(model.named_modules()):
        _swap_experts(parent)
        for child_name, child in list(parent.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if not isinstance(child, nn.Linear):
                continue
            if full == "lm_head" or full.endswith(".lm_head") or _is_router(parent, child_name):
                continue
            setattr(parent, child_name, Fp8Linear.from_linear(child))
    return model
