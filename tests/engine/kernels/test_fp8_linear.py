import pytest
import torch

from sluice.engine.kernels.fp8_linear import SmallMConfig, fp8_linear_reference, fp8_linear_small_m

from ._util import DEVICE, quantize, rel_err

# (M, N, K, config): odd sizes, ragged K, split-K with and without even splits.
CASES = [
    (1, 40, 96, None),
    (3, 70, 200, SmallMConfig(block_n=32, block_k=64, split_k=2)),
    (17, 33, 128, SmallMConfig(block_n=32, block_k=32, split_k=4)),
    (5, 64, 256, SmallMConfig(block_n=64, block_k=64, split_k=1)),
    (40, 24, 160, SmallMConfig(block_n=16, block_k=32, split_k=3)),
]


@pytest.mark.parametrize("m,n,k,config", CASES)
@pytest.mark.parametrize("act", ["bf16", "fp8"])
def test_small_m_matches_reference(m, n, k, config, act):
    torch.manual_seed(m * 1000 + n)
    x = torch.randn(m, k, device=DEVICE).bfloat16()
    w, w_scale = quantize(torch.randn(n, k, device=DEVICE))
    x_scale = None
    if act == "fp8":
        xq, x_scale = quantize(x.float())
        x = xq
    out = fp8_linear_small_m(x, w, w_scale, x_scale=x_scale, config=config)
    ref = fp8_linear_reference(x, w, w_scale, x_scale=x_scale)
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 1e-2  # bf16 output rounding only


def test_float32_activations_keep_float32():
    x = torch.randn(2, 48, device=DEVICE)
    w, s = quantize(torch.randn(20, 48, device=DEVICE))
    out = fp8_linear_small_m(x, w, s)
    assert out.dtype == torch.float32
    assert rel_err(out, fp8_linear_reference(x, w, s)) < 1e-5


def test_launcher_rejects_bad_arguments():
    w, s = quantize(torch.randn(16, 32, device=DEVICE))
    x = torch.randn(2, 32, device=DEVICE).bfloat16()
    with pytest.raises(ValueError, match="features"):
        fp8_linear_small_m(torch.randn(2, 31, device=DEVICE).bfloat16(), w, s)
    with pytest.raises(ValueError, match="dtype"):
        fp8_linear_small_m(x, w.float(), s)
    with pytest.raises(ValueError, match="contiguous"):
        fp8_linear_small_m(torch.randn(32, 2, device=DEVICE).bfloat16().t(), w, s)
    with pytest.raises(ValueError, match="weight_scale"):
        fp8_linear_small_m(x, w, s[:8])
    with pytest.raises(ValueError, match="x_scale"):
        fp8_linear_small_m(x.to(torch.float8_e4m3fn), w, s)


@pytest.mark.parametrize("m", [1, 16, 37])
def test_bf16_activations_take_fp16_dots(m, monkeypatch):
    """The W8A16 path as a GPU compiles it (fp16 dots, not the interpreter's fp32 ones):
    x rounded to fp16, saturated at its range instead of overflowing."""
    import sluice.engine.kernels.fp8_linear as fl

    monkeypatch.setattr(fl, "dot_in_fp32", lambda: False)
    torch.manual_seed(m)
    x = torch.randn(m, 256, device=DEVICE).bfloat16()
    w, w_scale = quantize(torch.randn(96, 256, device=DEVICE))
    out = fl.fp8_linear_small_m(x, w, w_scale, config=SmallMConfig(block_n=32, block_k=64, split_k=1))
    assert rel_err(out, fp8_linear_reference(x, w, w_scale)) < 1e-2
    x[0, 0] = 1e6  # past fp16's 65504: the dot sees 65504, finite
    assert torch.isfinite(fl.fp8_linear_small_m(x, w, w_scale).float()).all()
