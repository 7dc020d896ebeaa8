"""The backend plugin contract.

A backend is one class that turns a :class:`GenerationRequest` into a stream of
:class:`GenerationEvent`. It knows nothing of tenants, keys or billing: the gateway
authenticates, limits, guards and meters around it, and the runtime decides when
it is started and stopped.

What a backend receives and returns (the OpenAI wire model, whole):

- :class:`GenerationRequest` carries every message as sent (:class:`ChatMessage`: any role
  of system, developer, user, assistant, tool, function; ``content`` is the text view,
  ``parts`` the content parts when they came as a list, plus ``name``, ``tool_calls``,
  ``tool_call_id``, ``refusal`` and the message's other fields in ``extra``), the
  ``tools`` and ``tool_choice``, ``parallel_tool_calls``, ``response_format``, the
  sampling knobs (:class:`SamplingParams`, penalties and ``logit_bias`` included), ``user``
  and ``metadata``, and every other field the client sent in ``extra``. ``body`` is the
  client's request body as received (``raw`` its bytes), so a proxying backend
  (openai_upstream) can forward it unchanged; ``choice_index``/``n_choices`` say which of
  a fanned-out ``n`` this request is.
- :class:`GenerationEvent` deltas carry ``text``, ``tool_calls`` (:class:`ToolCallDelta`:
  index, id, name, argument fragments), ``refusal``, ``reasoning`` (reasoning_content),
  ``logprobs`` and any other delta fields in ``extra``; the last event carries the
  backend's own ``finish_reason`` (``tool_calls`` included), :class:`Usage` with its
  details, ``system_fingerprint`` and other top-level answer fields in ``response_extra``.
- :class:`ModelCard` ``capabilities`` say what a model serves (chat, completions,
  embeddings, tools, json_schema, vision): ``/v1/models`` shows them and the gateway
  answers 400 naming the field (``tools``, ``response_format``, ``messages[i].content[j]``)
  for a request the model cannot serve.
- :meth:`Backend.embed` serves ``/v1/embeddings`` for a backend whose cards say
  ``embeddings``.

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
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]
#: OpenAI's finish reasons, plus sluice's own ``error`` and ``cancelled``.
FinishReason = Literal[
    "stop", "length", "content_filter", "tool_calls", "function_call", "error", "cancelled"
]
Capability = Literal["chat", "completions", "embeddings", "tools", "json_schema", "vision",
                     "token_prompts"]
TEXT_CAPABILITIES: frozenset[Capability] = frozenset({"chat", "completions"})

_EMPTY: Mapping[str, Any] = {}


class BackendOptions(BaseModel):
    """Base of every backend's typed options: unknown keys are an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True, slots=True)
class ModelCard:
    id: str
    owned_by: str = "sluice"
    context_length: int | None = None
    #: What the model serves. ``tools``: tool definitions and tool messages are honoured;
    #: ``json_schema``: ``response_format`` json_object/json_schema is enforced; ``vision``:
    #: image content parts are understood; ``token_prompts``: a /v1/completions ``prompt``
    #: of token ids is served (``GenerationRequest.prompt_ids``).
    capabilities: frozenset[Capability] = TEXT_CAPABILITIES
    #: ``gen_ai.provider.name`` of the model's server (OpenTelemetry's GenAI conventions).
    provider: str = "sluice"
    #: Each choice of a fanned-out ``n`` is billed its own prompt (a proxy makes one
    #: upstream call per choice); otherwise the prompt is billed once, as OpenAI does.
    prompt_per_choice: bool = False

    def serves(self, capability: Capability) -> bool:
        return capability in self.capabilities


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A tool call the assistant made (in a message sent back to the model)."""

    id: str
    name: str
    arguments: str  # JSON text, exactly as the model wrote it
    type: str = "function"  # or "custom" (then ``arguments`` is the custom tool's input)


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One message as the client sent it.

    ``content`` is the text view (a string content, or the text parts joined; "" for
    none); ``parts`` keeps the content parts as sent (OpenAI's dicts: text, image_url,
    input_audio, file, refusal) when content came as a list, so a backend can honour
    or refuse what is not text. ``extra`` holds the message's other fields as sent
    (assistant ``audio``/``annotations``/``function_call``, ...).
    """

    role: Role
    content: str = ""
    parts: tuple[Mapping[str, Any], ...] | None = None
    name: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    refusal: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def text(self) -> str:
        return self.content

    def non_text_parts(self) -> list[int]:
        """Indexes of the content parts that are not text."""
        return [i for i, p in enumerate(self.parts or ()) if p.get("type") != "text"]


@dataclass(frozen=True, slots=True)
class Tool:
    """A tool the model may call (OpenAI's ``tools[i]``)."""

    name: str
    description: str | None = None
    parameters: Mapping[str, Any] | None = None  # JSON Schema of the arguments
    strict: bool | None = None
    type: str = "function"  # or "custom"


@dataclass(frozen=True, slots=True)
class NamedToolChoice:
    """``tool_choice`` naming one function: the model must call it."""

    name: str


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """``response_format``: free text, any JSON object, or JSON matching ``schema``."""

    type: Literal["text", "json_object", "json_schema"]
    schema: Mapping[str, Any] | None = None
    name: str | None = None
    strict: bool | None = None


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Effective sampling values for a backend that samples itself (a field the client
    omitted has OpenAI's default here; a proxy forwards ``GenerationRequest.body``)."""

    max_tokens: int | None = None  # None: up to the model's context
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias)


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One completion to produce (the gateway fans `n > 1` out into n requests).

    Exactly one of ``messages`` (chat), ``prompt`` (plain completion) and ``prompt_ids`` (a
    completion from token ids, only to models whose card says ``token_prompts``) is set. A
    /v1/completions body with several prompts is one request per prompt and choice.
    """

    request_id: str
    model: str
    sampling: SamplingParams = field(default_factory=SamplingParams)
    messages: tuple[ChatMessage, ...] | None = None
    prompt: str | None = None
    prompt_ids: tuple[int, ...] | None = None
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice | None = None  # None: not sent (OpenAI: "auto" with tools)
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None
    metadata: Mapping[str, str] | None = None
    #: Other fields the client sent (store, service_tier, reasoning_effort, prediction,
    #: modalities, audio, web_search_options, ...), as sent.
    extra: Mapping[str, Any] = field(default_factory=dict)
    #: The client's request body as received (parsed) and its bytes: what a proxy forwards.
    body: Mapping[str, Any] | None = None
    raw: bytes | None = None
    #: Which of a fanned-out ``n`` this is (a proxy sends each as its own n=1 call).
    choice_index: int = 0
    n_choices: int = 1
    #: W3C trace context (``traceparent``, ``tracestate``) for a backend that calls out.
    trace_headers: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.messages is not None) + (self.prompt is not None) + (self.prompt_ids is not None) != 1:
            raise ValueError("exactly one of messages, prompt and prompt_ids must be set")


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    #: OpenAI's breakdowns as the backend reports them (e.g. ``cached_tokens``,
    #: ``reasoning_tokens``, ``audio_tokens``); None: not reported.
    prompt_tokens_details: Mapping[str, Any] | None = None
    completion_tokens_details: Mapping[str, Any] | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of a tool call being streamed: the first piece of call ``index`` has its
    ``id`` and ``name``; later pieces carry ``arguments`` fragments only."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""
    type: str | None = "function"


@dataclass(frozen=True, slots=True)
class GenerationEvent:
    """A piece of a generation.

    Deltas carry ``text`` and ``tokens`` (how many completion tokens the delta
    holds, so a consumer that stops early knows exactly what was generated), and may
    carry ``tool_calls`` pieces, ``refusal`` and ``reasoning`` text, ``logprobs`` and
    ``extra`` delta fields (shown to the client as sent). The last event carries
    ``finish_reason`` and ``usage`` (and may carry any of the above too).
    """

    text: str = ""
    tokens: int = 0
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    logprobs: tuple[TokenLogprob, ...] = ()
    tool_calls: tuple[ToolCallDelta, ...] = ()
    refusal: str = ""
    reasoning: str = ""
    system_fingerprint: str | None = None
    extra: Mapping[str, Any] | None = None
    #: Other top-level fields of the answer, shown to the client as sent (``service_tier``).
    response_extra: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    """``/v1/embeddings``: ``input`` as sent (a string, strings, token ids or lists of them)."""

    request_id: str
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    dimensions: int | None = None
    encoding_format: Literal["float", "base64"] | None = None
    user: str | None = None
    body: Mapping[str, Any] | None = None
    raw: bytes | None = None
    trace_headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EmbeddingResult:
    """``data`` entries as OpenAI shapes them (``{"object", "index", "embedding"}``; the
    embedding a float list or a base64 string) and the backend's usage."""

    data: list[Mapping[str, Any]]
    usage: Usage


class BackendError(Exception):
    """A backend failed to serve a request.

    ``status`` is the HTTP status the gateway answers with; ``retryable`` says whether
    another try may work; ``fatal`` says the worker itself is broken and the runtime
    must replace it (its other requests fail too). ``headers`` go to the client with the
    error (an upstream's ``Retry-After`` and ``x-ratelimit-*``); ``param`` and ``code``
    name what was wrong, as OpenAI's error object does.
    """

    def __init__(
        self, message: str, *, status: int = 502, retryable: bool = False, fatal: bool = False,
        headers: Mapping[str, str] | None = None, param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable
        self.fatal = fatal
        self.headers = dict(headers or {})
        self.param = param
        self.code = code


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

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        """Embed ``request.input`` (only for models whose card says ``embeddings``)."""
        raise BackendError(f"backend {self.name} serves no embeddings", status=400)
