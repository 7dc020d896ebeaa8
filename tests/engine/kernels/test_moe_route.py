"""The one-launch MoE router (moe_route.py) against torch: gate GEMM, softmax, top-k and
the fused MoE's slot alignment."""

import pytest
import torch

from sluice.engine.kernels.fused_moe import moe_align_reference
from sluice.engine.kernels.moe_route import route, route_reference

from ._util import DEVICE

DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32  # the interpreter truncates to bf16
# bf16 logits: the kernel's fp32 sum and the reference matmul add in different orders, so
# a logit may round to the neighbouring bf16 value (~0.4% of it)
W_ATOL = 1e-6 if DTYPE == torch.float32 else 1e-2


def _inputs(t: int, d: int, e: int, dtype: torch.dtype = DTYPE) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(t * 31 + d + e)
    return torch.randn(t, d, device=DEVICE).to(dtype), (torch.randn(e, d, device=DEVICE) * d ** -0.5).to(dtype)


def _counter() -> torch.Tensor:
    return torch.zeros(1, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("t,d,e,k,block_m,block_d", [
    (1, 96, 8, 2, 16, None),
    (5, 64, 8, 2, 16, None),
    (37, 128, 6, 3, 32, None),  # E not a power of two
    (9, 96, 8, 2, 16, 32),  # 3 slices of D, the last one partial: 4 slots in the tile, one masked
    (64, 4096, 8, 2, 16, None),  # Mixtral's D and E at the largest decode graph
    (3, 80, 33, 2, 16, 64),  # more experts than slots
])
def test_route_matches_torch(t, d, e, k, block_m, block_d):
    x, gate = _inputs(t, d, e)
    counter = _counter()
    w, ids, align = route(x, gate, k, counter, block_m, block_d=block_d)
    w_ref, ids_ref = route_reference(x, gate, k)
    assert torch.equal(ids.long(), ids_ref)
    assert torch.allclose(w, w_ref, atol=W_ATOL)
    for got, want in zip(align, moe_align_reference(ids, e, block_m)):
        assert torch.equal(got.long(), want.long())
    assert int(counter) == 0  # left for the next launch


def test_route_again_on_the_same_counter():
    """Each launch leaves its counter at zero, so the next one (a graph replay) routes too."""
    counter = _counter()
    for t in (4, 4, 7):
        x, gate = _inputs(t, 64, 8)
        w, ids, align = route(x, gate, 2, counter)
        assert align is None
        assert torch.equal(ids.long(), route_reference(x, gate, 2)[1])


def test_route_ties_take_the_lowest_expert():
    x = torch.ones(2, 64, device=DEVICE, dtype=DTYPE)
    gate = torch.zeros(6, 64, device=DEVICE, dtype=DTYPE)
    gate[[2, 5]] = 0.1  # experts 2 and 5 tie for first, 0, 1, 3, 4 for third
    w, ids, _ = route(x, gate, 3, _counter())
    assert ids.tolist() == [[2, 5, 0], [2, 5, 0]]
    assert torch.equal(w[:, 0], w[:, 1])


def test_route_no_tokens():
    x, gate = _inputs(0, 64, 8)
    w, ids, (sorted_ids, expert_ids, num_post) = route(x, gate, 2, _counter(), 16)
    assert w.shape == ids.shape == (0, 2) and sorted_ids.numel() == expert_ids.numel() == 0
    assert int(num_post) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_route_16_bit(dtype):
    """16-bit x and gate (bit-level rounding is checked on a GPU; the interpreter truncates)."""
    x, gate = _inputs(6, 128, 8, dtype)
    w, ids, _ = route(x, gate, 2, _counter())
    w_ref, ids_ref = route_reference(x, gate, 2)
    assert torch.equal(ids.long(), ids_ref)
    assert torch.allclose(w, w_ref, atol=1e-2)


def test_route_rejects_bad_arguments():
    x, gate = _inputs(2, 64, 8)
    with pytest.raises(ValueError, match="gate"):
        route(x, gate.to(torch.float16), 2, _counter())
    with pytest.raises(ValueError, match="counter"):
        route(x, gate, 2, torch.zeros(1, device=DEVICE))
    with pytest.raises(ValueError, match="top_k"):
        route(x, gate, 9, _counter())
