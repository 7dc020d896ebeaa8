"""`sluice warmup`: fill the compiled-kernel cache ahead of time (e.g. while building an image).

Starts each configured backend that can warm up (the in-process engine: it compiles its
kernels into its persistent cache and captures every CUDA graph), prints what it took,
and stops it. A later `sluice serve` on the same host then compiles nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from rich.console import Console

from sluice.gateway.backends.registry import build_backend, discover
from sluice.gateway.settings import Settings, SettingsError

out = Console()


async def warm(settings: Settings, names: list[str] | None) -> dict[str, Any]:
    plugins = discover(settings.plugins)
    chosen = names or list(settings.backends)
    unknown = sorted(set(chosen) - set(settings.backends))
    if unknown:
        raise SettingsError(f"no backend named {', '.join(unknown)} (configured: {', '.join(settings.backends)})")
    report: dict[str, Any] = {}
    for name in chosen:
        backend = build_backend(name, settings.backends[name], plugins)
        warmup = getattr(backend, "warmup", None)
        if warmup is None:
            report[name] = {"skipped": "nothing to warm up"}
            continue
        began = time.perf_counter()
        try:
            report[name] = {**await warmup(), "total_s": time.perf_counter() - began}
        finally:
            await backend.stop()
    return report


def cmd_warmup(args: argparse.Namespace, settings: Settings) -> int:
    report = asyncio.run(warm(settings, args.backend or None))
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        for name, result in report.items():
            out.print(f"{name}: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in result.items()))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("warmup", help="compile kernels and capture graphs ahead of time (kernel cache)")
    p.add_argument("--backend", action="append", help="only this backend (repeatable; default: all)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_warmup)
