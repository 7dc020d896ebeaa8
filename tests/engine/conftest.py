"""Tiny random checkpoints written by transformers, shared by the engine tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # the test machine has 2 cores shared with others


def _save(model_cls, config, path: Path) -> Path:
    torch.manual_seed(0)
    model = model_cls(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    return path


def mixtral_config(**overrides):
    from transformers import MixtralConfig

    kw = dict(vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
              max_position_embeddings=512, rope_theta=1e6, initializer_range=0.1)
    kw.update(overrides)
    return MixtralConfig(**kw)


@pytest.fixture(scope="session")
def tiny_mixtral(tmp_path_factory) -> Path:
    from transformers import MixtralForCausalLM

    return _save(MixtralForCausalLM, mixtral_config(), tmp_path_factory.mktemp("tiny-mixtral"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """Llama 3 flavour: llama3 rope scaling, tied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, initializer_range=0.1,
        rope_scaling={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        bos_token_id=1, eos_token_id=2)
    return _save(LlamaForCausalLM, config, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def counted_reads(monkeypatch):
    """Counts each checkpoint tensor the loader reads (Checkpoint.get), by name."""
    from collections import Counter

    from sluice.engine.loader import Checkpoint

    reads: Counter[str] = Counter()
    original = Checkpoint.get

    def counting_get(self, name):
        reads[name] += 1
        return original(self, name)

    monkeypatch.setattr(Checkpoint, "get", counting_get)
    return reads
