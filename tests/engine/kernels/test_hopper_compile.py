"""Every triton launch the engine makes on an H200 compiles for sm_90 with the installed
triton and fits in a block's shared memory, checked on a machine without a GPU
(bench/hopper_compile.py). The interpreter tests check the arithmetic; this checks that
the same kernels lower for Hopper: layouts, MMA instructions, pipeline depth."""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("sm90") / "compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(out.parent / "cache")  # a real compile, not a cached one
    proc = subprocess.run([sys.executable, "-W", "ignore", "-m", "bench.hopper_compile", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    failed = [r for r in results if "error" in r]
    assert not failed, "\n".join(f"{r['kernel']} ({r['case']}): {r['error']}" for r in failed)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return results


def test_every_launch_compiles_within_shared_memory(compiled: list[dict]) -> None:
    from bench.hopper_compile import SM90_SHARED_LIMIT

    over = [r for r in compiled if r["shared_bytes"] > SM90_SHARED_LIMIT]
    assert not over, [(r["kernel"], r["case"], r["shared_bytes"]) for r in over]


def test_every_launched_kernel_is_covered(compiled: list[dict]) -> None:
    """Each top-level kernel of sluice.engine.kernels (a jit function whose name ends in
    _kernel: the ones wrappers launch) is among the compiled launches, so a new kernel
    cannot skip this check."""
    import sluice.engine.kernels as pkg

    src = {name for m in pkgutil.iter_modules(pkg.__path__)
           for name in vars(importlib.import_module(f"{pkg.__name__}.{m.name}"))
           if name.startswith("_") and name.endswith("_kernel")}
    assert src - {r["kernel"] for r in compiled} == set()


def test_mma_instructions(compiled: list[dict]) -> None:
    """What the tiles are for: the swap-AB decode MoE tiles put weight rows in wgmma's
    64-wide dimension (the unswapped 16/32-row token blocks lower to mma.sync), and the
    prefill W8A8 GEMMs and small-M projections run on wgmma."""
    moe = [r for r in compiled if r["kernel"] == "_moe_gemm_kernel"]
    swapped = [r for r in moe if r["constexprs"].get("SWAP_AB")]
    assert swapped and all(r["mma"] == "wgmma" for r in swapped)
    prefill = [r for r in moe if r["case"].startswith("prefill")]
    assert prefill and all(r["mma"] == "wgmma" for r in prefill)
    small_m = [r for r in compiled if r["kernel"] == "_fp8_linear_small_m_kernel"]
    assert small_m and all(r["mma"] == "wgmma" for r in small_m)
