import json
from dataclasses import asdict, replace

import pytest
import torch

from sluice.engine.kernels.fused_moe import (
    TILES_ENV,
    MoeConfig,
    fused_moe,
    fused_moe_reference,
    moe_align_block_size,
    moe_align_reference,
    moe_config,
    moe_prefill_config,
)

from ._util import DEVICE, quantize, rel_err


def _routing(t: int, e: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.randn(t, e, device=DEVICE)
    w, ids = logits.softmax(-1).topk(k)
    return (w / w.sum(-1, keepdim=True)).float().contiguous(), ids.int().contiguous()


@pytest.mark.parametrize("t,e,k,block_m", [(1, 8, 2, 16), (5, 4, 2, 16), (37, 8, 2, 16), (64, 6, 3, 32), (3, 33, 2, 16)])
def test_align_matches_reference(t, e, k, block_m):
    torch.manual_seed(t + e)
    _, ids = _routing(t, e, k)
    got = moe_align_block_size(ids, e, block_m)
    want = moe_align_reference(ids, e, block_m)
    for g, w in zip(got, want):
        assert torch.equal(g.long().cpu(), w.long().cpu())
    sorted_ids, expert_ids, num_post = got
    total = int(num_post)
    assert total % block_m == 0
    # every (token, slot) appears exactly once, inside a block of its own expert
    real = sorted_ids[:total][sorted_ids[:total] < ids.numel()].long()
    assert torch.equal(real.sort().values.cpu(), torch.arange(ids.numel()))
    blocks = torch.arange(total, device=sorted_ids.device) // block_m
    mask = sorted_ids[:total] < ids.numel()
    assert torch.equal(expert_ids[blocks[mask]].long(), ids.flatten()[sorted_ids[:total][mask].long()].long())


MOE_CASES = [
    # (T, E, k, D, I, config)
    (1, 4, 2, 64, 96, None),
    (7, 5, 2, 96, 64, None),
    (33, 8, 2, 64, 128, None),
    (3, 3, 3, 80, 48, None),
    (20, 4, 2, 64, 64, MoeConfig(block_m=32, block_n=32, block_k=32, block_n2=16, block_k2=64)),
    # fp16 dots: x converted in the kernel, and x converted (clamped) before it
    (1, 4, 2, 64, 96, MoeConfig(block_m=16, block_n=32, block_k=32, block_n2=32, block_k2=32, dot_f16=1)),
    (7, 5, 2, 96, 64, MoeConfig(block_m=16, block_n=32, block_k=32, block_n2=32, block_k2=32, dot_f16=2)),
    # swap-AB (transposed tiles): one token, several blocks of one expert, partial tiles
    (1, 4, 2, 64, 96, MoeConfig(block_m=16, block_n=32, block_k=32, block_n2=32, block_k2=32, dot_f16=1,
                                swap_ab=True)),
    (37, 3, 2, 80, 48, MoeConfig(block_m=16, block_n=32, block_k=32, block_n2=64, block_k2=32, dot_f16=1,
                                 swap_ab=True)),
    (20, 4, 2, 64, 64, MoeConfig(block_m=32, block_n=64, block_k=32, block_n2=16, block_k2=64, swap_ab=True)),
]


@pytest.mark.parametrize("t,e,k,d,i,config", MOE_CASES)
def test_fused_moe_matches_reference(t, e, k, d, i, config):
    torch.manual_seed(t * 7 + d)
    x = torch.randn(t, d, device=DEVICE).bfloat16()
    w13, s13 = quantize(torch.randn(e, 2 * i, d, device=DEVICE) / d**0.5)
    w2, s2 = quantize(torch.randn(e, d, i, device=DEVICE) / i**0.5)
    tw, ti = _routing(t, e, k)
    out = fused_moe(x, w13, s13, w2, s2, tw, ti, config=config)
    ref = fused_moe_reference(x, w13, s13, w2, s2, tw, ti)
    assert out.shape == (t, d) and out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 2e-2  # bf16 intermediate + output
    assert torch.isfinite(out.float()).all()


A8_CASES = [
    # (T, E, k, D, I, group_m): W8A8, the prefill path; uneven experts, partial tiles
    (37, 8, 2, 64, 96, 1),
    (37, 8, 2, 64, 96, 4),  # 13 token blocks: the last group holds one
    (130, 8, 2, 64, 96, 4),
    (17, 5, 3, 48, 32, 2),
]


@pytest.mark.parametrize("t,e,k,d,i,group_m", A8_CASES)
def test_fused_moe_w8a8_matches_reference(t, e, k, d, i, group_m):
    torch.manual_seed(t + d)
    x = torch.randn(t, d, device=DEVICE).bfloat16()
    w13, s13 = quantize(torch.randn(e, 2 * i, d, device=DEVICE) / d**0.5)
    w2, s2 = quantize(torch.randn(e, d, i, device=DEVICE) / i**0.5)
    tw, ti = _routing(t, e, k)
    cfg = MoeConfig(block_m=16, block_n=32, block_k=32, block_n2=32, block_k2=32, act_fp8=True, group_m=group_m)
    out = fused_moe(x, w13, s13, w2, s2, tw, ti, config=cfg)
    ref = fused_moe_reference(x, w13, s13, w2, s2, tw, ti)
    assert out.shape == (t, d) and out.dtype == torch.bfloat16
    assert torch.isfinite(out.float()).all()
    # per-token e4m3 activations (x and h) on top of the weight error: ~4e-2 here
    assert rel_err(out, ref) < 6e-2
    # the grouped program order covers every (token block, N tile) exactly once
    ungrouped = fused_moe(x, w13, s13, w2, s2, tw, ti, config=MoeConfig(
        block_m=16, block_n=32, block_k=32, block_n2=32, block_k2=32, act_fp8=True, group_m=1))
    assert torch.equal(out, ungrouped)


@pytest.mark.parametrize("act_fp8", [False, True])
def test_swap_ab_computes_the_same_tiles(act_fp8):
    """The transposed tiles hold the same sums: per slot, swapped and unswapped agree to
    the accumulation order."""
    t, e, k, d, i = 29, 4, 2, 64, 96
    torch.manual_seed(3)
    x = torch.randn(t, d, device=DEVICE).bfloat16()
    w13, s13 = quantize(torch.randn(e, 2 * i, d, device=DEVICE) / d**0.5)
    w2, s2 = quantize(torch.randn(e, d, i, device=DEVICE) / i**0.5)
    tw, ti = _routing(t, e, k)
    cfg = MoeConfig(block_m=16, block_n=32, block_k=32, block_n2=32, block_k2=32, dot_f16=1, act_fp8=act_fp8)
    plain = fused_moe(x, w13, s13, w2, s2, tw, ti, config=cfg, reduce=False)
    swapped = fused_moe(x, w13, s13, w2, s2, tw, ti, config=replace(cfg, swap_ab=True), reduce=False)
    assert rel_err(swapped.float(), plain.float()) < 1e-2
    assert rel_err(swapped.sum(1), fused_moe_reference(x, w13, s13, w2, s2, tw, ti)) < (6e-2 if act_fp8 else 2e-2)


def test_a_tile_table_takes_the_token_counts_it_covers(tmp_path, monkeypatch):
    small = MoeConfig(block_m=16, block_n=32, block_k=32, block_n2=32, block_k2=32, dot_f16=1, swap_ab=True)
    mid = MoeConfig(block_m=32, block_n=64, block_k=32, block_n2=16, block_k2=64, act_fp8=True)
    table = tmp_path / "tiles.json"
    table.write_text(json.dumps({"device": "test", "decode": [
        {"max_tokens": 64, "config": asdict(mid)}, {"max_tokens": 2, "config": asdict(small)}]}))
    builtin = moe_config(200)
    monkeypatch.setenv(TILES_ENV, str(table))
    assert moe_config(1) == moe_config(2) == small
    assert moe_config(3) == moe_config(64) == mid
    assert moe_config(200) == builtin  # past the table: the built-in tiles
    t, e, k, d, i = 2, 4, 2, 64, 96
    x = torch.randn(t, d, device=DEVICE).bfloat16()
    w13, s13 = quantize(torch.randn(e, 2 * i, d, device=DEVICE) / d**0.5)
    w2, s2 = quantize(torch.randn(e, d, i, device=DEVICE) / i**0.5)
    tw, ti = _routing(t, e, k)
    out = fused_moe(x, w13, s13, w2, s2, tw, ti)  # the table's tiles, chosen by T
    assert rel_err(out, fused_moe_reference(x, w13, s13, w2, s2, tw, ti)) < 2e-2


@pytest.mark.parametrize("text", ['{"decode": [{"max_tokens": 2, "config": {"block_m": 16}}]}',
                                  '{"decode": [{"max_tokens": 2, "config": {"block_m": 24, "block_n": 32, '
                                  '"block_k": 32, "block_n2": 32, "block_k2": 32}}]}', "[1, 2", '{"prefill": []}'])
def test_a_bad_tile_table_names_itself(tmp_path, monkeypatch, text):
    table = tmp_path / "bad.json"
    table.write_text(text)
    monkeypatch.setenv(TILES_ENV, str(table))
    with pytest.raises(ValueError, match=TILES_ENV):
        moe_config(1)


def test_moe_prefill_config_is_w8a8():
    for t in (256, 1024, 8192):
        assert moe_prefill_config(t).act_fp8
    assert not moe_config(64).act_fp8  # decode graphs keep 16-bit activations


def test_fp16_dots_saturate_instead_of_overflowing():
    """h beyond fp16's range is clamped to +-65504, never inf or NaN."""
    torch.manual_seed(3)
    t, e, k, d, i = 2, 2, 2, 64, 32
    x = (torch.randn(t, d, device=DEVICE) * 300).bfloat16()
    w13, s13 = quantize(torch.randn(e, 2 * i, d, device=DEVICE) * 40)
    w2, s2 = quantize(torch.randn(e, d, i, device=DEVICE) / i**0.5)
    tw, ti = _routing(t, e, k)
    cfg = MoeConfig(block_m=16, block_n=32, block_k=32, block_n2=32, block_k2=32, dot_f16=1)
    out = fused_moe(x, w13, s13, w2, s2, tw, ti, config=cfg)
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("t,e,k,d,i", [(1, 4, 2, 64, 96), (9, 5, 2, 96, 64)])
def test_fused_moe_bf16_experts_match_reference(t, e, k, d, i):
    """16-bit experts (the bf16 decode path) take no scales and skip the widening."""
    torch.manual_seed(t + e)
    x = torch.randn(t, d, device=DEVICE).bfloat16()
    w13 = (torch.randn(e, 2 * i, d, device=DEVICE) / d**0.5).bfloat16()
    w2 = (torch.randn(e, d, i, device=DEVICE) / i**0.5).bfloat16()
    tw, ti = _routing(t, e, k)
    out = fused_moe(x, w13, None, w2, None, tw, ti)
    ref = fused_moe_reference(x, w13, None, w2, None, tw, ti)
    assert out.shape == (t, d) and out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 2e-2
    with pytest.raises(ValueError, match="take none"):
        fused_moe(x, w13, torch.ones(e, 2 * i, device=DEVICE), w2, None, tw, ti)


def test_fused_moe_rejects_bad_shapes():
    e, d, i = 4, 32, 48
    x = torch.randn(2, d, device=DEVICE).bfloat16()
    w13, s13 = quantize(torch.randn(e, 2 * i, d, device=DEVICE))
    w2, s2 = quantize(torch.randn(e, d, i, device=DEVICE))
    tw, ti = _routing(2, e, 2)
    with pytest.raises(ValueError, match="w2"):
        fused_moe(x, w13, s13, w2[:, :, :-1].contiguous(), s2, tw, ti)
    with pytest.raises(ValueError, match="topk_weights"):
        fused_moe(x, w13, s13, w2, s2, tw.bfloat16(), ti)
    with pytest.raises(ValueError, match="w13_scale"):
        fused_moe(x, w13, s13[:, :i].contiguous(), w2, s2, tw, ti)


@pytest.mark.parametrize("t,e,k", [(1, 4, 2), (7, 5, 2), (5, 3, 3)])
def test_fused_moe_partials_and_precomputed_align(t, e, k):
    """reduce=False: the (T, k, D) terms whose sum over k is the reduced output; a
    precomputed alignment gives the same result as the one fused_moe computes."""
    torch.manual_seed(t + 11 * e)
    d, i = 64, 96
    x = torch.randn(t, d, device=DEVICE).bfloat16()
    w13, s13 = quantize(torch.randn(e, 2 * i, d, device=DEVICE) / d**0.5)
    w2, s2 = quantize(torch.randn(e, d, i, device=DEVICE) / i**0.5)
    tw, ti = _routing(t, e, k)
    out = fused_moe(x, w13, s13, w2, s2, tw, ti)
    parts = fused_moe(x, w13, s13, w2, s2, tw, ti, reduce=False)
    assert parts.shape == (t, k, d) and parts.dtype == x.dtype
    assert torch.equal(parts.sum(1), out)
    align = moe_align_block_size(ti, e, moe_config(t).block_m)
    assert torch.equal(fused_moe(x, w13, s13, w2, s2, tw, ti, align=align, reduce=False), parts)


def test_fused_moe_rejects_align_for_another_block_m():
    t, e, k, d, i = 5, 4, 2, 32, 48
    x = torch.randn(t, d, device=DEVICE).bfloat16()
    w13, s13 = quantize(torch.randn(e, 2 * i, d, device=DEVICE))
    w2, s2 = quantize(torch.randn(e, d, i, device=DEVICE))
    tw, ti = _routing(t, e, k)
    align = moe_align_block_size(ti, e, 2 * moe_config(t).block_m)
    with pytest.raises(ValueError, match="another block_m"):
        fused_moe(x, w13, s13, w2, s2, tw, ti, align=align)


def test_fused_moe_no_tokens():
    e, d, i = 4, 32, 48
    w13, s13 = quantize(torch.randn(e, 2 * i, d, device=DEVICE))
    w2, s2 = quantize(torch.randn(e, d, i, device=DEVICE))
    x = torch.randn(0, d, device=DEVICE).bfloat16()
    tw, ti = torch.zeros(0, 2, device=DEVICE), torch.zeros(0, 2, dtype=torch.int32, device=DEVICE)
    assert fused_moe(x, w13, s13, w2, s2, tw, ti).shape == (0, d)
    assert fused_moe(x, w13, s13, w2, s2, tw, ti, reduce=False).shape == (0, 2, d)
