"""`sluice warmup` fills the kernel cache where the engine is told to keep it."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from sluice.gateway.cli import build_parser
from sluice.gateway.cli_warmup import warm
from sluice.gateway.settings import BackendConfig, Settings


def test_warmup_builds_the_engine_once_and_points_triton_at_the_configured_cache(tmp_path: Path,
                                                                                  monkeypatch) -> None:
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "unused"))  # restored after the test
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "unused-inductor"))
    cache = tmp_path / "kernels"
    local = BackendConfig(plugin="local", options={"cache_dir": str(tmp_path / "models"), "device": "cpu",
                                                   "num_kv_blocks": 16, "compile_cache_dir": str(cache)})
    settings = Settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'db'}", admin_jwt_secret="x" * 32,
                        backends={"local": local, "echo": BackendConfig(plugin="echo")}, data_dir=tmp_path)
    report = asyncio.run(warm(settings, None))
    assert report["echo"] == {"skipped": "nothing to warm up"}
    assert report["local"]["load_s"] > 0 and report["local"]["total_s"] >= report["local"]["load_s"]
    assert os.environ["TRITON_CACHE_DIR"] == str(cache / "triton") and (cache / "triton").is_dir()
    args = build_parser().parse_args(["warmup", "--backend", "local", "--json"])
    assert args.backend == ["local"] and args.json
