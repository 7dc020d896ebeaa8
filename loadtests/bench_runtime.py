"""Cold start and wake times of a backend through the serverless runtime.

    python -m loadtests.bench_runtime                       # tiny random Mixtral on CPU
    python -m loadtests.bench_runtime --model /ckpt --dtype fp8 --repeats 3

For each repeat it measures, from a pool at zero:
  * stop -> first token: a cold start (load the checkpoint, warm up) plus the first token;
  * sleep -> first token: the worker was put to sleep (weights parked in host memory,
    accelerator memory released) and is woken by the request;
and the accelerator memory still held while asleep (CUDA only).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from sluice.gateway.backends.contract import GenerationRequest, SamplingParams
from sluice.gateway.backends.runtime import Pool
from sluice.gateway.settings import PoolConfig
from sluice.plugins.local_engine import LocalEngineBackend


def _cuda_memory() -> float | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**30


async def first_token(pool: Pool, prompt: str) -> float:
    """Seconds from asking the pool to the first streamed token."""
    began = time.perf_counter()
    request = GenerationRequest("bench", "m", SamplingParams(max_tokens=4, temperature=0.0),
                                prompt=prompt)
    first: float | None = None
    async with pool.lease() as worker:
        async for event in worker.backend.generate(request):  # to the end: the engine is idle after
            if event.tokens and first is None:
                first = time.perf_counter() - began
    if first is None:
        raise RuntimeError("no token generated")
    return first


async def run(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {"dtype": args.dtype}
    if args.model:
        options["model"] = args.model
    if args.num_kv_blocks:
        options["num_kv_blocks"] = args.num_kv_blocks
    opts = LocalEngineBackend.Options(**options)
    config = PoolConfig(min_workers=0, max_workers=1, idle_timeout_s=3600, idle_action="sleep")
    pool = Pool("bench", lambda: LocalEngineBackend(opts), config)
    await pool.start()
    baseline = _cuda_memory()
    cold, wake, asleep_gib = [], [], []
    for _ in range(args.repeats):
        cold.append(await first_token(pool, "Hello"))
        worker = pool._workers[0]  # noqa: SLF001 - the bench drives the pool's own transitions
        if worker.backend.supports_sleep:
            await pool._sleep_worker(worker)  # noqa: SLF001
            held = _cuda_memory()
            if held is not None and baseline is not None:
                asleep_gib.append(held - baseline)
            wake.append(await first_token(pool, "Hello again"))
        pool._workers.remove(worker)  # noqa: SLF001
        await pool._stop(worker)  # noqa: SLF001 - back to zero for the next cold start
    await pool.close()
    med = statistics.median
    return {
        "model": args.model or "tiny-mixtral (random)",
        "dtype": args.dtype,
        "repeats": args.repeats,
        "cold_start_to_first_token_s": {"median": med(cold), "all": cold},
        "wake_to_first_token_s": {"median": med(wake), "all": wake} if wake else None,
        "accelerator_gib_held_asleep": max(asleep_gib) if asleep_gib else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint directory (default: the tiny random Mixtral)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "fp8"])
    parser.add_argument("--num-kv-blocks", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    table = Table(title=f"runtime: {result['model']} ({result['dtype']})")
    table.add_column("measure")
    table.add_column("median", justify="right")
    table.add_column("runs", justify="right")
    for name, key in (("stop -> first token", "cold_start_to_first_token_s"),
                      ("sleep -> first token", "wake_to_first_token_s")):
        value = result[key]
        if value is None:
            table.add_row(name, "n/a (backend cannot sleep)", "")
        else:
            table.add_row(name, f"{value['median']:.3f} s",
                          ", ".join(f"{v:.3f}" for v in value["all"]))
    held = result["accelerator_gib_held_asleep"]
    table.add_row("GPU memory held asleep", "n/a (CPU)" if held is None else f"{held:.2f} GiB", "")
    Console().print(table)


if __name__ == "__main__":
    main()
