"""One request on its way through the pipeline: the :class:`Call` every stage takes.

A ``Call`` is data only. Stages (pipeline/stages.py, dispatch.py, finish.py) read it and
write their results into it; the pipeline (pipeline/service.py) passes it along in order.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sluice.gateway.accounts.auth import Principal
from sluice.gateway.backends.contract import GenerationRequest, TokenLogprob, Usage
from sluice.gateway.backends.runtime import Pool
from sluice.gateway.http.formats import ChatFormat, TextFormat, usage_dict
from sluice.gateway.pipeline.ratelimit import Admission

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
    _prompt_tokens: int | None = None

    @property
    def prompt_tokens(self) -> int:
        if self._prompt_tokens is None:
            self._prompt_tokens = self.count_prompt()
        return self._prompt_tokens

    @prompt_tokens.setter
    def prompt_tokens(self, value: int) -> None:
        self._prompt_tokens = value

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self.choices)

    @property
    def response_id(self) -> str:
        return self.fmt.id_prefix + self.request_id.removeprefix("req_")

    def usage(self) -> dict[str, int]:
        return usage_dict(Usage(self.prompt_tokens, self.completion_tokens))
