"""The backend plugin contract.

A backend is one class that turns a :class:`GenerationRequest` into a stream of
:class:`GenerationEvent`. It knows nothing of tenants, keys or billing: the gateway
authenticates, limits, guards and meters around it, and the runtime decides when
it is started and stopped.

A plugin is registered under the entry-point group ``sluice.plugins``; the entry
point names the backend class. Built-in backends are registered the same way in
sluice's own ``pyproject.toml``.

    class MyBackend(Backend):
        class Options(BackendOptions):
            url: str

        def models(self) -> list[ModelCard]: ...
        async def start(self) -> None: ...
        async def stop(self) -> None: ...
        def count_tokens(self, request: GenerationRequest) -> int: ...
        async def generate(self, request) -> AsyncIterator[GenerationEvent]: ...
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict

Role = Literal["system", "user", "assistant", "tool", "developer"]
FinishReason = Literal["stop", "length", "content_filter", "error", "cancelled"]


class BackendOptions(BaseModel):
    """Base of every backend's typed options: unknown keys are an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True, slots=True)
class ModelCard:
    id: str
    owned_by: str = "sluice"
    context_length: int | None = None


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int | None = None  # None: up to the model's context
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One completion to produce (the gateway fans `n > 1` out into n requests).

    Exactly one of ``messages`` (chat) and ``prompt`` (plain completion) is set.
    """

    request_id: str
    model: str
    sampling: SamplingParams = field(default_factory=SamplingParams)
    messages: tuple[ChatMessage, ...] | None = None
    prompt: str | None = None

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("exactly one of messages and prompt must be set")


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class GenerationEvent:
    """A piece of a generation.

    Deltas carry ``text`` and ``tokens`` (how many completion tokens the delta
    holds, so a consumer that stops early knows exactly what was generated). The
    last event carries ``finish_reason`` and ``usage`` (and may carry text too).
    """

    text: str = ""
    tokens: int = 0
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    logprobs: tuple[TokenLogprob, ...] = ()


class BackendError(Exception):
    """A backend failed to serve a request.

    ``status`` is the HTTP status the gateway answers with; ``retryable`` says whether
    another try may work; ``fatal`` says the worker itself is broken and the runtime
    must replace it (its other requests fail too).
    """

    def __init__(
        self, message: str, *, status: int = 502, retryable: bool = False, fatal: bool = False
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable
        self.fatal = fatal


class Backend(abc.ABC):
    """One model server: created from its options, started and stopped by the runtime."""

    #: The name the plugin is registered under (also the entry point's name).
    name: ClassVar[str]

    class Options(BackendOptions):
        pass

    def __init__(self, options: BackendOptions) -> None:
        self.options = options

    @abc.abstractmethod
    def models(self) -> list[ModelCard]:
        """The models this backend serves (known before start)."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Cold start: load weights, connect, warm up."""

    async def stop(self) -> None:  # noqa: B027 - optional hook
        """Release what start() took."""

    #: Whether sleep()/wake() are implemented (a cheaper way down than stop()).
    supports_sleep: ClassVar[bool] = False

    async def sleep(self) -> None:
        """Release the accelerator but keep what makes waking fast (e.g. weights parked in
        host memory). Only called when ``supports_sleep``."""
        raise BackendError(f"backend {self.name} cannot sleep", status=500)

    async def wake(self) -> None:
        """Undo sleep(): be ready to serve again."""
        raise BackendError(f"backend {self.name} cannot wake", status=500)

    @abc.abstractmethod
    def count_tokens(self, request: GenerationRequest) -> int:
        """Prompt tokens of ``request`` exactly as generate() will count them."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Stream the completion. Closing the iterator cancels the generation."""
