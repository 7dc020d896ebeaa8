"""FP8 against the 16-bit model, sub-layer by sub-layer (the issue's per-layer check).

Both engines must hold the same random weights (same seed and config) and the same
number of KV blocks. The prompt goes through ``ref`` as one prefill; each attention and
MoE sub-layer of ``other`` is then fed exactly the inputs its counterpart in ``ref`` got,
so the errors do not compound from layer to layer. The final logits are compared after
independent forward passes (errors compounded, as served).
"""

from __future__ import annotations

import torch

from sluice.engine.kernels.act_quant import per_token_quant_reference
from sluice.engine.layers.moe import MoE
from sluice.engine.llm import LLM
from sluice.engine.quant.fp8 import Fp8Linear
from sluice.engine.sampling import SamplingParams

SUBLAYERS = (".self_attn", ".mlp")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def capture_sublayers(ref: LLM, prompt: list[int]) -> tuple[dict[str, tuple], tuple]:
    """Run ``prompt`` through ``ref`` as one prefill, recording each sub-layer's (args,
    output); returns them and the step's (ids, positions, metadata). The request is
    left scheduled in ``ref`` (its cache holds the prompt's K/V)."""
    ref.add_request(list(prompt), SamplingParams(max_tokens=1))
    ids, pos, meta, _ = ref.runner.prepare_varlen(ref.scheduler.schedule())
    seen: dict[str, tuple] = {}
    hooks = [m.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, (args, out)))
             for name, m in ref.model.named_modules()
             if name.startswith("layers.") and name.count(".") == 2 and name.endswith(SUBLAYERS)]
    try:
        with torch.inference_mode():
            hidden = ref.model(ids, pos, meta)
    finally:
        for h in hooks:
            h.remove()
    return seen, (ids, pos, meta, hidden)


def sublayer_errors(ref: LLM, other: LLM, prompt: list[int]) -> dict[str, float]:
    """Relative error of each of ``other``'s attention/MoE sub-layers against ``ref``'s on
    the same inputs, plus "logits": the last position's logits after both full passes."""
    seen, (ids, pos, meta, hidden) = capture_sublayers(ref, prompt)
    other.runner.kv_cache.copy_(ref.runner.kv_cache)  # attention reads the prompt's K/V from it
    errors = {}
    with torch.inference_mode():
        for name, (args, want) in seen.items():
            # a decode-sized MoE returns its per-slot partials (N, k, D): compare the sums
            errors[name] = rel_err(MoE.reduced(other.model.get_submodule(name)(*args)), MoE.reduced(want))
        want_logits = ref.model.compute_logits(hidden[-1:])
        got_logits = other.model.compute_logits(other.model(ids, pos, meta)[-1:])
    errors["logits"] = rel_err(got_logits, want_logits)
    return errors


def attention_error_on_cpu(tokens: int, hidden: int = 4096, heads: int = 32, kv_heads: int = 8,
                           seed: int = 0) -> dict[str, float]:
    """One Mixtral-width attention sub-layer (random weights, std 0.02 as the GPU bench
    builds them) on the CPU: fp8 against bf16 with weights only quantized, and with each
    linear's input also quantized per token to e4m3 as the GPU's W8A8 GEMMs do. Tells the
    format's own error apart from a GPU kernel's (the GPU bench's ``layer_errors``)."""
    import random

    from sluice.engine.config import ModelConfig

    torch.manual_seed(seed)
    raw = {"architectures": ["MixtralForCausalLM"], "vocab_size": 32000, "hidden_size": hidden,
           "intermediate_size": 256, "num_hidden_layers": 1, "num_attention_heads": heads,
           "num_key_value_heads": kv_heads, "num_local_experts": 8, "num_experts_per_tok": 2, "rope_theta": 1e6}
    cfg = ModelConfig.from_dict(raw)
    opts = {"device": "cpu", "num_kv_blocks": -(-tokens // 16) + 1, "max_model_len": tokens + 16,
            "max_num_batched_tokens": tokens, "progress": False}
    ref = LLM(model_config=cfg, dtype="bfloat16", **opts)
    fp8 = LLM(model_config=cfg, dtype="fp8", **opts)
    rng = random.Random(seed)
    seen, _ = capture_sublayers(ref, [rng.randrange(3, 32000) for _ in range(tokens)])
    fp8.runner.kv_cache.copy_(ref.runner.kv_cache)
    args, want = seen["layers.0.self_attn"]
    attn = fp8.model.get_submodule("layers.0.self_attn")
    weights_only = Fp8Linear.forward
    with torch.inference_mode():
        errors = {"weights_only": rel_err(attn(*args), want)}
        Fp8Linear.forward = w8a8_forward
        try:
            errors["w8a8"] = rel_err(attn(*args), want)
        finally:
            Fp8Linear.forward = weights_only
    return errors


def w8a8_forward(self: Fp8Linear, x: torch.Tensor) -> torch.Tensor:
    """Fp8Linear as the GPU runs it, on the CPU (patch it in as ``Fp8Linear.forward``):
    the input quantized per token to e4m3 by the kernel's reference quantizer, then the
    weights-only forward."""
    q, s = per_token_quant_reference(x.reshape(-1, self.in_features))
    return _weights_only_forward(self, (q.float() * s[:, None]).to(x.dtype).reshape(x.shape))


_weights_only_forward = Fp8Linear.forward


if __name__ == "__main__":  # python -m bench.quant_error [tokens ...]
    import sys

    for n in [int(a) for a in sys.argv[1:]] or [32, 1024]:
        print(f"attention sub-layer, hidden 4096, {n}-token prefill:", attention_error_on_cpu(n), flush=True)
