"""Fused MoE experts with FP8 (e4m3) weights and bf16 activations.

Legend: T tokens, k experts per token, E experts, D hidden, I intermediate,
P padded slot count (upper bound, fixed for a given T), BM block of slots.

Pipeline, three kernels and one sum, no host sync (CUDA-graph safe):
1. `moe_align_block_size`: one triton program counts tokens per expert, pads each
   expert's run to a multiple of BM and scatters the flat (token, slot) ids into
   `sorted_ids` (P,) sorted by expert, with `expert_ids` per BM-block and the padded
   total as a device scalar. P = T*k + min(T*k, E)*(BM-1) is known from shapes.
2. `_moe_gemm_kernel` (GATED): h = silu(x W1^T) * (x W3^T) for each slot, w1 and w3
   rows of the stacked w13 read in the same program, per-channel scales applied.
3. `_moe_gemm_kernel` (not GATED): y_slot = (h W2^T) * scale * routed weight.
4. out = y_slot.view(T, k, D).sum(1); with `reduce=False` the (T, k, D) partials are
   returned instead, for a consumer to sum in a launch it makes anyway (the next
   residual add + RMSNorm: fused_small.fused_add_rmsnorm).
Step 1 can come precomputed (`align=`): the fused router (kernels/moe_route.py) does it
in its own launch, so decode runs the two GEMMs alone.
The fp8 weights are widened in registers (W8A16): decode is bound by weight bytes, and
the activations keep 16-bit precision. The dots run in fp16 (e4m3 -> fp16 is one packed
conversion on Hopper, -> bf16 several): x is converted in the kernel, h is written in
fp16 saturated to +-65504; the output is in x's dtype.

Prefill-sized T (`moe_prefill_config`, `MoeConfig.act_fp8`): the MoE turns compute-bound,
so the same two kernels run W8A8 instead. x is quantized per token and h per slot to e4m3
(one triton pass each), the dots run fp8 x fp8 (twice the 16-bit MMA rate on Hopper) and
the activation scales join the weight scales in the epilogue. Programs are grouped
(`group_m`) so each weight tile is fetched once per group of token blocks. Still no
host sync, so it also serves under graph capture.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sluice.engine.kernels._common import FP8_DTYPE, check, check_tensor, dot_in_fp32
from sluice.engine.kernels.act_quant import per_token_quant_fp8

ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class MoeConfig:
    block_m: int
    block_n: int  # n-tile of GEMM1 (over I)
    block_k: int
    block_n2: int  # n-tile of GEMM2 (over D)
    block_k2: int
    num_warps: int = 4
    num_stages: int = 4
    # fp8 experts only: the dots in fp16 (e4m3 -> fp16 is one packed conversion on
    # Hopper, -> bf16 several). 0: bf16 dots; 1: activations converted in the kernel;
    # 2: x converted (clamped to the fp16 range) before the kernel. h is written in fp16
    # (clamped) whenever this is on.
    dot_f16: int = 0
    # fp8 experts only: W8A8. Activations quantized per row to e4m3 (x per token before
    # GEMM1, h per slot between the GEMMs) and the dots run fp8 x fp8 on the tensor
    # cores: twice the bf16/fp16 MMA rate, for prefill-sized T where the MoE is
    # compute-bound. Overrides dot_f16. Adds the activations' quantization error.
    act_fp8: bool = False
    # Programs are ordered in groups of `group_m` token blocks that sweep the N tiles
    # together, so a weight tile is fetched from HBM once for the whole group (L2)
    # rather than once per token block. 1: N tiles fastest (decode: one token block).
    group_m: int = 1
    # swap-AB: each program computes its output tile transposed, W[BLOCK_N, K] @ x^T, so
    # the weight rows fill the MMA's large dimension (Hopper's wgmma needs 64) and the
    # few slots of an expert the small one; for decode, where a token block is mostly
    # padding and the weights are the traffic.
    swap_ab: bool = False


DOT_F16 = int(os.environ.get("SLUICE_MOE_DOT_F16", "1"))  # MoeConfig.dot_f16 of the default tiles


# A tile table from a sweep (bench.decode_sweep writes OUT/moe_tiles.json) replaces the
# built-in decode tiles below for the token counts it covers.
TILES_ENV = "SLUICE_MOE_TILES"


@functools.cache
def load_tiles(path: str) -> tuple[tuple[int, MoeConfig], ...]:
    """((max_tokens, config), ...) ascending, from a JSON file
    ``{"decode": [{"max_tokens": 2, "config": {MoeConfig fields}}, ...]}``; ValueError
    naming the file for anything else."""
    try:
        with open(path) as f:
            rows = json.load(f)["decode"]
        table = sorted((int(r["max_tokens"]), MoeConfig(**r["config"])) for r in rows)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{TILES_ENV}={path}: not a MoE tile table ({type(exc).__name__}: {exc})") from exc
    for _, c in table:
        check(all(v > 0 and v & (v - 1) == 0 for v in (c.block_m, c.block_n, c.block_k, c.block_n2, c.block_k2)),
              f"{TILES_ENV}={path}: block sizes must be powers of two, got {c}")
    return tuple(table)


def moe_config(num_tokens: int) -> MoeConfig:
    """Tiles by token count (measured on an H200, docs/kernels.md): tiny BM while decode
    is weight-bound, larger BM once experts see enough tokens for the MMA to matter;
    fp16 dots throughout (20-30% faster than bf16 ones at every size, same error).
    $SLUICE_MOE_TILES, a swept table (load_tiles), takes the token counts it covers."""
    tiles = os.environ.get(TILES_ENV)
    if tiles:
        for max_tokens, cfg in load_tiles(tiles):
            if num_tokens <= max_tokens:
                return cfg
    # Pipeline depth and GEMM2's n-tile per decode size: bench.decode_sweep's coordinate
    # descent on the H200 (2026-12-03, alignment given, unsummed output): T=1 98.6 us at 5
    # stages against 101.4 at 6; T=8 297.9 at 4 against 321.2; T=32 336.0 at 5 stages with
    # 128-wide GEMM2 tiles against 355.3. T=64 kept its tiles (the alternatives were within
    # the run's +-3% noise).
    if num_tokens <= 2:
        return MoeConfig(block_m=16, block_n=64, block_k=128, block_n2=32, block_k2=256, num_stages=5,
                         dot_f16=DOT_F16)
    if num_tokens <= 16:
        return MoeConfig(block_m=16, block_n=64, block_k=128, block_n2=32, block_k2=256, num_stages=4,
                         dot_f16=DOT_F16)
    if num_tokens <= 32:
        return MoeConfig(block_m=16, block_n=64, block_k=128, block_n2=128, block_k2=256, num_stages=5,
                         dot_f16=DOT_F16)
    if num_tokens <= 128:
        return MoeConfig(block_m=32, block_n=64, block_k=128, block_n2=64, block_k2=128, dot_f16=DOT_F16)
    return MoeConfig(block_m=64, block_n=128, block_k=64, block_n2=128, block_k2=64,
                     num_warps=8, num_stages=3, dot_f16=DOT_F16)


def moe_prefill_config(num_tokens: int) -> MoeConfig:
    """W8A8 tiles for prefill-sized token counts, fp8 experts only (H200 sweep 2026-11-29,
    docs/kernels.md: at T=1024 the 128-row tiles run 1107 us, 652 TFLOP/s)."""
    if num_tokens <= 512:
        return MoeConfig(block_m=64, block_n=128, block_k=128, block_n2=128, block_k2=128,
                         num_warps=4, num_stages=4, act_fp8=True, group_m=16)
    return MoeConfig(block_m=128, block_n=128, block_k=128, block_n2=128, block_k2=128,
                     num_warps=8, num_stages=4, act_fp8=True, group_m=8)


@triton.jit
def align_slots(
    topk_ids_ptr, sorted_ids_ptr, expert_ids_ptr, num_post_ptr,
    numel, max_padded, max_blocks,
    E: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr,
):
    """The body of the alignment, run by one program (here, and at the end of the fused
    router's launch, moe_route.py)."""
    offs_e = tl.arange(0, BLOCK_E)
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for c0 in range(0, numel, CHUNK):
        offs = c0 + tl.arange(0, CHUNK)
        ids = tl.load(topk_ids_ptr + offs, mask=offs < numel, other=-1).to(tl.int32)
        onehot = ((ids[:, None] == offs_e[None, :]) & (offs_e[None, :] < E)).to(tl.int32)
        counts += tl.sum(onehot, axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    total = tl.sum(padded, axis=0)
    tl.store(num_post_ptr, total)
    # Scatter: slot i of expert e goes to starts[e] + (number of earlier slots of e).
    running = starts
    for c0 in range(0, numel, CHUNK):
        offs = c0 + tl.arange(0, CHUNK)
        ids = tl.load(topk_ids_ptr + offs, mask=offs < numel, other=-1).to(tl.int32)
        onehot = ((ids[:, None] == offs_e[None, :]) & (offs_e[None, :] < E)).to(tl.int32)
        rank = tl.sum((tl.cumsum(onehot, axis=0) - 1 + running[None, :]) * onehot, axis=1)
        tl.store(sorted_ids_ptr + rank, offs, mask=tl.sum(onehot, axis=1) > 0)
        running += tl.sum(onehot, axis=0)
    # Padding slots (disjoint from the scattered ones) get the sentinel `numel`.
    for p0 in range(0, max_padded, CHUNK):
        p = p0 + tl.arange(0, CHUNK)
        rel = p[:, None] - starts[None, :]
        used = tl.sum(((rel >= 0) & (rel < counts[None, :])).to(tl.int32), axis=1) > 0
        tl.store(sorted_ids_ptr + p, numel + tl.zeros_like(p), mask=(p < max_padded) & (~used))
    for b0 in range(0, max_blocks, CHUNK):
        b = b0 + tl.arange(0, CHUNK)
        first = b * BLOCK_M
        expert = tl.sum((first[:, None] >= ends[None, :]).to(tl.int32), axis=1)
        expert = tl.where(first < total, expert, -1)
        tl.store(expert_ids_ptr + b, expert, mask=b < max_blocks)


# Token-count arguments are not specialised (triton would compile a variant per
# "divisible by 16" / "equal to 1" combination of them, i.e. new JITs mid-serving as
# batch sizes vary); nothing in the kernels gains from knowing them.
@triton.jit(do_not_specialize=["numel", "max_padded", "max_blocks"])
def _moe_align_kernel(
    topk_ids_ptr, sorted_ids_ptr, expert_ids_ptr, num_post_ptr,
    numel, max_padded, max_blocks,
    E: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr,
):
    align_slots(topk_ids_ptr, sorted_ids_ptr, expert_ids_ptr, num_post_ptr, numel, max_padded, max_blocks,
                E, BLOCK_E, BLOCK_M, CHUNK)


def _align_sizes(numel: int, num_experts: int, block_m: int) -> tuple[int, int]:
    """(P, P / BM): the lengths of sorted_ids and expert_ids for ``numel`` slots."""
    max_padded = numel + min(numel, num_experts) * (block_m - 1)
    max_blocks = triton.cdiv(max_padded, block_m)
    return max_blocks * block_m, max_blocks


def moe_align_block_size(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(T, k) expert ids -> sorted_ids (P,) int32, expert_ids (P/BM,) int32 (-1 past
    the end), num_post_padded (1,) int32; all on topk_ids' device, no host sync."""
    check_tensor(topk_ids, "topk_ids", 2, (torch.int32, torch.int64))
    check(topk_ids.is_contiguous(), "topk_ids must be contiguous")
    numel = topk_ids.numel()
    padded, max_blocks = _align_sizes(numel, num_experts, block_m)
    dev = topk_ids.device
    sorted_ids = torch.empty(padded, dtype=torch.int32, device=dev)
    expert_ids = torch.empty(max_blocks, dtype=torch.int32, device=dev)
    num_post = torch.empty(1, dtype=torch.int32, device=dev)
    block_e = triton.next_power_of_2(num_experts)
    _moe_align_kernel[(1,)](
        topk_ids, sorted_ids, expert_ids, num_post, numel, padded, max_blocks,
        E=num_experts, BLOCK_E=block_e, BLOCK_M=block_m, CHUNK=align_chunk(numel, block_e),
    )
    return sorted_ids, expert_ids, num_post


def align_chunk(numel: int, block_e: int) -> int:
    """align_slots' CHUNK: all slots at once while a (CHUNK, BLOCK_E) one-hot tile is small."""
    return max(16, min(triton.next_power_of_2(max(numel, 1)), 8192 // block_e))


def check_align(align: tuple[torch.Tensor, torch.Tensor, torch.Tensor], numel: int, num_experts: int,
                block_m: int, device: torch.device) -> None:
    """Raise ValueError unless ``align`` is moe_align_block_size's output for ``numel`` slots,
    ``num_experts`` and ``block_m`` (the sizes pin block_m: P = blocks * BM)."""
    check(isinstance(align, tuple) and len(align) == 3, "align must be (sorted_ids, expert_ids, num_post)")
    padded, max_blocks = _align_sizes(numel, num_experts, block_m)
    for a, name, size in zip(align, ("sorted_ids", "expert_ids", "num_post"), (padded, max_blocks, 1)):
        check_tensor(a, name, 1, (torch.int32,), device=device)
        check(a.numel() == size, f"align's {name} has {a.numel()} entries; {numel} slots of {num_experts} "
                                 f"experts in blocks of {block_m} need {size} (an alignment for another block_m?)")


def moe_align_reference(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as moe_align_block_size, in plain torch ops (stable sort)."""
    flat = topk_ids.flatten().long()
    numel = flat.numel()
    padded_len, max_blocks = _align_sizes(numel, num_experts, block_m)
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    starts = ends - padded
    order = torch.sort(flat, stable=True).indices
    sorted_experts = flat[order]
    rank = torch.arange(numel, device=flat.device) - (counts.cumsum(0) - counts)[sorted_experts]
    sorted_ids = torch.full((padded_len,), numel, dtype=torch.int32, device=flat.device)
    sorted_ids[starts[sorted_experts] + rank] = order.to(torch.int32)
    first = torch.arange(max_blocks, device=flat.device) * block_m
    expert_ids = torch.searchsorted(ends, first, right=True).to(torch.int32)
    expert_ids = torch.where(first < ends[-1], expert_ids, -1)
    return sorted_ids, expert_ids, ends[-1:].to(torch.int32)


@triton.jit(do_not_specialize=["numel", "num_pid_m"])
def _moe_gemm_kernel(
    a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, out_ptr, topk_w_ptr,
    sorted_ids_ptr, expert_ids_ptr, num_post_ptr,
    numel, N, K, num_pid_m,
    stride_am, stride_we, stride_wn, stride_se, stride_om,
    A_ROW_DIV: tl.constexpr, GATED: tl.constexpr, MUL_ROUTED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_F32: tl.constexpr, EVEN_K: tl.constexpr, HAS_SCALE: tl.constexpr, DOT_F16: tl.constexpr,
    A_FP8: tl.constexpr, SWAP_AB: tl.constexpr,
):
    # Grouped order: GROUP_M token blocks share each N tile (L2 reuse of the weights).
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    if pid_m * BLOCK_M >= tl.load(num_post_ptr):
        return
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    slots = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    slot_mask = slots < numel
    rows = tl.where(slot_mask, slots // A_ROW_DIV, 0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows_n = tl.where(n_mask, offs_n, 0)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    w_ptrs = w_ptr + expert * stride_we + rows_n[:, None] * stride_wn + offs_k[None, :]
    up_off = N * stride_wn  # w3 rows follow the I rows of w1 in w13
    if SWAP_AB:  # transposed tiles: weight rows x slots
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=slot_mask[:, None], other=0.0)
            w = tl.load(w_ptrs, eviction_policy="evict_first")
            if GATED:
                wu = tl.load(w_ptrs + up_off, eviction_policy="evict_first")
        else:
            k_mask = (k0 + offs_k) < K
            a = tl.load(a_ptrs, mask=slot_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[None, :], other=0.0, eviction_policy="evict_first")
            if GATED:
                wu = tl.load(w_ptrs + up_off, mask=k_mask[None, :], other=0.0,
                             eviction_policy="evict_first")
        if DOT_F32:  # the interpreter (and its fp8 operands) widen to fp32
            a = a.to(tl.float32)
        elif DOT_F16 and not A_FP8:
            a = a.to(tl.float16)
        if SWAP_AB:
            acc += tl.dot(w.to(a.dtype), tl.trans(a))
            if GATED:
                acc_up += tl.dot(wu.to(a.dtype), tl.trans(a))
        else:
            acc += tl.dot(a, tl.trans(w.to(a.dtype)))  # A_FP8: e4m3 x e4m3, no widening
            if GATED:
                acc_up += tl.dot(a, tl.trans(wu.to(a.dtype)))
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if SWAP_AB:  # back to slots x rows for the epilogue
        acc = tl.trans(acc)
        if GATED:
            acc_up = tl.trans(acc_up)
    if HAS_SCALE:
        scale_ptrs = w_scale_ptr + expert * stride_se + rows_n
        acc = acc * tl.load(scale_ptrs)[None, :]
        if GATED:
            acc_up = acc_up * tl.load(scale_ptrs + N)[None, :]
    if A_FP8:  # per-row activation scales (x: per token; h: per slot)
        a_scale = tl.load(a_scale_ptr + rows, mask=slot_mask, other=0.0)[:, None]
        acc = acc * a_scale
        if GATED:
            acc_up = acc_up * a_scale
    if GATED:
        acc = acc * tl.sigmoid(acc) * acc_up
    if MUL_ROUTED:
        acc = acc * tl.load(topk_w_ptr + slots, mask=slot_mask, other=0.0)[:, None]
    if DOT_F16 and GATED and not A_FP8:  # h feeds an fp16 dot: saturate rather than overflow to inf
        acc = tl.minimum(tl.maximum(acc, -65504.0), 65504.0)
    out_ptrs = out_ptr + slots.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=slot_mask[:, None] & n_mask[None, :])


def _check_moe_args(x, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids) -> None:
    check_tensor(x, "x", 2, ACT_DTYPES)
    check(x.is_contiguous(), f"x must be contiguous, strides {x.stride()}")
    t, d = x.shape
    check_tensor(w13, "w13", 3, (FP8_DTYPE, x.dtype), device=x.device)
    check_tensor(w2, "w2", 3, (w13.dtype,), device=x.device)
    check(w13.is_contiguous() and w2.is_contiguous(), "w13 and w2 must be contiguous")
    e, two_i, d13 = w13.shape
    check(d13 == d and two_i % 2 == 0, f"w13 {tuple(w13.shape)} must be [E, 2I, {d}]")
    check(tuple(w2.shape) == (e, d, two_i // 2), f"w2 {tuple(w2.shape)} must be [{e}, {d}, {two_i // 2}]")
    fp8 = w13.dtype == FP8_DTYPE
    check(fp8 == (w13_scale is not None) == (w2_scale is not None),
          "fp8 experts need w13_scale and w2_scale; 16/32-bit experts take none")
    if fp8:
        check_tensor(w13_scale, "w13_scale", 2, (torch.float32,), device=x.device)
        check_tensor(w2_scale, "w2_scale", 2, (torch.float32,), device=x.device)
        check(tuple(w13_scale.shape) == (e, two_i) and w13_scale.is_contiguous(),
              f"w13_scale must be contiguous [{e}, {two_i}], got {tuple(w13_scale.shape)}")
        check(tuple(w2_scale.shape) == (e, d) and w2_scale.is_contiguous(),
              f"w2_scale must be contiguous [{e}, {d}], got {tuple(w2_scale.shape)}")
    check_tensor(topk_ids, "topk_ids", 2, (torch.int32, torch.int64), device=x.device)
    check_tensor(topk_weights, "topk_weights", 2, (torch.float32,), device=x.device)
    check(topk_ids.shape == topk_weights.shape and topk_ids.shape[0] == t,
          f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} must be ({t}, k)")
    check(topk_ids.is_contiguous() and topk_weights.is_contiguous(),
          "topk_ids and topk_weights must be contiguous")


def _stages(wanted: int, stage_bytes: int) -> int:
    """Pipeline depth within shared memory (H100: 227 KiB per block): 16-bit experts
    take twice the bytes per stage of fp8 ones at the same tiles."""
    return max(2, min(wanted, (200 * 1024) // stage_bytes))


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor | None,
    w2: torch.Tensor,
    w2_scale: torch.Tensor | None,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    config: MoeConfig | None = None,
    *,
    align: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    reduce: bool = True,
) -> torch.Tensor:
    """x (T, D), w13 e4m3 [E, 2I, D] + scale [E, 2I], w2 e4m3 [E, D, I] + scale [E, D],
    topk_weights (T, k) fp32, topk_ids (T, k) in [0, E) -> (T, D) in x's dtype.
    Experts in x's own dtype (bf16 decode) pass no scales: the same kernels, no widening.

    align: ``moe_align_block_size(topk_ids, E, config.block_m)`` computed beforehand
    (checked by size: it must be for the block_m of the config used). reduce=False:
    returns the (T, k, D) routed-weighted per-slot outputs; their sum over k is the output."""
    _check_moe_args(x, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids)
    t, d = x.shape
    e, two_i, _ = w13.shape
    i, top_k = two_i // 2, topk_ids.shape[1]
    numel = t * top_k
    cfg = config or moe_config(t)
    if align is not None:
        check_align(align, numel, e, cfg.block_m, x.device)
    if t == 0:
        return x.new_empty((0, d) if reduce else (0, top_k, d))
    sorted_ids, expert_ids, num_post = align or moe_align_block_size(topk_ids, e, cfg.block_m)
    max_blocks = expert_ids.numel()
    f32 = dot_in_fp32()
    has_scale = w13_scale is not None
    a8 = cfg.act_fp8 and has_scale
    f16 = bool(cfg.dot_f16) and has_scale and not a8
    out_dtype = x.dtype
    x_scale = h_scale = topk_weights  # stand-ins for the activation-scale pointers unless W8A8
    if a8:
        x, x_scale = per_token_quant_fp8(x)  # (T, D) e4m3, (T,) fp32
    elif f16 and cfg.dot_f16 == 2:
        x = x.clamp(-65504.0, 65504.0).to(torch.float16)
    # W8A8: h is re-quantized right away; bf16 holds any finite value fp16 would overflow on
    h_dtype = torch.float16 if f16 else (torch.bfloat16 if a8 else x.dtype)
    h = torch.empty((numel, i), dtype=h_dtype, device=x.device)  # (T*k, I)
    y = torch.empty((numel, d), dtype=out_dtype, device=x.device)  # (T*k, D)
    if not has_scale:  # any fp32 tensor stands in for the unused scale pointers
        w13_scale = w2_scale = topk_weights
    common = dict(BLOCK_M=cfg.block_m, GROUP_M=cfg.group_m, DOT_F32=f32, HAS_SCALE=has_scale, DOT_F16=f16,
                  A_FP8=a8, SWAP_AB=cfg.swap_ab, num_warps=cfg.num_warps)
    stages1 = _stages(cfg.num_stages, (2 * cfg.block_n * w13.element_size() + cfg.block_m * x.element_size()) * cfg.block_k)
    _moe_gemm_kernel[(triton.cdiv(i, cfg.block_n) * max_blocks,)](
        x, x_scale, w13, w13_scale, h, topk_weights, sorted_ids, expert_ids, num_post,
        numel, i, d, max_blocks, x.stride(0), w13.stride(0), w13.stride(1), w13_scale.stride(0), h.stride(0),
        A_ROW_DIV=top_k, GATED=True, MUL_ROUTED=False, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        EVEN_K=d % cfg.block_k == 0, num_stages=stages1, **common,
    )
    if a8:
        h, h_scale = per_token_quant_fp8(h)  # per slot: each row of h is one (token, expert) pair
    stages2 = _stages(cfg.num_stages, (cfg.block_n2 * w2.element_size() + cfg.block_m * h.element_size()) * cfg.block_k2)
    _moe_gemm_kernel[(triton.cdiv(d, cfg.block_n2) * max_blocks,)](
        h, h_scale, w2, w2_scale, y, topk_weights, sorted_ids, expert_ids, num_post,
        numel, d, i, max_blocks, h.stride(0), w2.stride(0), w2.stride(1), w2_scale.stride(0), y.stride(0),
        A_ROW_DIV=1, GATED=False, MUL_ROUTED=True, BLOCK_N=cfg.block_n2, BLOCK_K=cfg.block_k2,
        EVEN_K=i % cfg.block_k2 == 0, num_stages=stages2, **common,
    )
    y = y.view(t, top_k, d)
    return y.sum(dim=1) if reduce else y


def fused_moe_reference(
    x: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor | None,
    w2: torch.Tensor,
    w2_scale: torch.Tensor | None,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """Loop over experts in fp32 with dequantized weights."""
    t, d = x.shape
    i = w2.shape[2]
    xf = x.float()
    out = torch.zeros((t, d), dtype=torch.float32, device=x.device)
    for e in range(w13.shape[0]):
        tok, slot = torch.nonzero(topk_ids == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        w13_e = w13[e].float()  # (2I, D)
        w2_e = w2[e].float()  # (D, I)
        if w13_scale is not None and w2_scale is not None:
            w13_e = w13_e * w13_scale[e].float()[:, None]
            w2_e = w2_e * w2_scale[e].float()[:, None]
        gu = xf[tok] @ w13_e.t()
        hid = torch.nn.functional.silu(gu[:, :i]) * gu[:, i:]
        out.index_add_(0, tok, (hid @ w2_e.t()) * topk_weights[tok, slot, None].float())
    return out.to(x.dtype)
