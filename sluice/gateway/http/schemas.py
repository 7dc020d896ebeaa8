"""Wire models of the OpenAI-compatible API, from OpenAI's own published types.

The request schemas are the JSON Schemas of the ``openai`` package's request TypedDicts
(``CompletionCreateParams`` of chat, completions and embeddings), so every role, content
part, tool, response format and nullable field is exactly OpenAI's. On top of them a small
overlay (:data:`_RANGES` and :func:`_close`) adds what the TypedDicts cannot say and
OpenAI's server enforces: value ranges, ``stream``, and no unknown fields at the top level
or inside a message (an assistant message may carry the fields the gateway itself
answered with, e.g. ``annotations`` or an upstream's ``reasoning_content``).

Validation is one pass of a compiled Rust validator (``jsonschema_rs``) over the parsed
body; only a body that fails is looked at again, with ``jsonschema``, to name the exact
field in OpenAI's words (``param`` like ``messages[1].content[0].type``, never a
Python type name). The validated body is then read once into the backend contract's
types (:mod:`sluice.gateway.backends.contract`).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from typing import Any

import jsonschema
import jsonschema_rs
from openai.types import completion_create_params as text_params
from openai.types import embedding_create_params as embedding_params
from openai.types.chat import completion_create_params as chat_params
from pydantic import BaseModel, TypeAdapter

from sluice.gateway.backends.contract import (
    ChatMessage,
    GenerationRequest,
    NamedToolChoice,
    ResponseFormat,
    SamplingParams,
    Tool,
    ToolCall,
    ToolChoice,
)
from sluice.gateway.errors import InvalidRequest

# -- the schemas -------------------------------------------------------------------------

_NULLABLE_BOOL = {"anyOf": [{"type": "boolean"}, {"type": "null"}]}

#: Ranges OpenAI's server enforces (its API reference), per top-level field.
_RANGES: dict[str, dict[str, Any]] = {
    "temperature": {"minimum": 0, "maximum": 2},
    "top_p": {"minimum": 0, "maximum": 1},
    "n": {"minimum": 1, "maximum": 128},
    "presence_penalty": {"minimum": -2, "maximum": 2},
    "frequency_penalty": {"minimum": -2, "maximum": 2},
    "top_logprobs": {"minimum": 0, "maximum": 20},
    "max_tokens": {"minimum": 1},
    "max_completion_tokens": {"minimum": 1},
    "seed": {"minimum": -(2**63), "maximum": 2**63 - 1},
    "best_of": {"minimum": 0, "maximum": 20},
    "dimensions": {"minimum": 1},
}
_TEXT_RANGES = {**_RANGES, "logprobs": {"minimum": 0, "maximum": 5}}
#: Chat message types that take no other fields (an assistant message may: see above).
_CLOSED_DEFS = (
    "ChatCompletionSystemMessageParam", "ChatCompletionDeveloperMessageParam",
    "ChatCompletionUserMessageParam", "ChatCompletionToolMessageParam",
    "ChatCompletionFunctionMessageParam", "ChatCompletionContentPartTextParam",
    "ChatCompletionContentPartImageParam", "ChatCompletionContentPartInputAudioParam",
    "ChatCompletionContentPartRefusalParam", "File",
)


def _bound(prop: dict[str, Any], limits: dict[str, Any]) -> None:
    """Apply ``limits`` to the numeric branch of a (possibly nullable) property."""
    branches = prop.get("anyOf", [prop])
    for branch in branches:
        if branch.get("type") in ("integer", "number"):
            branch.update(limits)


def _close(schema: dict[str, Any], ranges: dict[str, dict[str, Any]]) -> dict[str, Any]:
    schema["additionalProperties"] = False
    props = schema["properties"]
    for name, limits in ranges.items():
        if name in props:
            _bound(props[name], limits)
    if "stop" in props:  # at most 4 stop sequences, none empty
        for branch in props["stop"]["anyOf"]:
            if branch.get("type") == "array":
                branch.update(maxItems=4, items={"type": "string", "minLength": 1})
            elif branch.get("type") == "string":
                branch["minLength"] = 1
    props["stream"] = dict(_NULLABLE_BOOL, title="Stream")
    return schema


def _openai_schema(typed_dict: Any) -> dict[str, Any]:
    return TypeAdapter(typed_dict).json_schema(ref_template="#/$defs/{model}")


@functools.cache
def chat_schema() -> dict[str, Any]:
    schema = _close(_openai_schema(chat_params.CompletionCreateParamsBase), _RANGES)
    schema["properties"]["messages"]["minItems"] = 1
    defs = schema["$defs"]
    for name in _CLOSED_DEFS:
        defs[name]["additionalProperties"] = False
    assistant = defs["ChatCompletionAssistantMessageParam"]["properties"]
    # What the gateway answers with, so a client may append the message it got as is.
    assistant["annotations"] = {"anyOf": [{"type": "array"}, {"type": "null"}]}
    return schema


@functools.cache
def completion_schema() -> dict[str, Any]:
    return _close(_openai_schema(text_params.CompletionCreateParamsBase), _TEXT_RANGES)


@functools.cache
def embedding_schema() -> dict[str, Any]:
    schema = _openai_schema(embedding_params.EmbeddingCreateParams)
    schema["additionalProperties"] = False
    _bound(schema["properties"]["dimensions"], _RANGES["dimensions"])
    return schema


# -- validation and OpenAI-shaped errors -------------------------------------------------


class _Schema:
    """One request schema: a fast validator and, for failures only, an explainer that
    looks at no more than the failing field (or the failing item of an array field), so
    a large invalid body costs about what a valid one does."""

    def __init__(self, schema: dict[str, Any]) -> None:
        self.schema = schema
        self._fast = jsonschema_rs.validator_for(schema)
        self._slow: dict[tuple[str, bool], jsonschema.Draft202012Validator] = {}

    def check(self, data: Any) -> None:
        if not self._fast.is_valid(data):
            raise self._explain(data)

    def _explain(self, data: Any) -> InvalidRequest:
        props = self.schema["properties"]
        unknown = sorted(set(data) - set(props))
        if unknown:
            return InvalidRequest(f"Unrecognized request argument supplied: {unknown[0]}",
                                  param=unknown[0], code="unknown_parameter")
        missing = [name for name in self.schema.get("required", ()) if name not in data]
        if missing:
            return InvalidRequest(f"Missing required parameter: '{missing[0]}'",
                                  param=missing[0], code="missing_required_parameter")
        first = next(iter(self._fast.iter_errors(data)), None)
        where = list(first.instance_path) if first is not None else []
        if not where or where[0] not in props:  # the validators disagree: never crash
            return InvalidRequest("Invalid request body", param=None, code="invalid_value")
        name = str(where[0])
        item = len(where) > 1 and isinstance(where[1], int) and "items" in props[name]
        prefix: list[Any] = [name, where[1]] if item else [name]
        instance = data[name][where[1]] if item else data[name]
        errors = list(self._validator(name, item).iter_errors(instance))
        if not errors:
            return InvalidRequest(f"Invalid value for '{name}'", param=name,
                                  code="invalid_value")
        error = _deepest(min(errors, key=lambda e: len(e.absolute_path)))
        path = prefix + list(error.absolute_path)
        value = error.instance
        if (error.validator in ("anyOf", "oneOf") and isinstance(value, dict)
                and ("role" in value or "type" in value)):
            path.append("role" if "role" in value else "type")  # the discriminator is wrong
        param = _param(path)
        return InvalidRequest(f"Invalid value for '{param}': {_say(error)}", param=param,
                              code="invalid_type" if error.validator == "type"
                              else "invalid_value")

    def _validator(self, name: str, item: bool) -> jsonschema.Draft202012Validator:
        """A validator of one top-level field (or of one item of it), built once."""
        validator = self._slow.get((name, item))
        if validator is None:
            sub = self.schema["properties"][name]
            sub = copy.deepcopy(sub["items"] if item else sub)
            sub["$defs"] = self.schema.get("$defs", {})
            validator = self._slow[(name, item)] = jsonschema.Draft202012Validator(sub)
        return validator


def _deepest(error: jsonschema.ValidationError) -> jsonschema.ValidationError:
    """Inside an ``anyOf`` (message roles, content parts, nullable fields), the branch
    the value meant: the one whose ``role``/``type`` discriminator it matches, or else
    whose JSON type it has."""
    if error.validator not in ("anyOf", "oneOf") or not error.context:
        return error
    branches: dict[int, list[jsonschema.ValidationError]] = {}
    for sub in error.context:
        branches.setdefault(sub.schema_path[0], []).append(sub)
    instance = error.instance

    def fits(subs: list[jsonschema.ValidationError]) -> bool:
        if not isinstance(instance, dict):
            return not any(s.validator == "type" and not s.relative_path for s in subs)
        return not any(
            s.validator in ("const", "enum", "required") and len(s.relative_path) <= 1
            and (not s.relative_path or s.relative_path[0] in ("role", "type"))
            and (s.validator != "required" or "'role'" in s.message or "'type'" in s.message)
            for s in subs
        ) and not any(s.validator == "type" and not s.relative_path for s in subs)

    chosen = [subs for subs in branches.values() if fits(subs)]
    if len(chosen) == 1:
        return _deepest(max(chosen[0], key=lambda s: len(s.absolute_path)))
    return error


def _say(error: jsonschema.ValidationError) -> str:
    value = error.instance
    if error.validator in ("anyOf", "oneOf"):
        if isinstance(value, dict) and ("role" in value or "type" in value):
            key = "role" if "role" in value else "type"
            return f"{value[key]!r} is not a supported {key} here"
        kinds = [sub.validator_value for sub in error.context or ()
                 if sub.validator == "type" and not sub.relative_path]
        if kinds and len(kinds) == len({sub.schema_path[0] for sub in error.context or ()}):
            return f"expected {' or '.join(dict.fromkeys(kinds))}, got {_json_type(value)}"
        return "not any of the accepted shapes"
    if error.validator == "type":
        return f"expected {error.validator_value}, got {_json_type(value)}"
    if error.validator == "additionalProperties":
        return error.message.replace("Additional", "additional")
    return error.message


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(value), type(value).__name__)


def _param(path: Any) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


CHAT = _Schema(chat_schema())
TEXT = _Schema(completion_schema())
EMBEDDING = _Schema(embedding_schema())


# -- validated requests ------------------------------------------------------------------


class StreamOptions:
    __slots__ = ("include_usage",)

    def __init__(self, data: Mapping[str, Any] | None) -> None:
        self.include_usage = bool(data and data.get("include_usage"))


def _stop_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _logit_bias(bias: Mapping[str, Any]) -> tuple[tuple[int, float], ...]:
    """``{"token id": bias}`` as (id, bias) pairs; ids are non-negative integers and biases
    in [-100, 100], as OpenAI's API reference says."""
    pairs = []
    for token, value in bias.items():
        if not (token.isascii() and token.isdigit()):
            raise InvalidRequest(f"Invalid value for 'logit_bias': key {token!r} is not a token id",
                                 param="logit_bias", code="invalid_value")
        if not -100 <= value <= 100:
            raise InvalidRequest(f"Invalid value for 'logit_bias': the bias of token {token} is "
                                 f"{value}; biases are from -100 to 100", param="logit_bias",
                                 code="invalid_value")
        pairs.append((int(token), float(value)))
    return tuple(pairs)


def _int(value: Any) -> int | None:
    return None if value is None else int(value)  # JSON Schema counts 2.0 as an integer


class _Request:
    """Fields every generation endpoint has, read once from the validated body."""

    def __init__(self, data: dict[str, Any], raw: bytes | None) -> None:
        self.data = data
        self.raw = raw
        #: W3C trace context for backends that call out (set by the route).
        self.trace_headers: dict[str, str] = {}
        self.model: str = data["model"]
        self.temperature: float | None = data.get("temperature")
        self.top_p: float | None = data.get("top_p")
        self.n: int = _int(data.get("n")) or 1
        self.stop = data.get("stop")
        self.stream: bool = bool(data.get("stream"))
        options = data.get("stream_options")
        self.stream_options = StreamOptions(options) if options is not None else None
        self.seed: int | None = _int(data.get("seed"))
        self.user: str | None = data.get("user")
        self.presence_penalty: float | None = data.get("presence_penalty")
        self.frequency_penalty: float | None = data.get("frequency_penalty")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("The 'stream_options' parameter is only allowed when "
                                 "'stream' is enabled.", param="stream_options")

    def stops(self) -> list[str]:
        return _stop_list(self.stop)

    def logit_bias(self) -> tuple[tuple[int, float], ...]:
        bias = self.data.get("logit_bias")
        return _logit_bias(bias) if bias else ()

    def sampling(self, logprobs: bool, top_logprobs: int, choice: int = 0) -> SamplingParams:
        """Effective sampling values for choice ``choice`` of ``n`` (seeds differ)."""
        return SamplingParams(
            max_tokens=self.token_limit(),
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=None if self.seed is None else self.seed + choice,
            stop=tuple(self.stops()),
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=self.logit_bias(),
        )

    def token_limit(self) -> int | None:
        raise NotImplementedError


#: Chat fields the contract has a typed place for; the rest travel in ``extra``.
_CHAT_TYPED = frozenset({
    "model", "messages", "temperature", "top_p", "n", "stop", "stream", "stream_options",
    "seed", "user", "presence_penalty", "frequency_penalty", "max_tokens",
    "max_completion_tokens", "logprobs", "top_logprobs", "tools", "tool_choice",
    "parallel_tool_calls", "response_format", "logit_bias", "metadata",
})


class ChatCompletionRequest(_Request):
    """A validated ``/v1/chat/completions`` body."""

    schema = CHAT

    def __init__(self, data: dict[str, Any], raw: bytes | None = None) -> None:
        super().__init__(data, raw)
        self.max_tokens: int | None = _int(data.get("max_tokens"))
        self.max_completion_tokens: int | None = _int(data.get("max_completion_tokens"))
        self.logprobs: bool = bool(data.get("logprobs"))
        self.top_logprobs: int | None = _int(data.get("top_logprobs"))
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("Invalid value for 'top_logprobs': top_logprobs requires "
                                 "logprobs to be true", param="top_logprobs")
        self.messages: tuple[ChatMessage, ...] = tuple(
            _message(m) for m in data["messages"])
        self.tools: tuple[Tool, ...] = tuple(_tool(t) for t in data.get("tools") or ())
        self.tool_choice: ToolChoice | None = _tool_choice(data.get("tool_choice"))
        self.parallel_tool_calls: bool | None = data.get("parallel_tool_calls")
        self.response_format: ResponseFormat | None = _response_format(
            data.get("response_format"))
        self.metadata: Mapping[str, str] | None = data.get("metadata")
        self.extra = {k: v for k, v in data.items() if k not in _CHAT_TYPED}

    @classmethod
    def model_validate(cls, data: Any, raw: bytes | None = None) -> ChatCompletionRequest:
        CHAT.check(data)
        return cls(data, raw)

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def generation_requests(self, request_id: str) -> list[GenerationRequest]:
        """One backend request per choice of ``n``."""
        return [
            GenerationRequest(
                request_id if self.n == 1 else f"{request_id}-{i}", self.model,
                self.sampling(self.logprobs, self.top_logprobs or 0, i),
                messages=self.messages, tools=self.tools, tool_choice=self.tool_choice,
                parallel_tool_calls=self.parallel_tool_calls,
                response_format=self.response_format, user=self.user,
                metadata=self.metadata, extra=self.extra, body=self.data, raw=self.raw,
                choice_index=i, n_choices=self.n, trace_headers=self.trace_headers,
            )
            for i in range(self.n)
        ]


class CompletionRequest(_Request):
    """A validated ``/v1/completions`` body. ``prompt`` comes in OpenAI's four forms: a string,
    strings, token ids, or lists of token ids; each prompt is its own ``n`` choices."""

    schema = TEXT

    def __init__(self, data: dict[str, Any], raw: bytes | None = None) -> None:
        super().__init__(data, raw)
        self.prompts: list[str | tuple[int, ...]] = _prompts(data["prompt"])
        self.max_tokens: int | None = _int(data["max_tokens"]) if "max_tokens" in data else 16
        self.logprobs: int | None = _int(data.get("logprobs"))
        self.extra = {k: v for k, v in data.items() if k not in _CHAT_TYPED and k != "prompt"}

    @classmethod
    def model_validate(cls, data: Any, raw: bytes | None = None) -> CompletionRequest:
        TEXT.check(data)
        return cls(data, raw)

    @property
    def token_prompts(self) -> bool:
        """Whether the prompts are token ids (then the gateway cannot read them as text)."""
        return not isinstance(self.prompts[0], str)

    def prompt_texts(self) -> list[str]:
        """The text prompts (none when they are token ids)."""
        return [p for p in self.prompts if isinstance(p, str)]

    def token_limit(self) -> int | None:
        return self.max_tokens

    def generation_requests(self, request_id: str) -> list[GenerationRequest]:
        """One backend request per prompt and choice of ``n``, in OpenAI's order (choice
        ``index`` = prompt * n + choice); each prompt's choices are seeded as a request with
        that prompt alone would be."""
        logprobs = self.logprobs is not None
        many = len(self.prompts) * self.n > 1
        return [
            GenerationRequest(
                f"{request_id}-{p * self.n + i}" if many else request_id, self.model,
                self.sampling(logprobs, self.logprobs or 0, i),
                prompt=prompt if isinstance(prompt, str) else None,
                prompt_ids=None if isinstance(prompt, str) else prompt,
                user=self.user, extra=self.extra, body=self.data, raw=self.raw,
                choice_index=i, n_choices=self.n, trace_headers=self.trace_headers,
            )
            for p, prompt in enumerate(self.prompts)
            for i in range(self.n)
        ]


def _prompts(prompt: Any) -> list[str | tuple[int, ...]]:
    """OpenAI's ``prompt`` (schema-checked: a string or a list of strings, of ids or of id
    lists) as a list of prompts: strings, or tuples of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise InvalidRequest("Invalid value for 'prompt': at least one prompt is required",
                             param="prompt", code="invalid_value")
    if isinstance(prompt[0], str):
        return list(prompt)
    if isinstance(prompt[0], int):
        return [_ids(prompt)]
    return [_ids(ids) for ids in prompt]


def _ids(ids: list[int]) -> tuple[int, ...]:
    if not ids or min(ids) < 0:
        raise InvalidRequest("Invalid value for 'prompt': a token-id prompt is a non-empty "
                             "list of token ids (integers >= 0)", param="prompt",
                             code="invalid_value")
    return tuple(int(t) for t in ids)  # JSON Schema counts 2.0 as an integer


class EmbeddingRequestBody:
    """A validated ``/v1/embeddings`` body."""

    def __init__(self, data: dict[str, Any], raw: bytes | None = None) -> None:
        self.data = data
        self.raw = raw
        self.model: str = data["model"]
        self.input = data["input"]
        self.dimensions: int | None = _int(data.get("dimensions"))
        self.encoding_format = data.get("encoding_format")
        self.user: str | None = data.get("user")
        if self.input in ("", []) or (isinstance(self.input, list) and len(self.input) > 2048):
            raise InvalidRequest("Invalid value for 'input': between 1 and 2048 inputs, "
                                 "none empty", param="input")

    @classmethod
    def model_validate(cls, data: Any, raw: bytes | None = None) -> EmbeddingRequestBody:
        EMBEDDING.check(data)
        return cls(data, raw)


# -- the body's parts as contract types --------------------------------------------------

_MESSAGE_TYPED = frozenset({"role", "content", "name", "tool_calls", "tool_call_id",
                            "refusal"})


def _message(m: dict[str, Any]) -> ChatMessage:
    content = m.get("content")
    parts: tuple[Mapping[str, Any], ...] | None = None
    if isinstance(content, list):
        parts = tuple(content)
        text = "".join(p["text"] for p in content if p.get("type") == "text")
    else:
        text = content or ""
    calls = tuple(
        ToolCall(id=c["id"], name=c["function"]["name"], arguments=c["function"]["arguments"])
        if c.get("type") == "function" else
        ToolCall(id=c["id"], name=c["custom"]["name"], arguments=c["custom"]["input"],
                 type="custom")
        for c in m.get("tool_calls") or ()
    )
    extra = {k: v for k, v in m.items() if k not in _MESSAGE_TYPED} if len(m) > 2 else {}
    return ChatMessage(role=m["role"], content=text, parts=parts, name=m.get("name"),
                       tool_calls=calls, tool_call_id=m.get("tool_call_id"),
                       refusal=m.get("refusal"), extra=extra)


def _tool(t: dict[str, Any]) -> Tool:
    if t.get("type") == "custom":
        custom = t["custom"]
        return Tool(name=custom["name"], description=custom.get("description"), type="custom")
    fn = t["function"]
    return Tool(name=fn["name"], description=fn.get("description"),
                parameters=fn.get("parameters"), strict=fn.get("strict"))


def _tool_choice(value: Any) -> ToolChoice | None:
    if value is None or isinstance(value, str):
        return value
    if value.get("type") == "function":
        return NamedToolChoice(value["function"]["name"])
    if value.get("type") == "custom":
        return NamedToolChoice(value["custom"]["name"])
    return "required" if value.get("allowed_tools", {}).get("mode") == "required" else "auto"


def _response_format(value: Any) -> ResponseFormat | None:
    if value is None:
        return None
    if value["type"] == "json_schema":
        spec = value["json_schema"]
        return ResponseFormat("json_schema", schema=spec.get("schema"), name=spec.get("name"),
                              strict=spec.get("strict"))
    return ResponseFormat(value["type"])


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail
