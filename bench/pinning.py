"""How fast can host memory be page-locked? (engine/offload.py parks the weights in it.)

    python3 -m bench.pinning --gb 8 --json

Takes ``--gb`` GiB of page-locked host memory, 1 GiB at a time, by each method below,
then times device-to-host and host-to-device copies of all of it (1 GiB per copy) and
gives it back. Needs CUDA; only torch (and the standard library).

    pinned              torch.empty(pin_memory=True) (cudaHostAlloc), one chunk after another
    pinned_threads{N}   the same from N threads at once
    register            torch.empty + cudaHostRegister per chunk (staging.pinned_buffer today)
    mmap_touch{N}_register      anonymous mmap, pages faulted in by N threads, cudaHostRegister
    mmap_thp_touch{N}_register  the same after madvise(MADV_HUGEPAGE)
    mmap_thp_touch1_register_threads{N}  N chunks at once, each faulted and registered by its thread
    pinned_host_register{N}     torch's pinned allocator set to malloc + cudaHostRegister with N
                                threads (pinned_use_cuda_host_register); runs last: it changes
                                the allocator's settings for the rest of the process
"""

from __future__ import annotations

import argparse
import gc
import json
import mmap
import re
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

GiB = 1 << 30
PAGE = 4096


def _anon_huge_bytes() -> int:
    """AnonHugePages of this process (bytes backed by transparent huge pages)."""
    try:
        text = Path("/proc/self/smaps_rollup").read_text()
    except OSError:
        return 0
    m = re.search(r"^AnonHugePages:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) * 1024 if m else 0


def _sysfs(name: str) -> str:
    try:
        return Path(f"/sys/kernel/mm/transparent_hugepage/{name}").read_text().strip()
    except OSError:
        return "n/a"


def _register(t: torch.Tensor) -> None:
    err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel(), 0)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister returned {err}")
    weakref.finalize(t, torch.cuda.cudart().cudaHostUnregister, t.data_ptr())


def _touch(t: torch.Tensor, threads: int) -> None:
    """Fault every page in: one byte written per 4 KiB, by ``threads`` threads (torch
    releases the GIL while it writes)."""
    n = t.numel()
    step = -(-n // threads // PAGE) * PAGE
    spans = [(a, min(n, a + step)) for a in range(0, n, step)]
    if threads == 1:
        for a, b in spans:
            t[a:b:PAGE].zero_()
        return
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda s: t[s[0]:s[1]:PAGE].zero_(), spans))


class Phases:
    """Seconds spent in each phase, summed over chunks (and threads)."""

    def __init__(self) -> None:
        self.s: dict[str, float] = {}

    def add(self, name: str, began: float) -> float:
        now = time.perf_counter()
        self.s[name] = self.s.get(name, 0.0) + now - began
        return now


def pinned(nbytes: int, phases: Phases) -> tuple[torch.Tensor, Callable[[], None]]:
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True), lambda: None


def registered(nbytes: int, phases: Phases) -> tuple[torch.Tensor, Callable[[], None]]:
    began = time.perf_counter()
    t = torch.empty(nbytes, dtype=torch.uint8)
    began = phases.add("malloc_s", began)
    _register(t)
    phases.add("register_s", began)
    return t, lambda: None


def mapped(thp: bool, touch_threads: int) -> Callable[[int, Phases], tuple[torch.Tensor, Callable[[], None]]]:
    def take(nbytes: int, phases: Phases) -> tuple[torch.Tensor, Callable[[], None]]:
        began = time.perf_counter()
        mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if thp:
            mm.madvise(mmap.MADV_HUGEPAGE)
        t = torch.frombuffer(mm, dtype=torch.uint8)
        began = phases.add("mmap_s", began)
        _touch(t, touch_threads)
        began = phases.add("fault_s", began)
        _register(t)
        phases.add("register_s", began)
        return t, mm.close  # called once the tensor is gone (it holds a view of mm)
    return take


def measure(take: Callable[[int, Phases], tuple[torch.Tensor, Callable[[], None]]], gb: int,
            threads: int, src: torch.Tensor) -> dict:
    phases = Phases()
    huge_before = _anon_huge_bytes()
    torch.cuda.synchronize()
    began = time.perf_counter()
    if threads == 1:
        taken = [take(GiB, phases) for _ in range(gb)]
    else:
        with ThreadPoolExecutor(threads) as pool:
            taken = list(pool.map(lambda _: take(GiB, phases), range(gb)))
    take_s = time.perf_counter() - began
    out = {"take_s": round(take_s, 3), "take_GBps": round(gb * GiB / take_s / 1e9, 2),
           "thp_GB": round((_anon_huge_bytes() - huge_before) / 1e9, 2),
           "pinned": all(t.is_pinned() for t, _ in taken)}
    out.update({k: round(v, 3) for k, v in phases.s.items()})
    for direction in ("d2h", "h2d"):
        rates = []
        for _ in range(2):  # the first pass may pay for first touches; the second is reported
            torch.cuda.synchronize()
            began = time.perf_counter()
            for t, _ in taken:
                (t.copy_(src, non_blocking=True) if direction == "d2h" else src.copy_(t, non_blocking=True))
            torch.cuda.synchronize()
            rates.append(gb * GiB / (time.perf_counter() - began) / 1e9)
        out[f"{direction}_GBps"] = round(rates[-1], 2)
    began = time.perf_counter()
    closers = [close for _, close in taken]
    del taken
    gc.collect()  # unregisters (weakref.finalize) before the memory is unmapped
    for close in closers:
        close()
    if hasattr(torch._C, "_host_emptyCache"):
        torch._C._host_emptyCache()  # torch's pinned allocator caches freed blocks
    out["free_s"] = round(time.perf_counter() - began, 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=int, default=8, help="GiB taken by each method (1 GiB chunks)")
    ap.add_argument("--threads", default="4,8", help="thread counts for the threaded methods")
    ap.add_argument("--only", default="", help="comma-separated method names (default: all)")
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.pinning needs CUDA")
    torch.set_num_threads(1)  # the thread counts below are the only parallelism
    counts = [int(n) for n in args.threads.split(",") if n]
    src = torch.full((GiB,), 7, dtype=torch.uint8, device="cuda")
    methods: list[tuple[str, Callable, int]] = [("pinned", pinned, 1)]
    methods += [(f"pinned_threads{n}", pinned, n) for n in counts]
    methods += [("register", registered, 1)]
    for n in counts:
        methods += [(f"mmap_touch{n}_register", mapped(False, n), 1),
                    (f"mmap_thp_touch{n}_register", mapped(True, n), 1)]
    methods += [(f"mmap_thp_touch1_register_threads{n}", mapped(True, 1), n) for n in counts]
    wanted = {m for m in args.only.split(",") if m}
    results: dict[str, dict] = {}
    for name, take, threads in methods:
        if wanted and name not in wanted:
            continue
        try:
            results[name] = measure(take, args.gb, threads, src)
        except Exception as exc:  # noqa: BLE001 (one method failing must not hide the others)
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        gc.collect()
    n = max(counts, default=8)
    name = f"pinned_host_register{n}"
    if not wanted or name in wanted:
        try:
            torch.cuda.memory._set_allocator_settings(
                f"pinned_use_cuda_host_register:True,pinned_num_register_threads:{n}")
            results[name] = measure(pinned, args.gb, 1, src)
        except Exception as exc:  # noqa: BLE001
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    report = {"gb": args.gb, "chunk_GiB": 1, "torch": torch.__version__, "device": torch.cuda.get_device_name(),
              "thp_enabled": _sysfs("enabled"), "thp_defrag": _sysfs("defrag"), "methods": results}
    if args.json:
        print(json.dumps(report))
        return
    print(f"{report['device']}, torch {report['torch']}, THP enabled: {report['thp_enabled']}, "
          f"defrag: {report['thp_defrag']}; {args.gb} GiB per method")
    for name, r in results.items():
        if "error" in r:
            print(f"  {name:40s} error: {r['error']}")
        else:
            print(f"  {name:40s} take {r['take_GBps']:7.2f} GB/s ({r['take_s']:6.2f}s)  d2h {r['d2h_GBps']:6.2f}  "
                  f"h2d {r['h2d_GBps']:6.2f} GB/s  thp {r['thp_GB']:5.2f} GB  pinned {r['pinned']}")


if __name__ == "__main__":
    main()
