"""Compile a start's triton kernels side by side, while the weights load.

On an empty kernel cache a start used to compile its kernels one after another on the
way to the first token: about twenty on the H200 host (6.9 s), between the load and the
first token. Compiling a triton kernel mostly runs outside the interpreter lock (the
MLIR and LLVM passes, ptxas and the C compiler that builds its launcher are native code
or subprocesses), so N threads compile N kernels in about the time of one.

Which kernels a start needs depends on a layer's shapes, dtypes and quantization and on
the step sizes, not on how many layers there are. So, before the weights load:

1. a one-layer *twin* of the model is built from the checkpoint's layout (zeros of each
   tensor's stored shape and dtype, nothing read: ``load_model(layout_only=True)``);
2. the twin runs every step size a start and its first requests use (KV sizing's
   prefill, each decode batch bucket, each varlen token bucket: the sizes the CUDA
   graphs are captured at) in *record* mode: each triton launch is bound, which picks
   the kernel's specialization exactly as the real model's launch will, and its compile
   goes to a thread pool (triton's AsyncCompileMode); nothing is launched on the GPU
   (the tensor arguments of each skipped kernel are zeroed, so the torch ops between
   them read valid indices);
3. the twin is dropped and the weights load while the pool compiles; each compiled
   kernel's launcher is built and its binary loaded in the pool too.

The engine runs its model inside ``attached()`` until every recorded kernel is compiled:
a launch whose kernel is still compiling waits for that compile instead of starting its
own. Compiles reach triton's cache directory as before (engine/kernel_cache.py), so a
restart compiles nothing. Nothing may read a recorded launch's return value (a pending
compile that waits for the end of the recording).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from sluice.engine.config import EngineConfig, ModelConfig
from sluice.engine.cuda_graphs import decode_graph_sizes
from sluice.engine.kv_sizing import allocate_cache, measure_peak
from sluice.engine.layers.attention import AttentionKernels
from sluice.engine.loader import load_model
from sluice.engine.model_runner import step_inputs, step_sizes
from sluice.engine.models.mixtral import CausalLM
from sluice.engine.parallel.group import use_device

log = logging.getLogger(__name__)

_recording = threading.local()  # .on: this thread's triton launches only compile
_patch_lock = threading.Lock()
_patched = False


def _record_launches() -> None:
    """Wrap triton's JITFunction.run once per process: on a thread that is recording, a
    launch binds its arguments and compiles (asynchronously under AsyncCompileMode) but
    never runs; its tensor arguments are zeroed instead (they stand for its outputs)."""
    global _patched
    with _patch_lock:
        if _patched:
            return
        from triton.runtime.jit import JITFunction

        original = JITFunction.run

        def run(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
            if getattr(_recording, "on", False):
                for a in (*args, *kwargs.values()):
                    if isinstance(a, torch.Tensor) and a.is_cuda:
                        a.zero_()
                return original(self, *args, grid=grid, warmup=True, **kwargs)
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)

        JITFunction.run = run
        _patched = True


class _LoadingPool(ThreadPoolExecutor):
    """Compiles, then builds the compiled kernel's launcher and loads its binary on the
    pool's device, so that its first launch finds it ready."""

    def __init__(self, workers: int, device: torch.device, go: threading.Event) -> None:
        super().__init__(workers, thread_name_prefix="triton-compile", initializer=use_device, initargs=(device,))
        self.go = go

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future:
        def compile_and_load() -> Any:
            self.go.wait()  # not while the twin records: compiling's Python would slow it down
            kernel = fn(*args, **kwargs)
            init = getattr(kernel, "_init_handles", None)
            if init is not None:
                try:
                    init()
                except Exception:  # the launch that needs it builds it again and raises there
                    if getattr(kernel, "module", None) is None:
                        kernel._run = None
            return kernel

        return super().submit(compile_and_load)


def available(device: torch.device) -> bool:
    """Whether this triton has what precompiling uses (AsyncCompileMode) and the device is CUDA."""
    if device.type != "cuda":
        return False
    try:
        from triton.runtime import _async_compile
    except ImportError:
        return False
    return hasattr(_async_compile, "AsyncCompileMode") and hasattr(_async_compile, "active_mode")


class Precompile:
    """A pool compiling the kernels a twin's steps recorded (see the module doc)."""

    def __init__(self, device: torch.device, workers: int | None = None) -> None:
        from triton.runtime import _async_compile

        self.device = device
        # 8 on the 16-core H200 host: a fresh start ready in 7.2 s against 8.2-8.7 s with 15,
        # whose compiles took 52 s of CPU against 30 (they contend for the GIL and the cores
        # that the load uses too)
        self.workers = workers or max(1, min(8, (os.cpu_count() or 2) - 1))
        self._active = _async_compile.active_mode
        self._go = threading.Event()
        self.mode = _async_compile.AsyncCompileMode(_LoadingPool(self.workers, device, self._go))
        # triton >= 3.7 puts a pending kernel into the JIT's cache at once (any thread's launch
        # waits for it); 3.6 only when someone takes its result: the finisher does
        self._finalize = "cleanup_fn" not in inspect.signature(self.mode.submit).parameters
        self.finished = False  # every recorded kernel compiled and in its JIT cache
        self.began = time.perf_counter()
        self.twin_s = 0.0  # building the twin
        self.record_s = 0.0  # recording its steps
        self.kernels = 0  # compiles the twin's steps submitted
        self.done_s: float | None = None  # from the start until the last of them was compiled
        self._finisher: threading.Thread | None = None
        _record_launches()

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        """The calling thread's launches share the pool for the block: a kernel compiling
        there is waited for, a new one compiled there. A no-op once every recorded kernel
        is compiled (launches then compile what is missing themselves, as without a pool)."""
        if self.finished:
            yield
            return
        token = self._active.set(self.mode)
        try:
            yield
        finally:
            self._active.reset(token)

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        with self.attached():
            _recording.on = True
            try:
                yield
            finally:
                _recording.on = False

    @torch.inference_mode()
    def record(self, twin: CausalLM, engine: EngineConfig, max_model_len: int, kernels: AttentionKernels | None,
               profile_tokens: int | None) -> None:
        """Run the twin at every step size a start uses, in record mode: KV sizing's
        prefill of ``profile_tokens`` (None: skipped, a warm record has its bytes), a
        decode step of one sequence, every varlen token bucket, the other decode buckets."""
        began = time.perf_counter()
        block = engine.block_size
        max_blocks = -(-max_model_len // block)
        sizes = step_sizes(twin, engine, self.device, kernels)  # the runner's buckets: eager steps pad to them too
        with self.recording():
            if profile_tokens:
                measure_peak(twin, profile_tokens, block, kernels)
            nblocks = -(-max(sizes + [block]) // block) + 1
            allocate_cache(twin, nblocks + 1, block)
            scratch = nblocks * block
            decode, varlen = step_inputs(engine, max_blocks, scratch, self.device, kernels)
            decode.reset()
            varlen.reset()
            buckets = decode_graph_sizes(decode.max_bs)
            steps = [("decode", buckets[0])] + [("varlen", n) for n in sizes] + [("decode", b) for b in buckets[1:]]
            for kind, n in steps:
                hidden = twin(*(decode.args(n) if kind == "decode" else varlen.views(n)))
                twin.compute_logits(hidden[:1])
            allocate_cache(twin, 0, block)
        self.kernels = len(self.mode.raw_futures)
        self.record_s = time.perf_counter() - began
        self.start()
        futures = list(self.mode.raw_futures)
        self._finisher = threading.Thread(target=self._finish, args=(futures,), name="triton-compile-finish",
                                          daemon=True)
        self._finisher.start()

    def start(self) -> None:
        """Let the pool compile (what was recorded, and whatever comes next)."""
        self._go.set()

    def _finish(self, futures: list[Future]) -> None:
        """Put each compiled kernel into its JIT cache as soon as it is ready (triton 3.6:
        any thread's launch finds it there, attached or not); time the lot. A failed
        compile is forgotten, so the launch that needs it compiles it again and raises
        triton's own error."""
        failed = 0
        for f in as_completed(futures):
            key = getattr(f, "_key", None)
            if f.exception() is not None:
                self.mode.future_kernels.pop(key, None)
                failed += 1
            elif self._finalize and (kernel := self.mode.future_kernels.get(key)) is not None:
                kernel.result()
        self.done_s = time.perf_counter() - self.began
        self.finished = True
        self.mode.raw_futures.clear()  # finished futures keep their compile's frames alive
        log.info("%d kernels compiled by %d threads in %.1fs%s", self.kernels - failed, self.workers, self.done_s,
                 f" ({failed} failed: compiled again at first launch)" if failed else "")

    def pending(self) -> int:
        return sum(not f.done() for f in self.mode.raw_futures)

    def wait(self, timeout: float | None = None) -> None:
        if self._finisher is not None:
            self._finisher.join(timeout)

    def timings(self) -> dict[str, float]:
        out = {"precompile_kernels": float(self.kernels), "precompile_twin_s": round(self.twin_s, 3),
               "precompile_record_s": round(self.record_s, 3)}
        if self.done_s is not None:
            out["precompile_s"] = round(self.done_s, 3)
        return out


def start_precompile(cfg: ModelConfig, engine: EngineConfig, device: torch.device, dtype: torch.dtype,
                     checkpoint: str | Path | None, fp8: bool, max_model_len: int,
                     kernels: AttentionKernels | None, profile_tokens: int | None,
                     workers: int | None = None) -> Precompile | None:
    """Build the one-layer twin, record its steps, drop it; the pool goes on compiling.
    None when precompiling does not apply (not CUDA, an older triton) or the twin
    fails, in which case the start compiles as it goes, as before."""
    if not available(device):
        return None
    pre = twin = None
    try:
        pre = Precompile(device, workers)
        twin = load_model(replace(cfg, num_layers=1), device, dtype, checkpoint, fp8=fp8, seed=engine.seed,
                          max_positions=max_model_len, progress=False, layout_only=checkpoint is not None)
        pre.twin_s = time.perf_counter() - pre.began
        pre.record(twin, engine, max_model_len, kernels, profile_tokens)
    except Exception as exc:  # noqa: BLE001: only the head start is lost
        log.warning("kernel precompile skipped (%s: %s); kernels compile on first use", type(exc).__name__, exc)
        log.debug("kernel precompile failed", exc_info=True)
        return None
    finally:
        if pre is not None:
            pre.start()  # whatever was recorded compiles; nothing waits on a pool that never starts
        del twin
        torch.cuda.empty_cache()  # the twin's blocks back to the device before KV sizing counts free memory
    log.info("twin built in %.2fs recorded %d kernels in %.2fs; compiling on %d threads", pre.twin_s, pre.kernels,
             pre.record_s, pre.workers)
    return pre
