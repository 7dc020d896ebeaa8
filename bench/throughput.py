"""Throughput benchmark: ``python -m bench.throughput``.

Defaults to the tiny random Mixtral on the CPU (no checkpoint needed). Real shapes
with random weights built directly on the device:

    python -m bench.throughput --preset mixtral-8x7b --random-weights --num-layers 4 --dtype bfloat16

Tensor or expert parallel, one process per GPU (rank 0 prints; docs/parallel.md):

    torchrun --nproc-per-node 2 -m bench.throughput --parallel tp --preset mixtral-8x7b --random-weights --dtype fp8
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from dataclasses import asdict, dataclass

import torch

from sluice.engine import parallel
from sluice.engine.config import PRESETS, ModelConfig
from sluice.engine.llm import LLM
from sluice.engine.sampling import SamplingParams


@dataclass
class Result:
    batch_size: int
    prompt_len: int
    decode_len: int
    ttft_s: float  # until every sequence of the batch has its first token
    prefill_tok_s: float
    decode_tok_s: float  # generated tokens per second after the first
    total_s: float


def run_batch(llm: LLM, batch: int, prompt_len: int, decode_len: int, seed: int = 0) -> Result:
    rng = random.Random(seed)
    vocab = llm.model.config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=decode_len, ignore_eos=True)
    seqs = [llm.add_request([rng.randrange(3, vocab) for _ in range(prompt_len)], params) for _ in range(batch)]
    sync = torch.cuda.synchronize if llm.runner.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    first = None
    while llm.has_unfinished():
        llm.step()
        if first is None and all(s.num_completion_tokens >= 1 for s in seqs):
            sync()
            first = time.perf_counter()
    sync()
    end = time.perf_counter()
    first = first or end
    decoded = batch * (decode_len - 1)
    return Result(batch, prompt_len, decode_len, first - start, batch * prompt_len / (first - start),
                  decoded / (end - first) if decoded else 0.0, end - start)


def build_llm(args: argparse.Namespace) -> tuple[LLM, str]:
    common = dict(dtype=args.dtype, device=args.device, max_num_seqs=max(args.batch_sizes),
                  max_model_len=args.prompt_len + args.decode_len + 16, enforce_eager=args.eager,
                  max_num_batched_tokens=args.max_batched_tokens, warm_in_background=False, progress=False,
                  parallel=args.parallel, world_size=args.world_size, step_lookahead=not args.no_lookahead)
    if args.model:
        return LLM(args.model, **common), args.model
    if args.preset != "tiny-mixtral" and not args.random_weights:
        raise SystemExit(f"--preset {args.preset} has no checkpoint here: add --random-weights or use --model")
    raw = dict(PRESETS[args.preset])
    if args.num_layers:
        raw["num_hidden_layers"] = args.num_layers
    cfg = ModelConfig.from_dict(raw, source=args.preset)
    return LLM(model_config=cfg, **common), f"{args.preset} (random weights, {cfg.num_layers} layers)"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="HF checkpoint directory (default: a preset with random weights)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny-mixtral")
    p.add_argument("--random-weights", action="store_true", help="build the preset with random weights")
    p.add_argument("--num-layers", type=int, help="fewer layers than the preset (fits smaller devices)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", "fp8"])
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--decode-len", type=int, default=64)
    p.add_argument("--max-batched-tokens", type=int, default=4096)
    p.add_argument("--eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--no-lookahead", action="store_true", help="step in lock-step (EngineConfig.step_lookahead off)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.add_argument("--parallel", choices=["none", "tp", "ep"], default="none", help="under torchrun, one rank a GPU")
    p.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", "1")))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    llm, label = build_llm(args)
    run_batch(llm, 1, min(args.prompt_len, 16), 4)  # warm-up
    # distinct prompts per batch (seed): a repeated batch would time prefix-cache hits
    results = [run_batch(llm, b, args.prompt_len, args.decode_len, seed=1 + i) for i, b in enumerate(args.batch_sizes)]
    info = {"model": label, "device": str(llm.runner.device), "dtype": str(llm.runner.dtype).removeprefix("torch."),
            "cuda_graphs": llm.runner.graphs is not None, "threads": torch.get_num_threads(),
            "parallel": f"{args.parallel}={args.world_size}"}
    parallel.destroy()
    if llm.sharding.group.rank != 0:  # every rank ran the same steps; rank 0 reports
        return
    if args.json:
        print(json.dumps({**info, "results": [asdict(r) for r in results]}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{label} on {info['device']} ({info['dtype']}, cuda graphs: {info['cuda_graphs']}, "
                        f"parallel {info['parallel']})")
    for col in ("batch", "prompt", "decode", "TTFT s", "prefill tok/s", "decode tok/s", "total s"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(str(r.batch_size), str(r.prompt_len), str(r.decode_len), f"{r.ttft_s:.3f}",
                      f"{r.prefill_tok_s:,.0f}", f"{r.decode_tok_s:,.1f}", f"{r.total_s:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
