"""The warm record: an earlier start's activation bytes, so that a restart on the same
host sizes its KV cache without KV sizing's prefill (engine/warm_record.py)."""

from __future__ import annotations

from dataclasses import replace

import torch

from sluice.engine.config import EngineConfig, ModelConfig
from sluice.engine.llm import LLM
from sluice.engine.sampling import SamplingParams
from sluice.engine.warm_record import WarmRecord, warm_key


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


def test_an_engine_off_cuda_keeps_no_record(tiny_mixtral, tmp_path):
    llm = LLM(tiny_mixtral, dtype="float32", device="cpu", num_kv_blocks=16, progress=False,
              compile_cache_dir=str(tmp_path))
    assert not (tmp_path / "warm").exists()
    [out] = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3))
    assert len(out.token_ids) == 3
