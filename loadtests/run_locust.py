"""One command for the locust mix: gateway, tenants and keys set up, locust headless,
a summary printed, CSV written, everything stopped.

    .venv/bin/python -m loadtests.run_locust [--users 40] [--spawn-rate 10] [--duration 60]
                                             [--out bench_results/locust] [--database-url URL]

In a temporary directory: a SQLite database (or ``--database-url``, e.g. a Postgres
database of your own), `sluice serve` with the echo backend (20 ms TTFT, 400 tokens/s,
like a fast hosted model), three tenants with a key each and a tenant ``limited`` with
``--rpm 30``. Locust's CSVs are ``<out>_stats.csv``, ``<out>_failures.csv`` and
``<out>_stats_history.csv``; the exit status is locust's (1 when any request failed).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

CONFIG = """
[backends.echo]
plugin = "echo"
[backends.echo.options]
ttft_ms = 20
tokens_per_s = 400
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cli(env: dict[str, str], cwd: Path, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "sluice.gateway.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, check=True)
    return done.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=40)
    parser.add_argument("--spawn-rate", type=float, default=10)
    parser.add_argument("--duration", type=int, default=60, help="seconds")
    parser.add_argument("--out", default="bench_results/locust", help="CSV prefix")
    parser.add_argument("--database-url", help="default: a temporary SQLite file")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="sluice-locust-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "sluice.toml").write_text(CONFIG)
        env = {**os.environ,
               "SLUICE_DATABASE_URL": args.database_url or f"sqlite+aiosqlite:///{tmp}/sluice.db",
               "SLUICE_CONFIG": str(tmp / "sluice.toml"), "SLUICE_LOG_LEVEL": "warning",
               "SLUICE_ADMIN_JWT_SECRET": os.urandom(24).hex()}
        _cli(env, tmp, "migrate")
        keys = []
        for tenant in ("acme", "globex", "initech"):
            _cli(env, tmp, "tenants", "create", tenant)
            keys.append(json.loads(_cli(env, tmp, "keys", "create", "--tenant", tenant,
                                        "--json"))["key"])
        _cli(env, tmp, "tenants", "create", "limited", "--rpm", "30")
        limited = json.loads(_cli(env, tmp, "keys", "create", "--tenant", "limited",
                                  "--json"))["key"]
        port = _free_port()
        host = f"http://127.0.0.1:{port}"
        log = open(tmp / "server.log", "wb")  # noqa: SIM115 - closed below
        server = subprocess.Popen([sys.executable, "-m", "sluice.gateway.cli", "serve", "--port",
                                   str(port)], env=env, cwd=tmp, stdout=log,
                                  stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(host + "/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"sluice serve did not start:\n{(tmp / 'server.log').read_text()}")
                time.sleep(0.2)
            locust = Path(sys.executable).with_name("locust")
            cmd = [str(locust), "-f", str(Path(__file__).with_name("locustfile.py")),
                   "--headless", "-u", str(args.users), "-r", str(args.spawn_rate),
                   "-t", f"{args.duration}s", "--stop-timeout", "10", "--csv", str(out),
                   "--csv-full-history", "--host", host, "--only-summary"]
            print("$", " ".join(cmd[:1] + ["..."] + cmd[3:]), flush=True)
            code = subprocess.run(cmd, env={**env, "SLUICE_LOCUST_KEYS": ",".join(keys),
                                            "SLUICE_LOCUST_LIMITED_KEY": limited},
                                  timeout=args.duration + 120).returncode
            metrics = httpx.get(host + "/metrics", timeout=5).text
            by_status: dict[str, float] = {}
            for line in metrics.splitlines():
                if line.startswith("sluice_requests_total{"):
                    status = line.split('status="')[1].split('"')[0]
                    by_status[status] = by_status.get(status, 0) + float(line.rsplit(" ", 1)[1])
            print(f"gateway sluice_requests_total by status: "
                  f"{ {k: int(v) for k, v in sorted(by_status.items())} }")
            print(f"CSV: {out}_stats.csv, {out}_failures.csv, {out}_stats_history.csv")
            return code
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(40)
            except subprocess.TimeoutExpired:
                server.kill()
            log.close()


if __name__ == "__main__":
    sys.exit(main())
