"""Checkpoint loading: config dialects, and one clear line for every bad checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sluice.engine.config import ModelConfig
from sluice.engine.errors import CheckpointError, ConfigError, EngineError
from sluice.engine.llm import LLM


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_tensors(path: Path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def load_error(path: Path) -> str:
    with pytest.raises(EngineError) as info:
        LLM(path, device="cpu", dtype="float32", num_kv_blocks=8, progress=False)
    message = str(info.value)
    assert "\n" not in message
    # no chained library traceback behind the one line
    assert info.value.__cause__ is None and (info.value.__context__ is None or info.value.__suppress_context__)
    return message


def test_missing_tensor_is_named(tiny_mixtral, tmp_path):
    ckpt = copy_checkpoint(tiny_mixtral, tmp_path / "ckpt")
    rewrite_tensors(ckpt, lambda t: t.pop("model.layers.1.block_sparse_moe.experts.2.w3.weight"))
    msg = load_error(ckpt)
    assert "missing tensor model.layers.1.block_sparse_moe.experts.2.w3.weight" in msg


def test_wrong_shape_is_named(tiny_mixtral, tmp_path):
    ckpt = copy_checkpoint(tiny_mixtral, tmp_path / "ckpt")
    rewrite_tensors(ckpt, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(8, 32)}))
    msg = load_error(ckpt)
    assert "model.layers.0.self_attn.k_proj.weight has shape [8, 32], expected [16, 32]" in msg


def test_unexpected_tensor_is_named(tiny_mixtral, tmp_path):
    ckpt = copy_checkpoint(tiny_mixtral, tmp_path / "ckpt")
    rewrite_tensors(ckpt, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    assert "unexpected tensor model.layers.0.mlp.extra.weight" in load_error(ckpt)


def test_unknown_architecture(tiny_mixtral, tmp_path):
    ckpt = copy_checkpoint(tiny_mixtral, tmp_path / "ckpt")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    msg = load_error(ckpt)
    assert "unsupported architecture ['GPT2LMHeadModel']" in msg
    with pytest.raises(ConfigError):
        ModelConfig.from_file(ckpt)


def test_corrupt_safetensors_file(tiny_mixtral, tmp_path):
    ckpt = copy_checkpoint(tiny_mixtral, tmp_path / "ckpt")
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[:8] + b"{not json" + data[17:1000])
    with pytest.raises(CheckpointError):
        LLM(ckpt, device="cpu", dtype="float32", num_kv_blocks=8, progress=False)
    assert "model.safetensors: corrupt safetensors file" in load_error(ckpt)


def test_truncated_safetensors_file(tiny_mixtral, tmp_path):
    ckpt = copy_checkpoint(tiny_mixtral, tmp_path / "ckpt")
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "model.safetensors" in load_error(ckpt)


BASE = {"architectures": ["MixtralForCausalLM"], "vocab_size": 100, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 1, "num_attention_heads": 8, "num_key_value_heads": 2, "num_local_experts": 4}


@pytest.mark.parametrize("variant", [
    {"rope_theta": 1e6, "torch_dtype": "bfloat16"},  # real Mixtral checkpoints
    {"rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}, "head_dim": None, "dtype": "bfloat16"},  # tf 5
])
def test_config_dialects(variant):
    cfg = ModelConfig.from_dict(BASE | variant)
    assert (cfg.rope_theta, cfg.head_dim, cfg.dtype, cfg.rope_scaling) == (1e6, 8, "bfloat16", None)


def test_llama3_rope_scaling_and_experts_override():
    llama = ModelConfig.from_dict(BASE | {"architectures": ["LlamaForCausalLM"], "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}, "rope_theta": 5e5})
    assert not llama.is_moe and llama.rope_scaling["factor"] == 8.0 and llama.rope_theta == 5e5
    mixtral = ModelConfig.from_dict(BASE)
    assert mixtral.with_experts_per_tok(3).num_experts_per_tok == 3
    with pytest.raises(ConfigError, match="num_experts_per_tok must be in 1..4"):
        mixtral.with_experts_per_tok(5)


def test_num_experts_per_tok_override_at_load(tiny_mixtral):
    llm = LLM(tiny_mixtral, device="cpu", dtype="float32", num_kv_blocks=8, num_experts_per_tok=3, progress=False)
    assert all(layer.mlp.top_k == 3 for layer in llm.model.layers)
