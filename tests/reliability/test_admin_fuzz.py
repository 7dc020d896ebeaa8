"""Schemathesis against /admin/api (its OpenAPI document comes from the same pydantic
models that validate it): zero 5xx, on Postgres (NUL bytes and 64-bit integers are what
Postgres refuses and SQLite lets through)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import GatewayServer, drop_postgres_database, echo_settings, make_postgres_database
from tests.reliability.support import FULL, report


@pytest.fixture(scope="module")
def server() -> Iterator[GatewayServer]:
    url = make_postgres_database("sluice_adminfuzz")
    server = GatewayServer(echo_settings(url, max_body_bytes=64 * 1024)).start()
    yield server
    server.stop()
    drop_postgres_database(url)


def test_schemathesis_finds_no_server_error_in_the_admin_api(server: GatewayServer,
                                                             tmp_path: Path) -> None:
    from sluice.gateway.accounts.auth import issue_admin_token

    examples = int(os.environ.get("SLUICE_FUZZ_EXAMPLES", "300" if FULL else "40"))
    token = issue_admin_token(server.settings.admin_jwt_secret, "fuzz", 3600)
    server.tenant_key("acme")  # something for the generated references to find
    spec = httpx.get(server.base_url + "/admin/api/openapi.json",
                     headers={"Authorization": f"Bearer {token}"}).json()
    # the revoke operation would revoke the fuzzer's own token: fuzz it with its own
    spec_file = tmp_path / "admin.json"
    spec_file.write_text(json.dumps(spec))
    schemathesis = Path(sys.executable).with_name("schemathesis")
    cmd = [
        str(schemathesis), "run", str(spec_file), "--url", server.base_url,
        "--checks", "not_a_server_error",
        "--max-examples", str(examples),
        "--max-time", "300" if FULL else "40",
        "--phases", "examples,coverage,fuzzing",
        "--seed", "7",
        "--workers", "1",
        "--request-timeout", "20",
        "--generation-database", "none",
        "--exclude-path", "/admin/api/tokens/revoke",
        "--header", f"Authorization: Bearer {token}",
        "--no-color",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    lines = [line.strip() for line in done.stdout.splitlines()]
    summary = next((lines[i + 1] for i, line in enumerate(lines[:-1]) if line == "Test cases:"), "")
    report("admin_api_fuzz", max_examples=examples, exit_code=done.returncode, summary=summary)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
