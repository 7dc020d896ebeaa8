"""Compile the first request's kernels while the weights load.

On an empty kernel cache a cold start compiles about twenty triton kernels on its way to
the first token: the KV-sizing prefill's (2.6 s on the H200 host), then the first
request's prefill and decode (about 4 s more). Which kernels, and which variants of
them, depend on a layer's shapes and on the checkpoint's quantization, not on how many
layers there are. So a one-layer twin of the model, read from the same checkpoint (its
first layer and the embeddings), runs those steps in a thread while the main thread
loads every layer: loading is parallel reads and copies that leave the interpreter free,
compiling is mostly Python and LLVM, and the two overlap. The twin's memory is freed
before the KV cache is sized.

A small record per model, configuration and kernel source (``warm/<key>.json`` in the
kernel cache) says that its kernels are compiled, and keeps the activation bytes that KV
sizing measured, so the next start skips both the twin and that measurement.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from sluice.engine.config import EngineConfig, ModelConfig

log = logging.getLogger(__name__)

_KERNEL_SOURCES = ("kernels", "layers", "models", "quant")


def warm_key(cfg: ModelConfig, engine: EngineConfig, dtype: torch.dtype, fp8: bool, device: torch.device,
             checkpoint: Path | None) -> str:
    """What the compiled kernels and a step's activations depend on: the model's shapes,
    the checkpoint's tensor layout (its quantization), the step budget, the GPU, torch,
    triton and the engine's kernel sources."""
    import triton

    h = hashlib.sha256()
    h.update(json.dumps(asdict(cfg), sort_keys=True, default=str).encode())
    h.update(json.dumps({k: getattr(engine, k, None) for k in (
        "max_num_batched_tokens", "max_num_seqs", "block_size", "max_model_len", "attention",
        "num_experts_per_tok", "kv_cache_dtype")}, sort_keys=True, default=str).encode())
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
    """``<kernel cache>/warm/<key>.json``: the kernels are compiled; a full step's activations."""

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


class KernelTwin:
    """A one-layer twin of the model that compiles the first token's kernels in a thread.

    ``start()`` before loading the weights, ``join()`` once they are loaded (before the
    KV cache is sized). Any failure only costs the overlap: the main thread then compiles
    what it needs, as it would have without the twin."""

    def __init__(self, cfg: ModelConfig, engine: EngineConfig, device: torch.device, dtype: torch.dtype,
                 fp8: bool, checkpoint: Path | None, max_model_len: int) -> None:
        self.cfg, self.engine, self.device, self.dtype, self.fp8 = cfg, engine, device, dtype, fp8
        self.checkpoint, self.max_model_len = checkpoint, max_model_len
        self.seconds = 0.0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kernel-twin", daemon=True)

    def start(self) -> KernelTwin:
        self._thread.start()
        return self

    def join(self) -> None:
        self._thread.join()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if self.error is not None:
            log.warning("kernel twin failed (%s: %s); the start compiles its kernels itself",
                        type(self.error).__name__, self.error)
        else:
            log.info("kernels of the first steps compiled by a one-layer twin in %.1fs", self.seconds)

    def _run(self) -> None:
        began = time.perf_counter()
        try:
            self._steps()
        except BaseException as exc:  # noqa: BLE001 - reported by join(); never fatal
            self.error = exc
        self.seconds = time.perf_counter() - began

    @torch.inference_mode()
    def _steps(self) -> None:
        from sluice.engine.kv_sizing import allocate_cache, measure_peak
        from sluice.engine.layers.attention import AttentionMetadata
        from sluice.engine.loader import load_model
        from sluice.engine.model_runner import attention_kernels
        from sluice.engine.parallel.group import use_device

        use_device(self.device)
        cfg = replace(self.cfg, num_layers=1)
        model = load_model(cfg, self.device, self.dtype, self.checkpoint, fp8=self.fp8, seed=self.engine.seed,
                           max_positions=self.max_model_len, progress=False, stage=False, partial=True)
        kernels = attention_kernels(self.engine, cfg, self.device)
        block = self.engine.block_size
        limit = -(-self.max_model_len // block) * block
        # The steps of a cold start, in its order: KV sizing's prefill of a full step,
        # then a first request's prefill (token counts on either side of the kernels'
        # size buckets) and its decode at batch 1.
        for tokens in (min(self.engine.max_num_batched_tokens, limit), 40, 13):
            measure_peak(model, tokens, block, kernels)
        allocate_cache(model, 4, block)
        one = torch.ones(1, dtype=torch.int32, device=self.device)
        meta = AttentionMetadata(slot_mapping=torch.zeros(1, dtype=torch.int64, device=self.device),
                                 decode_block_tables=torch.zeros((1, 4), dtype=torch.int32, device=self.device),
                                 decode_context_lens=one * 20, kernels=kernels)
        ids = torch.zeros(1, dtype=torch.int64, device=self.device)
        model.compute_logits(model(ids, ids + 19, meta))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        allocate_cache(model, 0, block)
