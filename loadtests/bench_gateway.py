"""The gateway benchmark: requests/s and latency through sluice, auth and metering on.

    python -m loadtests.bench_gateway [--duration 10] [--out bench_results/gateway]
                                      [--http h11|httptools]

Starts, in a temporary directory with a fresh SQLite database, the mock upstream
(``loadtests.mock_upstream``) and the gateway (``sluice serve``, one uvicorn
worker, with the server's default HTTP parser unless ``--http`` names one) as
subprocesses; creates a tenant and an API key with the CLI; then for
each cell (backend x streaming x concurrency) runs ``wrk`` for a fixed time.
``wrk`` (C, one thread, Lua only to set the POST body and headers) keeps the load
generator off the critical path on a small machine. Rows "direct" hit the mock
upstream without the gateway, for reference.

A Python client (httpx, one connection, sequential) then measures the latency
the gateway adds at concurrency 1: gateway p50 (through ``openai_upstream``, and
through ``echo``) minus direct-to-mock p50. Every cell records the 1-minute load
average when it ends, since the machine may be shared.
After the gateway is stopped, the usage_events table is counted against the
successful requests sent, to show metering kept up.

Needs ``wrk`` on PATH (Debian: ``apt-get install wrk``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
PROMPT = "Explain in one short sentence why the sky looks blue on a clear day."
MAX_TOKENS = 64
MOCK_TOKENS = 16  # the mock answers 16 words; the echo answers PROMPT's 16 tokens
console = Console()

CONFIG = """\
[backends.echo]
plugin = "echo"
[backends.echo.options]
ttft_ms = 0
[backends.echo.pool]
max_concurrency = 256

[backends.up]
plugin = "openai_upstream"
[backends.up.options]
base_url = "http://127.0.0.1:{mock_port}/v1"
models = {{ "mock" = "mock-model" }}
[backends.up.pool]
max_concurrency = 256
"""

WRK_SCRIPT = """\
wrk.method = "POST"
wrk.body = [==[{body}]==]
wrk.headers["Content-Type"] = "application/json"
{auth}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {{\\"requests\\":%d,\\"duration_us\\":%d,\\"connect\\":%d,\\"read\\":%d," ..
    "\\"write\\":%d,\\"status\\":%d,\\"timeout\\":%d,\\"p50_us\\":%d,\\"p90_us\\":%d," ..
    "\\"p99_us\\":%d,\\"max_us\\":%d}}\\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


@dataclass
class Cell:
    target: str  # "echo" | "upstream" | "direct"
    stream: bool
    concurrency: int
    requests: int = 0
    rps: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)
    load1: float = 0.0  # 1-minute load average when the cell ended


@dataclass
class Sample:
    """Python-client latency at concurrency 1."""

    requests: int
    failures: int
    p50_ms: float
    p99_ms: float


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def body(model: str, stream: bool) -> bytes:
    data: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": MAX_TOKENS,
        "stream": stream,
    }
    if stream:
        data["stream_options"] = {"include_usage": True}
    return json.dumps(data).encode()


class Stack:
    """The mock upstream and the gateway, as subprocesses in a temporary directory."""

    def __init__(self, workdir: Path, gateway_port: int, mock_port: int,
                 http: str | None = None) -> None:
        self.workdir = workdir
        self.http = http  # uvicorn's HTTP parser; None: `sluice serve`'s default
        self.gateway_url = f"http://127.0.0.1:{gateway_port}"
        self.mock_url = f"http://127.0.0.1:{mock_port}"
        self.gateway_port, self.mock_port = gateway_port, mock_port
        self.env = {
            **os.environ,
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "SLUICE_DATABASE_URL": f"sqlite+aiosqlite:///{workdir / 'sluice.db'}",
            "SLUICE_CONFIG": str(workdir / "config.toml"),
            "SLUICE_LOG_LEVEL": "warning",
        }
        self.procs: list[subprocess.Popen[bytes]] = []
        self.gateway: subprocess.Popen[bytes] | None = None
        self.key = ""

    def cli(self, *args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "sluice.gateway.cli", *args], cwd=self.workdir,
                              env=self.env, capture_output=True, text=True, check=False)
        if done.returncode:
            raise RuntimeError(f"sluice {' '.join(args)} failed ({done.returncode}):\n"
                               f"{done.stdout}{done.stderr}")
        return done.stdout

    def spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - lives with the process
        proc = subprocess.Popen([sys.executable, "-m", *args], cwd=self.workdir, env=self.env,
                                stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def wait_ready(self, url: str, proc: subprocess.Popen[bytes], name: str) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({proc.returncode}):\n{self.log_tail(name)}")
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{name} not ready after 60 s:\n{self.log_tail(name)}")

    def log_tail(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else "(no log)"

    def start(self) -> None:
        (self.workdir / "config.toml").write_text(CONFIG.format(mock_port=self.mock_port))
        mock = self.spawn("mock", "loadtests.mock_upstream", "--port", str(self.mock_port),
                          "--tokens", str(MOCK_TOKENS))
        self.wait_ready(f"{self.mock_url}/health", mock, "mock")
        self.cli("migrate")
        self.cli("tenants", "create", "bench")
        self.key = json.loads(self.cli("keys", "create", "--tenant", "bench", "--json"))["key"]
        serve = ["sluice.gateway.cli", "serve", "--host", "127.0.0.1", "--port", str(self.gateway_port)]
        if self.http:
            serve += ["--http", self.http]
        self.gateway = self.spawn("gateway", *serve)
        self.wait_ready(f"{self.gateway_url}/readyz", self.gateway, "gateway")

    def stop_gateway(self) -> None:
        proc = self.gateway
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # graceful: lets metering flush
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop(self) -> None:
        self.stop_gateway()
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=10)


def target_request(stack: Stack, target: str, stream: bool) -> tuple[str, bytes, str | None]:
    """(url, body, bearer key) of one cell's request."""
    if target == "direct":
        return f"{stack.mock_url}/v1/chat/completions", body("mock-model", stream), None
    model = "echo" if target == "echo" else "mock"
    return f"{stack.gateway_url}/v1/chat/completions", body(model, stream), stack.key


def run_wrk(stack: Stack, cell: Cell, duration: float) -> None:
    url, data, key = target_request(stack, cell.target, cell.stream)
    auth = f'wrk.headers["Authorization"] = "Bearer {key}"' if key else ""
    script = stack.workdir / "cell.lua"
    script.write_text(WRK_SCRIPT.format(body=data.decode(), auth=auth))
    done = subprocess.run(
        ["wrk", "-t1", f"-c{cell.concurrency}", f"-d{duration:g}s", "--timeout", "10s",
         "-s", str(script), url], capture_output=True, text=True, check=False)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    r = json.loads(line[len("WRKJSON "):])
    cell.requests = r["requests"]
    cell.rps = r["requests"] / (r["duration_us"] / 1e6)
    cell.p50_ms, cell.p90_ms = r["p50_us"] / 1000, r["p90_us"] / 1000
    cell.p99_ms, cell.max_ms = r["p99_us"] / 1000, r["max_us"] / 1000
    cell.errors = {k: r[k] for k in ("connect", "read", "write", "status", "timeout") if r[k]}
    cell.load1 = os.getloadavg()[0]


def python_latency(stack: Stack, target: str, stream: bool, seconds: float) -> Sample:
    """Sequential requests on one kept-alive connection: p50/p99 in ms."""
    url, data, key = target_request(stack, target, stream)
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    samples: list[float] = []
    failures = 0
    with httpx.Client(timeout=30) as client:
        for _ in range(20):  # warm-up: connection, caches
            client.post(url, content=data, headers=headers).read()
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            with client.stream("POST", url, content=data, headers=headers) as response:
                for _ in response.iter_raw():
                    pass
            samples.append(time.perf_counter() - started)
            failures += response.status_code != 200
    cuts = statistics.quantiles(samples, n=100)
    return Sample(len(samples), failures, cuts[49] * 1000, cuts[98] * 1000)


def usage_events(workdir: Path) -> int:
    with sqlite3.connect(workdir / "sluice.db") as db:
        return int(db.execute("select count(*) from usage_events").fetchone()[0])


def environment() -> dict[str, Any]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                .splitlines() if ln.startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                            capture_output=True, text=True, check=False).stdout.strip()
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    return {"cpus": os.cpu_count(), "cpu": cpu, "loadavg_before": os.getloadavg(),
            "python": platform.python_version(), "commit": commit,
            "wrk": (wrk.stdout or wrk.stderr).splitlines()[0] if (wrk.stdout or wrk.stderr)
            else "?"}


def render(cells: list[Cell], added: dict[str, Any]) -> tuple[Table, str]:
    table = Table(title="sluice gateway benchmark (wrk, 1 thread)")
    head = ["target", "stream", "conc.", "req/s", "p50 ms", "p90 ms", "p99 ms", "errors",
            "load"]
    for name in head:
        table.add_column(name, justify="right" if name not in ("target", "stream") else "left")
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cells:
        row = [c.target, "yes" if c.stream else "no", str(c.concurrency), f"{c.rps:,.0f}",
               f"{c.p50_ms:.2f}", f"{c.p90_ms:.2f}", f"{c.p99_ms:.2f}",
               ", ".join(f"{k} {v}" for k, v in c.errors.items()) or "0", f"{c.load1:.2f}"]
        table.add_row(*row)
        md.append("| " + " | ".join(row) + " |")
    md += ["", "Python client, concurrency 1 (sequential, one connection):", "",
           "| target | requests | p50 ms | p99 ms |", "|---|---|---|---|"]
    for name, r in added["samples"].items():
        md.append(f"| {name} | {r['requests']} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} |")
    for key, ms in added["added_p50_ms"].items():
        target, _, stream = key.partition(" ")
        md.append(f"\nLatency the gateway adds, p50, through {target}, stream={stream}: "
                  f"**{ms:.3f} ms** ({target} p50 minus direct p50)")
    return table, "\n".join(md) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description="benchmark the sluice gateway")
    parser.add_argument("--duration", type=float, default=10, help="seconds per wrk cell")
    parser.add_argument("--python-duration", type=float, default=5,
                        help="seconds per Python-client latency sample")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--targets", default="echo,upstream,direct")
    parser.add_argument("--out", default="bench_results/gateway",
                        help="path prefix for .json and .md results")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--http", choices=["h11", "httptools"],
                        help="the gateway's HTTP parser (`sluice serve --http`; default: its own)")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install -y wrk")

    env = environment()
    workdir = Path(tempfile.mkdtemp(prefix="sluice-bench-"))
    stack = Stack(workdir, free_port(), free_port(), args.http)
    cells = [Cell(t, s, c) for t in args.targets.split(",") for s in (False, True)
             for c in map(int, args.concurrency.split(","))]
    added: dict[str, Any] = {"samples": {}, "added_p50_ms": {}}
    sent_through_gateway = 0
    try:
        stack.start()
        console.print(f"[dim]workdir {workdir}; gateway {stack.gateway_url}, "
                      f"mock {stack.mock_url}[/]")
        for target in ("echo", "upstream"):  # cold-start both backends before timing
            for stream in (False, True):
                python_latency(stack, target, stream, 0.5)
        for cell in cells:
            run_wrk(stack, cell, args.duration)
            if cell.target != "direct":
                sent_through_gateway += cell.requests - cell.errors.get("status", 0)
            console.print(f"{cell.target:8} stream={cell.stream!s:5} c={cell.concurrency:<3} "
                          f"{cell.rps:9,.0f} req/s  p50 {cell.p50_ms:.2f} ms  "
                          f"p99 {cell.p99_ms:.2f} ms  errors {cell.errors or 0}")
        for stream in (False, True):
            suffix = " stream" if stream else ""
            for target in ("direct", "upstream", "echo"):
                r = python_latency(stack, target, stream, args.python_duration)
                added["samples"][f"{target}{suffix}"] = asdict(r)
                if target != "direct":
                    sent_through_gateway += r.requests - r.failures
            for target in ("upstream", "echo"):
                added["added_p50_ms"][f"{target} {str(stream).lower()}"] = (
                    added["samples"][f"{target}{suffix}"]["p50_ms"]
                    - added["samples"][f"direct{suffix}"]["p50_ms"])
        stack.stop_gateway()
        metered = usage_events(workdir)
    except BaseException:
        for name in ("gateway", "mock"):
            console.print(f"[red]--- {name} log tail ---[/]\n{stack.log_tail(name)}")
        raise
    finally:
        stack.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    table, markdown = render(cells, added)
    console.print(table)
    console.print(markdown.split("\n\n", 1)[1])
    # warm-up requests (20 per Python sample, 4 x (20 + 0.5 s) at start) are metered too
    metering = {"usage_events": metered, "timed_successful_requests": sent_through_gateway}
    console.print(f"metering: {metered} usage events for {sent_through_gateway} timed "
                  f"successful gateway requests (plus warm-ups)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python -m loadtests.bench_gateway " + " ".join(sys.argv[1:])
    out.with_suffix(".json").write_text(json.dumps(
        {"command": command.strip(), "environment": env, "duration_s": args.duration,
         "http": args.http or "sluice serve's default",
         "prompt": PROMPT, "max_tokens": MAX_TOKENS, "mock_tokens": MOCK_TOKENS,
         "cells": [asdict(c) for c in cells], "python_client": added, "metering": metering},
        indent=2))
    out.with_suffix(".md").write_text(
        f"Command: `{command.strip()}` at commit {env['commit']} on {env['cpus']} CPUs "
        f"({env['cpu']}), load average before {env['loadavg_before'][0]:.2f}, gateway HTTP "
        f"parser: {args.http or 'sluice serve default'}.\n\n" + markdown
        + f"\nMetering: {metered} usage events for {sent_through_gateway} timed successful "
          "gateway requests (plus warm-ups).\n")
    console.print(f"[green]wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}[/]")


if __name__ == "__main__":
    main()
