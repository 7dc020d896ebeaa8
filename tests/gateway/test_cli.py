"""The `sluice` command line as an operator uses it, in processes of its own."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import free_port


def sluice(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sluice.gateway.cli", *args], cwd=cwd,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=120)


def test_first_start_bootstraps_a_key_that_works(tmp_path: Path) -> None:
    """What `make run` does on a fresh clone: serve the embedded database, print a key."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    proc = subprocess.Popen([sys.executable, "-m", "sluice.gateway.cli", "serve", "--port", str(port)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        key = None
        deadline = time.monotonic() + 60
        assert proc.stdout is not None
        for line in proc.stdout:
            if match := re.search(r"(sk-[A-Za-z0-9]{52})", line):
                key = match[1]
            if "Uvicorn running" in line or time.monotonic() > deadline:
                break
        assert key, "no API key printed on first start"
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                       headers={"Authorization": f"Bearer {key}"},
                       json={"model": "echo", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "hi"
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models",
                           headers={"Authorization": f"Bearer {key}"}).json()
        assert {m["id"] for m in models["data"]} == {"echo", "tiny-mixtral"}
        assert (tmp_path / "sluice.db").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_tenants_keys_and_admin_token_commands(tmp_path: Path) -> None:
    env = {"SLUICE_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}",
           "SLUICE_ADMIN_JWT_SECRET": "cli-test-secret-" + "x" * 20}
    assert sluice("migrate", cwd=tmp_path, env=env).returncode == 0
    tenant = json.loads(sluice("tenants", "create", "acme", "--rpm", "60", "--json",
                               cwd=tmp_path, env=env).stdout)
    assert tenant["name"] == "acme" and tenant["rpm"] == 60
    dup = sluice("tenants", "create", "acme", cwd=tmp_path, env=env)
    assert dup.returncode == 2 and "already exists" in dup.stderr
    assert "Traceback" not in dup.stderr
    created = json.loads(sluice("keys", "create", "--tenant", "acme", "--models", "echo",
                                "--expires-in", "30d", "--json", cwd=tmp_path, env=env).stdout)
    assert created["key"].startswith("sk-") and created["models"] == ["echo"]
    listed = json.loads(sluice("keys", "list", "--tenant", "acme", "--json",
                               cwd=tmp_path, env=env).stdout)
    assert [k["id"] for k in listed] == [created["id"]] and "key" not in listed[0]
    revoked = json.loads(sluice("keys", "revoke", created["id"], "--json",
                                cwd=tmp_path, env=env).stdout)
    assert revoked["revoked_at"]
    bad = sluice("keys", "create", "--tenant", "nobody", cwd=tmp_path, env=env)
    assert bad.returncode == 2 and "no tenant 'nobody'" in bad.stderr
    token = sluice("admin-token", cwd=tmp_path, env=env).stdout.strip()
    assert token.count(".") == 2
    # Every change above is in the audit chain, and the chain verifies.
    verify = sluice("audit", "verify", cwd=tmp_path, env=env)
    assert verify.returncode == 0, verify.stderr


def test_bad_configuration_is_one_clear_line(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text('[backends.x]\nplugin = "echo"\nsurprise = 1\n')
    result = sluice("serve", cwd=tmp_path, env={"SLUICE_CONFIG": str(tmp_path / "bad.toml")})
    assert result.returncode == 2
    assert "backends.x.surprise" in result.stderr and "Traceback" not in result.stderr
    (tmp_path / "opt.toml").write_text('[backends.x]\nplugin = "echo"\n[backends.x.options]\n'
                                       'tokens_per_second = 5\n')
    result = sluice("serve", cwd=tmp_path, env={"SLUICE_CONFIG": str(tmp_path / "opt.toml")})
    assert result.returncode == 2 and "tokens_per_second" in result.stderr
