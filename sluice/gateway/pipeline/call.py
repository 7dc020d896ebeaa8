"""One request on its way through the pipeline: the :class:`Call` every stage takes.

A ``Call`` is data only. Stages (pipeline/stages.py, dispatch.py, finish.py) read it and
write their results into it; the pipeline (pipeline/service.py) passes it along in order.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sluice.gateway.accounts.auth import Principal
from sluice.gateway.backends.contract import GenerationEvent, GenerationRequest, TokenLogprob, Usage
from sluice.gateway.backends.runtime import Pool
from sluice.gateway.http.formats import ChatFormat, MessageParts, TextFormat, merge_details, usage_dict
from sluice.gateway.pipeline.ratelimit import Admission
from sluice.gateway.workers import estimate_prompt_tokens

if TYPE_CHECKING:
    from sluice.gateway.backends.routing import Plan
    from sluice.gateway.economics.budgets import Reservation

CLIENT_CLOSED = 499  # nginx's status for a client that went away; recorded, never sent


@dataclass
class Choice:
    """One of the ``n`` answers: its text so far and when each phase happened (ns)."""

    text: list[str] = field(default_factory=list)
    tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    queued_at: float | None = None
    dispatched_at: float | None = None
    first_token_at: float | None = None
    done_at: float | None = None
    # what the events carried besides text (tool calls, refusal, reasoning, fingerprint)
    parts: MessageParts = field(default_factory=MessageParts)
    usage: Usage | None = None  # the backend's own, with its details


@dataclass
class Call:
    # -- what was asked (set when the call is opened) ----------------------------------
    request_id: str
    endpoint: str  # "chat" or "completions"
    principal: Principal
    model: str
    pool: Pool  # the runtime pool of the backend serving ``model``
    requests: list[GenerationRequest]  # one per choice (n)
    count_prompt: Callable[[], int]  # the backend's token count, asked for only when needed
    prompt_text: str  # what rate limiting scores and the audit digests
    conversation: list[tuple[str, str]]  # (role, text), what the guard reads
    reserve_tokens: int  # per choice, against tokens/min limits
    fmt: ChatFormat | TextFormat
    span: Any  # the request's trace span (INVALID_SPAN when tracing is off)
    stream: bool = False
    include_usage: bool = False
    want_logprobs: bool = False
    provider: str = "sluice"  # gen_ai.provider.name of the model's server
    prompt_per_choice: bool = False  # n fanned out to a proxy: each choice bills its prompt
    prompts: int = 1  # /v1/completions with several prompts: choice i has prompt i // n
    error: Any = None  # the SluiceError the call failed with (its status and headers)
    created: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.perf_counter)
    # -- what happened (written by the stages) -----------------------------------------
    admission: Admission | None = None  # the rate limiter's reservation, settled at finish
    headers: dict[str, str] = field(default_factory=dict)  # x-ratelimit-* for the response
    choices: list[Choice] = field(default_factory=list)
    ttft_s: float | None = None
    status: int = 200
    dispatched: bool = False
    finished: bool = False
    # -- money and routing (pipeline/spend.py, backends/routing.py) ----------------------
    body: dict[str, Any] | None = None  # the request body as sent (the cache key's source)
    cache_control: str = ""  # the client's Cache-Control header
    plan: Plan | None = None  # a model group's routes to try; None: ``pool`` only
    budget: Reservation | None = None  # held against budgets, settled at finish
    cache_key: str | None = None  # set when the answer may come from / go to the cache
    replay: list[list[GenerationEvent]] | None = None  # a cache hit: each choice's events
    recorded: list[list[GenerationEvent]] | None = None  # a miss to cache: events as they came
    served_by: str | None = None  # the backend that answered (after retries, fallbacks)
    cost_pico: int = 0  # exact, priced at finish
    _prompt_tokens: int | None = None

    @property
    def prompt_tokens(self) -> int:
        if self._prompt_tokens is None:
            self._prompt_tokens = self.count_prompt()
        return self._prompt_tokens

    @prompt_tokens.setter
    def prompt_tokens(self, value: int) -> None:
        self._prompt_tokens = value

    def estimated_prompt_tokens(self) -> int:
        """The prompt tokens the call will be billed, by the byte estimate (nothing tokenized):
        each of its prompts once."""
        if self.prompts == 1:
            return estimate_prompt_tokens(self.requests[0])
        return sum(estimate_prompt_tokens(r) for r in self.requests[::len(self.requests) // self.prompts])

    def reported_prompt_tokens(self, usage: Usage) -> int:
        """The prompt tokens to bill once a backend reported ``usage`` for a choice: every
        choice's own prompt for a proxy that ran each choice as its own call; otherwise each
        prompt once, the backends' numbers once every prompt has one (until then the count
        stands)."""
        if self.prompt_per_choice:
            return sum(c.usage.prompt_tokens for c in self.choices if c.usage)
        if self.prompts == 1:
            return usage.prompt_tokens
        n = len(self.choices) // self.prompts
        reported: dict[int, int] = {}
        for i, c in enumerate(self.choices):
            if c.usage is not None:
                reported.setdefault(i // n, c.usage.prompt_tokens)
        return sum(reported.values()) if len(reported) == self.prompts else self.prompt_tokens

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self.choices)

    @property
    def response_id(self) -> str:
        return self.fmt.id_prefix + self.request_id.removeprefix("req_")

    def usage(self) -> dict[str, Any]:
        prompt_details, completion_details = merge_details(
            c.usage for c in self.choices if c.usage is not None)
        return usage_dict(Usage(self.prompt_tokens, self.completion_tokens, prompt_details,
                                completion_details))
