import pytest
import torch

from sluice.engine.kernels.fused_moe import fused_moe_reference
from sluice.engine.kernels.moe_prefill import fp8_moe_prefill, silu_mul_quant_fp8, silu_mul_quant_reference
from sluice.engine.quant.fp8 import Fp8FusedExperts

from ._util import DEVICE, quantize, rel_err


def test_silu_mul_quant_matches_reference():
    torch.manual_seed(0)
    gu = torch.randn(7, 2 * 48, device=DEVICE).bfloat16()
    q, s = silu_mul_quant_fp8(gu)
    qr, sr = silu_mul_quant_reference(gu)
    assert torch.allclose(s, sr, rtol=1e-5)
    assert (q.float() - qr.float()).abs().max().item() <= 32  # at most one e4m3 step near 448


@pytest.mark.parametrize("t,e,k,d,i", [(130, 8, 2, 64, 96), (40, 4, 2, 32, 48), (17, 5, 3, 48, 32)])
def test_fp8_moe_prefill_matches_reference(t, e, k, d, i):
    torch.manual_seed(t + e)
    x = torch.randn(t, d, device=DEVICE).bfloat16()
    w13, s13 = quantize(torch.randn(e, 2 * i, d, device=DEVICE) / d**0.5)
    w2, s2 = quantize(torch.randn(e, d, i, device=DEVICE) / i**0.5)
    logits = torch.randn(t, e, device=DEVICE)
    if e > 4:
        logits[:, 0] = -1e4  # expert 0 gets no tokens
    w, ids = logits.softmax(-1).topk(k)
    w = (w / w.sum(-1, keepdim=True)).float().contiguous()
    out = fp8_moe_prefill(x, w13, s13, w2, s2, w, ids.int().contiguous())
    ref = fused_moe_reference(x, w13, s13, w2, s2, w, ids)
    assert out.shape == (t, d) and out.dtype == torch.bfloat16
    # W8A8: per-token e4m3 activations (x and the hidden) on top of the weight error
    assert rel_err(out, ref) < 6e-2


def test_fp8_experts_dispatch(monkeypatch):
    assert Fp8FusedExperts.prefill_min_tokens > 64  # decode graphs (<= 64 tokens) keep W8A16
    w13, s13 = quantize(torch.randn(2, 8, 16, device=DEVICE))
    w2, s2 = quantize(torch.randn(2, 16, 4, device=DEVICE))
    experts = Fp8FusedExperts(w13, s13, w2, s2)
    n = experts.prefill_min_tokens
    assert [experts.path(t) for t in (1, 64, n - 1, n, 4096)] == ["w8a16"] * 3 + ["w8a8"] * 2
    monkeypatch.setattr(Fp8FusedExperts, "prefill_kernel", "scaled_mm")
    assert experts.path(n) == "scaled_mm"
    assert experts.path(n, capturing=True) == "w8a8"  # _scaled_mm syncs: never under graph capture
    assert experts.path(n, scaled_mm_ok=False) == "w8a8"
    assert experts.path(n - 1) == "w8a16"
    monkeypatch.setattr(Fp8FusedExperts, "prefill_kernel", "w8a16")
    assert experts.path(4096) == "w8a16"


def test_unknown_prefill_kernel_is_a_config_error(monkeypatch):
    from sluice.engine.errors import ConfigError

    monkeypatch.setattr(Fp8FusedExperts, "prefill_kernel", "cutlass")
    w13, s13 = quantize(torch.randn(2, 8, 16, device=DEVICE))
    w2, s2 = quantize(torch.randn(2, 16, 4, device=DEVICE))
    with pytest.raises(ConfigError, match="SLUICE_MOE_PREFILL='cutlass'.*auto, triton, grouped, scaled_mm, w8a16"):
        Fp8FusedExperts(w13, s13, w2, s2)
