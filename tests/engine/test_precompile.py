"""The precompile twin (engine/precompile.py): a one-layer model laid out like the real
one from the checkpoint's header alone, and the padded eager prefill whose sizes it
records. The threads that compile need CUDA; what runs here is what decides *which*
kernels they compile."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from sluice.engine.config import ModelConfig
from sluice.engine.loader import Checkpoint, LayoutCheckpoint, load_model
from sluice.engine.precompile import available, start_precompile
from tests.engine.test_fp8 import write_prequantized


def _layer_layout(model: torch.nn.Module, layer: int) -> dict[str, tuple]:
    """Every tensor of ``layer`` and the top: (module type, shape, strides, dtype), what
    a triton launch's specialization sees of it."""
    owner = {id(t): type(m).__name__ for m in model.modules() for t in [*m.parameters(False), *m.buffers(False)]}
    out = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name.startswith("layers.") and not name.startswith(f"layers.{layer}."):
            continue
        out[name.replace(f"layers.{layer}.", "layers.N.")] = (owner.get(id(t)), tuple(t.shape), t.stride(), t.dtype)
    return out


@pytest.mark.parametrize("kind", ["bf16", "fp8-prequantized", "fp8-on-load"])
def test_layout_twin_matches_the_real_first_layer(tiny_mixtral, tmp_path, kind):
    path = write_prequantized(tiny_mixtral, tmp_path / "fp8", "compressed-tensors") \
        if kind == "fp8-prequantized" else tiny_mixtral
    cfg = ModelConfig.from_file(path)
    fp8 = kind != "bf16"
    real = load_model(cfg, torch.device("cpu"), torch.bfloat16, path, fp8=fp8, progress=False)
    twin = load_model(replace(cfg, num_layers=1), torch.device("cpu"), torch.bfloat16, path, fp8=fp8,
                      progress=False, layout_only=True)
    assert len(twin.layers) == 1
    assert _layer_layout(twin, 0) == _layer_layout(real, 0)
    assert all(not t.any() for n, t in twin.named_parameters() if not n.endswith("norm.weight"))


def test_layout_checkpoint_reads_no_tensor_data(tiny_mixtral, monkeypatch):
    import contextlib

    def refuse(self, name):  # the real reader: never reached
        raise AssertionError(f"read {name}")

    monkeypatch.setattr(Checkpoint, "get", refuse)
    with contextlib.ExitStack() as stack:
        ckpt = LayoutCheckpoint(tiny_mixtral, stack, torch.device("cpu"))
        t = ckpt.get("model.layers.1.block_sparse_moe.experts.0.w1.weight")
    assert t.shape == (64, 32) and not t.any()


def test_precompile_is_cuda_only(tiny_mixtral):
    from sluice.engine.config import EngineConfig

    assert not available(torch.device("cpu"))
    cfg = ModelConfig.from_file(tiny_mixtral)
    assert start_precompile(cfg, EngineConfig(), torch.device("cpu"), torch.bfloat16, tiny_mixtral, False,
                            64, None, 64) is None


def test_eager_prefill_runs_padded_to_its_bucket(tiny_mixtral):
    """Before a size's graph exists, a prefill step runs eagerly on that size's padded
    inputs (the shapes the twin recorded), with the unpadded step's tokens."""
    from sluice.engine.llm import LLM
    from sluice.engine.sampling import SamplingParams

    opts = dict(dtype="float32", device="cpu", block_size=4, num_kv_blocks=64, max_num_batched_tokens=24,
                progress=False)
    exact, padded = LLM(tiny_mixtral, **opts), LLM(tiny_mixtral, **opts)
    assert exact.runner.varlen_sizes == []  # the CPU: no triton attention, no buckets
    padded.runner.varlen_sizes = [8, 16, 24]
    sizes = []
    views = padded.runner.varlen.views
    padded.runner.varlen.views = lambda n: sizes.append(n) or views(n)
    prompts = [[(7 * i + n) % 500 for i in range(n)] for n in (5, 13)]
    params = SamplingParams(temperature=0, max_tokens=6)
    got = [c.token_ids for c in padded.generate(prompts, params)]
    assert got == [c.token_ids for c in exact.generate(prompts, params)]
    assert sizes and set(sizes) <= {8, 16, 24} and 24 in sizes  # 5 + 13 tokens: the 24 bucket


def _submit(pre, key, compile_fn):
    """AsyncCompileMode.submit as triton's JIT calls it (3.6: no cleanup callback)."""
    import inspect

    finalized = []
    args = [key, compile_fn, finalized.append]
    if "cleanup_fn" in inspect.signature(pre.mode.submit).parameters:
        args.append(lambda future_kernel: None)
    return pre.mode.submit(*args), finalized


def test_the_pool_waits_for_the_recording_then_finishes_and_forgets_failures():
    """Compiles start once the twin has recorded; the finisher puts what compiled into
    the JIT cache (triton 3.6), forgets what failed (the launch that needs it compiles
    again and raises triton's own error) and marks the pool finished."""
    import threading

    from triton.runtime import _async_compile

    from sluice.engine.precompile import Precompile

    pre = Precompile(torch.device("cpu"), workers=2)
    ran = threading.Event()

    def good():
        ran.set()
        return "kernel"

    def bad():
        raise RuntimeError("ptxas says no")

    with pre.attached():
        assert _async_compile.active_mode.get() is pre.mode
        good_kernel, finalized = _submit(pre, "good", good)
        _submit(pre, "bad", bad)
    assert _async_compile.active_mode.get() is None  # scoped: the thread is not left attached
    assert not ran.wait(0.2)  # held until the recording ends
    pre.start()
    pre._finish(list(pre.mode.raw_futures))
    assert "bad" not in pre.mode.future_kernels and pre.finished and not pre.mode.raw_futures
    assert good_kernel.result() == "kernel"
    if pre._finalize:  # triton 3.6: the finisher finalized it into the JIT cache
        assert finalized == ["kernel"]
    with pre.attached():  # finished: launches compile for themselves again
        assert _async_compile.active_mode.get() is None


def test_a_failed_twin_leaves_no_thread_attached_or_recording(tiny_mixtral, monkeypatch):
    """On the CPU the twin's profiling prefill fails (no CUDA memory stats): the start
    goes on without a pool, and this thread neither records nor shares one."""
    from triton.runtime import _async_compile

    from sluice.engine import precompile
    from sluice.engine.config import EngineConfig

    monkeypatch.setattr(precompile, "available", lambda device: True)
    cfg = ModelConfig.from_file(tiny_mixtral)
    assert precompile.start_precompile(cfg, EngineConfig(), torch.device("cpu"), torch.bfloat16, tiny_mixtral,
                                       False, 64, None, 64) is None
    assert _async_compile.active_mode.get() is None
    assert not getattr(precompile._recording, "on", False)
