"""Where compiled kernels persist, so that a restart on the same host compiles nothing.

Triton writes every kernel it compiles to its cache directory and reads it back on the
next launch of the same kernel, source and target; torch's inductor (if anything uses
torch.compile) does the same under its own. Both directories are read from the
environment when the first kernel compiles, so this runs before the model is built.

``COMPILES`` counts what triton compiled in this process (a cache hit is not counted):
how many kernels and the seconds they took, the part of a cold start that a warm kernel
cache saves. ``SLUICE_LOG_COMPILES=1`` logs each one.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: A call of triton's compile() shorter than this found its kernel in the cache.
_HIT_S = 0.05


@dataclass
class CompileStats:
    kernels: int = 0
    seconds: float = 0.0

    def as_timings(self) -> dict[str, float]:
        return {"compiled_kernels": float(self.kernels), "compile_s": round(self.seconds, 3)}


COMPILES = CompileStats()
_lock = threading.Lock()
_counting = False


def default_kernel_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sluice" / "kernels"


def use_kernel_cache(path: str | os.PathLike[str] | None = None) -> Path:
    """Point triton's (and inductor's) caches at ``path``; None: $TRITON_CACHE_DIR when
    set, else ~/.cache/sluice/kernels. Returns the triton cache directory in use."""
    if path is None and os.environ.get("TRITON_CACHE_DIR"):
        triton_dir = Path(os.environ["TRITON_CACHE_DIR"])
    else:
        root = Path(path).expanduser() if path is not None else default_kernel_cache()
        triton_dir = root / "triton"
        os.environ["TRITON_CACHE_DIR"] = str(triton_dir)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")
    triton_dir.mkdir(parents=True, exist_ok=True)
    log.info("compiled kernels cached in %s", triton_dir)
    count_compiles()
    return triton_dir


def count_compiles() -> None:
    """Wrap triton's compile() (once per process) to add each real compile to ``COMPILES``.
    Kernels bind compile() on their first launch, so this runs before any kernel does."""
    global _counting
    with _lock:
        if _counting:
            return
        try:
            import triton.compiler as tc
        except ImportError:  # no triton (CPU-only installs): nothing compiles
            return
        original = tc.compile
        verbose = os.environ.get("SLUICE_LOG_COMPILES") == "1"

        def compile(src: Any, *args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            out = original(src, *args, **kwargs)
            took = time.perf_counter() - began
            if took >= _HIT_S:
                with _lock:
                    COMPILES.kernels += 1
                    COMPILES.seconds += took
                if verbose:
                    name = getattr(getattr(src, "fn", None), "__name__", None) or type(src).__name__
                    log.info("compiled %s in %.2fs", name, took)
            return out

        tc.compile = compile
        _counting = True
