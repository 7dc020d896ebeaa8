"""What a start of a model learns once per host: its warm record.

KV sizing measures a full step's activation bytes by running a prefill of
``max_num_batched_tokens`` tokens (engine/kv_sizing.py): 0.9 s on an H200 with the
kernels compiled, more on an empty kernel cache. A small record per model, configuration,
GPU, torch/triton and kernel source (``warm/<key>.json`` beside the kernel cache) keeps
that number, so that a restart on the same host sizes its KV cache without the prefill.

(Tried on the H200, 2026-12-03, and removed: one-layer twins of the model compiling a
cold start's kernels while the weights load, as a thread (ready in 12.0 s against ~8.9 s
estimated without: compiling holds the GIL and the twin's own one-layer read came first)
and as three processes (16.5 s: each pays imports, a CUDA context and its read). See
docs/performance.md, "Serverless transitions".)
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from sluice.engine.config import EngineConfig, ModelConfig

_KERNEL_SOURCES = ("kernels", "layers", "models", "quant")


def warm_key(cfg: ModelConfig, engine: EngineConfig, dtype: torch.dtype, fp8: bool, device: torch.device,
             checkpoint: Path | None) -> str:
    """What a step's activations (and the compiled kernels) depend on: the model's shapes,
    the checkpoint's tensor layout (its quantization), the step budget, the GPU, torch,
    triton and the engine's kernel sources."""
    import triton

    h = hashlib.sha256()
    h.update(json.dumps(asdict(cfg), sort_keys=True, default=str).encode())
    h.update(json.dumps({k: getattr(engine, k, None) for k in (
        "max_num_batched_tokens", "max_num_seqs", "block_size", "max_model_len", "attention",
        "num_experts_per_tok")}, sort_keys=True, default=str).encode())
    h.update(f"{dtype}|{fp8}|{torch.__version__}|{triton.__version__}".encode())
    if device.type == "cuda":
        h.update(torch.cuda.get_device_name(device).encode())
    if checkpoint is not None and (index := checkpoint / "model.safetensors.index.json").exists():
        h.update(index.read_bytes())
    root = Path(__file__).parent
    for sub in _KERNEL_SOURCES:
        for f in sorted((root / sub).rglob("*.py")):
            h.update(f.read_bytes())
    return h.hexdigest()[:24]


class WarmRecord:
    """``<kernel cache>/../warm/<key>.json``: a full step's activation bytes."""

    def __init__(self, kernel_cache: Path, key: str) -> None:
        self.path = kernel_cache.parent / "warm" / f"{key}.json"

    def activations(self) -> int | None:
        try:
            return int(json.loads(self.path.read_text())["activation_bytes"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def write(self, activations: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"activation_bytes": activations, "written": time.time()}))
        tmp.replace(self.path)
