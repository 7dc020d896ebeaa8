"""Request-level sampling knobs and the sampler.

Randomness comes from one torch.Generator per sequence (seeded from the request's
seed), drawing exactly one uniform number per generated token. The draw is
inverted through the token CDF, so a seeded request yields the same tokens
whatever else shares its batch.

A request with a ``constraint`` (engine/structured.py: JSON, a JSON Schema, forced tool
calls) has what its grammar forbids masked out of its logits row first: one bitmask for
the whole batch, applied to the logits the model returned (outside any CUDA graph).
``logit_bias`` and the presence/frequency penalties (engine/penalties.py) are added before
that mask, so a bias can never make a forbidden token possible.

Logprobs are those of the distribution the token is drawn from before temperature, top-k
and top-p: the model's logits after bias, penalties and the grammar mask (a token the
grammar forbids has -inf). OpenAI does not document which it reports; vLLM's default is
the raw model's, ours says what could actually have been sampled, and greedy and seeded
requests of the same params report the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from sluice.engine.errors import RequestError
from sluice.engine.penalties import Generated, apply_penalties
from sluice.engine.transfer import upload

if TYPE_CHECKING:
    from sluice.engine.structured import Constraint


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = -1  # -1: off
    max_tokens: int | None = 16  # None: until max_model_len
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    #: OpenAI's penalties (-2..2) on tokens of the completion so far, and (token id, bias)
    #: pairs (-100..100) added to the logits (engine/penalties.py).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    #: Decoding constraint (engine/structured.py); it holds the request's parse state, so
    #: a SamplingParams with one belongs to one request.
    constraint: Constraint | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise RequestError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise RequestError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise RequestError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.top_logprobs < 0:
            raise RequestError(f"top_logprobs must be >= 0, got {self.top_logprobs}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise SamplingError(f"{name} must be in [-2, 2], got {getattr(self, name)}", name)
        for token, bias in self.logit_bias:
            if token < 0 or not -100 <= bias <= 100:
                raise SamplingError(f"logit_bias: token {token} bias {bias}: token ids are >= 0 and "
                                    "biases in [-100, 100]", "logit_bias")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def adjusts_logits(self) -> bool:
        """Whether bias or penalties change this request's logits."""
        return bool(self.logit_bias) or self.presence_penalty != 0 or self.frequency_penalty != 0


class SamplingError(RequestError):
    """A sampling knob out of range (``param`` names the request field)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator],
           sequences: Sequence[Generated] = ()) -> list[SampledToken]:
    """logits (S, V) fp32, one row per sequence -> one token each. ``sequences`` (one per
    row) are read only for rows with penalties. Waits for the device; the engine runs the
    same three phases apart (``adjust``, ``draw``, ``accept``) so that it need not."""
    if logits.shape[0] == 0:
        return []
    adjust(logits, params, sequences)
    out = draw(logits, params, generators).result()
    accept(params, out)
    return out


def adjust(logits: torch.Tensor, params: list[SamplingParams], sequences: Sequence[Generated] = ()) -> None:
    """Bias, penalties and grammar masks, in place. Reads what the host holds: each
    penalised row's completion so far and each constraint's parse state, so it runs once
    the previous token of every such row has been accepted."""
    if any(p.adjusts_logits for p in params):
        apply_penalties(logits, params, sequences)
    if any(p.constraint is not None for p in params):
        from sluice.engine.structured import apply_constraints

        apply_constraints(logits, [p.constraint for p in params])


def accept(params: list[SamplingParams], tokens: list[SampledToken]) -> None:
    """Advance each row's constraint (if any) by the token it drew."""
    if any(p.constraint is not None for p in params):
        from sluice.engine.structured import accept_tokens

        accept_tokens([p.constraint for p in params], [t.token_id for t in tokens])


def needs_host_history(params: SamplingParams) -> bool:
    """Whether adjusting this request's logits reads its previous tokens on the host
    (penalties count them; a grammar advances on them): a step launched before those are
    back (LLM's step lookahead) samples it only once they are."""
    return params.adjusts_logits or params.constraint is not None


class Draw:
    """One step's sampled tokens, still on the device: ``token_ids`` (S,) int64 there (the
    next step's inputs can be taken from it without a host round trip); ``result()``
    waits for their copy to the host and builds the SampledTokens. Logprobs, where asked
    for, are gathered on the device too (the drawn token's and the ``top`` best) and come
    back in the same copy, so reading them never waits for work queued after the step."""

    def __init__(self, token_ids: torch.Tensor, params: list[SamplingParams],
                 logprobs: torch.Tensor | None = None) -> None:
        self.token_ids, self.params = token_ids, params
        parts = [token_ids]
        if logprobs is not None:
            k = max(p.top_logprobs for p in params)
            parts.append(logprobs.gather(1, token_ids[:, None]).squeeze(1))  # (S,) the drawn token's
            if k:
                parts.extend(logprobs.topk(k, dim=-1))  # (S, k) values, then ids
        cuda = token_ids.is_cuda
        self._host = [t.to("cpu", non_blocking=True) if cuda else t for t in parts]
        self._copied = None
        if cuda:
            self._copied = torch.cuda.Event()
            self._copied.record()

    def result(self) -> list[SampledToken]:
        if self._copied is not None:
            self._copied.synchronize()
        tokens, *lp = (t.tolist() for t in self._host)
        out = []
        for i, (tok, p) in enumerate(zip(tokens, self.params)):
            if not lp or not (p.logprobs or p.top_logprobs):
                out.append(SampledToken(tok))
                continue
            top: tuple[tuple[int, float], ...] = ()
            if p.top_logprobs:
                top = tuple(zip(lp[2][i][:p.top_logprobs], lp[1][i][:p.top_logprobs]))
            out.append(SampledToken(tok, lp[0][i], top))
        return out


def draw(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> Draw:
    """Sample one token per row of (already biased, penalised and masked) logits without
    waiting for the device: the uniform draws come from the CPU generators, everything
    else is enqueued on the logits' device."""
    V = logits.shape[1]
    want_lp = any(p.logprobs or p.top_logprobs for p in params)
    if not want_lp and all(p.greedy for p in params):
        for g in generators:  # the draw every row takes, so a request's stream stays its own
            torch.rand(1, generator=g)
        return Draw(logits.argmax(dim=-1), params, None)
    temps = _on(logits.device, [p.temperature if not p.greedy else 1.0 for p in params], torch.float32)
    probs = torch.softmax(logits / temps[:, None], dim=-1)  # (S, V)
    if any(p.top_k > 0 or p.top_p < 1 for p in params):
        probs = _top_k_top_p(probs, params)
    # one uniform draw per row from that row's own generator, always taken (greedy too)
    # so a request's random stream never depends on its neighbours
    u = _on(logits.device, [torch.rand(1, generator=g).item() for g in generators], torch.float32)
    cdf = probs.cumsum(dim=-1)  # (S, V)
    drawn = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1).clamp_(max=V - 1)  # (S,)
    greedy = _on(logits.device, [p.greedy for p in params], torch.bool)
    tokens = torch.where(greedy, logits.argmax(dim=-1), drawn)
    return Draw(tokens, params, torch.log_softmax(logits, dim=-1) if want_lp else None)


def _on(device: torch.device, values: list, dtype: torch.dtype) -> torch.Tensor:
    return upload(torch.tensor(values, dtype=dtype), device)


def _top_k_top_p(probs: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Zero out what top-k and top-p exclude (rows keep their own settings)."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)  # (S, V)
    V = probs.shape[-1]
    ks = _on(probs.device, [p.top_k if p.top_k > 0 else V for p in params], torch.int64)
    ps = _on(probs.device, [p.top_p for p in params], torch.float32)
    rank = torch.arange(V, device=probs.device)[None, :]
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass strictly above each token
    drop = (rank >= ks[:, None]) | (before >= ps[:, None])
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(1, order, sorted_probs)
