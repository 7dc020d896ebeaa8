"""Where a decode step's time goes: torch.profiler over a few steps at each batch size.

    python3 -m bench.profile_decode CHECKPOINT OUT_DIR [--batch-sizes 1,64] [--steps 5]

Loads the checkpoint (fp8 when it is quantized), captures every CUDA graph, fills a batch
of random 64-token prompts, steps past the prefill, then profiles ``--steps`` decode
steps. Writes OUT/profile_b{B}.txt (the kernels by GPU time, per step) and prints one line
per batch: wall time per step, GPU kernel time per step, and the gap between them (the
host's share that the device waits for).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from sluice.engine.llm import LLM
from sluice.engine.sampling import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--batch-sizes", default="1,64")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--dtype", default="fp8")
    ap.add_argument("--no-lookahead", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=max(sizes), max_model_len=512, warm_in_background=False,
              progress=False, step_lookahead=not args.no_lookahead)
    rng = random.Random(0)
    summary = []
    for b in sizes:
        sp = SamplingParams(temperature=0, max_tokens=args.steps + 40, ignore_eos=True)
        for _ in range(b):
            llm.add_request([rng.randrange(3, 32000) for _ in range(64)], sp)
        for _ in range(8):  # past the prefill, into steady decode
            llm.step()
        torch.cuda.synchronize()
        began = time.perf_counter()
        for _ in range(args.steps):
            llm.step()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - began) * 1e3 / args.steps
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                llm.step()
            torch.cuda.synchronize()
        events = prof.key_averages()
        gpu_ms = sum(e.self_device_time_total for e in events) / 1e3 / args.steps
        table = events.table(sort_by="self_cuda_time_total", row_limit=40)
        (out / f"profile_b{b}.txt").write_text(f"{args.steps} steps at batch {b}\n{table}")
        row = {"batch": b, "wall_ms_per_step": round(wall_ms, 3), "gpu_kernel_ms_per_step": round(gpu_ms, 3),
               "lookahead": not args.no_lookahead}
        summary.append(row)
        print(json.dumps(row), flush=True)
        while llm.has_unfinished():
            llm.step()
    (out / "profile_summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
