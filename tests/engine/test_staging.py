"""Page-locked layer staging (engine/staging.py): the bytes it reads are the checkpoint's,
and a model loaded through it is the model loaded without it."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from sluice.engine import staging
from sluice.engine.config import ModelConfig
from sluice.engine.errors import CheckpointError
from sluice.engine.loader import load_model
from sluice.engine.staging import LayerStager, read_header
from tests.engine.conftest import _save, mixtral_config
from tests.engine.test_fp8 import write_prequantized


def test_stager_reads_every_tensor_as_stored(tmp_path, monkeypatch):
    monkeypatch.setattr(staging, "CHUNK", 1000)  # split tensors across reads and threads
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": (torch.randn(64, 48, generator=gen) * 40).to(torch.float8_e4m3fn),
        "a.weight_scale": torch.rand(64, 1, generator=gen),
        "b.weight": torch.randn(33, 17, generator=gen).to(torch.bfloat16),
        "c.ids": torch.arange(7, dtype=torch.int64),
    }
    save_file(dict(list(tensors.items())[:2]), tmp_path / "one.safetensors")
    save_file(dict(list(tensors.items())[2:]), tmp_path / "two.safetensors")
    extents = read_header(tmp_path / "one.safetensors") | read_header(tmp_path / "two.safetensors")
    groups = [["a.weight", "c.ids"], ["b.weight"], ["a.weight_scale", "b.weight"]]
    stager = LayerStager(extents, groups, threads=3)
    try:
        for n, group in enumerate(groups):
            staged = stager.take(n)
            assert sorted(staged) == sorted(group)
            for name in group:
                got, want = staged[name], tensors[name]
                assert got.dtype == want.dtype and got.shape == want.shape
                assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), name
            stager.release(n)
        assert stager.bytes_read == sum(extents[name].nbytes for g in groups for name in g)
    finally:
        stager.close()


def test_truncated_shard_is_a_checkpoint_error(tmp_path):
    save_file({"w": torch.ones(1000)}, tmp_path / "m.safetensors")
    extents = read_header(tmp_path / "m.safetensors")
    with open(tmp_path / "m.safetensors", "r+b") as f:
        f.truncate(extents["w"].start + 100)
    stager = LayerStager(extents, [["w"]], threads=2)
    try:
        with pytest.raises(CheckpointError, match="ends before"):
            stager.take(0)
    finally:
        stager.close()
    (tmp_path / "bad.safetensors").write_bytes(b"\x05")
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        read_header(tmp_path / "bad.safetensors")


@pytest.fixture(scope="module")
def three_layers(tmp_path_factory):
    """Three layers: the third reuses the first's staging buffer, so a model tensor still
    pointing into a buffer would come out wrong."""
    from transformers import MixtralForCausalLM

    return _save(MixtralForCausalLM, mixtral_config(num_hidden_layers=3), tmp_path_factory.mktemp("three"))


@pytest.mark.parametrize("prequantized", [False, True])
@pytest.mark.parametrize("fp8", [False, True])
def test_staged_load_equals_direct_load(three_layers, tmp_path, prequantized, fp8):
    path = write_prequantized(three_layers, tmp_path / "fp8", "fp8") if prequantized else three_layers
    cfg = ModelConfig.from_file(path)
    direct = load_model(cfg, torch.device("cpu"), torch.float32, path, fp8=fp8, progress=False, stage=False)
    staged = load_model(cfg, torch.device("cpu"), torch.float32, path, fp8=fp8, progress=False, stage=True)
    a, b = direct.state_dict(), staged.state_dict()
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), name


def test_prequantized_load_reads_each_tensor_once(three_layers, tmp_path, counted_reads):
    """Every checkpoint tensor is read (and copied to the device) once: an earlier loader
    re-installed a layer's FP8 weights once per tensor name, 31 times a Mixtral layer."""
    path = write_prequantized(three_layers, tmp_path / "fp8", "fp8")
    cfg = ModelConfig.from_file(path)
    load_model(cfg, torch.device("cpu"), torch.float32, path, fp8=True, progress=False, stage=True)
    assert counted_reads and max(counted_reads.values()) == 1, counted_reads.most_common(3)


def test_mmap_pinning_gives_zeroed_writable_bytes(monkeypatch, tmp_path):
    """SLUICE_PINNING=mmap (huge pages, faulted in by threads; the default with CUDA): the
    same buffer as plain memory, and a stager on it reads as stored."""
    monkeypatch.setenv("SLUICE_PINNING", "mmap:3")
    buf = staging.pinned_buffer(5 * 4096 + 7)
    assert buf.numel() == 5 * 4096 + 7 and buf.dtype == torch.uint8 and not buf.any()
    buf.fill_(3)
    assert int(buf.sum()) == 3 * buf.numel()
    tensors = {"a.weight": torch.randn(40, 30), "b.weight": torch.randn(7, 3).to(torch.bfloat16)}
    save_file(tensors, tmp_path / "one.safetensors")
    stager = LayerStager(read_header(tmp_path / "one.safetensors"), [["a.weight"], ["b.weight", "a.weight"]])
    try:
        for n in range(2):
            for name, got in stager.take(n).items():
                assert torch.equal(got.view(torch.uint8), tensors[name].view(torch.uint8)), name
            stager.release(n)
    finally:
        stager.close()
