"""Tile sweep of the two kernels that dominate the FP8 Mixtral decode step, at their model
shapes (H200, fp8 weights): the fused MoE and the small-M fp8 linear of attention.

    python3 -m bench.decode_sweep OUT_DIR [--budget 120] [--dry-run] [--skip-linear] [--swap-only]

1. MoE: `fused_moe` W8A16 (fp16 dots), E 8 top-2 D 4096 I 14336, T in 64, 1, 8, 32, run
   as decode runs it (alignment given, per-slot partials: reduce=False). Coordinate
   descent per T from `moe_config(T)`, one field a round: GEMM1's block_m, block_n,
   block_k, num_warps, num_stages (warps and stages are shared with GEMM2), then GEMM2's
   block_n2, block_k2, then group_m (T=64); a move needs a 0.5% gain. Each round compiles
   its new kernels first, every T's at once, on a thread pool (triton's AsyncCompileMode;
   fused_moe's launches swapped for JITFunction.warmup). A config is checked against fused_moe_reference
   (rel err <= 2e-2) before it is timed; one that fails to compile or launch (shared
   memory) is skipped.
   Then a second descent of swap-AB tiles (`MoeConfig.swap_ab`: weight rows in the MMA's
   wide dimension) from `swap_seed(T)` over SWAP_AXES, its first round W8A16 against W8A8
   (the two per-row quant launches included); a T's best moves to it only if it wins by
   0.5%. --swap-only: that descent alone, against the current tiles. The winners go to
   OUT/moe_tiles.json, a table the engine takes with SLUICE_MOE_TILES=OUT/moe_tiles.json.
2. Linear (W8A16 too: bf16 x and fp16 dots, every config, then per-token quant + the
   current W8A8 tiles against the best W8A16 tiles, as Fp8Linear would run each; the
   verdict at the current tiles, summed over shapes and M, goes to OUT/linear_choice.json):
   `fp8_linear_small_m` (fp8 activations with per-token scales) at qkv 4096->6144
   and o 4096->4096, M in 1, 16, 64: bench.kernels.SWEEP plus tiles for these narrow
   outputs (block_n 16/32: more programs; split-K), against `small_m_config`; all
   compiled up front with the MoE's first round.
Timing: bench.kernels.bench_us (CUDA-graph replay, do_bench median, L2 flushed), 4 rotating
weight sets. No new config is timed once --budget seconds have passed since the start;
the closing current-vs-best re-times (back to back) still run.
Output: per kernel and size, the floor at 4.41 TB/s, the current config's us (TB/s of
the weight bytes read), the best's and its fields; OUT/decode_sweep.json holds every
check, timing and descent round. --dry-run (no GPU) lists the first round's candidates,
the linear configs, and what a descent would compile if the current config always won.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import torch
import triton
from triton.runtime._async_compile import AsyncCompileMode

from bench.kernels import SWEEP, bench_us, rel_err
from sluice.engine.kernels._common import FP8_DTYPE
from sluice.engine.kernels.act_quant import per_token_quant_fp8
from sluice.engine.kernels.fp8_linear import (SmallMConfig, fp8_linear_reference, fp8_linear_small_m,
                                              small_m_config)
from sluice.engine.kernels.fused_moe import (MoeConfig, _align_sizes, _stages, fused_moe, fused_moe_reference,
                                             moe_align_block_size, moe_config)
from sluice.engine.quant.fp8 import quantize_per_channel

# the modules themselves (the package's names are its functions): their kernels are swapped while compiling
KERNEL_MODULES = [importlib.import_module(f"sluice.engine.kernels.{m}") for m in ("fused_moe", "fp8_linear")]

JOINT = {64: [MoeConfig(16, 64, 128, bn2, 256, 4, st, group_m=g) for bn2, st in ((128, 5), (32, 4)) for g in (2, 4, 8)]
         + [MoeConfig(32, 64, 128, 128, 128, 4, 4, group_m=1), MoeConfig(64, 64, 128, 128, 128, 4, 4, group_m=1)]}
MOE_T = (64, 1, 8, 32)  # in order of weight in the decode step: a round's timings stop at the budget
AXES: list[tuple[str, Callable[[int], list[int]]]] = [  # one descent round each
    ("block_m", lambda t: [16] if t <= 16 else ([16, 32] if t <= 32 else [16, 32, 64])),
    ("block_n", lambda t: [32, 64, 128]),
    ("block_k", lambda t: [64, 128, 256]),
    ("num_warps", lambda t: [4, 8]),
    ("num_stages", lambda t: [3, 4, 5, 6]),
    ("block_n2", lambda t: [16, 32, 64, 128]),
    ("block_k2", lambda t: [128, 256, 512]),
    ("group_m", lambda t: [1, 2, 4] if t >= 64 else [1]),  # T=64: a second block of an expert reads its tiles from L2
]
# swap-AB (MoeConfig.swap_ab): a second descent from these seeds, weight rows in the MMA's
# 64/128-wide dimension; its first round tries W8A8 (fp8 x fp8 dots, two quant launches)
SWAP_AXES: list[tuple[str, Callable[[int], list]]] = [
    ("act_fp8", lambda t: [False, True]),
    ("block_m", lambda t: [16] if t <= 16 else ([16, 32] if t <= 32 else [16, 32, 64])),
    ("block_n", lambda t: [64, 128]),
    ("block_k", lambda t: [64, 128, 256]),
    ("num_warps", lambda t: [4, 8]),
    ("num_stages", lambda t: [3, 4, 5, 6]),
    ("block_n2", lambda t: [64, 128]),
    ("block_k2", lambda t: [128, 256, 512]),
]


TILE_BRACKET = {1: 2, 8: 16, 32: 32, 64: 128}  # measured T -> the largest T its tiles serve (moe_config's brackets)


def swap_seed(t: int) -> MoeConfig:
    return replace(moe_config(t), swap_ab=True, block_m=16 if t <= 32 else 32, block_n=64, block_k=128,
                   block_n2=64, block_k2=256, group_m=1)


LIN = {"qkv": 6144, "o": 4096}  # N; K = D
LIN_M = (1, 16, 64)
LIN_EXTRA = [SmallMConfig(*c) for c in [  # N 4096/6144 at block_n 64: 64/96 programs for 132 SMs
    (32, 256, 1, 4, 4), (32, 256, 1, 4, 6), (32, 512, 1, 4, 4), (32, 128, 1, 4, 8), (32, 256, 1, 2, 6),
    (16, 256, 1, 2, 6), (16, 512, 1, 4, 4), (16, 1024, 1, 4, 3), (64, 128, 1, 4, 8), (64, 256, 2, 4, 6),
    (32, 256, 2, 4, 6), (64, 512, 2, 4, 4),
]]

E, K, D, I = 8, 2, 4096, 14336  # noqa: E741  (Mixtral-8x7B: experts, top-k, hidden, intermediate)
DEV = "cuda"
SETS = 4  # rotating weight sets: 5.6 GB of experts, L2 (50-60 MB) holds none
HBM = 4.41  # TB/s, measured HBM read rate of the H200
TOL = 2e-2


def weights() -> list[tuple[torch.Tensor, ...]]:
    """SETS fp8 expert sets (w13, s13, w2, s2) at Mixtral shapes."""
    sets = []
    for _ in range(SETS):
        w13, s13 = quantize_per_channel(torch.randn(E, 2 * I, D, device=DEV, dtype=torch.bfloat16) / D**0.5)
        w2, s2 = quantize_per_channel(torch.randn(E, D, I, device=DEV, dtype=torch.bfloat16) / I**0.5)
        sets.append((w13, s13, w2, s2))
    return sets


def routing(t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random top-k routing of t tokens: renormalised fp32 weights, int32 ids."""
    w, ids = torch.randn(t, E, device=DEV).softmax(-1).topk(K)
    return (w / w.sum(-1, keepdim=True)).float().contiguous(), ids.int().contiguous()


def lin_configs() -> list[SmallMConfig]:
    return list(dict.fromkeys(SWEEP + LIN_EXTRA))


def moe_keys(c: MoeConfig) -> tuple[tuple, tuple]:
    """What GEMM1's and GEMM2's compiled kernels depend on (fused_moe clamps the stages
    to shared memory: x bf16, h fp16, fp8 weights)."""
    a = 1 if c.act_fp8 else 2
    s1 = _stages(c.num_stages, (2 * c.block_n + a * c.block_m) * c.block_k)
    s2 = _stages(c.num_stages, (c.block_n2 + a * c.block_m) * c.block_k2)
    mode = (c.swap_ab, c.act_fp8)
    return ((c.block_m, c.block_n, c.block_k, c.num_warps, s1, c.group_m, *mode),
            (c.block_m, c.block_n2, c.block_k2, c.num_warps, s2, c.group_m, *mode))


def short(c: MoeConfig) -> str:
    (_, _, _, _, s1, *_), (_, _, _, _, s2, *_) = moe_keys(c)
    return (f"bm{c.block_m} g1 {c.block_n}x{c.block_k} g2 {c.block_n2}x{c.block_k2} w{c.num_warps} "
            f"s{c.num_stages}({s1}/{s2}) gm{c.group_m}" + (" swap" if c.swap_ab else "")
            + (" a8" if c.act_fp8 else ""))


def descend(state: dict[int, MoeConfig], compile_round: Callable[[list[MoeConfig]], None],
            measure: Callable[[int, MoeConfig], float | None], log: Callable[[str], None],
            axes: list[tuple[str, Callable[[int], list]]] = AXES) -> list[dict]:
    """Coordinate descent over `axes`, every T in lockstep; state[t] ends at each T's best."""
    rounds = []
    for field, values in axes:
        cands = {}
        for t, cur in state.items():
            cs: dict = {}  # the current config first; none that compiles to the same kernels twice
            for c in [cur] + [replace(cur, **{field: v}) for v in values(t)]:
                cs.setdefault(moe_keys(c), c)
            if len(cs) > 1:
                cands[t] = list(cs.values())
        if not cands:
            continue
        compile_round([c for cs in cands.values() for c in cs])
        for t, cs in cands.items():
            got = {c: measure(t, c) for c in cs}
            ok = {c: us for c, us in got.items() if us is not None}
            if ok:  # a move needs 0.5%: noise should not walk the descent
                best = min(ok, key=ok.get)
                state[t] = cs[0] if cs[0] in ok and ok[best] > 0.995 * ok[cs[0]] else best
            rounds.append({"T": t, "field": field, "chosen": short(state[t]),
                           "tried": {short(c): us for c, us in got.items()}})
            log(f"  T={t:<3d} {field:10s} " + ", ".join(
                f"{getattr(c, field)}: {'-' if us is None else f'{us:.1f}'}" for c, us in got.items())
                + f" -> {getattr(state[t], field)}")
    return rounds


@contextlib.contextmanager
def compiling(kernels: list[tuple[object, str]]) -> Iterator[list]:
    """Inside, `module.name[grid](...)` of the named kernels compiles (JITFunction.warmup,
    on a pool: AsyncCompileMode) and launches nothing; each compile's Future (None when
    cached) is appended to the yielded list. Leaving waits for every compile."""
    saved = [(m, n, getattr(m, n)) for m, n in kernels]
    futures: list = []

    class Warm:
        def __init__(self, fn) -> None:
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *a, **kw: futures.append(getattr(self.fn.warmup(*a, grid=grid, **kw), "future", None))

    try:
        for m, n, fn in saved:
            setattr(m, n, Warm(fn))
        with ThreadPoolExecutor(16) as pool, AsyncCompileMode(pool, ignore_errors=True):
            yield futures
    finally:
        for m, n, fn in saved:
            setattr(m, n, fn)


def compile_all(launches: dict[object, Callable[[], object]], meanwhile: Callable[[], None] = lambda: None
                ) -> dict[object, str]:
    """Compile every launch's kernels at once; `meanwhile` runs on this thread during the
    compiles. Returns {name: error} for the launches whose kernels failed."""
    errors, mine = {}, {}
    moe, lin = KERNEL_MODULES
    with compiling([(moe, "_moe_gemm_kernel"), (lin, "_fp8_linear_small_m_kernel"),
                    (lin, "_sum_splits_kernel")]) as futures:
        for name, launch in launches.items():
            n = len(futures)
            try:
                launch()
            except Exception as exc:  # noqa: BLE001: raised while binding
                errors[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
            mine[name] = [f for f in futures[n:] if f is not None]
        meanwhile()
    for name, fs in mine.items():
        exc = next((f.exception() for f in fs if f.exception() is not None), None)
        if exc is not None:
            errors[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return errors


class Run:
    def __init__(self, out: Path, budget: float) -> None:
        self.out, self.budget, self.t0 = out, budget, time.perf_counter()
        self.res: dict = {"timings": [], "failed": [], "rounds": [], "summary": [], "skipped": 0}

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.1f}s] {msg}", flush=True)

    def over(self) -> bool:
        return time.perf_counter() - self.t0 > self.budget

    def save(self) -> None:
        (self.out / "decode_sweep.json").write_text(json.dumps(self.res, indent=1))

    def fail(self, what: str, why: str) -> None:
        self.res["failed"].append(f"{what}: {why}")
        self.log(f"  {what}: {why[:160]}")

    def time(self, kernel: str, size: str, cfg, fn, nbytes: float, err: float, force: bool = False) -> float | None:
        if self.over() and not force:
            self.res["skipped"] += 1
            return None
        try:
            us = bench_us(fn, SETS)
        except Exception as exc:  # noqa: BLE001
            self.fail(f"time {kernel} {size} {cfg}", f"{type(exc).__name__}: {exc}")
            return None
        self.res["timings"].append({"kernel": kernel, "size": size, "config": asdict(cfg), "us": round(us, 2),
                                    "TB/s": round(nbytes / us / 1e6, 3), "err": round(err, 6)})
        return us


def dry_run() -> None:
    state = {t: moe_config(t) for t in MOE_T}
    print("MoE round 1 (block_m) candidates: " + "; ".join(
        f"T={t}: " + ", ".join(short(replace(c, block_m=v)) for v in AXES[0][1](t)) for t, c in state.items()))
    seen: set = set()

    def compile_round(cs: list[MoeConfig]) -> None:
        new = {k for c in cs for k in moe_keys(c)} - seen
        seen.update(new)
        print(f"  compile {len(new)} new kernels")

    descend(state, compile_round, lambda t, c: 0.0 if moe_keys(c) == moe_keys(state[t]) else 1.0, print)
    print(f"MoE, if the current config always won: {len(seen)} distinct GEMM kernels")
    cfgs = lin_configs()
    print(f"linear: {len(cfgs)} configs x M {LIN_M} = {len(cfgs) * len(LIN_M)} kernels (one per config and M "
          f"class serves both N); current: " + ", ".join(
              f"{s} M={m}: {small_m_config(m, n, D)}" for s, n in LIN.items() for m in LIN_M))
    for c in cfgs:
        print(f"  {c}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--budget", type=float, default=120.0, help="seconds; no new timings after this")
    ap.add_argument("--dry-run", action="store_true", help="list the sweep; no GPU needed")
    ap.add_argument("--skip-linear", action="store_true", help="the MoE only")
    ap.add_argument("--swap-only", action="store_true",
                    help="the MoE's swap-AB descent only, against the current tiles (no unswapped descent)")
    args = ap.parse_args()
    if args.dry_run:
        return dry_run()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = Run(out, args.budget)
    log = run.log
    props = torch.cuda.get_device_properties(0)
    run.res["env"] = {"gpu": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
                      "triton": triton.__version__, "budget_s": args.budget}
    log(json.dumps(run.res["env"]))
    torch.manual_seed(0)
    bf16, fp8, f32, i32 = torch.bfloat16, FP8_DTYPE, torch.float32, torch.int32
    inputs = {t: (torch.randn(t, D, device=DEV).to(bf16), *routing(t)) for t in MOE_T}

    # compile-only stand-ins: the kernels specialise on neither T nor the values
    dw = (torch.empty(E, 2 * I, D, device=DEV, dtype=fp8), torch.empty(E, 2 * I, device=DEV, dtype=f32),
          torch.empty(E, D, I, device=DEV, dtype=fp8), torch.empty(E, D, device=DEV, dtype=f32))
    dw_lin = (torch.empty(max(LIN.values()), D, device=DEV, dtype=fp8),
              torch.empty(max(LIN.values()), device=DEV, dtype=f32))
    dx_lin = {m: (torch.empty(m, D, device=DEV, dtype=fp8), torch.empty(m, device=DEV, dtype=f32)) for m in LIN_M}
    dx_lin16 = {m: torch.empty(m, D, device=DEV, dtype=bf16) for m in LIN_M}  # W8A16: 16-bit x
    x1, tw1, ti1 = inputs[1]

    def moe_launch(c: MoeConfig) -> Callable[[], object]:
        padded, blocks = _align_sizes(K, E, c.block_m)
        al = (torch.empty(padded, device=DEV, dtype=i32), torch.empty(blocks, device=DEV, dtype=i32),
              torch.zeros(1, device=DEV, dtype=i32))
        return lambda: fused_moe(x1, *dw, tw1, ti1, config=c, align=al, reduce=False)

    failed: dict[object, str] = {}  # moe_keys(config) or ("lin", config, M) -> why
    compiled: set = set()

    def compile_round(cs: list[MoeConfig], more: dict | None = None, meanwhile=lambda: None) -> None:
        t_c = time.perf_counter()
        launches = {moe_keys(c): moe_launch(c) for c in cs if moe_keys(c) not in failed} | (more or {})
        errs = compile_all(launches, meanwhile)
        compiled.update(k for c in cs for k in moe_keys(c))
        for key, why in errs.items():
            failed[key] = why
            run.fail(f"compile {key}", why)
        log(f"compiled {len(launches)} launches in {time.perf_counter() - t_c:.1f}s; {len(errs)} failed")

    # round 0: the MoE's current configs and first round, every linear config; meanwhile
    # (this thread) the weights and inputs, and the alignment and quant kernels' compiles
    ws: list = []
    lin_ws: dict[int, list] = {}
    lin_x: dict[int, tuple] = {}  # M -> (xq, xs)
    lin_xb: dict[int, torch.Tensor] = {}  # M -> the bf16 x they quantize
    aligns: dict[tuple[int, int], tuple] = {}

    def setup() -> None:
        ws.extend(weights())
        for n in LIN.values():
            lin_ws[n] = [quantize_per_channel(torch.randn(n, D, device=DEV, dtype=bf16) / D**0.5)
                         for _ in range(SETS)]
        for m in LIN_M:
            lin_xb[m] = torch.randn(m, D, device=DEV, dtype=bf16)
            lin_x[m] = per_token_quant_fp8(lin_xb[m])
        for t in MOE_T:
            for bm in AXES[0][1](t):
                aligns[t, bm] = moe_align_block_size(inputs[t][2], E, bm)

    lin_launch = {("lin", c, m): (lambda c=c, m=m: fp8_linear_small_m(dx_lin[m][0], *dw_lin, x_scale=dx_lin[m][1],
                                                                       config=c))
                  for c in lin_configs() + [small_m_config(m, n, D) for m in LIN_M for n in LIN.values()]
                  for m in LIN_M}
    lin_launch |= {("lin16", c, m): (lambda c=c, m=m: fp8_linear_small_m(dx_lin16[m], *dw_lin, config=c))
                   for c in lin_configs() + [small_m_config(m, n, D) for m in LIN_M for n in LIN.values()]
                   for m in LIN_M}
    compile_round([replace(moe_config(t), block_m=v) for t in MOE_T for v in AXES[0][1](t)], lin_launch, setup)
    log(f"weights: {SETS} sets of {E} experts ({E * 3 * I * D / 1e9:.2f} GB each), of qkv and of o")

    # 1. MoE: coordinate descent per T
    refs = {t: fused_moe_reference(inputs[t][0], *ws[0], *inputs[t][1:]) for t in MOE_T}
    hits = {t: int(inputs[t][2].unique().numel()) for t in MOE_T}
    times: dict[tuple, float | None] = {}

    def moe_call(t: int, c: MoeConfig, w: tuple, whole: bool) -> torch.Tensor:
        x, tw, ti = inputs[t]
        if whole:  # alignment launched, partials summed: the call the brief's numbers time
            return fused_moe(x, *w, tw, ti, config=c)
        if (t, c.block_m) not in aligns:
            aligns[t, c.block_m] = moe_align_block_size(ti, E, c.block_m)
        return fused_moe(x, *w, tw, ti, config=c, align=aligns[t, c.block_m], reduce=False)

    def measure(t: int, c: MoeConfig, force: bool = False, whole: bool = False) -> float | None:
        key = (t, moe_keys(c), whole)
        if key in times and not force:
            return times[key]
        if moe_keys(c) in failed:
            return None
        if run.over() and not force:
            run.res["skipped"] += 1
            return None
        try:
            y = moe_call(t, c, ws[0], whole)
            err = rel_err(y if whole else y.sum(1), refs[t])
        except Exception as exc:  # noqa: BLE001: out of shared memory, mostly
            failed[moe_keys(c)] = f"{type(exc).__name__}: {exc}"
            run.fail(f"MoE T={t} {short(c)}", failed[moe_keys(c)])
            return None
        if not err < TOL:
            run.fail(f"MoE T={t} {short(c)}", f"rel err {err:.2e} over {TOL:g}")
            return None
        times[key] = run.time("moe", f"T={t}" + (" whole call" if whole else ""), c,
                              lambda: [moe_call(t, c, w, whole) for w in ws], hits[t] * 3 * I * D, err, force)
        return times[key]

    state = {t: moe_config(t) for t in MOE_T}
    try:
        if not args.swap_only:
            run.res["rounds"] = descend(state, lambda cs: None if run.over() else compile_round(cs), measure, log)
    except Exception:  # noqa: BLE001: keep what was measured
        run.fail("MoE descent", traceback.format_exc())
    # joint moves a one-field descent cannot make: at T=64, 16-row blocks whose two blocks
    # of one expert share each weight tile through L2 (group_m), with T=32's tiles
    try:
        joint = {t: [replace(c, dot_f16=moe_config(t).dot_f16) for c in cs] for t, cs in JOINT.items() if t in state}
        if args.swap_only:
            joint = {}
        elif not run.over():
            compile_round([c for cs in joint.values() for c in cs])
        for t, cs in joint.items():
            got = {c: measure(t, c) for c in [state[t]] + cs}
            ok = {c: us for c, us in got.items() if us is not None}
            if ok and min(ok.values()) < 0.995 * ok.get(state[t], float("inf")):
                state[t] = min(ok, key=ok.get)
            log(f"  T={t:<3d} joint      " + ", ".join(f"{short(c)}: {'-' if us is None else f'{us:.1f}'}"
                                                  for c, us in got.items()) + f" -> {short(state[t])}")
    except Exception:  # noqa: BLE001
        run.fail("MoE joint candidates", traceback.format_exc())
    # swap-AB: its own descent from swap_seed; it replaces a T's best only by beating it
    swapped = {t: swap_seed(t) for t in MOE_T}
    try:
        run.res["swap_rounds"] = descend(swapped, lambda cs: None if run.over() else compile_round(cs), measure,
                                         log, SWAP_AXES)
    except Exception:  # noqa: BLE001
        run.fail("MoE swap-AB descent", traceback.format_exc())
    for t in MOE_T:
        us_s, us_b = measure(t, swapped[t]), measure(t, state[t])
        log(f"  T={t:<3d} swap-AB best {short(swapped[t])}: {us_s}, unswapped best {short(state[t])}: {us_b}")
        if us_s is not None and (us_b is None or us_s < 0.995 * us_b):
            state[t] = swapped[t]
    # the winners as a tile table for the engine (SLUICE_MOE_TILES, fused_moe.load_tiles):
    # each measured T stands for moe_config's bracket around it
    (out / "moe_tiles.json").write_text(json.dumps({
        "device": props.name, "triton": triton.__version__, "source": "bench.decode_sweep",
        "decode": [{"max_tokens": TILE_BRACKET[t], "measured_T": t, "config": asdict(state[t])} for t in MOE_T]},
        indent=1))
    run.save()

    # 2. linear: every config at every shape and M
    def lin_call(mode: str, m: int, c: SmallMConfig, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """a8: the kernel on fp8 x; q8: per-token quant + the kernel (Fp8Linear today);
        a16: the kernel on bf16 x, fp16 dots (SLUICE_LINEAR_W8A16=1)."""
        if mode == "a16":
            return fp8_linear_small_m(lin_xb[m], w, s, config=c)
        xq, xs = per_token_quant_fp8(lin_xb[m]) if mode == "q8" else lin_x[m]
        return fp8_linear_small_m(xq, w, s, x_scale=xs, config=c)

    def lin_time(shape: str, m: int, c: SmallMConfig, force: bool = False, mode: str = "a8") -> float | None:
        n = LIN[shape]
        key = ("lin16" if mode == "a16" else "lin", c, m)
        if key in failed:
            return None
        try:
            # each against the fp32 product of what it multiplies: fp8 x, or the bf16 x itself
            ref = (fp8_linear_reference(lin_xb[m], *lin_ws[n][0]) if mode == "a16"
                   else fp8_linear_reference(*lin_x[m][:1], *lin_ws[n][0], x_scale=lin_x[m][1]))
            err = rel_err(lin_call(mode, m, c, *lin_ws[n][0]), ref)
        except Exception as exc:  # noqa: BLE001
            failed[key] = f"{type(exc).__name__}: {exc}"
            run.fail(f"linear {mode} {shape} M={m} {c}", failed[key])
            return None
        if not err < TOL:
            run.fail(f"linear {mode} {shape} M={m} {c}", f"rel err {err:.2e} over {TOL:g}")
            return None
        return run.time(f"linear {mode}", f"{shape} M={m}", c, lambda: [
            lin_call(mode, m, c, w, s) for w, s in lin_ws[n]], n * D, err, force)

    lin_best: dict[tuple[str, int], SmallMConfig] = {}
    lin_best16: dict[tuple[str, int], SmallMConfig] = {}
    try:
        for m in (() if args.skip_linear else LIN_M):
            for shape, n in LIN.items():
                got = {c: lin_time(shape, m, c) for c in dict.fromkeys([small_m_config(m, n, D)] + lin_configs())}
                ok = {c: us for c, us in got.items() if us is not None}
                if ok:
                    lin_best[shape, m] = min(ok, key=ok.get)
                    log(f"  linear {shape} M={m}: current {got[small_m_config(m, n, D)]}, best "
                        f"{ok[lin_best[shape, m]]:.2f} us {lin_best[shape, m]}")
                got16 = {c: lin_time(shape, m, c, mode="a16")
                         for c in dict.fromkeys([small_m_config(m, n, D)] + lin_configs())}
                ok16 = {c: us for c, us in got16.items() if us is not None}
                if ok16:
                    lin_best16[shape, m] = min(ok16, key=ok16.get)
                    log(f"  linear W8A16 {shape} M={m}: best {ok16[lin_best16[shape, m]]:.2f} us "
                        f"{lin_best16[shape, m]}")
    except Exception:  # noqa: BLE001
        run.fail("linear sweep", traceback.format_exc())
    run.save()

    # 3. current against best, re-timed back to back; the tables
    def cell(us: float | None, nbytes: float) -> str:
        return "-" if us is None else f"{us:7.1f} us {nbytes / us / 1e6:4.2f} TB/s"

    rows = ["", "MoE, fused_moe W8A16 as decode runs it (alignment given, reduce=False); us per call, TB/s of the "
            "routed experts' bytes; floor at 4.41 TB/s",
            f"{'T':>3} exp {'floor':>8} | {'current, whole call':22s} | {'current':22s} | {'best':22s} | best config"]
    for t in MOE_T:
        nbytes, cur, best = hits[t] * 3 * I * D, moe_config(t), state[t]
        try:
            whole = measure(t, cur, force=True, whole=True)
            us_cur = measure(t, cur, force=True)
            us_best = measure(t, best, force=True) if moe_keys(best) != moe_keys(cur) else us_cur
        except Exception:  # noqa: BLE001
            run.fail(f"MoE T={t} re-time", traceback.format_exc())
            continue
        run.res["summary"].append({"kernel": "moe", "T": t, "experts": hits[t], "current_whole_call_us": whole,
                                   "current_us": us_cur, "best_us": us_best, "current": asdict(cur),
                                   "best": asdict(best)})
        rows.append(f"{t:>3} {hits[t]:>3} {nbytes / HBM / 1e6:6.1f}us | {cell(whole, nbytes):22s} | "
                    f"{cell(us_cur, nbytes):22s} | {cell(us_best, nbytes):22s} | {best}")
    rows += ["", "fp8_linear_small_m, fp8 x with per-token scales, K 4096; us per call, TB/s of the weight's bytes",
             f"{'shape':>5} {'M':>3} {'floor':>8} | {'current':22s} | {'best':22s} | best config (current)"]
    for (shape, m), best in lin_best.items():
        n, cur = LIN[shape], small_m_config(m, n, D)
        us = {c: lin_time(shape, m, c, force=True) for c in dict.fromkeys([cur, best])}
        run.res["summary"].append({"kernel": "linear", "shape": shape, "M": m, "current_us": us[cur],
                                   "best_us": us[best], "current": asdict(cur), "best": asdict(best)})
        rows.append(f"{shape:>5} {m:>3} {n * D / HBM / 1e6:6.1f}us | {cell(us[cur], n * D):22s} | "
                    f"{cell(us[best], n * D):22s} | {best} ({cur})")
    rows += ["", "attention projections as Fp8Linear runs them: per-token quant + W8A8 kernel (current tiles) against "
             "W8A16 (bf16 x, fp16 dots, no quant launch; SLUICE_LINEAR_W8A16=1) with its best tiles",
             f"{'shape':>5} {'M':>3} | {'quant + W8A8':22s} | {'W8A16, current tiles':22s} | "
             f"{'W8A16, best tiles':22s} | W8A16 best tiles"]
    for (shape, m), best16 in lin_best16.items():
        n, cur = LIN[shape], small_m_config(m, n, D)
        q8 = lin_time(shape, m, cur, force=True, mode="q8")
        a16_cur = lin_time(shape, m, cur, force=True, mode="a16")
        a16 = lin_time(shape, m, best16, force=True, mode="a16")
        run.res["summary"].append({"kernel": "linear quant+W8A8 vs W8A16", "shape": shape, "M": m, "q8_us": q8,
                                   "a16_current_us": a16_cur, "a16_best_us": a16, "a16_best": asdict(best16)})
        rows.append(f"{shape:>5} {m:>3} | {cell(q8, n * D):22s} | {cell(a16_cur, n * D):22s} | "
                    f"{cell(a16, n * D):22s} | {best16}")
    pairs = [(r["q8_us"], r["a16_current_us"]) for r in run.res["summary"] if "q8_us" in r]
    if pairs and all(q is not None and a is not None for q, a in pairs):
        # the engine's choice as it stands (current tiles): W8A16 where it wins over every shape and M
        q8_sum, a16_sum = sum(q for q, _ in pairs), sum(a for _, a in pairs)
        (out / "linear_choice.json").write_text(json.dumps(
            {"w8a16": a16_sum < 0.995 * q8_sum, "q8_us_sum": q8_sum, "a16_us_sum": a16_sum}))
        rows.append(f"summed over shapes and M: quant + W8A8 {q8_sum:.1f} us, W8A16 {a16_sum:.1f} us "
                    f"-> OUT/linear_choice.json")
    rows.append(f"skipped past the budget: {run.res['skipped']} timings; failed: {len(run.res['failed'])} "
                f"(decode_sweep.json 'failed'); MoE GEMM kernels compiled: {len(compiled)}")
    run.save()
    for r in rows:
        log(r)


if __name__ == "__main__":
    main()
