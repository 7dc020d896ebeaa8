"""Where compiled kernels persist, so that a restart on the same host compiles nothing.

Triton writes every kernel it compiles to its cache directory and reads it back on the
next launch of the same kernel, source and target; torch's inductor (if anything uses
torch.compile) does the same under its own. Both directories are read from the
environment when the first kernel compiles, so this runs before the model is built.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


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
    return triton_dir
