import pytest
import torch

from sluice.engine.kernels.act_quant import per_token_quant_fp8, per_token_quant_reference

from ._util import DEVICE


@pytest.mark.parametrize("m,k", [(1, 100), (5, 4100), (3, 64), (17, 33)])
@pytest.mark.parametrize("static", [False, True])
def test_per_token_quant_matches_reference(m, k, static):
    torch.manual_seed(m + k)
    x = (torch.randn(m, k, device=DEVICE) * 3).bfloat16()
    x[0, 0] = 125.5  # rounds up across a power of two in e4m3
    s = torch.tensor([0.05], device=DEVICE) if static else None
    q, scale = per_token_quant_fp8(x, s)
    q_ref, scale_ref = per_token_quant_reference(x, s)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (m,)
    assert torch.equal(scale, scale_ref)
    assert torch.equal(q.float(), q_ref.float())
    if not static:
        err = (q.float() * scale[:, None] - x.float()).abs().max() / x.float().abs().max()
        assert err < 0.07  # e4m3 keeps 3 mantissa bits


def test_rejects_bad_static_scale():
    x = torch.randn(2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="static_scale"):
        per_token_quant_fp8(x, torch.ones(2, device=DEVICE))
