"""Decode MoE with FP8 (e4m3) experts: stream-K weight streaming at the HBM floor.

Legend: T tokens, k experts per token, E experts, D hidden, I intermediate, BM block of
slots (one expert per block), BN x BK weight tile, NT = N / BN n-tiles, KT = K / BK
k-steps, P programs of a launch, SMS the device's SM count.

At decode (T <= 64) the MoE is bound by reading the routed experts' weights (3*I*D bytes
each) once. `fused_moe.py` reaches 69-88% of the HBM read rate there (docs/kernels.md);
what it loses is fixed per call rather than per byte: a program per (block, n-tile)
at one CTA per SM runs whole waves (T=1: 448 programs on 132 SMs, 3.4 waves), each
program fills its software pipeline from cold, and the h round trip, the k-sum and the
shared tile config of both GEMMs sit on top.

Pipeline, no host sync, fixed sizes per T (CUDA-graph safe):
0. the alignment of `fused_moe.moe_align_block_size` at BM (slots sorted by expert,
   padded per expert to BM; taken precomputed or launched here), and one zeroed fp32
   workspace: gu (T*k, 2I) and out (T, D) (a single memset node).
1. GEMM1: gu[slot] += x[token] @ (w13[e] * s13[e])^T, gate and up rows alike.
2. GEMM2: out[token] += routed weight * (silu(gu[:, :I]) * gu[:, I:]) @ (w2[e] * s2[e])^T;
   h is formed from gu as the A tile is loaded (no h tensor, no activation pass), and
   the k slots of a token meet in the same fp32 row (no k-sum pass).
3. out -> x's dtype (skipped for fp32 x, or when the caller takes fp32).
With `pdl`, GEMM2 is a programmatic dependent launch of GEMM1 (Hopper griddepcontrol):
its programs start as GEMM1's last ones finish, set up and L2-prefetch their first weight
tiles, then wait for GEMM1's results; the kernel boundary's drain and fill overlap.
Both GEMMs run the same kernel, `_moe_decode_kernel`, with a tile config each. Its
iteration space is the (tile, k-step) pairs of the routed blocks, `flat`ly numbered:
- flat (stream-K): P = SMS * ctas_per_sm persistent programs each take an equal,
  contiguous share of the iterations, crossing tile boundaries without draining the
  load pipeline; a tile's partial sum is flushed with fp32 atomic adds at its end and
  wherever a program's share ends. Every SM streams for the whole kernel: no wave tail,
  one pipeline fill per program.
- not flat (split-K): a program per (tile, k-split), P fixed from the worst-case block
  count, programs past the routed blocks exit; the atomics sum the splits.
The dots: fp8 weights widened to fp16 in registers (W8A16: one packed conversion on
Hopper), activations converted to fp16 saturated to +-65504 (x, and h as it is formed),
fp32 accumulation; `use_dot=False` (BM <= 8: tl.dot needs 16 rows) multiplies and sums
in fp32 on the CUDA cores instead. The atomics make the result's last bits depend on
the order the partial sums land in (run to run); the error against
`fused_moe_reference` is that of the fp16 dots (~3e-3 at Mixtral shapes).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sluice.engine.kernels._common import FP8_DTYPE, check, check_tensor, dot_in_fp32, interpreting
from sluice.engine.kernels.fused_moe import _align_sizes, moe_align_block_size

ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
Alignment = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # sorted_ids, expert_ids, num_post


@dataclass(frozen=True)
class GemmTiles:
    """One GEMM's launch: weight tile BN x BK, warps, pipeline stages, and either
    stream-K over ctas_per_sm * SMS programs (flat) or split_k programs per tile."""
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 4
    flat: bool = True
    ctas_per_sm: int = 2  # flat only
    split_k: int = 1  # not flat only; must divide K / BK

    def short(self) -> str:
        how = f"sk{self.ctas_per_sm}" if self.flat else f"split{self.split_k}"
        return f"{self.block_n}x{self.block_k}w{self.num_warps}s{self.num_stages}{how}"


@dataclass(frozen=True)
class DecodeConfig:
    block_m: int
    gemm1: GemmTiles
    gemm2: GemmTiles
    use_dot: bool = True  # False: fp32 multiply-and-sum, BM <= 8
    # Programmatic dependent launch (Hopper): GEMM2's programs start while GEMM1's last
    # ones finish, build their routing tables, L2-prefetch the weights of their first
    # `prefetch` k-steps (stream-K only), then wait for GEMM1's gate/up sums
    pdl: bool = False
    prefetch: int = 0  # a power of two

    def short(self) -> str:
        pdl = f" pdl{self.prefetch}" if self.pdl else ""
        return f"bm{self.block_m}{'' if self.use_dot else 'gemv'} g1 {self.gemm1.short()} g2 {self.gemm2.short()}{pdl}"


def moe_decode_config(num_tokens: int) -> DecodeConfig:
    """Tiles by token count. Unmeasured first guesses (bench/moe_decode.py sweeps them):
    stream-K with 2 CTAs per SM and ~40 KB of weights in flight per CTA (5 stages of 8 KB:
    at 4.41 TB/s and ~1 us of loaded latency an SM needs ~33 KB in flight), GEMM2 with
    wider n-tiles than GEMM1 (its A tile is formed from fp32 gate/up rows: wider n
    amortizes that over more weight bytes)."""
    if num_tokens <= 8:
        return DecodeConfig(16, GemmTiles(64, 128, 4, 6, ctas_per_sm=2), GemmTiles(128, 64, 4, 6, ctas_per_sm=2))
    return DecodeConfig(16, GemmTiles(128, 128, 4, 4, ctas_per_sm=2), GemmTiles(128, 128, 4, 3, ctas_per_sm=2))


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _programs(device: torch.device) -> int:
    """SMs of the device (stream-K's unit); under the interpreter a small stand-in."""
    if device.type == "cuda":
        return sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 3


@triton.jit
def _route(sorted_ids_ptr, expert_ids_ptr, blk, numel, A_ROW_DIV: tl.constexpr, BLOCK_M: tl.constexpr):
    """Block blk of the alignment -> its expert, slot ids, which are real, their A rows."""
    expert = tl.load(expert_ids_ptr + blk).to(tl.int64)
    slots = tl.load(sorted_ids_ptr + blk * BLOCK_M + tl.arange(0, BLOCK_M))
    real = slots < numel
    rows = tl.where(real, slots // A_ROW_DIV, 0).to(tl.int64)
    return expert, slots, real, rows


@triton.jit
def _route_table(sorted_ids_ptr, expert_ids_ptr, n_blocks, numel, BLOCK_M: tl.constexpr, MAX_BLOCKS: tl.constexpr):
    """Every routed block's expert (MAX_BLOCKS,) and slots (MAX_BLOCKS, BM), held in
    registers: the stream-K loop picks its block from them without a load, whose address
    chain (id load -> weight load) kept triton's pipeliner to a single buffer."""
    offs_b = tl.arange(0, MAX_BLOCKS)
    b_mask = offs_b < n_blocks
    experts = tl.load(expert_ids_ptr + offs_b, mask=b_mask, other=0)
    slots = tl.load(sorted_ids_ptr + offs_b[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :],
                    mask=b_mask[:, None], other=numel)
    return experts, slots


@triton.jit
def _pick(experts, slot_table, blk, numel, A_ROW_DIV: tl.constexpr, MAX_BLOCKS: tl.constexpr):
    """_route from the register tables."""
    sel = tl.arange(0, MAX_BLOCKS) == blk
    expert = tl.sum(tl.where(sel, experts, 0), axis=0).to(tl.int64)
    slots = tl.sum(tl.where(sel[:, None], slot_table, 0), axis=0)
    real = slots < numel
    rows = tl.where(real, slots // A_ROW_DIV, 0).to(tl.int64)
    return expert, slots, real, rows


@triton.jit
def _step(acc, a_ptr, w_ptr, expert, rows, real, nt, kk, stride_am,
          N: tl.constexpr, K: tl.constexpr, SWIGLU_A: tl.constexpr, BLOCK_N: tl.constexpr,
          BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr, DOT_F32: tl.constexpr):
    """acc (BM, BN) += A[rows, kk-th BK] @ W[expert, nt-th BN, kk-th BK]^T."""
    offs_k = kk * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = nt * BLOCK_N + tl.arange(0, BLOCK_N)
    w = tl.load(w_ptr + expert * (N * K) + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :],
                eviction_policy="evict_first")
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :]
    if SWIGLU_A:  # a = silu(gate) * up, from the fp32 gate/up sums of GEMM1 (up K columns on)
        g = tl.load(a_ptrs, mask=real[:, None], other=0.0)
        u = tl.load(a_ptrs + K, mask=real[:, None], other=0.0)
        a = g * tl.sigmoid(g) * u
    else:
        a = tl.load(a_ptrs, mask=real[:, None], other=0.0).to(tl.float32)
    if USE_DOT:
        a = tl.minimum(tl.maximum(a, -65504.0), 65504.0)  # the fp16 operand saturates, never inf
        if DOT_F32:  # the interpreter: fp32 dots
            acc += tl.dot(a, tl.trans(w.to(tl.float32)))
        else:
            acc += tl.dot(a.to(tl.float16), tl.trans(w.to(tl.float16)))
    else:
        acc += tl.sum(a[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    return acc


@triton.jit
def _flush(acc, out_ptr, s_ptr, topk_w_ptr, expert, slots, real, nt,
           N: tl.constexpr, OUT_ROW_DIV: tl.constexpr, MUL_ROUTED: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[slot // OUT_ROW_DIV, nt-th BN] += acc * channel scale (* routed weight)."""
    offs_n = nt * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = acc * tl.load(s_ptr + expert * N + offs_n)[None, :]
    if MUL_ROUTED:
        acc = acc * tl.load(topk_w_ptr + slots, mask=real, other=0.0)[:, None]
    out_rows = tl.where(real, slots // OUT_ROW_DIV, 0).to(tl.int64)
    tl.atomic_add(out_ptr + out_rows[:, None] * N + offs_n[None, :], acc, mask=real[:, None], sem="relaxed")


@triton.jit
def _prefetch_l2(w_ptr, expert_ids_ptr, start, end, n_blocks, N: tl.constexpr, K: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr):
    """prefetch.global.L2 of each 128-byte line of the weight tiles of iterations
    start .. start + PREFETCH - 1 (clamped to end - 1)."""
    LINES: tl.constexpr = (BLOCK_K + 127) // 128
    its = tl.minimum(start + tl.arange(0, PREFETCH), end - 1)
    tile = its // (K // BLOCK_K)
    kk = its - tile * (K // BLOCK_K)
    nt = tile // n_blocks
    expert = tl.load(expert_ids_ptr + (tile - nt * n_blocks)).to(tl.int64)
    row = nt[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    col = kk[:, None, None] * BLOCK_K + tl.arange(0, LINES)[None, None, :] * 128
    ptrs = (w_ptr + expert[:, None, None] * (N * K) + row.to(tl.int64)[:, :, None] * K + col)
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


# numel varies with T: not specialised, so one compile per config serves every T.
@triton.jit(do_not_specialize=["numel"])
def _moe_decode_kernel(
    a_ptr, w_ptr, s_ptr, out_ptr, topk_w_ptr, sorted_ids_ptr, expert_ids_ptr, num_post_ptr,
    numel, stride_am,
    N: tl.constexpr, K: tl.constexpr, A_ROW_DIV: tl.constexpr, OUT_ROW_DIV: tl.constexpr,
    SWIGLU_A: tl.constexpr, MUL_ROUTED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    FLAT: tl.constexpr, SPLIT_K: tl.constexpr, USE_DOT: tl.constexpr, DOT_F32: tl.constexpr,
    MAX_BLOCKS: tl.constexpr, PDL_TRIGGER: tl.constexpr, PDL_WAIT: tl.constexpr, PREFETCH: tl.constexpr,
):
    if PDL_TRIGGER:  # the next kernel may start its programs (they wait for this one's results)
        tl.extra.cuda.gdc_launch_dependents()
    NT: tl.constexpr = N // BLOCK_N
    KT: tl.constexpr = K // BLOCK_K
    n_blocks = tl.load(num_post_ptr) // BLOCK_M
    n_tiles = n_blocks * NT
    pid = tl.program_id(0)
    if FLAT:
        # stream-K: this program's share of the n_tiles * KT (tile, k-step) iterations
        total = n_tiles * KT
        nprog = tl.num_programs(0)
        start = (pid * total) // nprog
        end = ((pid + 1) * total) // nprog
        experts, slot_table = _route_table(sorted_ids_ptr, expert_ids_ptr, n_blocks, numel, BLOCK_M, MAX_BLOCKS)
        if PREFETCH > 0:  # the weights of the first k-steps into L2, not waiting for the previous kernel
            _prefetch_l2(w_ptr, expert_ids_ptr, start, end, n_blocks, N, K, BLOCK_N, BLOCK_K, PREFETCH)
        if PDL_WAIT:
            tl.extra.cuda.gdc_wait()
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for it in range(start, end):
            tile = it // KT
            kk = it - tile * KT
            nt = tile // n_blocks
            blk = tile - nt * n_blocks
            expert, slots, real, rows = _pick(experts, slot_table, blk, numel, A_ROW_DIV, MAX_BLOCKS)
            acc = _step(acc, a_ptr, w_ptr, expert, rows, real, nt, kk, stride_am,
                        N, K, SWIGLU_A, BLOCK_N, BLOCK_K, USE_DOT, DOT_F32)
            if (kk == KT - 1) | (it == end - 1):
                _flush(acc, out_ptr, s_ptr, topk_w_ptr, expert, slots, real, nt,
                       N, OUT_ROW_DIV, MUL_ROUTED, BLOCK_N)
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        KS: tl.constexpr = KT // SPLIT_K
        tile = pid // SPLIT_K
        if tile < n_tiles:
            split = pid - tile * SPLIT_K
            nt = tile // n_blocks
            blk = tile - nt * n_blocks
            expert, slots, real, rows = _route(sorted_ids_ptr, expert_ids_ptr, blk, numel, A_ROW_DIV, BLOCK_M)
            if PDL_WAIT:
                tl.extra.cuda.gdc_wait()
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for kk in range(split * KS, split * KS + KS):
                acc = _step(acc, a_ptr, w_ptr, expert, rows, real, nt, kk, stride_am,
                            N, K, SWIGLU_A, BLOCK_N, BLOCK_K, USE_DOT, DOT_F32)
            _flush(acc, out_ptr, s_ptr, topk_w_ptr, expert, slots, real, nt, N, OUT_ROW_DIV, MUL_ROUTED, BLOCK_N)


# Compile without launching (bench/moe_decode.py warms every config on a thread pool)
_WARMUP: contextvars.ContextVar[list | None] = contextvars.ContextVar("moe_decode_warmup", default=None)


@contextlib.contextmanager
def warming_up() -> Iterator[list]:
    """Inside, the GEMM launchers compile their kernel (`JITFunction.warmup`) and launch
    nothing; what each warmup returned is appended to the yielded list."""
    got: list = []
    token = _WARMUP.set(got)
    try:
        yield got
    finally:
        _WARMUP.reset(token)


def _launch(grid: int, args: tuple, tiles: GemmTiles, max_blocks: int, pdl_trigger: bool = False,
            pdl_wait: bool = False, prefetch: int = 0, **constexprs) -> None:
    # the register tables of stream-K hold every block: one size (16 up to T=64 at BM 16)
    # so that a config compiles once for all decode sizes
    gpu = not interpreting()  # griddepcontrol is PTX: nothing for the interpreter
    kw = dict(constexprs, FLAT=tiles.flat, SPLIT_K=tiles.split_k, DOT_F32=dot_in_fp32(),
              MAX_BLOCKS=max(16, triton.next_power_of_2(max_blocks)), PDL_TRIGGER=pdl_trigger and gpu,
              PDL_WAIT=pdl_wait and gpu, PREFETCH=prefetch if gpu and tiles.flat else 0,
              num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    if pdl_wait and gpu:
        kw["launch_pdl"] = True
    warm = _WARMUP.get()
    if warm is not None:
        warm.append(_moe_decode_kernel.warmup(*args, grid=(grid,), **kw))
    else:
        _moe_decode_kernel[(grid,)](*args, **kw)


def _grid(tiles: GemmTiles, n: int, k: int, max_blocks: int, block_m: int, device: torch.device) -> int:
    check(n % tiles.block_n == 0 and k % tiles.block_k == 0,
          f"tile {tiles.block_n}x{tiles.block_k} must divide the GEMM's N {n} and K {k}")
    if tiles.flat:
        return _programs(device) * tiles.ctas_per_sm
    check((k // tiles.block_k) % tiles.split_k == 0, f"split_k {tiles.split_k} must divide K/BK = {k // tiles.block_k}")
    return max_blocks * (n // tiles.block_n) * tiles.split_k


def moe_decode_gemm1(x: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor, alignment: Alignment,
                     top_k: int, gu: torch.Tensor, block_m: int, tiles: GemmTiles, use_dot: bool = True,
                     pdl: bool = False) -> None:
    """gu (T*k, 2I) fp32, zeroed by the caller, += x[slot // k] @ (w13[e] * s13[e])^T.
    pdl: let the next kernel (a pdl GEMM2) start early."""
    sorted_ids, expert_ids, num_post = alignment
    e, two_i, d = w13.shape
    grid = _grid(tiles, two_i, d, expert_ids.numel(), block_m, x.device)
    _launch(grid, (x, w13, w13_scale, gu, w13_scale, sorted_ids, expert_ids, num_post, gu.shape[0], x.stride(0)),
            tiles, expert_ids.numel(), pdl_trigger=pdl, N=two_i, K=d, A_ROW_DIV=top_k, OUT_ROW_DIV=1, SWIGLU_A=False, MUL_ROUTED=False,
            BLOCK_M=block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, USE_DOT=use_dot)


def moe_decode_gemm2(gu: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor, topk_weights: torch.Tensor,
                     alignment: Alignment, out: torch.Tensor, block_m: int, tiles: GemmTiles,
                     use_dot: bool = True, pdl: bool = False, prefetch: int = 0) -> None:
    """out (T, D) fp32, zeroed by the caller, += w * (silu(gate) * up) @ (w2[e] * s2[e])^T.
    pdl: launched as a programmatic dependent of the previous kernel (GEMM1), prefetching
    the weights of its first `prefetch` k-steps into L2 before it waits for gu."""
    sorted_ids, expert_ids, num_post = alignment
    e, d, i = w2.shape
    grid = _grid(tiles, d, i, expert_ids.numel(), block_m, gu.device)
    _launch(grid, (gu, w2, w2_scale, out, topk_weights, sorted_ids, expert_ids, num_post, gu.shape[0], gu.stride(0)),
            tiles, expert_ids.numel(), pdl_wait=pdl, prefetch=prefetch, N=d, K=i, A_ROW_DIV=1, OUT_ROW_DIV=topk_weights.shape[1], SWIGLU_A=True, MUL_ROUTED=True,
            BLOCK_M=block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, USE_DOT=use_dot)


def _check_args(x, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids) -> None:
    check_tensor(x, "x", 2, ACT_DTYPES)
    check(x.is_contiguous(), f"x must be contiguous, strides {x.stride()}")
    t, d = x.shape
    check_tensor(w13, "w13", 3, (FP8_DTYPE,), device=x.device)
    check_tensor(w2, "w2", 3, (FP8_DTYPE,), device=x.device)
    check(w13.is_contiguous() and w2.is_contiguous(), "w13 and w2 must be contiguous")
    e, two_i, d13 = w13.shape
    check(d13 == d and two_i % 2 == 0, f"w13 {tuple(w13.shape)} must be [E, 2I, {d}]")
    check(tuple(w2.shape) == (e, d, two_i // 2), f"w2 {tuple(w2.shape)} must be [{e}, {d}, {two_i // 2}]")
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
    check(topk_ids.is_contiguous() and topk_weights.is_contiguous(), "topk_ids and topk_weights must be contiguous")


def moe_decode(
    x: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    alignment: Alignment | None = None,
    config: DecodeConfig | None = None,
    out_fp32: bool = False,
) -> torch.Tensor:
    """x (T, D) bf16/fp16/fp32, w13 e4m3 [E, 2I, D] + scale [E, 2I], w2 e4m3 [E, D, I] +
    scale [E, D], topk_weights (T, k) fp32, topk_ids (T, k) in [0, E) -> (T, D), summed over
    the k experts, in x's dtype (fp32 with out_fp32).

    alignment: `moe_align_block_size(topk_ids, E, config.block_m)`'s three tensors, when
    the caller has them; otherwise that kernel is launched here."""
    _check_args(x, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids)
    t, d = x.shape
    e, two_i, _ = w13.shape
    top_k = topk_ids.shape[1]
    numel = t * top_k
    if t == 0:
        return torch.empty((0, d), dtype=torch.float32 if out_fp32 else x.dtype, device=x.device)
    cfg = config or moe_decode_config(t)
    check(cfg.use_dot == (cfg.block_m >= 16), f"tl.dot takes block_m >= 16, the fp32 sum block_m <= 8: {cfg}")
    if alignment is None:
        alignment = moe_align_block_size(topk_ids, e, cfg.block_m)
    padded, max_blocks = _align_sizes(numel, e, cfg.block_m)
    check(alignment[0].numel() == padded and alignment[1].numel() == max_blocks,
          f"alignment sizes {alignment[0].numel()}, {alignment[1].numel()} are not those of block_m {cfg.block_m}")
    ws = torch.zeros(numel * two_i + t * d, dtype=torch.float32, device=x.device)  # one memset
    gu = ws[: numel * two_i].view(numel, two_i)
    out = ws[numel * two_i:].view(t, d)
    moe_decode_gemm1(x, w13, w13_scale, alignment, top_k, gu, cfg.block_m, cfg.gemm1, cfg.use_dot, cfg.pdl)
    moe_decode_gemm2(gu, w2, w2_scale, topk_weights, alignment, out, cfg.block_m, cfg.gemm2, cfg.use_dot,
                     cfg.pdl, cfg.prefetch)
    return out if out_fp32 or x.dtype == torch.float32 else out.to(x.dtype)
