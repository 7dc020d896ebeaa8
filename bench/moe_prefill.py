"""Prefill MoE on the GPU: the CUTLASS grouped GEMM (torch._scaled_grouped_mm) against the
fused triton W8A8 kernel, per token count, at Mixtral-8x7B shapes (one layer, fp8 experts).

    python3 -m bench.moe_prefill OUT_DIR [--sizes 128,256,...]

Checks first, on fresh random inputs: each variant against the fp32 reference on the
same fp8 weights and against the bf16 experts they were quantized from, including an
expert that gets no tokens; the grouped path replayed from a CUDA graph against eager.
Then times every variant per size (do_bench median, weights 1.4 GB so L2 holds none)
and writes results.json, a table, and `grouped_min_tokens.txt`: the smallest measured
size from which the grouped GEMM wins at every larger measured size.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

from sluice.engine.kernels.fused_moe import fused_moe, fused_moe_reference, moe_prefill_config
from sluice.engine.kernels.moe_grouped import fp8_moe_grouped, grouped_mm_available
from sluice.engine.quant.fp8 import quantize_per_channel

E, K, D, I = 8, 2, 4096, 14336  # noqa: E741


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def routing(t: int, empty_expert: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.randn(t, E, device="cuda")
    if empty_expert:
        logits[:, 3] = -1e4
    w, ids = logits.softmax(-1).topk(K)
    return (w / w.sum(-1, keepdim=True)).float().contiguous(), ids.int().contiguous()


def variants(w: dict) -> dict:
    args = (w["w13"], w["s13"], w["w2"], w["s2"])
    return {
        "triton_w8a8": lambda x, tw, ti: fused_moe(x, *args, tw, ti, config=moe_prefill_config(x.shape[0])),
        "grouped_fast": lambda x, tw, ti: fp8_moe_grouped(x, *args, tw, ti, fast_accum=True),
        "grouped": lambda x, tw, ti: fp8_moe_grouped(x, *args, tw, ti, fast_accum=False),
        "grouped_fast_align16": lambda x, tw, ti: fp8_moe_grouped(x, *args, tw, ti, fast_accum=True, align=16),
    }


def checks(w: dict, bf16: dict, log) -> dict:
    out = {}
    for t, empty in ((512, False), (333, True), (4096, False)):
        x = torch.randn(t, D, device="cuda").bfloat16()
        tw, ti = routing(t, empty)
        ref_q = fused_moe_reference(x, w["w13"], w["s13"], w["w2"], w["s2"], tw, ti)
        ref_b = fused_moe_reference(x, bf16["w13"], None, bf16["w2"], None, tw, ti)
        w8a16 = fused_moe(x, w["w13"], w["s13"], w["w2"], w["s2"], tw, ti)
        row = {"w8a16_vs_fp8ref": rel_err(w8a16, ref_q), "w8a16_vs_bf16": rel_err(w8a16, ref_b),
               "fp8ref_vs_bf16": rel_err(ref_q, ref_b)}
        for name, fn in variants(w).items():
            y = fn(x, tw, ti)
            row[f"{name}_vs_fp8ref"], row[f"{name}_vs_bf16"] = rel_err(y, ref_q), rel_err(y, ref_b)
        out[f"T={t}" + (" (expert 3 empty)" if empty else "")] = row
        log(f"check T={t} empty={empty}: " + ", ".join(f"{k} {v:.2e}" for k, v in row.items()))
    # graph capture: replays with new inputs must equal eager on those inputs
    t = 2048
    x = torch.randn(t, D, device="cuda").bfloat16()
    tw, ti = routing(t)
    fn = variants(w)["grouped_fast"]
    fn(x, tw, ti)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(g):
            y = fn(x, tw, ti)
        diffs = []
        for _ in range(3):
            x.copy_(torch.randn_like(x))
            tw2, ti2 = routing(t)
            tw.copy_(tw2)
            ti.copy_(ti2)
            g.replay()
            diffs.append(rel_err(y, fn(x, tw, ti)))
        out["graph_replay_vs_eager"] = diffs
        log(f"graph replay vs eager (T={t}, 3 fresh inputs): {diffs}")
    except Exception as exc:  # report: the engine must then keep grouped out of graphs
        out["graph_replay_vs_eager"] = f"FAILED: {type(exc).__name__}: {exc}"
        log(out["graph_replay_vs_eager"])
    return out


def timings(w: dict, sizes: list[int], log) -> list[dict]:
    rows = []
    for t in sizes:
        x = torch.randn(t, D, device="cuda").bfloat16()
        tw, ti = routing(t)
        flop = 2 * t * K * (2 * I * D + D * I)
        row = {"tokens": t}
        for name, fn in variants(w).items():
            try:
                fn(x, tw, ti)
                us = do_bench(lambda: fn(x, tw, ti), warmup=25, rep=150, return_mode="median") * 1e3
                row[name] = round(us, 1)
                row[name + "_tflops"] = round(flop / us / 1e6, 0)
            except Exception as exc:
                row[name] = f"FAILED {type(exc).__name__}: {str(exc)[:200]}"
        # the two grouped GEMMs alone (no quant, gather, combine): what CUTLASS itself takes
        a = torch.randn(t * K, D, device="cuda").to(torch.float8_e4m3fn)
        sa = torch.rand(t * K, device="cuda") + 0.5
        h = torch.randn(t * K, I, device="cuda").to(torch.float8_e4m3fn)
        offs = torch.cumsum(torch.bincount(ti.reshape(-1).long(), minlength=E), 0).int()
        gemms = lambda: (torch._scaled_grouped_mm(a, w["w13"].transpose(1, 2), sa, w["s13"], offs=offs,  # noqa: E731
                                                  out_dtype=torch.bfloat16, use_fast_accum=True),
                         torch._scaled_grouped_mm(h, w["w2"].transpose(1, 2), sa, w["s2"], offs=offs,
                                                  out_dtype=torch.bfloat16, use_fast_accum=True))
        us = do_bench(gemms, warmup=25, rep=150, return_mode="median") * 1e3
        row["grouped_gemms_only"], row["grouped_gemms_only_tflops"] = round(us, 1), round(flop / us / 1e6, 0)
        rows.append(row)
        log(json.dumps(row))
    return rows


def crossover(rows: list[dict]) -> int | None:
    """Smallest measured size from which grouped_fast beats triton at every larger size."""
    best = None
    for row in reversed(rows):
        g, tr = row.get("grouped_fast"), row.get("triton_w8a8")
        if not (isinstance(g, float) and isinstance(tr, float) and g < tr):
            break
        best = row["tokens"]
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--sizes", default="128,256,512,1024,1536,2048,3072,4096,8192")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / "moe_prefill_log.txt", "a")

    def log(msg: str) -> None:
        print(msg, flush=True)
        logf.write(msg + "\n")

    env = {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
           "gpu": torch.cuda.get_device_name(), "has_scaled_grouped_mm": hasattr(torch, "_scaled_grouped_mm"),
           "grouped_mm_available": grouped_mm_available()}
    log(json.dumps(env))
    if not env["grouped_mm_available"]:
        log("torch._scaled_grouped_mm not usable here")
        sys.exit(1)
    torch.manual_seed(0)
    bf16 = {"w13": (torch.randn(E, 2 * I, D, device="cuda") * 0.02).bfloat16(),
            "w2": (torch.randn(E, D, I, device="cuda") * 0.02).bfloat16()}
    w = {}
    w["w13"], w["s13"] = quantize_per_channel(bf16["w13"])
    w["w2"], w["s2"] = quantize_per_channel(bf16["w2"])
    results = {"env": env, "checks": checks(w, bf16, log)}
    del bf16
    torch.cuda.empty_cache()
    results["timings"] = timings(w, [int(s) for s in args.sizes.split(",")], log)
    results["grouped_min_tokens"] = crossover(results["timings"])
    (out / "moe_prefill.json").write_text(json.dumps(results, indent=1))
    (out / "grouped_min_tokens.txt").write_text(str(results["grouped_min_tokens"] or 1 << 30))
    log("tokens | triton_w8a8 us (TF/s) | grouped_fast | grouped | grouped_fast_align16 | 2 GEMMs only")
    for r in results["timings"]:
        cells = [f"{r.get(n)} ({r.get(n + '_tflops', '-')})" for n in
                 ("triton_w8a8", "grouped_fast", "grouped", "grouped_fast_align16", "grouped_gemms_only")]
        log(f"{r['tokens']} | " + " | ".join(cells))
    log(f"grouped_min_tokens = {results['grouped_min_tokens']}")


if __name__ == "__main__":
    main()
