"""The packed decode-graph inputs (model_runner.DecodeInputs): what a replay reads."""

from __future__ import annotations

import torch

from sluice.engine.model_runner import DecodeInputs
from sluice.engine.sampling import SamplingParams
from sluice.engine.sequence import Sequence


def _seq(tokens: list[int], table: list[int]) -> Sequence:
    seq = Sequence(tokens, SamplingParams())
    seq.block_table = table
    return seq


def test_rows_hold_each_sequence_and_padding_reads_one_token_into_scratch():
    block, scratch = 4, 999
    inputs = DecodeInputs(max_bs=8, max_blocks=5, scratch_slot=scratch, device=torch.device("cpu"))
    v = inputs.views()
    a = _seq(list(range(10, 19)), [7, 3, 5])  # 9 tokens: the last at position 8, block 5 slot 0
    b = _seq([1, 2], [2])
    inputs.load([a, b], bucket=4, block_size=block)
    assert v["ids"][:4].tolist() == [18, 2, 0, 0]
    assert v["pos"][:4].tolist() == [8, 1, 0, 0]
    assert v["slots"][:4].tolist() == [5 * block + 0, 2 * block + 1, scratch, scratch]
    assert v["ctx"][:4].tolist() == [9, 2, 1, 1]
    assert v["tables"][0, :3].tolist() == [7, 3, 5] and v["tables"][1, 0] == 2
    # a later, smaller batch pads the rows the earlier one used
    inputs.load([b], bucket=2, block_size=block)
    assert v["ids"][:2].tolist() == [2, 0] and v["slots"][:2].tolist() == [2 * block + 1, scratch]
    assert v["ctx"][:2].tolist() == [2, 1]
    assert all(t.is_contiguous() for t in v.values())
