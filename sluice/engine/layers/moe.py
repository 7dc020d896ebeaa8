"""Mixtral's sparse MoE block.

Expert weights are stacked per layer in the ``experts`` submodule: w13 (E, 2I, D) with
w1 (gate) rows first, then w3 (up); w2 (E, D, I). All expert math goes through it, so
quantization replaces that one submodule (a module swap; this file stays untouched).

An experts submodule is called as (x (N, D), topk_weights (N, K) fp32, topk_ids (N, K))
-> (N, D). One that runs the fused triton MoE (Experts, quant/fp8.py's Fp8FusedExperts)
also has ``fused_block_m(x)``: the block_m of the fused kernel it will run for x, None
when x takes another path. On that path it takes ``align=`` (the slots already aligned
for that block_m by the one-launch router) and ``reduce=False`` (returns the (N, K, D)
per-slot outputs). MoE.forward alone decides when that happens (see there); everything
else (tensor/expert parallel experts, prefill paths, the CPU) keeps to (N, D).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sluice.engine.layers import fusion
from sluice.engine.layers.linear import Linear

Alignment = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # fused_moe's (sorted_ids, expert_ids, num_post)

# 16-bit experts: the triton fused MoE up to here, per-expert cuBLAS past it. H200
# 2026-11-29 (check_gpu moe_prefill): fused 961/881/1351 us against cuBLAS 2305/1750/1389
# at T=128/256/384; cuBLAS ahead from T=512 (1355 against 1617).
FUSED_MAX_TOKENS = 384
# The fused decode path (MoE.forward) up to here: the decode graphs' sizes. The one-launch
# router's last program walks every token alone, so larger batches take cuBLAS +
# router_topk, and prefill-sized MoE outputs stay (N, D) for whoever reads them.
FUSED_DECODE_MAX_TOKENS = 64


class Experts(nn.Module):
    """The E expert MLPs of one MoE block, stacked: w13 (E, 2I, D), w2 (E, D, I).
    Called as (x (N, D), topk_weights (N, K) fp32, topk_ids (N, K)) -> (N, D). A quantizer
    replaces the whole submodule (quant/fp8.py: Fp8FusedExperts), gpt-fast style."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size), requires_grad=False)

    def graph_max_tokens(self) -> int | None:
        """The most tokens a CUDA graph may capture these experts at (None: no limit). Under
        capture they take the fused kernel; past FUSED_MAX_TOKENS eager 16-bit experts
        take per-expert cuBLAS instead, so larger graphs would change the kernel."""
        return FUSED_MAX_TOKENS

    def fused_block_m(self, x: torch.Tensor) -> int | None:
        """The fused triton MoE's block_m for x, or None where x takes per-expert cuBLAS / the CPU."""
        if not x.is_cuda or (x.shape[0] > FUSED_MAX_TOKENS and not torch.cuda.is_current_stream_capturing()):
            return None
        from sluice.engine.kernels.fused_moe import moe_config  # triton: imported only on CUDA

        return moe_config(x.shape[0]).block_m

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                align: Alignment | None = None, reduce: bool = True) -> torch.Tensor:
        """sum_k w_k * w2(silu(w1 x) * w3 x) over each token's chosen experts: (N, D);
        reduce=False (fused path only): the (N, K, D) terms of that sum. align (fused path
        only): the slots already aligned for fused_block_m(x) (fused_moe's ``align``).

        CUDA, decode-sized batches (and always under graph capture): the triton fused MoE,
        which reads only the routed experts and never syncs with the host. Larger
        batches (prefill) and the CPU: one cuBLAS/CPU matmul pair per expert."""
        if self.fused_block_m(x) is not None:
            from sluice.engine.kernels.fused_moe import fused_moe

            return fused_moe(x.contiguous(), self.w13, None, self.w2, None,
                             topk_weights.float().contiguous(), topk_ids.contiguous(), align=align, reduce=reduce)
        if not reduce or align is not None:
            raise ValueError("align and reduce=False are for the fused path (see fused_block_m)")
        out = torch.zeros_like(x)
        flat_ids = topk_ids.flatten()  # (N*K,)
        order = flat_ids.argsort(stable=True)
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()
        token_of = order // self.top_k  # (N*K,) token index of each sorted slot
        weight_of = topk_weights.flatten()[order]
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            tokens = token_of[start:start + n]
            h = self._expert(x[tokens], e) * weight_of[start:start + n, None]  # (n, D) fp32
            out.index_add_(0, tokens, h.to(x.dtype))
            start += n
        return out

    def _expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        gate, up = F.linear(x, self.w13[e]).chunk(2, dim=-1)  # (n, I) each
        return F.linear(F.silu(gate) * up, self.w2[e])  # (n, D)


class MoE(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.intermediate_size = num_experts, top_k, intermediate_size
        self.gate = Linear(hidden_size, num_experts)  # the router, stays high precision
        self.experts: nn.Module = Experts(hidden_size, intermediate_size, num_experts, top_k)
        # the one-launch router's arrival counter (kernels/moe_route.py); zero between launches
        self.register_buffer("route_counter", torch.zeros(1, dtype=torch.int32), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, D) -> (N, D); or, on the fused decode path (SLUICE_FUSED on, N <=
        FUSED_DECODE_MAX_TOKENS, experts running the fused triton MoE), the (N, K, D)
        routed-weighted outputs of each token's K experts, unsummed: the next
        RMSNorm.forward_residual sums them in its own launch, saving one. Whoever else
        takes this output sums it over dim 1 (``reduced``). On that path the one-launch
        router also aligns the slots for the fused MoE, which then runs its GEMMs alone."""
        block_m = self._fused_block_m(x)  # the one place that decides: None keeps (N, D)
        topk_weights, topk_ids, align = self._route(x, block_m)
        if block_m is None:
            return self.experts(x, topk_weights, topk_ids)
        return self.experts(x, topk_weights, topk_ids, align=align, reduce=False)

    def fused_partials(self, x: torch.Tensor) -> bool:
        """Whether forward(x) returns the (N, K, D) per-slot outputs."""
        return self._fused_block_m(x) is not None

    @staticmethod
    def reduced(y: torch.Tensor) -> torch.Tensor:
        """forward's output as (N, D) either way."""
        return y.sum(1) if y.dim() == 3 else y

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax in fp32 over all experts, keep top-k, renormalise: (N, K) fp32, (N, K) int64
        (int32 from the fused triton kernels on CUDA)."""
        return self._route(x, None)[:2]

    def _fused_block_m(self, x: torch.Tensor) -> int | None:
        """The fused MoE's block_m where x takes the fused decode path, else None."""
        fused_block_m = getattr(self.experts, "fused_block_m", None)  # absent: (N, D) experts only
        if fused_block_m is None or not self._fused_router(x):
            return None
        return fused_block_m(x)

    def _route(self, x: torch.Tensor, block_m: int | None) -> tuple[torch.Tensor, torch.Tensor, Alignment | None]:
        """route(x), plus the fused MoE's slot alignment for ``block_m`` where the
        one-launch router computes it (None: the MoE aligns for itself)."""
        if self._fused_router(x):
            from sluice.engine.kernels.moe_route import route  # gate GEMM + top-k + alignment, one launch

            return route(x.contiguous(), self.gate.weight, self.top_k, self.route_counter, block_m)
        if fusion.use_fused(x):
            from sluice.engine.kernels.fused_small import router_topk

            return (*router_topk(self.gate(x), self.top_k), None)
        probs = F.softmax(self.gate(x).float(), dim=-1)  # (N, E)
        topk_weights, topk_ids = torch.topk(probs, self.top_k, dim=-1)
        return topk_weights / topk_weights.sum(dim=-1, keepdim=True), topk_ids, None

    def _fused_router(self, x: torch.Tensor) -> bool:
        return (fusion.use_fused(x) and x.dim() == 2 and x.shape[0] <= FUSED_DECODE_MAX_TOKENS
                and self.gate.weight.dtype == x.dtype and self.gate.bias is None)
