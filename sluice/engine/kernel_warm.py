"""Compile the first request's kernels while the weights load.

On an empty kernel cache a cold start compiles about twenty triton kernels on its way to
the first token: the KV-sizing prefill's (2.6 s on the H200 host), then the first
request's prefill and decode (about 4 s more). Which kernels, and which variants of
them, depend on a layer's shapes and on the checkpoint's quantization, not on how many
layers there are. So one-layer twins of the model, read from the same checkpoint (its
first layer and the embeddings), run those steps in processes of their own, one part
each, while the engine loads every layer; the kernels they compile land in the shared
kernel cache, where the engine finds them. Their memory is back before the KV cache is
sized.

A small record per model, configuration and kernel source (``warm/<key>.json`` in the
kernel cache) says that its kernels are compiled, and keeps the activation bytes that KV
sizing measured, so the next start skips both the twin and that measurement.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from sluice.engine.config import ENGINE_FIELDS, EngineConfig, ModelConfig

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


#: The steps of a cold start that compile kernels, each run by its own twin process:
#: KV sizing's prefill of a full step, a first request's prefill (token counts on either
#: side of the kernels' size buckets) and its first decode step.
PARTS = ("profile", "prefill", "decode")


class KernelTwin:
    """One-layer twins of the model, one process per part of a cold start (PARTS), that
    compile its kernels into the shared kernel cache while this process loads the weights.

    Compiling holds the interpreter's lock, so twins are processes, not threads: three
    of them compile side by side, each paying its own imports and CUDA context (a few
    seconds, overlapped with the load). ``start()`` before loading the weights, ``join()``
    once they are loaded (before the KV cache is sized, when the twins' memory is back).
    A twin that fails costs only the overlap: the engine then compiles for itself."""

    def __init__(self, checkpoint: Path, engine: EngineConfig, device: torch.device, fp8: bool,
                 max_model_len: int, parts: tuple[str, ...] = PARTS) -> None:
        self.spec = {"checkpoint": str(checkpoint), "device": str(device), "fp8": fp8,
                     "max_model_len": max_model_len,
                     "engine": {k: getattr(engine, k) for k in ENGINE_FIELDS}}
        self.parts = parts
        self.seconds = 0.0
        self.error: str | None = None
        self.results: dict[str, dict] = {}
        self._procs: list[tuple[str, subprocess.Popen[str]]] = []
        self._began = 0.0

    def start(self) -> KernelTwin:
        self._began = time.perf_counter()
        for part in self.parts:
            spec = json.dumps({**self.spec, "part": part}, default=str)
            self._procs.append((part, subprocess.Popen(
                [sys.executable, "-m", "sluice.engine.kernel_warm", spec],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
        return self

    def join(self, timeout_s: float = 300.0) -> None:
        errors = []
        for part, proc in self._procs:
            try:
                out, err = proc.communicate(timeout=max(1.0, timeout_s - (time.perf_counter() - self._began)))
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            lines = out.strip().splitlines()
            if proc.returncode == 0 and lines:
                self.results[part] = json.loads(lines[-1])
            else:
                tail = (err.strip().splitlines() or ["no output"])[-1]
                errors.append(f"{part}: exit {proc.returncode}: {tail}")
        self._procs = []
        self.seconds = time.perf_counter() - self._began
        self.error = "; ".join(errors) or None
        if self.error is not None:
            log.warning("kernel twin failed (%s); the start compiles what it lacks itself", self.error)
        else:
            log.info("the first steps' kernels compiled by one-layer twins in %.1fs (%s)", self.seconds,
                     ", ".join(f"{p} {r['kernels']} in {r['compile_s']:.1f}s" for p, r in self.results.items()))


@torch.inference_mode()
def run_part(spec: dict) -> dict:
    """In a twin process: load the first layer of the checkpoint and run one part of a
    cold start. Returns what it compiled."""
    from sluice.engine.kernel_cache import COMPILES, count_compiles
    from sluice.engine.kv_sizing import allocate_cache, measure_peak
    from sluice.engine.layers.attention import AttentionMetadata
    from sluice.engine.loader import load_model
    from sluice.engine.model_runner import attention_kernels
    from sluice.engine.parallel.group import use_device

    count_compiles()
    engine = EngineConfig(**spec["engine"])
    device = torch.device(spec["device"])
    use_device(device)
    checkpoint = Path(spec["checkpoint"])
    cfg = ModelConfig.from_file(checkpoint).with_experts_per_tok(engine.num_experts_per_tok)
    dtype = engine.resolve_dtype(cfg, device)
    cfg = replace(cfg, num_layers=1)
    model = load_model(cfg, device, dtype, checkpoint, fp8=spec["fp8"], seed=engine.seed,
                       max_positions=spec["max_model_len"], progress=False, stage=False, partial=True)
    kernels = attention_kernels(engine, cfg, device)
    block = engine.block_size
    part = spec["part"]
    if part == "profile":
        limit = -(-spec["max_model_len"] // block) * block
        measure_peak(model, min(engine.max_num_batched_tokens, limit), block, kernels)
    elif part == "prefill":
        for tokens in (40, 13):
            measure_peak(model, tokens, block, kernels)
    elif part == "decode":
        allocate_cache(model, 4, block)
        meta = AttentionMetadata(slot_mapping=torch.zeros(1, dtype=torch.int64, device=device),
                                 decode_block_tables=torch.zeros((1, 4), dtype=torch.int32, device=device),
                                 decode_context_lens=torch.full((1,), 20, dtype=torch.int32, device=device),
                                 kernels=kernels)
        ids = torch.zeros(1, dtype=torch.int64, device=device)
        model.compute_logits(model(ids, ids + 19, meta))
    else:
        raise ValueError(f"unknown part {part!r}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return {"part": part, "kernels": COMPILES.kernels, "compile_s": round(COMPILES.seconds, 3)}


if __name__ == "__main__":
    print(json.dumps(run_part(json.loads(sys.argv[1]))))
