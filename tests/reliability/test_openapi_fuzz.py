"""Schemathesis against the running gateway's own /openapi.json: zero 5xx.

Bounded: ``--max-examples`` per operation (short 25, full 300, or SLUICE_FUZZ_EXAMPLES)
and a time budget. Runs the CLI as an operator would, against a real uvicorn.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import GatewayServer, drop_postgres_database, echo_settings, make_postgres_database
from tests.reliability.support import FULL, report


@pytest.fixture(scope="module")
def server() -> Iterator[GatewayServer]:
    url = make_postgres_database("sluice_fuzz")
    server = GatewayServer(echo_settings(url, max_body_bytes=64 * 1024)).start()
    yield server
    server.stop()
    drop_postgres_database(url)


def test_schemathesis_finds_no_server_error(server: GatewayServer, tmp_path: Path) -> None:
    examples = int(os.environ.get("SLUICE_FUZZ_EXAMPLES", "300" if FULL else "25"))
    key = server.tenant_key()
    schemathesis = Path(sys.executable).with_name("schemathesis")
    cmd = [
        str(schemathesis), "run", f"{server.base_url}/openapi.json",
        "--checks", "not_a_server_error",
        "--max-examples", str(examples),
        "--max-time", "300" if FULL else "15",
        "--phases", "examples,coverage,fuzzing",
        "--seed", "7",
        # one worker: CPython 3.11 keeps the ast module's recursion depth per interpreter,
        # so hypothesis describing strategies in two threads at once can crash the run
        # ("AST constructor recursion depth mismatch") with OpenAI's deep request schema
        "--workers", "1",
        "--request-timeout", "20",
        "--generation-database", "none",
        "--report", "junit", "--report-junit-path", str(tmp_path / "junit.xml"),
        "--header", f"Authorization: Bearer {key}",
        "--no-color",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    tail = done.stdout[-4000:] + done.stderr[-2000:]
    junit = (tmp_path / "junit.xml").read_text() if (tmp_path / "junit.xml").exists() else ""
    lines = [line.strip() for line in done.stdout.splitlines()]
    summary = next((lines[i + 1] for i, line in enumerate(lines[:-1]) if line == "Test cases:"), "")
    report("openapi_fuzz", max_examples=examples, exit_code=done.returncode, summary=summary,
           junit_testcases=junit.count("<testcase"))
    assert done.returncode == 0, tail
