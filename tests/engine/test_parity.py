"""The engine matches transformers: fp32 logits for prefill and decode, greedy tokens."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from sluice.engine.llm import LLM
from sluice.engine.sampling import SamplingParams

PROMPT = [1, 415, 2936, 9060, 285, 1142, 28705, 461, 10575, 754, 272, 17898, 3914, 28723, 7, 300, 451]
DECODE_STEPS = 16


def hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def engine_run(llm: LLM, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy-generate ``steps`` tokens, recording the logits the sampler saw."""
    seen: list[torch.Tensor] = []
    run = llm.runner.run
    llm.runner.run = lambda *args: seen.append(run(*args)) or seen[-1]
    [out] = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True))
    llm.runner.run = run
    return out.token_ids, [s[0] for s in seen if len(s)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("fixture", ["tiny_mixtral", "tiny_llama"])
def test_logits_and_greedy_match_transformers(fixture, request):
    path = request.getfixturevalue(fixture)
    prompt = [t % 512 for t in PROMPT]
    # small blocks and a small chunk budget: prefill spans blocks and chunks
    llm = LLM(path, dtype="float32", device="cpu", block_size=4, num_kv_blocks=32,
              max_num_batched_tokens=8, progress=False)
    tokens, logits = engine_run(llm, prompt, DECODE_STEPS + 1)  # prefill token + 16 decodes
    hf = hf_model(path)
    with torch.no_grad():
        full = torch.tensor([prompt + tokens])
        ref = hf(full).logits[0].float()  # (T, V)
        hf_tokens = hf.generate(torch.tensor([prompt]), max_new_tokens=DECODE_STEPS + 1, do_sample=False,
                                min_new_tokens=DECODE_STEPS + 1)[0, len(prompt):].tolist()
    assert len(logits) == DECODE_STEPS + 1
    for i, got in enumerate(logits):
        assert rel_err(got, ref[len(prompt) - 1 + i]) < 1e-4, f"step {i}"
    assert tokens == hf_tokens
    assert not torch.equal(logits[0], logits[-1])  # decode steps really differ


@pytest.mark.parametrize("fixture", ["tiny_mixtral", "tiny_llama"])
def test_prefill_logits_every_position(fixture, request):
    path = request.getfixturevalue(fixture)
    prompt = [t % 512 for t in PROMPT]
    llm = LLM(path, dtype="float32", device="cpu", block_size=4, num_kv_blocks=16, progress=False)
    seq = llm.add_request(prompt, SamplingParams(temperature=0, max_tokens=1))
    batch = llm.scheduler.schedule()
    ids, pos, meta, _ = llm.runner.prepare_varlen(batch)
    with torch.no_grad():
        got = llm.model.compute_logits(llm.model(ids, pos, meta))
        ref = hf_model(path)(torch.tensor([prompt])).logits[0].float()
    assert seq in batch.prefill
    assert rel_err(got, ref) < 1e-4


def test_sharded_checkpoint_loads_identically(tiny_mixtral, tmp_path):
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_mixtral).save_pretrained(
        sharded, safe_serialization=True, max_shard_size="300KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    a = LLM(tiny_mixtral, device="cpu", dtype="float32", num_kv_blocks=8, progress=False).model.state_dict()
    b = LLM(sharded, device="cpu", dtype="float32", num_kv_blocks=8, progress=False).model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    shutil.rmtree(sharded)
