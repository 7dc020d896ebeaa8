"""What the response cache costs and saves, at concurrency 1, through `sluice serve`.

    python -m loadtests.bench_cache [--requests 300] [--redis-url redis://127.0.0.1:6379/0]

Starts the gateway (echo backend, SQLite, cache on) in a temporary directory, then sends
sequential chat requests with one httpx connection: sampled requests (never cached: the
baseline), deterministic requests with distinct prompts (a lookup that misses, then a
store) and one deterministic request repeated (hits). Prints p50/p90 per kind, with the
in-process store and, when --redis-url is given, with Redis.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

CONFIG = """\
[backends.echo]
plugin = "echo"
[cache]
enabled = true
"""
PROMPT = "Explain in one short sentence why the sky looks blue on a clear day."


def _serve(tmp: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str, str]:
    (tmp / "sluice.toml").write_text(CONFIG)
    env = {**os.environ, "SLUICE_DATABASE_URL": f"sqlite+aiosqlite:///{tmp / 'sluice.db'}",
           "SLUICE_CONFIG": str(tmp / "sluice.toml"), "SLUICE_DATA_DIR": str(tmp),
           "SLUICE_LOG_LEVEL": "warning", **env}
    cli = [sys.executable, "-m", "sluice.gateway.cli"]
    subprocess.run([*cli, "migrate"], env=env, check=True, capture_output=True)
    subprocess.run([*cli, "tenants", "create", "bench", "--rpm", "1000000", "--tpm",
                    "1000000000"], env=env, check=True, capture_output=True)
    made = subprocess.run([*cli, "keys", "create", "--tenant", "bench", "--json"], env=env,
                          check=True, capture_output=True, text=True)
    key = json.loads(made.stdout)["key"]
    port = 18000 + os.getpid() % 1000
    proc = subprocess.Popen([*cli, "serve", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                return proc, base, key
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("sluice serve did not start")


def _latencies(client: httpx.Client, base: str, key: str, n: int, kind: str) -> list[float]:
    out = []
    for i in range(n):
        body = {"model": "echo", "max_tokens": 32,
                "messages": [{"role": "user", "content": PROMPT if kind == "hit"
                              else f"{PROMPT} ({kind} {i})"}],
                "temperature": 1 if kind == "sampled" else 0}
        start = time.perf_counter()
        reply = client.post(f"{base}/v1/chat/completions", json=body,
                            headers={"authorization": f"Bearer {key}"})
        out.append((time.perf_counter() - start) * 1000)
        reply.raise_for_status()
    return out


def run(requests: int, env: dict[str, str]) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory(prefix="sluice-bench-cache-") as tmp:
        proc, base, key = _serve(Path(tmp), env)
        try:
            with httpx.Client(timeout=30) as client:
                _latencies(client, base, key, 50, "sampled")  # warm-up
                results = {}
                for kind in ("sampled", "miss", "hit"):
                    ms = sorted(_latencies(client, base, key, requests, kind))
                    results[kind] = {"p50_ms": statistics.median(ms),
                                     "p90_ms": ms[int(len(ms) * 0.9)]}
                return results
        finally:
            proc.terminate()
            proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--redis-url")
    args = parser.parse_args()
    stores = {"memory": {}}
    if args.redis_url:
        stores["redis"] = {"SLUICE_REDIS_URL": args.redis_url}
    table = Table("store", "kind", "p50 ms", "p90 ms", "p50 vs sampled")
    report = {}
    for store, env in stores.items():
        report[store] = results = run(args.requests, env)
        base = results["sampled"]["p50_ms"]
        for kind, r in results.items():
            table.add_row(store, kind, f"{r['p50_ms']:.2f}", f"{r['p90_ms']:.2f}",
                          f"{r['p50_ms'] - base:+.2f}")
    Console().print(table)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
