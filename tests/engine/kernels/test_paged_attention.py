import pytest
import torch

from sluice.engine.kernels.paged_attention import paged_decode_attention, paged_decode_attention_reference

from ._util import DEVICE, rel_err

CASES = [
    # (B, Hq, Hkv, D, block_size, context lens, num_splits)
    (2, 8, 2, 32, 16, [5, 40], None),
    (3, 4, 4, 64, 16, [0, 17, 100], None),
    (2, 8, 2, 32, 16, [33, 64], 3),
    (1, 6, 2, 16, 32, [70], 1),
    (2, 12, 4, 32, 8, [1, 23], 2),
]


def _inputs(b, hq, hkv, d, page, lens, dtype=torch.bfloat16):
    num_blocks = 64
    k_cache = torch.randn(num_blocks, page, hkv, d, device=DEVICE).to(dtype)
    v_cache = torch.randn(num_blocks, page, hkv, d, device=DEVICE).to(dtype)
    max_blocks = max(1, -(-max(lens) // page)) + 1
    tables = torch.randperm(num_blocks, device=DEVICE)[: b * max_blocks].view(b, max_blocks).int()
    lens_t = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    q = torch.randn(b, hq, d, device=DEVICE).to(dtype)
    return q, k_cache, v_cache, tables, lens_t


@pytest.mark.parametrize("b,hq,hkv,d,page,lens,splits", CASES)
def test_paged_decode_matches_reference(b, hq, hkv, d, page, lens, splits):
    torch.manual_seed(sum(lens) + d)
    q, kc, vc, tables, lens_t = _inputs(b, hq, hkv, d, page, lens)
    out = paged_decode_attention(q, kc, vc, tables, lens_t, d**-0.5, num_splits=splits)
    ref = paged_decode_attention_reference(q, kc, vc, tables, lens_t, d**-0.5)
    assert out.shape == q.shape and not torch.isnan(out).any()
    assert rel_err(out, ref) < 1e-2
    for i, n in enumerate(lens):
        if n == 0:
            assert torch.all(out[i] == 0)


def test_launcher_rejects_bad_arguments():
    q, kc, vc, tables, lens_t = _inputs(2, 8, 2, 32, 16, [3, 9])
    with pytest.raises(ValueError, match="multiple of kv heads"):
        paged_decode_attention(q[:, :7].contiguous(), kc, vc, tables, lens_t, 1.0)
    with pytest.raises(ValueError, match="block_tables"):
        paged_decode_attention(q, kc, vc, tables.long(), lens_t, 1.0)
    with pytest.raises(ValueError, match="dtypes differ"):
        paged_decode_attention(q, kc, vc.float(), tables, lens_t, 1.0)
    with pytest.raises(ValueError, match="context_lens"):
        paged_decode_attention(q, kc, vc, tables, lens_t[:1], 1.0)
