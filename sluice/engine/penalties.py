"""OpenAI's ``logit_bias``, ``presence_penalty`` and ``frequency_penalty``, on the batch's logits.

For token ``j`` of a row whose completion so far holds ``c[j]`` copies of it (OpenAI's
definition; the prompt does not count):

    logits[j] += bias[j] - frequency_penalty * c[j] - presence_penalty * (c[j] > 0)

applied in place to the rows that ask for any of the three, before the grammar mask
(engine/structured.py) and before temperature, top-k and top-p; rows that ask for none are
not touched and a batch without any costs one check per row. The counts are rebuilt from
each row's completion ids every step (as vLLM does): one padded id matrix copied to the
device and one scatter, so nothing per request lives between steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

if TYPE_CHECKING:
    from sluice.engine.sampling import SamplingParams


class Generated(Protocol):
    """What is read of a row's sequence: its completion so far."""

    @property
    def completion_token_ids(self) -> list[int]: ...


@torch.inference_mode()  # the model's logits are inference tensors
def apply_penalties(logits: torch.Tensor, params: Sequence[SamplingParams],
                    sequences: Sequence[Generated]) -> None:
    """logits (S, V) fp32, in place; ``sequences[i]`` is row i's (read for penalized rows only)."""
    rows = [i for i, p in enumerate(params) if p.adjusts_logits]
    if not rows:
        return
    S, V = logits.shape
    device = logits.device
    every = len(rows) == S
    index = None if every else torch.tensor(rows, device=device)
    sub = logits if index is None else logits.index_select(0, index)  # (R, V)
    chosen = [params[i] for i in rows]
    _add_bias(sub, chosen)
    penalized = [p.presence_penalty or p.frequency_penalty for p in chosen]
    if any(penalized):
        if len(sequences) != S:
            raise ValueError("penalties need every row's sequence (its completion so far)")
        counts = _counts([sequences[i].completion_token_ids if pen else () for i, pen in zip(rows, penalized)],
                         V, device)  # (R, V)
        freq = torch.tensor([p.frequency_penalty for p in chosen], device=device)[:, None]  # (R, 1)
        pres = torch.tensor([p.presence_penalty for p in chosen], device=device)[:, None]
        sub -= freq * counts + pres * (counts > 0)
    if index is not None:
        logits.index_copy_(0, index, sub)


def _add_bias(sub: torch.Tensor, chosen: list[SamplingParams]) -> None:
    pairs = [(r, token, bias) for r, p in enumerate(chosen) for token, bias in p.logit_bias]
    if not pairs:
        return
    r, token, bias = zip(*pairs)
    device = sub.device
    where = (torch.tensor(r, device=device), torch.tensor(token, device=device))
    sub.index_put_(where, torch.tensor(bias, dtype=sub.dtype, device=device), accumulate=True)


def _counts(completions: list[Sequence[int]], V: int, device: torch.device) -> torch.Tensor:
    """How often each token occurs in each row's completion: (R, V) float32."""
    width = max(1, max(len(c) for c in completions))
    ids = np.full((len(completions), width), V, dtype=np.int64)  # V: padding, counted in a spare column
    for r, c in enumerate(completions):
        ids[r, :len(c)] = c
    ids_dev = torch.from_numpy(ids).to(device)  # (R, L)
    counts = torch.zeros((len(completions), V + 1), device=device)
    counts.scatter_add_(1, ids_dev, torch.ones(ids_dev.shape, device=device))
    return counts[:, :V]
