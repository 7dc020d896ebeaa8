"""FP8 sub-layer error with the activations quantized, as the GPU runs it.

On the CPU the fp8 model quantizes weights only (Fp8Linear dequantizes, the experts run
their fp32 reference), so tests/engine/test_fp8.py measures weight error alone. On the
GPU, Fp8Linear also quantizes its input per token (W8A8), and the prefill MoE quantizes
x per token and h per slot. Here both are measured against the bf16 model's sub-layers
on a random-weight Mixtral-shaped model (the issue's per-layer FP8-vs-bf16 check): the
MoE through the triton kernel itself (interpreter), the linears by quantizing their
input with the kernel's reference quantizer.

Measured (160-token prefill): attention 3.3-4.0e-2 weights only, 4.7-4.8e-2 W8A8; MoE
4.3-4.5e-2 W8A16 (decode, and SLUICE_MOE_PREFILL=w8a16), 6.1-6.3e-2 W8A8 (prefill).
The W8A8 MoE misses the issue's 5e-2: e4m3 keeps 3 mantissa bits, so each per-row
quantization of gaussian activations costs ~3.5% rms on top of the weights' ~2.6% per
matmul, and the MoE chains two. docs/performance.md records the miss.
"""

from __future__ import annotations

import pytest
import torch

from sluice.engine.config import ModelConfig
from sluice.engine.kernels.fused_moe import fused_moe, moe_config, moe_prefill_config
from sluice.engine.llm import LLM
from bench.quant_error import capture_sublayers, w8a8_forward
from sluice.engine.quant.fp8 import Fp8Linear

from ._util import rel_err

RAW = {"architectures": ["MixtralForCausalLM"], "vocab_size": 512, "hidden_size": 256,
       "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 8,
       "num_key_value_heads": 2, "num_local_experts": 8, "num_experts_per_tok": 2, "rope_theta": 1e6}


@pytest.fixture(scope="module")
def sublayers():
    """The bf16 model's attention and MoE sub-layers on a 160-token prefill: (inputs,
    output) per sub-layer name, and the fp8 model with the same cache contents."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict(RAW)
    opts = dict(device="cpu", num_kv_blocks=16, max_model_len=256, progress=False)
    ref = LLM(model_config=cfg, dtype="bfloat16", **opts)
    fp8 = LLM(model_config=cfg, dtype="fp8", **opts)
    seen, _ = capture_sublayers(ref, [3 + (7 * i) % 500 for i in range(160)])
    fp8.runner.kv_cache.copy_(ref.runner.kv_cache)
    return seen, fp8


def test_w8a8_attention_close_to_bf16(sublayers, monkeypatch):
    seen, fp8 = sublayers
    weights_only = Fp8Linear.forward

    errors = {}
    with torch.no_grad():
        for name, (args, want) in seen.items():
            if name.endswith(".self_attn"):
                m = fp8.model.get_submodule(name)
                errors[name] = {"weights": rel_err(m(*args), want)}
                monkeypatch.setattr(Fp8Linear, "forward", w8a8_forward)
                errors[name]["w8a8"] = rel_err(m(*args), want)
                monkeypatch.setattr(Fp8Linear, "forward", weights_only)
    assert len(errors) == 2, errors
    for e in errors.values():
        assert e["weights"] < e["w8a8"] < 5e-2, errors


def test_w8a8_moe_error_against_bf16(sublayers):
    seen, fp8 = sublayers
    errors = {}
    with torch.no_grad():
        for name, (args, want) in seen.items():
            if not name.endswith(".mlp"):
                continue
            x = args[0]
            mlp = fp8.model.get_submodule(name)
            experts = mlp.experts
            tw, ti = mlp.route(x)
            moe_args = (x.contiguous(), experts.w13, experts.w13_scale, experts.w2, experts.w2_scale,
                        tw.float().contiguous(), ti.int().contiguous())
            t = x.shape[0]
            errors[name] = {"w8a16": rel_err(fused_moe(*moe_args, config=moe_config(t)), want),
                            "w8a8": rel_err(fused_moe(*moe_args, config=moe_prefill_config(t)), want)}
    assert len(errors) == 2, errors
    for e in errors.values():
        assert e["w8a16"] < 5e-2, errors  # 16-bit activations: within the bound
        assert e["w8a16"] < e["w8a8"] < 7e-2, errors  # W8A8 prefill: ~6.2e-2, over it (see module doc)
