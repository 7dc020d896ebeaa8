"""Decode MoE on the GPU: `moe_decode.py` (stream-K / split-K GEMMs with fp32 atomics)
against today's `fused_moe`, at Mixtral-8x7B shapes (one layer, fp8 experts), T = 1..64.

    python3 -m bench.moe_decode OUT_DIR [--sizes 1,2,4,8,16,32,64] [--budget 200]

1. Compile: every swept tile config's kernel, and the baseline's, on a thread pool
   (triton's AsyncCompileMode; `moe_decode.warming_up` compiles without launching).
   A config that fails to compile is left out.
2. Check, per T: the baseline and every config (each GEMM's tiles composed with the other
   GEMM's default) against `fused_moe_reference`; a config over 2e-2 is not timed.
3. Time (bench.kernels.bench_us: replayed from a CUDA graph, 4 rotating weight sets so
   L2 holds none, median of do_bench), per T: the baseline, the default config (whole
   call: align + memset + 2 GEMMs + cast), the same with the alignment given; then each
   GEMM alone over its tile configs and block_m; then the whole call with the best pair,
   with and without the alignment given, and launched with PDL (checked eager and
   graph-replayed first).
   Sweeping stops once --budget seconds have passed since the start; what was measured
   is still printed and written.
Output: a table (T, experts read, baseline / default / best: us and TB/s of the
experts' bytes; 4.41 TB/s is the H200's measured HBM read rate) and OUT/moe_decode.json
with every check and timing.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import torch
import triton
from triton.runtime._async_compile import AsyncCompileMode

from bench.kernels import bench_us, rel_err
from sluice.engine.kernels.fused_moe import fused_moe, fused_moe_reference, moe_align_block_size, moe_config
from sluice.engine.kernels.moe_decode import (DecodeConfig, GemmTiles, moe_decode, moe_decode_config,
                                              moe_decode_gemm1, moe_decode_gemm2, warming_up)
from sluice.engine.quant.fp8 import quantize_per_channel

E, K, D, I = 8, 2, 4096, 14336  # noqa: E741
DEV = "cuda"
SETS = 4  # rotating weight sets: 5.6 GB, L2 (50-60 MB) holds none
HBM = 4.41  # TB/s, measured HBM read rate of the H200
TOL = 2e-2

G1 = [  # N = 2I = 28672, K = D = 4096
    GemmTiles(64, 128, 4, 4, ctas_per_sm=2),
    GemmTiles(64, 128, 4, 6, ctas_per_sm=2),
    GemmTiles(64, 128, 4, 4, ctas_per_sm=3),
    GemmTiles(128, 128, 4, 4, ctas_per_sm=2),
    GemmTiles(128, 128, 8, 4, ctas_per_sm=2),
    GemmTiles(64, 256, 4, 4, ctas_per_sm=2),
    GemmTiles(128, 256, 8, 3, ctas_per_sm=1),
    GemmTiles(32, 256, 4, 5, ctas_per_sm=3),
    GemmTiles(128, 128, 4, 6, ctas_per_sm=2),
    GemmTiles(64, 128, 4, 8, ctas_per_sm=2),
    GemmTiles(64, 128, 4, 6, flat=False, split_k=1),  # fused_moe's GEMM1 tile
    GemmTiles(64, 128, 4, 4, flat=False, split_k=2),
    GemmTiles(128, 128, 4, 4, flat=False, split_k=4),
]
G2 = [  # N = D = 4096, K = I = 14336 (K/BK: 224 at 64, 112 at 128, 56 at 256)
    GemmTiles(128, 64, 4, 4, ctas_per_sm=2),
    GemmTiles(128, 128, 4, 3, ctas_per_sm=2),
    GemmTiles(64, 128, 4, 4, ctas_per_sm=2),
    GemmTiles(128, 64, 4, 6, ctas_per_sm=2),
    GemmTiles(256, 64, 8, 4, ctas_per_sm=1),
    GemmTiles(256, 128, 8, 3, ctas_per_sm=1),
    GemmTiles(128, 128, 8, 4, ctas_per_sm=2),
    GemmTiles(64, 64, 4, 6, ctas_per_sm=3),
    GemmTiles(128, 128, 4, 4, flat=False, split_k=4),
    GemmTiles(64, 256, 4, 4, flat=False, split_k=2),
    GemmTiles(32, 256, 4, 6, flat=False, split_k=1),  # fused_moe's GEMM2 tile
]
GEMV = DecodeConfig(2, GemmTiles(32, 128, 4, 3, ctas_per_sm=4), GemmTiles(32, 128, 4, 3, ctas_per_sm=4), use_dot=False)


def block_ms(t: int) -> list[int]:
    """BM per T: 16 while experts see few slots; at T=64 (~16 slots an expert) BM 16 splits
    about half the experts into two blocks, each reading the expert's weights."""
    return [16] if t <= 16 else ([16, 32] if t <= 32 else [32, 16])


class Run:
    def __init__(self, out: Path, budget: float) -> None:
        self.out = out
        self.t0 = time.perf_counter()
        self.budget = budget
        self.logf = open(out / "moe_decode_log.txt", "a")
        self.res: dict = {"checks": {}, "timings": [], "failed_compile": [], "skipped": 0}

    def log(self, msg: str) -> None:
        msg = f"[{time.perf_counter() - self.t0:6.1f}s] {msg}"
        print(msg, flush=True)
        self.logf.write(msg + "\n")

    def over(self) -> bool:
        return time.perf_counter() - self.t0 > self.budget

    def save(self) -> None:
        (self.out / "moe_decode.json").write_text(json.dumps(self.res, indent=1))

    def time(self, t: int, name: str, cfg: str, fn, nbytes: float, force: bool = False) -> float | None:
        if self.over() and not force:
            self.res["skipped"] += 1
            return None
        try:
            us = bench_us(fn, SETS)
        except Exception as exc:  # noqa: BLE001: a config that does not launch (shared memory) is skipped
            self.log(f"  T={t} {name} {cfg}: FAILED {type(exc).__name__}: {str(exc)[:160]}")
            return None
        tbs = nbytes / us / 1e6
        self.res["timings"].append({"T": t, "name": name, "config": cfg, "us": round(us, 2), "TB/s": round(tbs, 3),
                                    "of_hbm": round(tbs / HBM, 3)})
        self.log(f"  T={t:<3d} {name:22s} {us:8.2f} us {tbs:5.2f} TB/s ({tbs / HBM:4.0%}) {cfg}")
        return us


def weights() -> list[tuple[torch.Tensor, ...]]:
    sets = []
    for _ in range(SETS):
        w13, s13 = quantize_per_channel(torch.randn(E, 2 * I, D, device=DEV, dtype=torch.bfloat16) / D**0.5)
        w2, s2 = quantize_per_channel(torch.randn(E, D, I, device=DEV, dtype=torch.bfloat16) / I**0.5)
        sets.append((w13, s13, w2, s2))
    return sets


def routing(t: int) -> tuple[torch.Tensor, torch.Tensor]:
    w, ids = torch.randn(t, E, device=DEV).softmax(-1).topk(K)
    return (w / w.sum(-1, keepdim=True)).float().contiguous(), ids.int().contiguous()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--sizes", default="1,2,4,8,16,32,64")
    ap.add_argument("--budget", type=float, default=200.0, help="seconds; no new sweep timings after this")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = Run(out, args.budget)
    log = run.log
    sizes = [int(s) for s in args.sizes.split(",")]
    props = torch.cuda.get_device_properties(0)
    run.res["env"] = {"gpu": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
                      "triton": triton.__version__, "cuda": torch.version.cuda}
    log(json.dumps(run.res["env"]))
    torch.manual_seed(0)
    ws = weights()
    w0 = ws[0]
    log(f"weights: {SETS} sets of {E} experts ({E * 3 * I * D / 1e9:.2f} GB each)")
    inputs = {t: (torch.randn(t, D, device=DEV).bfloat16(), *routing(t)) for t in sizes}
    bms = sorted({bm for t in sizes for bm in block_ms(t)})
    defaults = {t: moe_decode_config(t) for t in sizes}

    # 1. compile every config on a pool (one compile per config serves every T)
    pending: list[tuple[str, object]] = []
    got: list = []
    t_c = time.perf_counter()
    x1, tw1, ti1 = inputs[sizes[0]]
    gu1 = torch.zeros(ti1.numel(), 2 * I, device=DEV)
    o1 = torch.zeros(x1.shape[0], D, device=DEV)
    def warm(key: str, launch) -> None:
        n = len(got)
        try:
            launch()
        except Exception as exc:  # noqa: BLE001: raised while binding (a tile that does not divide)
            pending.append((key, exc))
            return
        pending.append((key, got[-1] if len(got) > n else None))

    with AsyncCompileMode(ThreadPoolExecutor(16), ignore_errors=True):
        with warming_up() as got:
            for bm in bms:
                al = moe_align_block_size(ti1, E, bm)
                for g in set(G1) | {defaults[t].gemm1 for t in sizes}:
                    warm(f"g1 bm{bm} {g.short()}", lambda: moe_decode_gemm1(x1, w0[0], w0[1], al, K, gu1, bm, g))
                for g in set(G2) | {defaults[t].gemm2 for t in sizes}:
                    warm(f"g2 bm{bm} {g.short()}", lambda: moe_decode_gemm2(gu1, w0[2], w0[3], tw1, al, o1, bm, g))
            if any(t <= 2 for t in sizes):
                al = moe_align_block_size(ti1, E, GEMV.block_m)
                warm(f"gemv g1 {GEMV.gemm1.short()}",
                     lambda: moe_decode_gemm1(x1, w0[0], w0[1], al, K, gu1, GEMV.block_m, GEMV.gemm1, False))
                warm(f"gemv g2 {GEMV.gemm2.short()}",
                     lambda: moe_decode_gemm2(gu1, w0[2], w0[3], tw1, al, o1, GEMV.block_m, GEMV.gemm2, False))
        # this thread meanwhile: the baseline's kernels and the align kernels (each launch
        # waits for its own compile, queued behind the configs')
        for t in sizes:
            x, tw, ti = inputs[t]
            fused_moe(x, *w0, tw, ti)
            for bm in block_ms(t) + [GEMV.block_m]:
                moe_align_block_size(ti, E, bm)
        torch.cuda.synchronize()
    failed = set()
    for key, fk in pending:
        exc = fk if isinstance(fk, Exception) else (fk.future.exception() if hasattr(fk, "future") else None)
        if exc is not None:
            failed.add(key)
            run.res["failed_compile"].append(f"{key}: {type(exc).__name__}: {str(exc)[:200]}")
    log(f"compiled {len(pending)} kernels in {time.perf_counter() - t_c:.1f}s; failed: {sorted(failed) or 'none'}")
    del gu1, o1

    def ok1(bm: int, g: GemmTiles) -> bool:
        return f"g1 bm{bm} {g.short()}" not in failed

    def ok2(bm: int, g: GemmTiles) -> bool:
        return f"g2 bm{bm} {g.short()}" not in failed

    # 2. checks
    bad: set[tuple[int, str]] = set()
    refs: dict[int, torch.Tensor] = {}
    for t in sizes:
        x, tw, ti = inputs[t]
        ref = refs[t] = fused_moe_reference(x, *w0, tw, ti)
        errs = {"baseline": rel_err(fused_moe(x, *w0, tw, ti), ref)}
        cands = {"default": defaults[t]}
        if t <= 2:
            cands["gemv"] = GEMV
        for bm in block_ms(t):
            d = replace(defaults[t], block_m=bm)
            for g in G1:
                if ok1(bm, g):
                    cands[f"g1 bm{bm} {g.short()}"] = replace(d, gemm1=g)
            for g in G2:
                if ok2(bm, g):
                    cands[f"g2 bm{bm} {g.short()}"] = replace(d, gemm2=g)
        for name, cfg in cands.items():
            try:
                errs[name] = rel_err(moe_decode(x, *w0, tw, ti, config=cfg), ref)
            except Exception as exc:  # noqa: BLE001
                errs[name] = float("nan")
                log(f"  check T={t} {name}: {type(exc).__name__}: {str(exc)[:160]}")
        for name, err in errs.items():
            if not err < TOL:
                bad.add((t, name))
        run.res["checks"][str(t)] = {n: (round(e, 6) if e == e else None) for n, e in errs.items()}
        worst = max((e for e in errs.values() if e == e), default=float("nan"))
        log(f"check T={t}: baseline {errs['baseline']:.2e}, default {errs['default']:.2e}, worst {worst:.2e}, "
            f"over {TOL:g}: {sorted(n for tt, n in bad if tt == t) or 'none'}")
    run.save()

    # 3a. baseline and default, every T (these run even past the budget)
    hits = {t: int(inputs[t][2].unique().numel()) for t in sizes}
    for t in sizes:
        x, tw, ti = inputs[t]
        nbytes = hits[t] * 3 * I * D
        run.time(t, "baseline fused_moe", str(moe_config(t)), lambda: [fused_moe(x, *w, tw, ti) for w in ws],
                 nbytes, force=True)
        cfg = defaults[t]
        run.time(t, "default", cfg.short(), lambda: [moe_decode(x, *w, tw, ti, config=cfg) for w in ws],
                 nbytes, force=True)
        al = moe_align_block_size(ti, E, cfg.block_m)
        run.time(t, "default, align given", cfg.short(),
                 lambda: [moe_decode(x, *w, tw, ti, alignment=al, config=cfg) for w in ws], nbytes, force=True)
        if t <= 2 and (t, "gemv") not in bad:
            run.time(t, "gemv", GEMV.short(), lambda: [moe_decode(x, *w, tw, ti, config=GEMV) for w in ws], nbytes)
    run.save()

    # 3b. each GEMM alone, per block_m and tiles (no memset: the atomics pile up, harmlessly)
    best: dict[int, dict] = {}
    for t in sizes:
        x, tw, ti = inputs[t]
        numel = ti.numel()
        gu = torch.zeros(numel, 2 * I, device=DEV)
        o = torch.zeros(t, D, device=DEV)
        for bm in block_ms(t):
            al = moe_align_block_size(ti, E, bm)
            for g in G1:
                if ok1(bm, g) and (t, f"g1 bm{bm} {g.short()}") not in bad:
                    us = run.time(t, f"gemm1 bm{bm}", g.short(),
                                  lambda: [moe_decode_gemm1(x, w[0], w[1], al, K, gu, bm, g) for w in ws],
                                  hits[t] * 2 * I * D)
                    if us is not None and us < best.setdefault(t, {}).get(("g1", bm), (1e9,))[0]:
                        best[t][("g1", bm)] = (us, g)
            for g in G2:
                if ok2(bm, g) and (t, f"g2 bm{bm} {g.short()}") not in bad:
                    us = run.time(t, f"gemm2 bm{bm}", g.short(),
                                  lambda: [moe_decode_gemm2(gu, w[2], w[3], tw, al, o, bm, g) for w in ws],
                                  hits[t] * I * D)
                    if us is not None and us < best.setdefault(t, {}).get(("g2", bm), (1e9,))[0]:
                        best[t][("g2", bm)] = (us, g)
        del gu, o
        run.save()

    # 3c. the whole call with each T's best pair, then the same launched with PDL (GEMM2's
    # programs start during GEMM1's tail; prefetching 0 or 8 k-steps of weights into L2)
    chosen: dict[int, DecodeConfig] = {}
    for t in sizes:
        pairs = [(b1[0] + best[t][("g2", bm)][0], bm, b1[1], best[t][("g2", bm)][1])
                 for (kind, bm), b1 in best.get(t, {}).items() if kind == "g1" and ("g2", bm) in best[t]]
        if pairs:
            _, bm, g1, g2 = min(pairs, key=lambda p: p[0])
            chosen[t] = DecodeConfig(bm, g1, g2)
    pdl_variants = {t: [replace(c, pdl=True), replace(c, pdl=True, prefetch=8)] for t, c in chosen.items()}
    t_c = time.perf_counter()
    with AsyncCompileMode(ThreadPoolExecutor(16), ignore_errors=True):
        with warming_up():
            for t, cs in pdl_variants.items():
                x, tw, ti = inputs[t]
                for c in cs:
                    try:
                        moe_decode(x, *w0, tw, ti, config=c)
                    except Exception as exc:  # noqa: BLE001
                        log(f"  warm T={t} {c.short()}: {type(exc).__name__}: {str(exc)[:160]}")
    log(f"compiled the PDL variants in {time.perf_counter() - t_c:.1f}s")
    summary = []
    for t in sizes:
        x, tw, ti = inputs[t]
        nbytes = hits[t] * 3 * I * D
        row = {"T": t, "experts": hits[t]}
        for r in run.res["timings"]:
            if r["T"] == t and r["name"] in ("baseline fused_moe", "default", "default, align given", "gemv"):
                row[r["name"]] = r["us"]
        if t in chosen:
            cfg = chosen[t]
            row["best_config"] = cfg.short()
            row["best_config_fields"] = asdict(cfg)
            row["best"] = run.time(t, "best pair", cfg.short(),
                                   lambda: [moe_decode(x, *w, tw, ti, config=cfg) for w in ws], nbytes, force=True)
            al = moe_align_block_size(ti, E, cfg.block_m)
            row["best, align given"] = run.time(
                t, "best pair, align given", cfg.short(),
                lambda: [moe_decode(x, *w, tw, ti, alignment=al, config=cfg) for w in ws], nbytes, force=True)
            for c in pdl_variants[t]:
                name = f"best pair, pdl{c.prefetch}"
                try:  # eager and graph-replayed against the reference: gdc_wait must hold GEMM2 back
                    err = rel_err(moe_decode(x, *w0, tw, ti, config=c), refs[t])
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g):
                        y = moe_decode(x, *w0, tw, ti, config=c)
                    g.replay()
                    err_g = rel_err(y, refs[t])
                    del g
                except Exception as exc:  # noqa: BLE001
                    log(f"  T={t} {name}: FAILED {type(exc).__name__}: {str(exc)[:160]}")
                    continue
                run.res["checks"][str(t)][name] = round(err, 6) if err == err else None
                run.res["checks"][str(t)][name + " (graph)"] = round(err_g, 6) if err_g == err_g else None
                if not (err < TOL and err_g < TOL):
                    log(f"  T={t} {name}: rel err {err:.2e}, graph-replayed {err_g:.2e}: over {TOL:g}, not timed")
                    continue
                row[name] = run.time(t, name, c.short(), lambda: [moe_decode(x, *w, tw, ti, config=c) for w in ws],
                                     nbytes, force=True)
        summary.append(row)
    run.res["summary"] = summary
    run.save()

    def cell(us: float | None, nbytes: float) -> str:
        return "-" if us is None else f"{us:7.1f} us {nbytes / us / 1e6:4.2f} TB/s"

    log("")
    cols = ["baseline fused_moe", "default", "best pair", "best pair, align given", "best pair, pdl0", "best pair, pdl8"]
    keys = ["baseline fused_moe", "default", "best", "best, align given", "best pair, pdl0", "best pair, pdl8"]
    log("T  | exp | floor us | " + " | ".join(f"{c:23s}" for c in cols) + " | best pair config")
    for row in summary:
        nbytes = row["experts"] * 3 * I * D
        log(f"{row['T']:<3d}| {row['experts']:<3d} | {nbytes / HBM / 1e6:8.1f} | "
            + " | ".join(f"{cell(row.get(k), nbytes):23s}" for k in keys) + f" | {row.get('best_config', '-')}")
    log(f"skipped past the budget: {run.res['skipped']} timings; failed compiles: {len(run.res['failed_compile'])}; "
        f"checks over {TOL:g}: {sorted(bad) or 'none'}")


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        raise
