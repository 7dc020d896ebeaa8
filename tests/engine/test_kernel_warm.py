"""The one-layer twins that compile a cold start's kernels while the weights load, and
the warm record that lets the next start skip them (engine/kernel_warm.py).

On the CPU nothing compiles; these check that a twin reads the right part of the
checkpoint and runs the steps a cold start runs in its own process, and that the record
works."""

from __future__ import annotations

from dataclasses import replace

import torch

from sluice.engine.config import EngineConfig, ModelConfig
from sluice.engine.kernel_warm import PARTS, KernelTwin, WarmRecord, warm_key
from sluice.engine.llm import LLM
from sluice.engine.loader import load_model
from sluice.engine.sampling import SamplingParams


def test_a_partial_load_reads_the_first_layer_of_the_checkpoint(tiny_mixtral):
    cfg = ModelConfig.from_file(tiny_mixtral)
    assert cfg.num_layers > 1
    full = load_model(cfg, torch.device("cpu"), torch.float32, tiny_mixtral, progress=False)
    one = load_model(replace(cfg, num_layers=1), torch.device("cpu"), torch.float32, tiny_mixtral,
                     progress=False, partial=True)
    assert len(one.layers) == 1
    for (name, a), (_, b) in zip(one.layers[0].state_dict().items(), full.layers[0].state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(one.embed_tokens.weight, full.embed_tokens.weight)


def test_the_twins_run_a_cold_starts_steps_in_processes_of_their_own(tiny_mixtral):
    engine = EngineConfig(model=str(tiny_mixtral), max_num_batched_tokens=64, device="cpu", dtype="float32")
    twin = KernelTwin(tiny_mixtral, engine, torch.device("cpu"), False, 256).start()
    assert len(twin._procs) == len(PARTS)
    twin.join()
    assert twin.error is None, twin.error
    assert set(twin.results) == set(PARTS)  # each part ran to its end (nothing compiles on the CPU)
    assert all(r["kernels"] == 0 for r in twin.results.values())


def test_a_failing_twin_costs_nothing_but_its_overlap(tiny_mixtral, tmp_path):
    engine = EngineConfig(model=str(tiny_mixtral), device="cpu", dtype="float32")
    twin = KernelTwin(tmp_path / "missing", engine, torch.device("cpu"), False, 256, parts=("decode",)).start()
    twin.join()  # no exception here: the start goes on and compiles for itself
    assert twin.error is not None and "decode: exit" in twin.error


def test_the_warm_record_keeps_a_steps_activations_per_model_and_configuration(tiny_mixtral, tmp_path):
    cfg = ModelConfig.from_file(tiny_mixtral)
    cpu = torch.device("cpu")
    key = warm_key(cfg, EngineConfig(), torch.bfloat16, True, cpu, tiny_mixtral)
    assert key == warm_key(cfg, EngineConfig(), torch.bfloat16, True, cpu, tiny_mixtral)
    others = {warm_key(cfg, EngineConfig(max_num_batched_tokens=4096), torch.bfloat16, True, cpu, tiny_mixtral),
              warm_key(cfg, EngineConfig(), torch.bfloat16, False, cpu, tiny_mixtral),
              warm_key(replace(cfg, hidden_size=cfg.hidden_size * 2), EngineConfig(), torch.bfloat16, True, cpu,
                       tiny_mixtral)}
    assert key not in others and len(others) == 3
    record = WarmRecord(tmp_path / "triton", key)
    assert record.activations() is None
    record.write(123_456)
    assert WarmRecord(tmp_path / "triton", key).activations() == 123_456
    record.path.write_text("not json")
    assert record.activations() is None  # a damaged record is no record


def test_an_engine_off_cuda_neither_starts_a_twin_nor_keeps_a_record(tiny_mixtral, tmp_path):
    llm = LLM(tiny_mixtral, dtype="float32", device="cpu", num_kv_blocks=16, progress=False,
              compile_cache_dir=str(tmp_path))
    assert "twin_s" not in llm.timings and not (tmp_path / "warm").exists()
    [out] = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3))
    assert len(out.token_ids) == 3
