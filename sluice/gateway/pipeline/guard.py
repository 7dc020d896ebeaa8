"""Guardrails: Llama Guard 3 moderation of prompts (role User) and answers (role Agent).

The moderation prompt is built exactly as the model was trained on
(tests/data/llamaguard_reference.md is the reference copy); the answer is parsed
strictly: `safe`, or `unsafe` + newline + comma-separated categories (`S1,S10`), with
whitespace tolerated only at the two ends. Anything else is an error that the
tenant's policy resolves (`on_error`, fail closed by default).

The guard model is reached through an injected `complete(prompt) -> str`
coroutine, so this module knows nothing about backends. `StreamGuard` checks a
streamed answer on rolling windows and cuts the stream at the first unsafe window.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Complete = Callable[[str], Awaitable[str]]
Decision = Literal["allow", "flag", "block"]
Mode = Literal["block", "flag", "off"]

DEFAULT_CATEGORIES: tuple[tuple[str, str], ...] = (
    ("S1", "Violent Crimes"), ("S2", "Non-Violent Crimes"), ("S3", "Sex Crimes"),
    ("S4", "Child Exploitation"), ("S5", "Defamation"), ("S6", "Specialized Advice"),
    ("S7", "Privacy"), ("S8", "Intellectual Property"), ("S9", "Indiscriminate Weapons"),
    ("S10", "Hate"), ("S11", "Self-Harm"), ("S12", "Sexual Content"), ("S13", "Elections"),
    ("S14", "Code Interpreter Abuse"),
)

CHAT_PREFIX = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
CHAT_SUFFIX = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"

_TASK = ("Task: Check if there is unsafe content in '{role}' messages in conversations "
         "according our safety policy with the below categories.\n\n")
_INSTRUCTIONS = (
    "Provide your safety assessment for ONLY THE LAST {role} message in the above "
    "conversation:\n - First line must read 'safe' or 'unsafe'.\n - If unsafe, a second line "
    "must include a comma-separated list of violated categories.")
_CODE = re.compile(r"S[1-9][0-9]*")
_CATEGORIES_LINE = re.compile(r"S[1-9][0-9]*(,S[1-9][0-9]*)*")
_SPECIAL_TOKEN = re.compile(r"<\|(?=[a-z_0-9]+\|>)")


class GuardCategory(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    code: str  # "S1"
    name: str  # "Violent Crimes"; may carry a description after the name

    @field_validator("code")
    @classmethod
    def _code(cls, v: str) -> str:
        if not _CODE.fullmatch(v):
            raise ValueError("category code must look like S1, S2, ...")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v.strip() or "<" in v or ">" in v:
            raise ValueError("category name must be non-empty and contain no '<' or '>'")
        return v.strip()

    def line(self) -> str:
        return f"{self.code}: {self.name}" + ("" if self.name.endswith(".") else ".")


class GuardPolicy(BaseModel):
    """A tenant's guard policy."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    input_mode: Mode = "block"
    output_mode: Mode = "block"
    excluded_categories: frozenset[str] = frozenset()
    categories: tuple[GuardCategory, ...] | None = None  # None = Llama Guard 3 S1-S14
    on_error: Literal["block", "allow"] = "block"

    @model_validator(mode="after")
    def _valid(self) -> GuardPolicy:
        codes = [c.code for c in self.taxonomy()]
        if len(set(codes)) != len(codes):
            raise ValueError("category codes must be unique")
        if unknown := self.excluded_categories - set(codes):
            raise ValueError(f"excluded categories not in the taxonomy: {sorted(unknown)}")
        if not set(codes) - self.excluded_categories:
            raise ValueError("every category is excluded; set the modes to 'off' instead")
        return self

    def taxonomy(self) -> tuple[GuardCategory, ...]:
        if self.categories is not None:
            return self.categories
        return tuple(GuardCategory(code=c, name=n) for c, n in DEFAULT_CATEGORIES)

    def active(self) -> tuple[GuardCategory, ...]:
        return tuple(c for c in self.taxonomy() if c.code not in self.excluded_categories)


@dataclass(frozen=True, slots=True)
class Verdict:
    decision: Decision
    categories: tuple[str, ...]  # violated categories that count under the policy
    raw: str  # the guard model's answer ("" when not called)
    latency_s: float
    error: str | None = None

    @property
    def allowed(self) -> bool:
        return self.decision != "block"


class GuardParseError(ValueError):
    pass


def _clean(content: str) -> str:
    """Stop message text from forging Llama 3 special tokens (<|eot_id|> and friends)."""
    return _SPECIAL_TOKEN.sub("<\u200b|", content)


def render_prompt(role: Literal["User", "Agent"], user: str, agent: str | None,
                  categories: Sequence[GuardCategory], *, chat_wrap: bool = True) -> str:
    """The moderation prompt; `agent` is the answer when role is "Agent"."""
    if (role == "Agent") != (agent is not None):
        raise ValueError("the Agent role moderates an answer; the User role has none")
    turns = f"User: {_clean(user)}\n\n"
    if agent is not None:
        turns += f"Agent: {_clean(agent)}\n\n"
    text = (_TASK.format(role=role)
            + "<BEGIN UNSAFE CONTENT CATEGORIES>\n"
            + "".join(c.line() + "\n" for c in categories)
            + "<END UNSAFE CONTENT CATEGORIES>\n\n"
            + "<BEGIN CONVERSATION>\n\n" + turns + "<END CONVERSATION>\n\n"
            + _INSTRUCTIONS.format(role=role))
    return CHAT_PREFIX + text + CHAT_SUFFIX if chat_wrap else text


def parse_answer(raw: str) -> tuple[bool, tuple[str, ...]]:
    """(unsafe, categories) from `safe` or `unsafe\\nS1,S10`; GuardParseError otherwise."""
    text = raw.strip()
    if text == "safe":
        return False, ()
    head, sep, cats = text.partition("\n")
    if head != "unsafe" or not sep or not _CATEGORIES_LINE.fullmatch(cats):
        raise GuardParseError(f"unparseable guard answer: {raw[:200]!r}")
    return True, tuple(dict.fromkeys(cats.split(",")))


def _last_user(messages: Sequence[tuple[str, str]]) -> str | None:
    for role, content in reversed(messages):
        if role == "user":
            return content
    return None


class Guard:
    """Llama Guard checks in both directions, resolved by a tenant's GuardPolicy."""

    def __init__(self, complete: Complete, *, timeout_s: float = 10.0,
                 chat_wrap: bool = True) -> None:
        self._complete = complete
        self._timeout_s = timeout_s
        self._chat_wrap = chat_wrap  # False when `complete` applies the chat template itself

    async def check_input(self, messages: Sequence[tuple[str, str]],
                          policy: GuardPolicy) -> Verdict:
        """Moderate the last user turn (role User)."""
        user = _last_user(messages)
        if policy.input_mode == "off" or user is None:
            return Verdict("allow", (), "", 0.0)
        prompt = render_prompt("User", user, None, policy.active(), chat_wrap=self._chat_wrap)
        return await self._run(prompt, policy, policy.input_mode)

    async def check_output(self, messages: Sequence[tuple[str, str]], answer: str,
                           policy: GuardPolicy) -> Verdict:
        """Moderate `answer` (role Agent) with the last user turn as its context."""
        if policy.output_mode == "off":
            return Verdict("allow", (), "", 0.0)
        user = _last_user(messages) or ""
        prompt = render_prompt("Agent", user, answer, policy.active(),
                               chat_wrap=self._chat_wrap)
        return await self._run(prompt, policy, policy.output_mode)

    def stream(self, messages: Sequence[tuple[str, str]], policy: GuardPolicy,
               config: StreamGuardConfig | None = None) -> StreamGuard:
        return StreamGuard(self, messages, policy, config or StreamGuardConfig())

    async def _run(self, prompt: str, policy: GuardPolicy, mode: Mode) -> Verdict:
        start = time.perf_counter()
        raw = ""
        try:
            raw = await asyncio.wait_for(self._complete(prompt), self._timeout_s)
            unsafe, cats = parse_answer(raw)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any guard failure is resolved by policy
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            # Failing closed treats the content as unsafe under the direction's mode.
            decision: Decision = "allow" if policy.on_error == "allow" else _decision_for(mode)
            return Verdict(decision, (), raw, time.perf_counter() - start, error)
        counted = tuple(c for c in cats if c not in policy.excluded_categories)
        decision = _decision_for(mode) if unsafe and counted else "allow"
        return Verdict(decision, counted, raw, time.perf_counter() - start)


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
        verdict = await self.guard.check_output(self.messages, text, self.policy)
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
