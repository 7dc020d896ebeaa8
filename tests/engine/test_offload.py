"""A wake after a cut-short host copy: the parked weights come from host, only the
modules holding the others are read again (engine/offload.py, load_model's ``parts``)."""

from __future__ import annotations


import pytest
import torch

from sluice.engine import offload
from sluice.engine.config import ModelConfig
from sluice.engine.llm import LLM
from sluice.engine.loader import load_model, reading_only
from sluice.engine.sampling import SamplingParams
from tests.engine.test_fp8 import write_prequantized

PROMPT = [1, 415, 2936, 9060, 285, 1142, 28705, 461]


def greedy(llm: LLM) -> list[int]:
    [out] = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    return out.token_ids


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(-1).view(torch.uint8).clone()


@pytest.fixture(scope="module")
def fp8_mixtral(tiny_mixtral, tmp_path_factory):
    return write_prequantized(tiny_mixtral, tmp_path_factory.mktemp("offload") / "fp8", "fp8")


def park_some(parking: offload.WeightParking, chunks: int) -> None:
    """Park ``chunks`` chunks, as a sleep coming during the host copy leaves it."""
    if chunks == 0:
        return
    layout, calls = offload.packed_layout, []

    def cancel_after(sizes):
        calls.append(1)
        if len(calls) == chunks:  # this chunk is copied, the next is not begun
            parking._cancel.set()
        return layout(sizes)

    offload.packed_layout = cancel_after
    try:
        parking.park()
    finally:
        offload.packed_layout = layout


@pytest.mark.parametrize("stop", ["nothing", "some", "the layers", "all but the last"])
@pytest.mark.parametrize("kind", ["bf16", "fp8"])
def test_a_wake_after_a_cut_short_copy_gives_the_same_weights(tiny_mixtral, fp8_mixtral, kind, stop,
                                                              monkeypatch, counted_reads):
    path, dtype = (tiny_mixtral, "bfloat16") if kind == "bf16" else (fp8_mixtral, "fp8")
    llm = LLM(path, dtype=dtype, device="cpu", num_kv_blocks=16, progress=False)
    before = greedy(llm)
    parking = llm.runner.parking
    weights = offload._weights(llm.model)
    snapshot = {name: as_bytes(t) for name, t in weights}
    identity = {name: id(t) for name, t in weights}
    modules = [(name, type(m)) for name, m in llm.model.named_modules()]
    monkeypatch.setattr(offload, "CHUNK", 1)  # one tensor a chunk
    layers = max(i for i, (name, _) in enumerate(weights) if name.startswith("layers.")) + 1
    chunks = {"nothing": 0, "some": len(weights) // 2, "the layers": layers, "all but the last": len(weights) - 1}[stop]
    park_some(parking, chunks)
    assert len(parking._chunks) == chunks and not parking.complete
    llm.sleep()
    counted_reads.clear()
    source = llm.wake()

    assert source == ("checkpoint" if stop == "nothing" else "host+checkpoint")
    after = offload._weights(llm.model)
    assert [(n, type(m)) for n, m in llm.model.named_modules()] == modules
    assert {name: id(t) for name, t in after} == identity  # the same Parameter objects, refilled
    for name, t in after:
        assert torch.equal(as_bytes(t), snapshot[name]), name
    # only the modules holding an unparked weight were read
    lacking = {offload._part(name) for name, _ in weights[chunks:]}
    read = {offload._part(name.removeprefix("model.")) for name in counted_reads}
    assert read == lacking - {"rotary"}
    assert max(counted_reads.values(), default=1) == 1
    parked = sum(host.numel() for host, _, _ in parking._chunks)
    assert parking.timings["restore_host_bytes"] == parked
    assert parking.timings["restore_checkpoint_bytes"] == sum(t.numel() * t.element_size()
                                                              for _, t in after[chunks:])
    assert greedy(llm) == before

    parking.park()  # goes on from where it stopped
    assert parking.complete
    llm.sleep()
    assert llm.wake() == "host" and greedy(llm) == before


@pytest.mark.parametrize("prequantized", [False, True])
@pytest.mark.parametrize("stage", [False, True])
def test_load_model_reads_only_the_parts_asked_for(tiny_mixtral, fp8_mixtral, prequantized, stage, counted_reads):
    path = fp8_mixtral if prequantized else tiny_mixtral
    cfg = ModelConfig.from_file(path)
    cpu = torch.device("cpu")
    full = load_model(cfg, cpu, torch.float32, path, fp8=True, progress=False, stage=stage).state_dict()
    counted_reads.clear()
    with reading_only({"layers.1", "lm_head"}):
        part = load_model(cfg, cpu, torch.float32, path, fp8=True, progress=False, stage=stage)
    assert {name.split(".")[2] for name in counted_reads if name.startswith("model.layers.")} == {"1"}
    assert "lm_head.weight" in counted_reads and "model.embed_tokens.weight" not in counted_reads
    for name, t in part.state_dict().items():
        if name.startswith(("layers.1.", "lm_head.", "rotary.")):
            assert torch.equal(as_bytes(t), as_bytes(full[name])), name
        else:
            assert t.is_meta, name


def test_random_weights_of_a_part_equal_a_full_load(tiny_mixtral):
    """Random weights (no checkpoint) are drawn in one stream: a part must be drawn as
    the full load draws it."""
    cfg = ModelConfig.from_file(tiny_mixtral)
    cpu = torch.device("cpu")
    full = load_model(cfg, cpu, torch.float32, None, fp8=True, seed=3, progress=False).state_dict()
    part = load_model(cfg, cpu, torch.float32, None, fp8=True, seed=3, progress=False,
                      parts={"layers.1", "norm"}).state_dict()
    for name, t in part.items():
        if name.startswith(("layers.1.", "norm.")):
            assert torch.equal(as_bytes(t), as_bytes(full[name])), name
        elif not name.startswith("rotary."):
            assert t.is_meta, name
