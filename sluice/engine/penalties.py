"""OpenAI's ``logit_bias``, ``presence_penalty`` and ``frequency_penalty``, on the batch's logits.

For token ``j`` of a row whose completion so far holds ``c[j]`` copies of it (OpenAI's
definition; the prompt does not count):

    logits[j] += bias[j] - frequency_penalty * c[j] - presence_penalty * (c[j] > 0)

applied in place to the rows that ask for any of the three, before the grammar mask
(engine/structured.py) and before temperature, top-k and top-p; rows that ask for none are
not touched and a batch without any costs one check per row. The counts are rebuilt from
each row's completion ids every step (as vLLM does), so nothing per request lives between
steps: the ids are counted on the host and each distinct token's penalty is subtracted on
the device in one indexed update; the work is the completions' length, not the
vocabulary's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from sluice.engine.transfer import upload


class Adjustments(Protocol):
    """What is read of a row's SamplingParams (engine/sampling.py imports this module)."""

    @property
    def adjusts_logits(self) -> bool: ...

    @property
    def logit_bias(self) -> tuple[tuple[int, float], ...]: ...

    @property
    def presence_penalty(self) -> float: ...

    @property
    def frequency_penalty(self) -> float: ...


class Generated(Protocol):
    """What is read of a row's sequence: its completion so far."""

    @property
    def completion_token_ids(self) -> list[int]: ...


@torch.inference_mode()  # the model's logits are inference tensors
def apply_penalties(logits: torch.Tensor, params: Sequence[Adjustments],
                    sequences: Sequence[Generated]) -> None:
    """logits (S, V) fp32, in place; ``sequences[i]`` is row i's (read for penalized rows only)."""
    rows = [i for i, p in enumerate(params) if p.adjusts_logits]
    if not rows:
        return
    S, V = logits.shape
    device = logits.device
    in_place = len(rows) == S and logits.is_contiguous()  # else a contiguous copy of the rows
    index = None if in_place else upload(torch.tensor(rows), device)
    sub = logits if index is None else logits.index_select(0, index)  # (R, V)
    chosen = [params[i] for i in rows]
    _add_bias(sub, chosen)
    penalized = [i for i, p in zip(rows, chosen) if p.presence_penalty or p.frequency_penalty]
    if penalized:
        if len(sequences) != S:
            raise ValueError("penalties need every row's sequence (its completion so far)")
        where = [r for r, p in enumerate(chosen) if p.presence_penalty or p.frequency_penalty]
        _subtract_penalties(sub, where, [params[i] for i in penalized],
                            [sequences[i].completion_token_ids for i in penalized])
    if index is not None:
        logits.index_copy_(0, index, sub)


def _add_bias(sub: torch.Tensor, chosen: list[Adjustments]) -> None:
    """Row r of ``sub`` (contiguous) gets its params' logit_bias added."""
    pairs = [(r, token, bias) for r, p in enumerate(chosen) for token, bias in p.logit_bias]
    if not pairs:
        return
    V = sub.shape[1]
    at = upload(torch.tensor([r * V + token for r, token, _ in pairs]), sub.device)
    sub.view(-1).index_add_(0, at, upload(torch.tensor([b for _, _, b in pairs], dtype=sub.dtype), sub.device))


def _subtract_penalties(sub: torch.Tensor, where: list[int], params: list[Adjustments],
                        completions: list[list[int]]) -> None:
    """Rows ``where`` of ``sub`` lose ``frequency_penalty * count + presence_penalty`` at each
    token their completion holds. The counts come from the ids sorted on the host (numpy: a
    run of equal ids is one token), so the device sees one (row, token, penalty) triple per
    distinct token, added exactly once: no pass over the vocabulary, and no atomic sums
    whose order could change a logit's last bit between runs."""
    P, V = len(where), sub.shape[1]
    width = max(1, max(len(c) for c in completions))
    ids = np.full((P, width), V, dtype=np.int64)  # V: padding, sorted last
    for r, c in enumerate(completions):
        ids[r, :len(c)] = c
    ids.sort(axis=1)
    first = np.ones(ids.shape, dtype=bool)  # the first of each run of equal ids (each row starts one)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    flat = ids.ravel()
    starts = np.flatnonzero(first)
    counts = np.diff(np.append(starts, flat.size))
    real = flat[starts] < V
    starts, counts = starts[real], counts[real]
    row = starts // width
    freq = np.array([p.frequency_penalty for p in params])
    pres = np.array([p.presence_penalty for p in params])
    penalty = freq[row] * counts + pres[row]  # (T,) one per distinct (row, token)
    at = upload(torch.from_numpy(np.asarray(where, dtype=np.int64)[row] * V + flat[starts]), sub.device)
    sub.view(-1).index_add_(0, at, upload(torch.from_numpy(penalty).to(sub.dtype), sub.device), alpha=-1)
