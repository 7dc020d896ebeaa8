"""The varlen paged attention kernel (prefill chunks and decodes in one launch) against
the per-sequence SDPA reference, on fresh random caches, including padding rows and
sequence rows with no tokens (what a CUDA graph captured at a padded size replays)."""

import pytest
import torch

from sluice.engine.kernels.varlen_attention import paged_varlen_attention
from sluice.engine.layers.attention import AttentionKernels
from sluice.engine.layers.attention import paged_decode_attention as reference_decode
from sluice.engine.layers.attention import paged_varlen_attention as reference
from sluice.engine.llm import LLM

from ..conftest import _save, mixtral_config
from ..test_varlen_step import mixed_batch, step_logits
from ._util import DEVICE, rel_err

CASES = [
    # (Hq, Hkv, D, block size, [(query len, context len) per sequence], padded rows, empty seq rows, block_m)
    (8, 2, 32, 16, [(1, 5), (1, 40), (23, 23), (7, 30)], 0, 0, 64),  # decodes + a prompt + a chunk after a prefix
    (4, 4, 64, 16, [(40, 40)], 8, 3, 64),  # one prompt, padding rows and empty sequence rows
    (12, 4, 32, 8, [(1, 1), (17, 50), (1, 9)], 5, 2, 32),  # group of 3 (padded to 4), short pages
    (8, 1, 16, 32, [(33, 33), (2, 70)], 0, 1, 16),  # group of 8, BQ = 2
]


def _inputs(hq, hkv, d, page, seqs, pad_rows, empty_rows, dtype=torch.bfloat16):
    num_blocks = 48
    k_cache = torch.randn(num_blocks, page, hkv, d, device=DEVICE).to(dtype)
    v_cache = torch.randn(num_blocks, page, hkv, d, device=DEVICE).to(dtype)
    S = len(seqs) + empty_rows
    width = max(-(-ctx // page) for _, ctx in seqs) + 1
    tables = torch.randperm(num_blocks, device=DEVICE)[: S * width].view(S, width).int()
    starts = [0]
    for qlen, _ in seqs:
        starts.append(starts[-1] + qlen)
    n = starts[-1]
    starts += [n] * empty_rows
    lens = [ctx for _, ctx in seqs] + [0] * empty_rows
    q = torch.randn(n + pad_rows, hq, d, device=DEVICE).to(dtype)
    as_i32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=DEVICE)
    return q, k_cache, v_cache, as_i32(starts), as_i32(lens), tables, n


@pytest.mark.parametrize("hq,hkv,d,page,seqs,pad_rows,empty_rows,block_m", CASES)
def test_varlen_matches_reference(hq, hkv, d, page, seqs, pad_rows, empty_rows, block_m):
    torch.manual_seed(len(seqs) * 100 + d)
    q, kc, vc, starts, lens, tables, n = _inputs(hq, hkv, d, page, seqs, pad_rows, empty_rows)
    out = paged_varlen_attention(q, kc, vc, starts, lens, tables, d**-0.5, block_m=block_m, block_n=16)
    ref = reference(q, kc, vc, starts, lens, tables, d**-0.5)
    assert out.shape == q.shape and not torch.isnan(out).any()
    assert rel_err(out[:n], ref[:n]) < 1e-2
    assert torch.all(out[n:] == 0), "padding rows must stay zero"


def test_decode_rows_match_the_decode_kernel_reference():
    """A varlen step of decodes only is the decode kernel's problem: same answer."""
    from sluice.engine.kernels.paged_attention import paged_decode_attention_reference

    torch.manual_seed(7)
    q, kc, vc, starts, lens, tables, _ = _inputs(8, 2, 32, 16, [(1, 9), (1, 31), (1, 16)], 0, 0)
    out = paged_varlen_attention(q, kc, vc, starts, lens, tables, 32**-0.5, block_n=16)
    want = paged_decode_attention_reference(q, kc, vc, tables, lens, 32**-0.5)
    assert rel_err(out, want) < 1e-2


def test_launcher_rejects_bad_arguments():
    q, kc, vc, starts, lens, tables, _ = _inputs(8, 2, 32, 16, [(3, 9)], 0, 0)
    with pytest.raises(ValueError, match="query_start"):
        paged_varlen_attention(q, kc, vc, starts[:1], lens, tables, 1.0)
    with pytest.raises(ValueError, match="block_tables"):
        paged_varlen_attention(q, kc, vc, starts, lens, tables.long(), 1.0)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        paged_varlen_attention(q[:, :7].contiguous(), kc, vc, starts, lens, tables, 1.0)
    with pytest.raises(ValueError, match="dtypes differ"):
        paged_varlen_attention(q, kc, vc.float(), starts, lens, tables, 1.0)


@pytest.fixture(scope="module")
def mixtral_d16(tmp_path_factory):
    """Head dim 16: the smallest the triton attention kernels take."""
    from transformers import MixtralForCausalLM

    return _save(MixtralForCausalLM, mixtral_config(hidden_size=64, intermediate_size=64),
                 tmp_path_factory.mktemp("mixtral-d16"))


def test_kernel_inside_the_model_matches_reference(mixtral_d16):
    """A mixed step (decodes, a whole prompt, a chunk) padded as a graph replays it."""
    llm = LLM(mixtral_d16, dtype="float32", device=DEVICE, block_size=4, num_kv_blocks=64, max_num_seqs=6,
              max_num_batched_tokens=24, progress=False)
    batch = mixed_batch(llm)
    llm.runner.varlen.kernels = AttentionKernels(decode=reference_decode, varlen=reference)  # passed in the metadata
    want = step_logits(llm, batch, batch.num_tokens)
    llm.runner.varlen.kernels = AttentionKernels(decode=reference_decode, varlen=paged_varlen_attention)
    got = step_logits(llm, batch, 24)
    assert not torch.isnan(got).any()
    assert ((got - want).norm() / want.norm()).item() < 1e-4


def test_groups_wider_than_the_default_tile():
    """128 query heads on one kv head: the tile grows to hold the group (BQ = 1)."""
    torch.manual_seed(3)
    q, kc, vc, starts, lens, tables, n = _inputs(128, 1, 16, 16, [(3, 20), (1, 7)], 2, 0)
    out = paged_varlen_attention(q, kc, vc, starts, lens, tables, 16**-0.5, block_n=16)
    assert rel_err(out[:n], reference(q, kc, vc, starts, lens, tables, 16**-0.5)[:n]) < 1e-2
