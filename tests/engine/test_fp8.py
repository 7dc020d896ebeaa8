"""FP8 weights end to end on the CPU reference path: quantize on load, pre-quantized
checkpoints (both config dialects), and accuracy against the 16-bit model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sluice.engine.config import ModelConfig
from sluice.engine.errors import CheckpointError, ConfigError
from sluice.engine.llm import LLM
from bench.quant_error import sublayer_errors
from sluice.engine.quant.fp8 import Fp8FusedExperts, Fp8Linear
from sluice.engine.sampling import SamplingParams

PROMPT = [1, 415, 2936, 9060, 285, 1142, 28705, 461, 10575, 754]


def greedy(llm: LLM, steps: int = 8) -> list[int]:
    [out] = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True))
    return out.token_ids


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_fp8_on_load_keeps_router_norms_embeddings_and_head(tiny_mixtral):
    llm = LLM(tiny_mixtral, dtype="fp8", device="cpu", num_kv_blocks=16, progress=False)
    layer = llm.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, Fp8Linear) and isinstance(layer.self_attn.o_proj, Fp8Linear)
    assert isinstance(layer.mlp.experts, Fp8FusedExperts)  # the 16-bit Experts submodule swapped out
    assert layer.mlp.gate.weight.dtype == torch.bfloat16  # the router
    assert llm.model.lm_head.weight.dtype == llm.model.embed_tokens.weight.dtype == torch.bfloat16
    assert layer.input_layernorm.weight.dtype == torch.bfloat16


def test_fp8_greedy_tokens_match_bf16(tiny_mixtral):
    bf16 = LLM(tiny_mixtral, dtype="bfloat16", device="cpu", num_kv_blocks=16, progress=False)
    fp8 = LLM(tiny_mixtral, dtype="fp8", device="cpu", num_kv_blocks=16, progress=False)
    assert greedy(fp8) == greedy(bf16)


def test_fp8_layer_outputs_close_to_bf16_on_mixtral_shapes():
    """Random-weight Mixtral-shaped model (8 experts, top-2, GQA). Each fp8 sub-layer
    (attention, MoE) and decoder layer gets the bf16 model's inputs to it and its
    output is compared. e4m3 rounds each weight to ~2.6% rms, so one matmul is off by
    ~2.6%, attention (qkv then o) and the MoE (w13 then w2) by ~4-5%. Whole decoder
    layers are not asserted: a random router is near-uniform, so the attention error
    flips some tokens' top-2 experts (measured 6% at layer 0, 22% at layer 1)."""
    raw = {"architectures": ["MixtralForCausalLM"], "vocab_size": 512, "hidden_size": 256,
           "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 8,
           "num_key_value_heads": 2, "num_local_experts": 8, "num_experts_per_tok": 2, "rope_theta": 1e6}
    cfg = ModelConfig.from_dict(raw)
    opts = dict(device="cpu", num_kv_blocks=8, max_model_len=64, progress=False)
    ref = LLM(model_config=cfg, dtype="bfloat16", **opts)
    fp8 = LLM(model_config=cfg, dtype="fp8", **opts)
    errors = sublayer_errors(ref, fp8, list(range(3, 40)))
    logits = errors.pop("logits")
    assert len(errors) == 4 and all(err < 5e-2 for err in errors.values()), errors
    assert logits < 0.1, logits  # reported: 5.4e-2, compounded over both layers and routing flips


def write_prequantized(src: Path, dst: Path, dialect: str) -> Path:
    """Quantize every linear but the router and lm_head the way published FP8 checkpoints
    are: e4m3 weight, per-tensor scalar scale (per-channel [out, 1] for the experts),
    static input_scale."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    out = {}
    for name, t in tensors.items():
        linear = name.endswith("proj.weight") or ".experts." in name
        if not linear:
            out[name] = t
            continue
        per_channel = ".experts." in name
        amax = t.abs().amax(dim=1, keepdim=True) if per_channel else t.abs().max()
        scale = (amax / 448.0).float()
        out[name] = (t / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
        out[name.replace(".weight", ".weight_scale")] = scale
        out[name.replace(".weight", ".input_scale")] = torch.tensor(0.05)
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = (
        {"quant_method": "fp8", "activation_scheme": "static"} if dialect == "fp8" else
        {"quant_method": "compressed-tensors", "format": "float-quantized",
         "config_groups": {"group_0": {"weights": {"num_bits": 8, "type": "float", "strategy": "tensor"},
                                       "input_activations": {"num_bits": 8, "type": "float", "dynamic": False}}},
         "ignore": ["lm_head", "re:.*block_sparse_moe.gate"]})
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("dialect", ["fp8", "compressed-tensors"])
def test_prequantized_checkpoint_is_read_as_stored(tiny_mixtral, tmp_path, dialect):
    path = write_prequantized(tiny_mixtral, tmp_path / "fp8", dialect)
    stored = load_file(path / "model.safetensors")
    fp8 = LLM(path, dtype="fp8", device="cpu", num_kv_blocks=16, progress=False)
    qkv = fp8.model.layers[1].self_attn.qkv_proj
    q = stored["model.layers.1.self_attn.q_proj.weight"]
    assert isinstance(qkv, Fp8Linear)
    assert torch.equal(qkv.weight[: q.shape[0]].view(torch.uint8), q.view(torch.uint8))
    assert float(qkv.input_scale) == pytest.approx(0.05)
    experts = fp8.model.layers[1].mlp.experts
    w2 = stored["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    assert torch.equal(experts.w2[3].view(torch.uint8), w2.view(torch.uint8))
    # the same checkpoint dequantized into bf16 gives the same greedy tokens
    dense = LLM(path, dtype="bfloat16", device="cpu", num_kv_blocks=16, progress=False)
    assert isinstance(dense.model.layers[1].self_attn.qkv_proj, torch.nn.Linear)
    assert greedy(fp8) == greedy(dense)


def test_prequantized_checkpoint_problems_are_one_line(tiny_mixtral, tmp_path):
    path = write_prequantized(tiny_mixtral, tmp_path / "fp8", "fp8")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.0.self_attn.o_proj.weight_scale"]
    tensors["model.layers.0.mlp.bogus.weight_scale"] = torch.tensor(1.0)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match="unexpected tensor model.layers.0.mlp.bogus.weight_scale"):
        LLM(path, dtype="fp8", device="cpu", num_kv_blocks=8, progress=False)
    del tensors["model.layers.0.mlp.bogus.weight_scale"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match="o_proj.weight has no model.layers.0.self_attn.o_proj.weight_scale"):
        LLM(path, dtype="fp8", device="cpu", num_kv_blocks=8, progress=False)


def test_unsupported_quantization_config_is_a_config_error(tiny_mixtral):
    raw = json.loads((tiny_mixtral / "config.json").read_text())
    with pytest.raises(ConfigError, match="quant_method 'awq'"):
        ModelConfig.from_dict({**raw, "quantization_config": {"quant_method": "awq"}})
    with pytest.raises(ConfigError, match="not FP8"):
        ModelConfig.from_dict({**raw, "quantization_config": {
            "quant_method": "compressed-tensors",
            "config_groups": {"g": {"weights": {"num_bits": 8, "type": "float", "strategy": "block"}}}}})
