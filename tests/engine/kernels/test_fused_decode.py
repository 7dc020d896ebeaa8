"""The fused decode path of a MoE layer, end to end on the triton interpreter: the MoE
block returns its (N, K, D) per-slot outputs and the next add + RMSNorm sums them.
Forced on the CPU by patching the CUDA checks; compared with the plain torch path."""

import importlib

import pytest
import torch

from sluice.engine.kernels.fused_moe import fused_moe_reference, moe_config
from sluice.engine.layers import fusion
from sluice.engine.layers.moe import FUSED_DECODE_MAX_TOKENS, Experts, MoE
from sluice.engine.layers.norm import RMSNorm

from ._util import DEVICE

fused_moe_module = importlib.import_module("sluice.engine.kernels.fused_moe")  # the package exports a function of that name


def _moe(d: int, i: int, e: int, k: int) -> MoE:
    torch.manual_seed(d + e)
    moe = MoE(d, i, e, k).to(DEVICE)
    with torch.no_grad():
        moe.gate.weight.normal_(0, 0.5)
        moe.experts.w13.normal_(0, d ** -0.5)
        moe.experts.w2.normal_(0, i ** -0.5)
    return moe


@pytest.fixture
def fused_on_cpu(monkeypatch):
    """The fused kernels for CPU tensors too (the interpreter runs them)."""
    if DEVICE == "cpu":
        monkeypatch.setattr(fusion, "use_fused", lambda x: fusion.ENABLED)
        monkeypatch.setattr(Experts, "fused_block_m", lambda self, x: moe_config(x.shape[0]).block_m)


@pytest.mark.parametrize("n,e,k", [(1, 4, 2), (6, 8, 2), (3, 5, 3)])
def test_moe_partials_summed_by_next_norm(fused_on_cpu, monkeypatch, n, e, k):
    d, i = 64, 32
    moe, norm = _moe(d, i, e, k), RMSNorm(d).to(DEVICE)
    x, residual = torch.randn(n, d, device=DEVICE), torch.randn(n, d, device=DEVICE)
    with monkeypatch.context() as m:  # the router aligned the slots: the MoE must not again
        m.setattr(fused_moe_module, "moe_align_block_size", None)
        parts = moe(x)
    assert parts.shape == (n, k, d)
    assert int(moe.route_counter) == 0
    normed, new_res = norm.forward_residual(parts, residual)
    fusion.ENABLED = False  # the torch path: torch routing, the fp32 expert loop, torch norm
    try:
        want = fused_moe_reference(x, moe.experts.w13, None, moe.experts.w2, None, *moe.route(x))
        want_normed, want_res = norm.forward_residual(want, residual)
        # the torch norm sums partials too (SLUICE_FUSED=0 with partials in hand)
        assert torch.allclose(norm.forward_residual(parts, residual)[1], new_res, atol=1e-6)
    finally:
        fusion.ENABLED = True
    assert torch.allclose(MoE.reduced(parts), want, atol=1e-5, rtol=1e-4)
    assert torch.allclose(new_res, want_res, atol=1e-5, rtol=1e-4)
    assert torch.allclose(normed, want_normed, atol=1e-4, rtol=1e-4)


def test_large_batches_keep_the_unfused_router_and_sum(fused_on_cpu):
    """Past FUSED_DECODE_MAX_TOKENS: the gate GEMM + router_topk, the MoE aligns and sums
    for itself (prefill-sized outputs stay (N, D))."""
    moe = _moe(32, 16, 4, 2)
    x = torch.randn(FUSED_DECODE_MAX_TOKENS + 1, 32, device=DEVICE)
    assert not moe.fused_partials(x)
    assert moe(x).shape == (x.shape[0], 32)
    w, ids = moe.route(x)
    fusion.ENABLED = False
    try:
        w_ref, ids_ref = moe.route(x)
    finally:
        fusion.ENABLED = True
    assert torch.equal(ids.long(), ids_ref) and torch.allclose(w, w_ref, atol=1e-6)


def test_moe_without_fused_path_returns_reduced_output():
    """The CPU (no fused kernels): (N, D), as every non-fused consumer expects."""
    moe = _moe(32, 16, 4, 2)
    x = torch.randn(3, 32, device=DEVICE)
    if DEVICE == "cpu":
        assert not moe.fused_partials(x)
        assert moe(x).shape == (3, 32)
        with pytest.raises(ValueError, match="fused path"):
            moe.experts(x, *moe.route(x), reduce=False)
