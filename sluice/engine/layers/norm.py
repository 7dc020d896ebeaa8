"""RMSNorm, computed in fp32 like the reference implementation."""

from __future__ import annotations

import torch
from torch import nn

from sluice.engine.layers import fusion


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused(x) and x.dim() == 2:
            from sluice.engine.kernels.fused_small import fused_add_rmsnorm

            return fused_add_rmsnorm(x, None, self.weight, self.eps)[0]
        dtype = x.dtype
        h = x.float()  # (N, D)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def forward_residual(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the residual (N, D), then normalise: returns (normed, new residual), both (N, D).
        x is (N, D), or the MoE's (N, K, D) per-slot outputs (MoE.forward on the fused
        path), summed over K first: in the same launch on the fused path, else by torch."""
        n, d = x.shape[0], x.shape[-1]
        if self._fused(x) and residual.shape == (n, d) and residual.dtype == x.dtype:
            from sluice.engine.kernels.fused_small import fused_add_rmsnorm

            return fused_add_rmsnorm(x.contiguous(), residual.contiguous(), self.weight, self.eps)
        if x.dim() == 3:
            x = x.sum(1)  # 16-bit: accumulated in fp32, rounded once (as the fused kernel does)
        residual = x + residual
        return self.forward(residual), residual

    def _fused(self, x: torch.Tensor) -> bool:
        return fusion.use_fused(x) and x.dim() in (2, 3) and self.weight.dtype == x.dtype
