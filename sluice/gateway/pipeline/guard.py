"""Guardrails: Llama Guard 3 moderation of prompts (role User) and answers (role Agent).

The moderation prompt and the strict parsing of the answer live in
pipeline/guard_prompt.py; an answer that does not parse is an error that the
tenant's policy resolves (`on_error`, fail closed by default).

Every turn the model will see is moderated, neutralised and cut to the guard model's
context budget (pipeline/guard_text.py says how, including the policy for conversations
longer than the budget). A guard failure reaches tenants as a generic reason
(`Verdict.error`); the exception itself (which may name an internal upstream and quote
its body) goes only to the log and `Verdict.detail`.

The guard model is reached through an injected `complete(prompt) -> str`
coroutine, so this module knows nothing about backends. `StreamGuard` checks a
streamed answer on rolling windows and cuts the stream at the first unsafe window.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sluice.gateway.pipeline.guard_prompt import (
    GuardCategory,
    GuardParseError,
    parse_answer,
    render_prompt,
)
from sluice.gateway.pipeline.guard_policy import Decision, GuardPolicy, Mode, Verdict
from sluice.gateway.pipeline.guard_text import GuardBudget, Selection, flatten, neutralise, select

log = logging.getLogger("sluice.guard")

Complete = Callable[[str], Awaitable[str]]
T = TypeVar("T")

__all__ = ["Guard", "GuardCategory", "GuardParseError", "GuardPolicy", "StreamBlocked",
           "StreamGuard", "StreamGuardConfig", "Verdict", "parse_answer", "render_prompt"]

_PUBLIC_ERRORS: tuple[tuple[type[BaseException], str], ...] = (
    (asyncio.TimeoutError, "guard model timed out"),
    (GuardParseError, "guard model answer unparseable"),
)


class Guard:
    """Llama Guard checks in both directions, resolved by a tenant's GuardPolicy."""

    def __init__(self, complete: Complete, *, timeout_s: float = 10.0,
                 chat_wrap: bool = True, budget: GuardBudget = GuardBudget()) -> None:
        self._complete = complete
        self._timeout_s = timeout_s
        self._chat_wrap = chat_wrap  # False when `complete` applies the chat template itself
        self.budget = budget

    async def check_input(self, messages: Sequence[tuple[str, str]],
                          policy: GuardPolicy) -> Verdict:
        """Moderate every turn of the conversation (role User), in windows if it is long."""
        if policy.input_mode == "off":
            return Verdict("allow", (), "", 0.0)
        template = self._template_bytes(policy)

        def prepare() -> Selection | None:
            segments = flatten(messages)
            if not segments:
                return Selection((), 0, 0)
            return select(segments, self.budget, template, sample=policy.long_input == "sample")

        selection = await _off_loop(prepare, _size(messages))
        if selection is not None and not selection.windows:
            return Verdict("allow", (), "", 0.0)
        if selection is None:
            return Verdict(_decision_for(policy.input_mode), (), "", 0.0,
                           error="conversation too long to moderate",
                           detail=f"over the guard budget of {self.budget.capacity(template)} "
                                  "bytes (guard policy long_input=block)")
        prompts = [render_prompt("User", w, None, policy.active(), chat_wrap=self._chat_wrap)
                   for w in selection.windows]
        return await self._run_all(prompts, policy, policy.input_mode, selection)

    async def check_output(self, messages: Sequence[tuple[str, str]], answer: str,
                           policy: GuardPolicy, context: str | None = None) -> Verdict:
        """Moderate `answer` (role Agent), all of it, in windows if it is long; the most
        recent conversation (`context_of`) is its context."""
        if policy.output_mode == "off":
            return Verdict("allow", (), "", 0.0)
        template = self._template_bytes(policy)
        room = self.budget.window_bytes(template) // 4
        user = context if context is not None else await self.context_of(messages, policy)
        windowed = self.budget.model_copy(update={
            "max_windows": 1 + len(answer.encode("utf-8", "surrogatepass")) // room})
        selection = select([neutralise(answer)], windowed, template + len(user.encode()),
                           sample=False)
        assert selection is not None  # max_windows covers the whole answer
        prompts = [render_prompt("Agent", user, w, policy.active(), chat_wrap=self._chat_wrap)
                   for w in selection.windows]
        return await self._run_all(prompts, policy, policy.output_mode, selection)

    async def context_of(self, messages: Sequence[tuple[str, str]], policy: GuardPolicy) -> str:
        """The most recent conversation, up to a quarter of a window: an answer's context."""
        room = self.budget.window_bytes(self._template_bytes(policy)) // 4

        def tail() -> str:
            text = "\n\n".join(flatten(messages)).encode("utf-8", "surrogatepass")
            return text[-room:].decode("utf-8", "ignore")

        return await _off_loop(tail, _size(messages))

    def _template_bytes(self, policy: GuardPolicy) -> int:
        """The Agent prompt without content (the longer of the two directions)."""
        return len(render_prompt("Agent", "", "", policy.active(),
                                 chat_wrap=self._chat_wrap).encode())

    def stream(self, messages: Sequence[tuple[str, str]], policy: GuardPolicy,
               config: StreamGuardConfig | None = None) -> StreamGuard:
        return StreamGuard(self, messages, policy, config or StreamGuardConfig())

    async def _run_all(self, prompts: list[str], policy: GuardPolicy, mode: Mode,
                       selection: Selection) -> Verdict:
        verdicts = await asyncio.gather(*(self._run(p, policy, mode) for p in prompts))
        decisions = {v.decision for v in verdicts}
        decision: Decision = "block" if "block" in decisions else \
            "flag" if "flag" in decisions else "allow"
        cats = tuple(dict.fromkeys(c for v in verdicts for c in v.categories))
        failed = [v for v in verdicts if v.error]
        return Verdict(decision, cats, "\n".join(v.raw for v in verdicts),
                       max(v.latency_s for v in verdicts),
                       error=failed[0].error if failed else None,
                       detail="; ".join(str(v.detail) for v in failed) or None,
                       windows=len(verdicts), skipped_bytes=selection.skipped_bytes)

    async def _run(self, prompt: str, policy: GuardPolicy, mode: Mode) -> Verdict:
        start = time.perf_counter()
        raw = ""
        try:
            raw = await asyncio.wait_for(self._complete(prompt), self._timeout_s)
            unsafe, cats = parse_answer(raw)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any guard failure is resolved by policy
            detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            public = next((text for kind, text in _PUBLIC_ERRORS if isinstance(exc, kind)),
                          "guard model unavailable")
            # The detail may name internal hosts and quote upstream bodies: logs only.
            log.warning("guard check failed (%s; policy on_error=%s): %s", public,
                        policy.on_error, detail)
            # Failing closed treats the content as unsafe under the direction's mode.
            decision: Decision = "allow" if policy.on_error == "allow" else _decision_for(mode)
            return Verdict(decision, (), raw, time.perf_counter() - start, public, detail)
        counted = tuple(c for c in cats if c not in policy.excluded_categories)
        decision = _decision_for(mode) if unsafe and counted else "allow"
        return Verdict(decision, counted, raw, time.perf_counter() - start)


_INLINE_MAX_CHARS = 32_768  # longer conversations are prepared on a worker thread


def _size(messages: Sequence[tuple[str, str]]) -> int:
    return sum(len(text) for _, text in messages)


async def _off_loop(fn: Callable[[], T], size: int) -> T:
    """`fn()` inline for small inputs; on the loop's default executor (the gateway's bounded
    CPU pool) for large ones, so NFKC and windowing of a 1 MB conversation never hold the
    event loop."""
    return fn() if size <= _INLINE_MAX_CHARS else await asyncio.to_thread(fn)


def _decision_for(mode: Mode) -> Decision:
    return "block" if mode == "block" else "flag"


class StreamGuardConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    interval_chars: int = Field(default=400, ge=1)  # check after this much new text
    window_chars: int = Field(default=1200, ge=1)  # the tail of the answer each check sees
    hold_back: bool = True  # release text to the client only once a check covered it
    final_full_check: bool = True  # finish() checks the whole answer, not just the tail

    @model_validator(mode="after")
    def _window_covers_interval(self) -> StreamGuardConfig:
        if self.window_chars < self.interval_chars:
            raise ValueError("window_chars must be >= interval_chars")
        return self


class StreamBlocked(Exception):
    """The answer was found unsafe mid-stream; stop sending it."""

    def __init__(self, verdict: Verdict) -> None:
        why = ", ".join(verdict.categories) or verdict.error
        super().__init__(f"answer blocked by the guard: {why}")
        self.verdict = verdict


@dataclass
class StreamGuard:
    """Checks a streamed answer every `interval_chars` new characters.

        sg = guard.stream(messages, policy)
        async for delta in deltas:
            if text := await sg.feed(delta):   # raises StreamBlocked
                send(text)
        send(await sg.finish())                # raises StreamBlocked
    """

    guard: Guard
    messages: Sequence[tuple[str, str]]
    policy: GuardPolicy
    config: StreamGuardConfig
    verdicts: list[Verdict] = field(default_factory=list)
    _answer: str = ""
    _checked: int = 0  # answer[:_checked] is covered by a passing check
    _released: int = 0
    _blocked: Verdict | None = None
    _context: str | None = None

    @property
    def answer(self) -> str:
        return self._answer

    async def feed(self, delta: str) -> str:
        """Add streamed text; returns the text that may be sent to the client now."""
        self._raise_if_blocked()
        self._answer += delta
        if self.policy.output_mode == "off":
            return self._release(len(self._answer))
        if len(self._answer) - self._checked >= self.config.interval_chars:
            tail = self._answer[-self.config.window_chars:]
            await self._check(tail)
            self._checked = len(self._answer)
        return self._release(self._checked if self.config.hold_back else len(self._answer))

    async def finish(self) -> str:
        """Final check of the answer; returns the rest of the text."""
        self._raise_if_blocked()
        if self.policy.output_mode != "off" and (self._checked < len(self._answer)
                                                 or self.config.final_full_check):
            text = self._answer if self.config.final_full_check else \
                self._answer[-self.config.window_chars:]
            await self._check(text)
            self._checked = len(self._answer)
        return self._release(len(self._answer))

    async def _check(self, text: str) -> None:
        if self._context is None:  # the conversation does not change while streaming
            self._context = await self.guard.context_of(self.messages, self.policy)
        verdict = await self.guard.check_output(self.messages, text, self.policy, self._context)
        self.verdicts.append(verdict)
        if verdict.decision == "block":
            self._blocked = verdict
            raise StreamBlocked(verdict)

    def _raise_if_blocked(self) -> None:
        if self._blocked is not None:
            raise StreamBlocked(self._blocked)

    def _release(self, upto: int) -> str:
        out = self._answer[self._released:upto]
        self._released = max(self._released, upto)
        return out
