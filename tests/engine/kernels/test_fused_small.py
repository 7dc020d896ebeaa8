import pytest
import torch

from sluice.engine.kernels.fused_small import (
    fused_add_rmsnorm,
    fused_add_rmsnorm_reference,
    rope_store_kv,
    router_topk,
    router_topk_reference,
)
from sluice.engine.layers.attention import store_kv
from sluice.engine.layers.rotary import RotaryEmbedding

from ._util import DEVICE

# The triton interpreter (CPU) truncates fp32 -> bf16 instead of rounding to nearest, so
# the bit-exact checks run in fp32 there and in bf16 on a GPU.
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


@pytest.mark.parametrize("n,d,res", [(1, 64, True), (5, 96, True), (3, 128, False)])
def test_add_rmsnorm_matches_torch(n, d, res):
    torch.manual_seed(n + d)
    x = torch.randn(n, d, device=DEVICE).to(DTYPE)
    r = torch.randn(n, d, device=DEVICE).to(DTYPE) if res else None
    w = (1 + 0.1 * torch.randn(d, device=DEVICE)).to(DTYPE)
    out, new_res = fused_add_rmsnorm(x, r, w, 1e-5)
    ref, ref_res = fused_add_rmsnorm_reference(x, r, w, 1e-5)
    assert torch.equal(new_res, ref_res)
    # same roundings; rsqrt vs 1/sqrt may differ in the last fp32 ulp
    assert torch.allclose(out.float(), ref.float(), rtol=2 ** -7, atol=1e-6)


@pytest.mark.parametrize("n,k,d,res", [(1, 2, 64, True), (7, 2, 96, True), (3, 3, 80, True), (4, 2, 64, False),
                                       (0, 2, 64, True)])
def test_add_rmsnorm_sums_partials(n, k, d, res):
    """(N, K, D) partials (the fused MoE's per-slot outputs): summed in the same launch,
    as torch's .sum(1) then the plain add + norm."""
    torch.manual_seed(n + k + d)
    x = torch.randn(n, k, d, device=DEVICE).to(DTYPE)
    r = torch.randn(n, d, device=DEVICE).to(DTYPE) if res else None
    w = (1 + 0.1 * torch.randn(d, device=DEVICE)).to(DTYPE)
    out, new_res = fused_add_rmsnorm(x, r, w, 1e-5)
    ref, ref_res = fused_add_rmsnorm_reference(x, r, w, 1e-5)
    assert out.shape == new_res.shape == (n, d)
    assert torch.equal(new_res, ref_res)
    assert torch.allclose(out.float(), ref.float(), rtol=2 ** -7, atol=1e-6)


def test_add_rmsnorm_rejects_mismatched_residual():
    x = torch.randn(3, 2, 64, device=DEVICE)
    with pytest.raises(ValueError, match="residual"):
        fused_add_rmsnorm(x, torch.randn(3, 2, 64, device=DEVICE), torch.ones(64, device=DEVICE), 1e-5)


@pytest.mark.parametrize("n,hq,hkv,dh", [(1, 4, 2, 16), (6, 8, 2, 32), (3, 6, 3, 16)])
def test_rope_store_kv_matches_torch(n, hq, hkv, dh):
    torch.manual_seed(n * hq)
    rot = RotaryEmbedding(dh, 256, 1e6).to(DEVICE)
    qkv = torch.randn(n, (hq + 2 * hkv) * dh, device=DEVICE).to(DTYPE)
    pos = torch.randint(0, 256, (n,), device=DEVICE)
    slots = torch.randperm(4 * 8, device=DEVICE)[:n]
    kc, vc = (torch.zeros(4, 8, hkv, dh, device=DEVICE).to(DTYPE) for _ in range(2))
    kc_ref, vc_ref = kc.clone(), vc.clone()
    q = rope_store_kv(qkv, pos, rot.cos, rot.sin, kc, vc, slots, hq, hkv, dh)
    qr, kr, vr = qkv.split((hq * dh, hkv * dh, hkv * dh), dim=-1)
    q_ref, k_ref = rot(pos, qr.reshape(n, hq, dh), kr.reshape(n, hkv, dh))
    store_kv(k_ref, vr.reshape(n, hkv, dh), kc_ref, vc_ref, slots)
    assert torch.equal(q, q_ref)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)


@pytest.mark.parametrize("n,e,k", [(1, 8, 2), (9, 8, 2), (4, 6, 3)])
def test_router_topk_matches_torch(n, e, k):
    torch.manual_seed(n + e)
    logits = torch.randn(n, e, device=DEVICE).to(DTYPE)
    w, ids = router_topk(logits, k)
    w_ref, ids_ref = router_topk_reference(logits, k)
    assert torch.equal(ids.long(), ids_ref)
    assert torch.allclose(w, w_ref, atol=1e-6)


def test_bf16_inputs_run():
    """bf16 through each kernel (exactness is checked on a GPU; the interpreter truncates)."""
    x = torch.randn(2, 64, device=DEVICE).bfloat16()
    out, res = fused_add_rmsnorm(x, x, torch.ones(64, device=DEVICE).bfloat16(), 1e-5)
    ref, ref_res = fused_add_rmsnorm_reference(x, x, torch.ones(64, device=DEVICE).bfloat16(), 1e-5)
    assert torch.allclose(out.float(), ref.float(), rtol=2 ** -6, atol=1e-2)
    w, ids = router_topk(x[:, :8], 2)
    assert torch.equal(ids.long(), router_topk_reference(x[:, :8], 2)[1])
