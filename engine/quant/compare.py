"""FP8 against the 16-bit model, sub-layer by sub-layer (the issue's per-layer check).

Both engines must hold the same random weights (same seed and config) and the same
number of KV blocks. The prompt goes through ``ref`` as one prefill; each attention and
MoE sub-layer of ``other`` is then fed exactly the inputs its counterpart in ``ref`` got,
so the errors do not compound from layer to layer. The final logits are compared after
independent forward passes (errors compounded, as served).
"""

from __future__ import annotations

import torch

from engine.llm import LLM
from engine.sampling import SamplingParams

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
            errors[name] = rel_err(other.model.get_submodule(name)(*args), want)
        want_logits = ref.model.compute_logits(hidden[-1:])
        got_logits = other.model.compute_logits(other.model(ids, pos, meta)[-1:])
    errors["logits"] = rel_err(got_logits, want_logits)
    return errors
