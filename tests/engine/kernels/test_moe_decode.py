import pytest
import torch

from sluice.engine.kernels.fused_moe import fused_moe_reference, moe_align_block_size
from sluice.engine.kernels.moe_decode import DecodeConfig, GemmTiles, moe_decode, moe_decode_config

from ._util import DEVICE, quantize, rel_err

FLAT = DecodeConfig(16, GemmTiles(64, 32), GemmTiles(32, 64))
SPLIT = DecodeConfig(16, GemmTiles(32, 32, flat=False, split_k=2), GemmTiles(64, 32, flat=False, split_k=4))
MIXED = DecodeConfig(32, GemmTiles(32, 64, flat=False), GemmTiles(32, 32, ctas_per_sm=3))
GEMV = DecodeConfig(2, GemmTiles(32, 32, ctas_per_sm=1), GemmTiles(32, 64), use_dot=False)
PDL = DecodeConfig(16, GemmTiles(64, 32), GemmTiles(32, 64), pdl=True, prefetch=4)  # PTX parts GPU-only


def _experts(e: int, d: int, i: int):
    w13, s13 = quantize(torch.randn(e, 2 * i, d, device=DEVICE) / d**0.5)
    w2, s2 = quantize(torch.randn(e, d, i, device=DEVICE) / i**0.5)
    return w13, s13, w2, s2


def _routing(t: int, e: int, k: int, empty: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.randn(t, e, device=DEVICE)
    logits[:, list(empty)] = -1e4  # these experts get no tokens
    w, ids = logits.softmax(-1).topk(k)
    return (w / w.sum(-1, keepdim=True)).float().contiguous(), ids.int().contiguous()


CASES = [
    # (T, E, k, D, I, config, x dtype, experts without tokens)
    (1, 8, 2, 128, 256, FLAT, torch.bfloat16, ()),
    (3, 4, 2, 64, 128, FLAT, torch.float16, (1,)),
    (7, 6, 2, 128, 128, SPLIT, torch.bfloat16, (0, 5)),
    (13, 8, 2, 64, 256, MIXED, torch.float16, (2,)),
    (2, 5, 2, 64, 128, GEMV, torch.bfloat16, ()),
    (5, 4, 3, 64, 64, FLAT, torch.float32, (3,)),
    (33, 8, 2, 64, 128, SPLIT, torch.bfloat16, ()),  # blocks of one expert > 1
    (4, 8, 2, 64, 128, PDL, torch.bfloat16, (7,)),
]


@pytest.mark.parametrize("t,e,k,d,i,config,dtype,empty", CASES)
def test_moe_decode_matches_reference(t, e, k, d, i, config, dtype, empty):
    torch.manual_seed(t * 13 + d + i)
    x = torch.randn(t, d, device=DEVICE).to(dtype)
    w13, s13, w2, s2 = _experts(e, d, i)
    tw, ti = _routing(t, e, k, empty)
    out = moe_decode(x, w13, s13, w2, s2, tw, ti, config=config)
    ref = fused_moe_reference(x, w13, s13, w2, s2, tw, ti)
    assert out.shape == (t, d) and out.dtype == dtype
    assert torch.isfinite(out.float()).all()
    assert rel_err(out, ref) < 2e-2


def test_precomputed_alignment_and_fp32_out():
    torch.manual_seed(1)
    t, e, k, d, i = 9, 8, 2, 64, 128
    x = torch.randn(t, d, device=DEVICE).bfloat16()
    w13, s13, w2, s2 = _experts(e, d, i)
    tw, ti = _routing(t, e, k, (4,))
    alignment = moe_align_block_size(ti, e, FLAT.block_m)
    out = moe_decode(x, w13, s13, w2, s2, tw, ti, alignment=alignment, config=FLAT, out_fp32=True)
    assert out.dtype == torch.float32
    assert rel_err(out, fused_moe_reference(x.float(), w13, s13, w2, s2, tw, ti)) < 2e-2
    with pytest.raises(ValueError, match="block_m"):  # an alignment made for another BM
        moe_decode(x, w13, s13, w2, s2, tw, ti, alignment=moe_align_block_size(ti, e, 32), config=FLAT)


def test_h_beyond_fp16_saturates():
    """gate*up past fp16's range is clamped to +-65504 before the fp16 dot, never inf."""
    torch.manual_seed(3)
    t, e, k, d, i = 2, 2, 2, 64, 64
    x = (torch.randn(t, d, device=DEVICE) * 300).bfloat16()
    w13, s13 = quantize(torch.randn(e, 2 * i, d, device=DEVICE) * 40)
    w2, s2 = quantize(torch.randn(e, d, i, device=DEVICE) / i**0.5)
    tw, ti = _routing(t, e, k)
    assert torch.isfinite(moe_decode(x, w13, s13, w2, s2, tw, ti, config=FLAT).float()).all()


def test_rejects_bad_configs_and_shapes():
    e, d, i = 4, 64, 96
    x = torch.randn(2, d, device=DEVICE).bfloat16()
    w13, s13, w2, s2 = _experts(e, d, i)
    tw, ti = _routing(2, e, 2)
    with pytest.raises(ValueError, match="divide"):  # GEMM2's BK 64 does not divide I = 96
        moe_decode(x, w13, s13, w2, s2, tw, ti, config=DecodeConfig(16, GemmTiles(64, 32), GemmTiles(32, 64)))
    with pytest.raises(ValueError, match="block_m"):
        moe_decode(x, w13, s13, w2, s2, tw, ti, config=DecodeConfig(4, GemmTiles(32, 32), GemmTiles(32, 32)))
    with pytest.raises(ValueError, match="w2"):
        moe_decode(x, w13, s13, w2[:, :, :-1].contiguous(), s2, tw, ti, config=FLAT)
    assert moe_decode(x[:0], w13, s13, w2, s2, tw[:0], ti[:0]).shape == (0, d)


@pytest.mark.parametrize("t", [1, 2, 3, 4, 8, 16, 24, 32, 48, 64])
def test_config_table_fits_mixtral(t):
    """The table's tiles divide Mixtral's GEMMs (N, K): D 4096, I 14336."""
    cfg = moe_decode_config(t)
    for tiles, n, k in ((cfg.gemm1, 2 * 14336, 4096), (cfg.gemm2, 4096, 14336)):
        assert n % tiles.block_n == 0 and k % tiles.block_k == 0
        assert tiles.flat or (k // tiles.block_k) % tiles.split_k == 0
    assert cfg.use_dot == (cfg.block_m >= 16)
