"""The grouped-GEMM MoE (moe_grouped.py) against torch references: expert sorting and
padding, the combine kernel, and the whole W8A8 pipeline with the grouped GEMM in fp32
(torch._scaled_grouped_mm itself runs only on a Hopper GPU: bench/moe_prefill.py)."""

import pytest
import torch

from sluice.engine.kernels.fused_moe import fused_moe_reference
from sluice.engine.kernels.moe_grouped import (
    fp8_moe_grouped,
    moe_combine,
    moe_combine_reference,
    scaled_grouped_mm_reference,
    sort_by_expert,
)
from sluice.engine.quant.fp8 import Fp8FusedExperts

from ._util import DEVICE, quantize, rel_err


def _routing(t: int, e: int, k: int, empty_expert: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.randn(t, e, device=DEVICE)
    if empty_expert:
        logits[:, 1] = -1e4  # expert 1 gets no tokens
    w, ids = logits.softmax(-1).topk(k)
    return (w / w.sum(-1, keepdim=True)).float().contiguous(), ids.int().contiguous()


@pytest.mark.parametrize("align", [1, 16])
@pytest.mark.parametrize("t,e,k", [(1, 4, 2), (37, 8, 2), (19, 5, 3)])
def test_sort_by_expert_groups_each_expert(t, e, k, align):
    torch.manual_seed(t * e + align)
    _, ids = _routing(t, e, k, empty_expert=e > 4)
    order, row, offs, rows = sort_by_expert(ids, e, align)
    flat = ids.reshape(-1).long()
    counts = torch.bincount(flat, minlength=e)
    assert rows == t * k + (e * (align - 1) if align > 1 else 0)
    assert sorted(order.tolist()) == list(range(t * k))  # a permutation of the slots
    assert len(set(row.tolist())) == t * k and int(row.max()) < rows
    start = 0
    for g in range(e):  # group g = rows [start of g's aligned run, offs[g]) hold exactly g's slots
        first = -(-start // align) * align
        end = int(offs[g])
        assert end - first == int(counts[g])
        in_group = (row >= first) & (row < end)
        assert (flat[order[in_group]] == g).all()
        start = end


@pytest.mark.parametrize("t,k,d,rows", [(1, 2, 16, 2), (13, 2, 100, 40), (7, 3, 33, 21)])
def test_moe_combine_matches_reference(t, k, d, rows):
    torch.manual_seed(d)
    y = torch.randn(rows, d, device=DEVICE).bfloat16()
    pos = torch.randperm(rows, device=DEVICE)[: t * k].contiguous()
    w = torch.rand(t, k, device=DEVICE).float()
    out = moe_combine(y, pos, w)
    ref = moe_combine_reference(y, pos, w)
    assert out.shape == (t, d) and out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 1e-2
    assert torch.allclose(moe_combine(y, pos, w, out_dtype=torch.float32), ref.float(), rtol=1e-2, atol=1e-2)


def test_moe_combine_checks_its_arguments():
    y = torch.randn(8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="pos must be 4 contiguous int64"):
        moe_combine(y, torch.zeros(4, dtype=torch.int32, device=DEVICE), torch.rand(2, 2, device=DEVICE))
    with pytest.raises(ValueError, match="topk_weights must have dtype"):
        moe_combine(y, torch.zeros(4, dtype=torch.int64, device=DEVICE), torch.rand(2, 2, device=DEVICE).half())


def test_grouped_mm_reference_skips_empty_groups():
    torch.manual_seed(1)
    a, sa = quantize(torch.randn(6, 32, device=DEVICE))  # rows = the grouped operand
    b, sb = quantize(torch.randn(3, 16, 32, device=DEVICE))  # (E, N, K)
    offs = torch.tensor([2, 2, 6], dtype=torch.int32, device=DEVICE)
    out = scaled_grouped_mm_reference(a, b.transpose(1, 2), sa, sb, offs, out_dtype=torch.float32)
    af = a.float() * sa[:, None]
    bf = b.float() * sb[..., None]
    assert torch.allclose(out[:2], af[:2] @ bf[0].t(), rtol=1e-5, atol=1e-5)
    assert torch.allclose(out[2:], af[2:] @ bf[2].t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("align", [1, 16])
@pytest.mark.parametrize("t,e,k,d,i", [(130, 8, 2, 64, 96), (41, 4, 2, 32, 48), (17, 5, 3, 48, 32)])
def test_fp8_moe_grouped_matches_reference(t, e, k, d, i, align):
    torch.manual_seed(t + e + align)
    x = torch.randn(t, d, device=DEVICE).bfloat16()
    w13, s13 = quantize(torch.randn(e, 2 * i, d, device=DEVICE) / d**0.5)
    w2, s2 = quantize(torch.randn(e, d, i, device=DEVICE) / i**0.5)
    w, ids = _routing(t, e, k, empty_expert=e > 4)
    out = fp8_moe_grouped(x, w13, s13, w2, s2, w, ids, align=align, grouped_mm=scaled_grouped_mm_reference)
    ref = fused_moe_reference(x, w13, s13, w2, s2, w, ids)
    assert out.shape == (t, d) and out.dtype == torch.bfloat16
    # W8A8: per-token e4m3 activations (x and the hidden) on top of the weight error
    assert rel_err(out, ref) < 6e-2


def test_grouped_dispatch(monkeypatch):
    w13, s13 = quantize(torch.randn(2, 8, 16, device=DEVICE))
    w2, s2 = quantize(torch.randn(2, 16, 4, device=DEVICE))
    experts = Fp8FusedExperts(w13, s13, w2, s2)
    n, g = experts.prefill_min_tokens, experts.grouped_min_tokens
    assert n <= g
    monkeypatch.setattr(Fp8FusedExperts, "prefill_kernel", "auto")
    assert [experts.path(t, grouped_ok=True) for t in (64, n, g - 1, g, 8192)] == \
        ["w8a16", "w8a8", "w8a8" if g > n else "grouped", "grouped", "grouped"]
    assert experts.path(g, capturing=True, grouped_ok=True) == "grouped"  # no host sync: graph-safe
    assert experts.path(g, grouped_ok=False) == "w8a8"  # no op or not a Hopper GPU
    assert experts.path(g, scaled_mm_ok=False, grouped_ok=True) == "w8a8"  # K, N not multiples of 16
    monkeypatch.setattr(Fp8FusedExperts, "prefill_kernel", "grouped")
    assert experts.path(n, grouped_ok=True) == "grouped"
    monkeypatch.setattr(Fp8FusedExperts, "prefill_kernel", "triton")
    assert experts.path(8192, grouped_ok=True) == "w8a8"
