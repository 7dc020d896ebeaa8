"""A backend that proxies to any OpenAI-compatible server (vLLM, Fireworks, OpenAI, ...).

Transparent both ways. Upstream goes the client's own request body, unchanged (its
bytes, when nothing has to change): only ``model`` becomes the upstream's name, a
streamed request gets ``stream_options.include_usage: true`` (the gateway meters from
it; the client sees the usage chunk only if it asked), and a fanned-out ``n`` goes as
``n`` calls without ``n`` (seed + i when seeded). Nothing is injected (an omitted
temperature stays omitted) and nothing is dropped. Back comes every field of the
answer: text, ``tool_calls`` (streamed fragments with index/id/name), ``refusal``,
``reasoning_content``, any other message or delta field as sent, logprobs,
``system_fingerprint``, the upstream's ``finish_reason`` and its usage with details,
which is what metering bills. A stream that ends without a ``finish_reason`` is an
error (502), not a clean stop. :meth:`count_tokens` is only an estimate (Mixtral's
tokenizer, or bytes / 4 with ``tokenizer = "none"``) used before the request is sent,
for rate limiting; it is also the fallback, with a warning, for an upstream that
reports no usage. ``/v1/embeddings`` goes through :meth:`embed` the same way.

The HTTP client is aiohttp: one ``ClientSession`` per backend instance, opened in
:meth:`start` and closed in :meth:`stop`, over a keep-alive ``TCPConnector`` of
``max_connections`` (httpx's client cost 1.4-2.6 ms of CPU per proxied request).
``connect_timeout_s`` bounds getting a connection (pool wait included) and
``timeout_s`` every wait for upstream bytes of a stream, so a long generation that keeps
streaming never times out; a non-streamed answer, which comes only once generated, may
take ``answer_timeout_s``.

Failures become :class:`BackendError`::

    connect error / connect or pool timeout  -> 503, retryable
    read timeout (no bytes for timeout_s)    -> 504, retryable
    broken connection, bad stream            -> 502, retryable
    upstream 429                             -> 429, retryable (Retry-After, x-ratelimit-*)
    upstream 503                             -> 503, retryable (Retry-After, x-ratelimit-*)
    upstream 401 / 403 (our credentials)     -> 502
    other upstream 4xx                       -> 400, with the upstream's message and param
    upstream 5xx                             -> 502, retryable
    stream ended without finish_reason       -> 502
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any, Literal, get_args

import aiohttp
import orjson
from pydantic import Field
from yarl import URL

from sluice.gateway.backends.contract import (
    Backend,
    BackendError,
    BackendOptions,
    Capability,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationEvent,
    GenerationRequest,
    ModelCard,
    TokenLogprob,
    ToolCallDelta,
    Usage,
)
from sluice.plugins._tokenizer import MixtralTokenizer

log = logging.getLogger("sluice.plugins.openai_upstream")

#: Delta / message fields read into the event's own fields; every other one is passed on.
_KNOWN = frozenset({"role", "content", "tool_calls", "refusal", "reasoning_content"})
#: Top-level answer fields the gateway writes itself; every other one is passed on.
_OWN_FIELDS = frozenset({"id", "object", "created", "model", "choices", "usage",
                         "system_fingerprint"})
#: Upstream response headers a client needs to back off.
_PASSED_HEADERS = ("retry-after", "retry-after-ms")


class OpenAIUpstreamBackend(Backend):
    name = "openai_upstream"

    class Options(BackendOptions):
        base_url: str  # e.g. http://127.0.0.1:9000/v1
        api_key: str | None = None
        models: dict[str, str] = Field(min_length=1)  # served name -> upstream model name
        timeout_s: float = Field(default=60.0, gt=0)
        #: A non-streamed answer comes in one piece, after the whole generation.
        answer_timeout_s: float = Field(default=600.0, gt=0)
        connect_timeout_s: float = Field(default=5.0, gt=0)
        max_connections: int = Field(default=256, ge=1)
        #: How count_tokens estimates prompts (the upstream's usage is what gets metered).
        tokenizer: Literal["mistral", "none"] = "mistral"
        #: What the upstream's models serve (shown in /v1/models; the gateway refuses the
        #: rest with a 400). Default: everything, the upstream answers for itself.
        capabilities: tuple[Capability, ...] = get_args(Capability)
        #: ``gen_ai.provider.name`` in traces and metrics (e.g. openai, azure.ai.openai).
        provider: str = "openai"

    def __init__(self, options: BackendOptions) -> None:
        if not isinstance(options, OpenAIUpstreamBackend.Options):
            raise TypeError(
                f"OpenAIUpstreamBackend needs its Options, got {type(options).__name__}"
            )
        super().__init__(options)
        self.opts = options
        url = URL(options.base_url)
        path = url.path.rstrip("/")
        # parsed once, not per request; a query string (e.g. api-version) is kept
        self._urls = {
            kind: url.with_path(f"{path}/{kind}", keep_query=True)
            for kind in ("chat/completions", "completions", "embeddings")
        }
        # what error messages may show: no user:password, no query string
        port = url.explicit_port
        self._where = f"{url.scheme}://{url.host}" + (f":{port}" if port else "")
        self.tokenizer = MixtralTokenizer() if options.tokenizer == "mistral" else None
        self._session: aiohttp.ClientSession | None = None
        self._answer_timeout = aiohttp.ClientTimeout(
            total=None, connect=options.connect_timeout_s, sock_read=options.answer_timeout_s)
        self._warned_no_usage = False

    def models(self) -> list[ModelCard]:
        capabilities = frozenset(self.opts.capabilities)
        return [ModelCard(id=served, owned_by="upstream", capabilities=capabilities,
                          provider=self.opts.provider, prompt_per_choice=True)
                for served in self.opts.models]

    async def start(self) -> None:
        opts = self.opts
        headers = {"content-type": "application/json"}
        if opts.api_key:
            headers["authorization"] = f"Bearer {opts.api_key}"
        self._session = aiohttp.ClientSession(
            headers=headers,
            connector=aiohttp.TCPConnector(limit=opts.max_connections, limit_per_host=0),
            timeout=aiohttp.ClientTimeout(
                total=None, connect=opts.connect_timeout_s, sock_read=opts.timeout_s
            ),
            # no accept-encoding is sent, so the upstream answers uncompressed: skip the decoder
            skip_auto_headers=("accept-encoding",),
            auto_decompress=False,
        )

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def count_tokens(self, request: GenerationRequest) -> int:
        if self.tokenizer is not None:
            return self.tokenizer.count_prompt(request)
        if request.prompt_ids is not None:
            return len(request.prompt_ids)
        if request.messages is None:
            text_bytes = len((request.prompt or "").encode())
        else:
            text_bytes = sum(len(m.content.encode()) + 4 for m in request.messages)
        return 1 + (text_bytes + 3) // 4

    def _count_completion(self, text: str, chunks: int) -> int:
        return len(self.tokenizer.encode(text)) if self.tokenizer is not None else chunks

    def _upstream_model(self, model: str) -> str:
        upstream_model = self.opts.models.get(model)
        if upstream_model is None:
            raise BackendError(f"model '{model}' is not served here", status=404)
        return upstream_model

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        session = self._started()
        upstream_model = self._upstream_model(request.model)
        chat = request.messages is not None
        body, stream = _forwarded_body(request, upstream_model)
        text_parts: list[str] = []
        streamed = 0  # completion tokens already reported in deltas
        finish: str | None = None
        usage: Usage | None = None
        fingerprint: str | None = None
        top: dict[str, Any] | None = None
        url = self._urls["chat/completions" if chat else "completions"]
        headers = {"accept": "text/event-stream" if stream else "application/json",
                   **request.trace_headers}
        try:
            # a stream: the session's per-read timeout; a whole answer: answer_timeout_s
            timeout = {} if stream else {"timeout": self._answer_timeout}
            async with session.post(url, data=body, headers=headers, **timeout) as response:
                if response.status != 200:
                    raise self._status_error(response, await response.read())
                if not stream:
                    yield self._whole_answer(request, orjson.loads(await response.read()), chat)
                    return
                async for data in _sse_data(response.content):
                    if data == b"[DONE]":
                        continue  # read on to the body's end, so the connection is reused
                    chunk = orjson.loads(data)
                    if "error" in chunk:
                        raise BackendError(
                            f"upstream error mid-stream: {_error_message(chunk)}", status=502
                        )
                    if chunk.get("usage"):
                        usage = _usage(chunk["usage"])
                    fingerprint = chunk.get("system_fingerprint") or fingerprint
                    top = _top_fields(chunk)
                    for choice in chunk.get("choices") or ():
                        event = _delta(choice, chat, fingerprint=fingerprint, top=top)
                        if choice.get("finish_reason"):
                            finish = choice["finish_reason"]
                        if event is not None:
                            text_parts.append(event.text)
                            streamed += event.tokens
                            yield event
        except aiohttp.ClientConnectorError as exc:
            raise BackendError(f"upstream {self._where} unreachable: {_reason(exc.os_error)}",
                               status=503, retryable=True) from None
        except aiohttp.ConnectionTimeoutError:  # connecting, or waiting for a pooled connection
            raise BackendError(f"upstream {self._where}: no connection in time",
                               status=503, retryable=True) from None
        except TimeoutError:  # aiohttp.SocketTimeoutError: no bytes for timeout_s
            raise BackendError(f"upstream {self._where} timed out",
                               status=504, retryable=True) from None
        except (aiohttp.ClientError, orjson.JSONDecodeError) as exc:
            raise BackendError(f"upstream {self._where} broke the stream: {_reason(exc)}",
                               status=502, retryable=True) from None

        if finish is None:
            # The answer was cut short: never pass that off as a clean stop. With nothing
            # passed on yet, another backend may still answer it whole (retryable).
            raise BackendError(f"upstream {self._where} ended the stream before the answer "
                               "was finished (no finish_reason)", status=502,
                               retryable=not text_parts)
        if usage is None:
            usage = self._local_usage(request, "".join(text_parts), streamed)
        yield GenerationEvent(
            tokens=max(0, usage.completion_tokens - streamed),
            finish_reason=finish,  # type: ignore[arg-type]  # the upstream's, as sent
            usage=usage,
            system_fingerprint=fingerprint,
            response_extra=top,
        )

    def _whole_answer(self, request: GenerationRequest, answer: dict[str, Any], chat: bool
                      ) -> GenerationEvent:
        """A non-streamed upstream answer as one event (n=1: one choice)."""
        choices = answer.get("choices") or [{}]
        event = _delta(choices[0], chat, whole=True) or GenerationEvent()
        finish = choices[0].get("finish_reason")
        if not finish:
            raise BackendError(f"upstream {self._where} answered without a finish_reason",
                               status=502)
        usage = (_usage(answer["usage"]) if answer.get("usage")
                 else self._local_usage(request, event.text, event.tokens))
        return GenerationEvent(
            text=event.text, tokens=usage.completion_tokens, finish_reason=finish,
            usage=usage, logprobs=event.logprobs, tool_calls=event.tool_calls,
            refusal=event.refusal, reasoning=event.reasoning,
            system_fingerprint=answer.get("system_fingerprint"), extra=event.extra,
            response_extra=_top_fields(answer),
        )

    def _local_usage(self, request: GenerationRequest, text: str, streamed: int) -> Usage:
        if not self._warned_no_usage:
            self._warned_no_usage = True
            log.warning(
                "upstream %s sent no usage; counting tokens locally (%s), which may "
                "differ from the upstream's own count", self._where, self.opts.tokenizer,
            )
        return Usage(prompt_tokens=self.count_tokens(request),
                     completion_tokens=self._count_completion(text, streamed))

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        session = self._started()
        upstream_model = self._upstream_model(request.model)
        if request.body is not None:
            body = _with_model(request.body, request.raw, upstream_model)
        else:
            fields = {"model": upstream_model, "input": request.input,
                      "dimensions": request.dimensions,
                      "encoding_format": request.encoding_format, "user": request.user}
            body = orjson.dumps({k: v for k, v in fields.items() if v is not None})
        try:
            async with session.post(self._urls["embeddings"], data=body,
                                    headers={"accept": "application/json",
                                             **request.trace_headers}) as response:
                content = await response.read()
                if response.status != 200:
                    raise self._status_error(response, content)
        except aiohttp.ClientConnectorError as exc:
            raise BackendError(f"upstream {self._where} unreachable: {_reason(exc.os_error)}",
                               status=503, retryable=True) from None
        except TimeoutError:
            raise BackendError(f"upstream {self._where} timed out",
                               status=504, retryable=True) from None
        except aiohttp.ClientError as exc:
            raise BackendError(f"upstream {self._where} failed: {_reason(exc)}",
                               status=502, retryable=True) from None
        try:
            answer = orjson.loads(content)
            usage = answer.get("usage") or {}
            return EmbeddingResult(data=list(answer["data"]),
                                   usage=Usage(int(usage.get("prompt_tokens") or 0), 0))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            raise BackendError(f"upstream {self._where} sent a malformed embeddings answer",
                               status=502) from None

    def _started(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise BackendError("openai_upstream backend is not started", status=503,
                               retryable=True)
        return self._session

    def _status_error(self, response: aiohttp.ClientResponse, content: bytes) -> BackendError:
        status = response.status
        payload = _json_or_none(content)
        message = _error_message(payload)
        headers = {name: value for name, value in response.headers.items()
                   if name.lower() in _PASSED_HEADERS or name.lower().startswith("x-ratelimit-")}
        if status in (429, 503):
            what = "rate limit" if status == 429 else "unavailable"
            return BackendError(f"upstream {what}: {message}", status=status, retryable=True,
                                headers=headers)
        if status in (401, 403):
            return BackendError(f"upstream rejected the gateway's credentials ({status})",
                                status=502)
        if 400 <= status < 500:
            error = payload.get("error") if isinstance(payload, dict) else None
            param = error.get("param") if isinstance(error, dict) else None
            code = error.get("code") if isinstance(error, dict) else None
            return BackendError(message, status=400, param=param if isinstance(param, str)
                                else None, code=code if isinstance(code, str) else None)
        return BackendError(f"upstream {self._where} failed ({status}): {message}",
                            status=502, retryable=True, headers=headers)


def _forwarded_body(request: GenerationRequest, upstream_model: str) -> tuple[bytes, bool]:
    """What goes upstream, and whether it is a stream: the client's body as sent, with
    only what the gateway must change (see the module's docstring)."""
    body = request.body
    if body is None:  # a request the gateway made itself (e.g. the guard model's)
        return orjson.dumps(_request_body(request, upstream_model)), True
    stream = bool(body.get("stream"))
    changes: dict[str, Any] = {}
    drop: tuple[str, ...] = ()
    if body.get("model") != upstream_model:
        changes["model"] = upstream_model
    if request.messages is None and _several_prompts(body.get("prompt")):
        # a list of prompts is fanned out as n is: each call takes its own, as sent
        changes["prompt"] = request.prompt if request.prompt_ids is None else list(request.prompt_ids)
    if request.n_choices > 1:
        drop = ("n",)
        if body.get("seed") is not None:
            changes["seed"] = body["seed"] + request.choice_index
    if stream and not (body.get("stream_options") or {}).get("include_usage"):
        changes["stream_options"] = {**(body.get("stream_options") or {}),
                                     "include_usage": True}
    if not changes and not drop and request.raw is not None:
        return request.raw, stream
    out = {k: v for k, v in body.items() if k not in drop}
    out.update(changes)
    return orjson.dumps(out), stream


def _several_prompts(prompt: Any) -> bool:
    """A /v1/completions ``prompt`` of more than one prompt (strings or token-id lists)."""
    return isinstance(prompt, list) and len(prompt) > 1 and not isinstance(prompt[0], int)


def _with_model(body: Mapping[str, Any], raw: bytes | None, upstream_model: str) -> bytes:
    if body.get("model") == upstream_model and raw is not None:
        return raw
    return orjson.dumps({**body, "model": upstream_model})


def _request_body(request: GenerationRequest, upstream_model: str) -> dict[str, Any]:
    """A body from the typed request, for requests without a client body: the sampling
    values as given (the gateway's own requests set what they mean)."""
    s = request.sampling
    body: dict[str, Any] = {
        "model": upstream_model,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": s.temperature,
        "top_p": s.top_p,
    }
    if request.messages is not None:
        body["messages"] = [_message_dict(m) for m in request.messages]
        if s.logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = s.top_logprobs
    else:
        body["prompt"] = request.prompt if request.prompt_ids is None else list(request.prompt_ids)
        if s.logprobs:
            body["logprobs"] = s.top_logprobs  # legacy completions: an int
    if s.max_tokens is not None:
        body["max_tokens"] = s.max_tokens
    if s.stop:
        body["stop"] = list(s.stop)
    if s.seed is not None:
        body["seed"] = s.seed
    if s.presence_penalty:
        body["presence_penalty"] = s.presence_penalty
    if s.frequency_penalty:
        body["frequency_penalty"] = s.frequency_penalty
    if s.top_k != -1:
        body["top_k"] = s.top_k  # not OpenAI's; vLLM and most open servers accept it
    if request.user is not None:
        body["user"] = request.user
    return body


def _message_dict(m: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role,
                           "content": list(m.parts) if m.parts is not None else m.content}
    if m.name is not None:
        out["name"] = m.name
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function",
                              "function": {"name": c.name, "arguments": c.arguments}}
                             for c in m.tool_calls]
    return out


async def _sse_data(body: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """The ``data:`` payloads of an SSE stream (one JSON object per event here)."""
    buffer = b""
    async for raw in body.iter_any():  # whatever has arrived: often the whole answer at once
        buffer += raw
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if line.startswith(b"data:"):
                yield line[5:].strip()
    if buffer.startswith(b"data:"):
        yield buffer[5:].strip()


def _usage(data: dict[str, Any]) -> Usage:
    return Usage(
        prompt_tokens=int(data.get("prompt_tokens") or 0),
        completion_tokens=int(data.get("completion_tokens") or 0),
        prompt_tokens_details=data.get("prompt_tokens_details"),
        completion_tokens_details=data.get("completion_tokens_details"),
    )


def _top_fields(answer: dict[str, Any]) -> dict[str, Any] | None:
    return {k: v for k, v in answer.items() if k not in _OWN_FIELDS} or None


def _delta(choice: dict[str, Any], chat: bool, whole: bool = False,
           fingerprint: str | None = None, top: dict[str, Any] | None = None
           ) -> GenerationEvent | None:
    """One choice of a chunk (a ``delta``) or of a whole answer (a ``message``)."""
    if not chat:
        text = choice.get("text") or ""
        logprobs = _completion_logprobs(choice.get("logprobs"))
        if not text and not logprobs:
            return None
        return GenerationEvent(text=text, tokens=len(logprobs) or 1, logprobs=logprobs,
                               system_fingerprint=fingerprint, response_extra=top)
    delta = (choice.get("message") if whole else choice.get("delta")) or {}
    text = delta.get("content") or ""
    logprobs = _chat_logprobs(choice.get("logprobs"))
    calls = tuple(_tool_call(i, c) for i, c in enumerate(delta.get("tool_calls") or ()))
    refusal = delta.get("refusal") or ""
    reasoning = delta.get("reasoning_content") or ""
    extra = {k: v for k, v in delta.items() if k not in _KNOWN and v is not None}
    if not (text or logprobs or calls or refusal or reasoning or extra):
        return None
    return GenerationEvent(text=text, tokens=len(logprobs) or 1, logprobs=logprobs,
                           tool_calls=calls, refusal=refusal, reasoning=reasoning,
                           system_fingerprint=fingerprint, extra=extra or None,
                           response_extra=top)


def _tool_call(position: int, call: dict[str, Any]) -> ToolCallDelta:
    function = call.get("function") or call.get("custom") or {}
    arguments = function.get("arguments", function.get("input")) or ""
    return ToolCallDelta(index=int(call.get("index", position)), id=call.get("id"),
                         name=function.get("name"), arguments=arguments,
                         type=call.get("type"))


def _chat_logprobs(data: dict[str, Any] | None) -> tuple[TokenLogprob, ...]:
    if not data or not data.get("content"):
        return ()
    return tuple(
        TokenLogprob(
            token=item["token"],
            logprob=float(item["logprob"]),
            top=tuple((t["token"], float(t["logprob"])) for t in item.get("top_logprobs") or ()),
        )
        for item in data["content"]
    )


def _completion_logprobs(data: dict[str, Any] | None) -> tuple[TokenLogprob, ...]:
    if not data or not data.get("tokens"):
        return ()
    tops = data.get("top_logprobs") or [None] * len(data["tokens"])
    return tuple(
        TokenLogprob(
            token=token,
            logprob=float(logprob if logprob is not None else 0.0),
            top=tuple((t, float(lp)) for t, lp in (top or {}).items()),
        )
        for token, logprob, top in zip(data["tokens"], data["token_logprobs"], tops, strict=False)
    )


def _json_or_none(content: bytes) -> Any:
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        return content.decode(errors="replace")[:500] or None


def _error_message(payload: Any) -> str:
    if isinstance(payload, dict):
        error = payload.get("error", payload)
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if payload.get("message"):
            return str(payload["message"])
    if isinstance(payload, str):
        return payload
    return "no error message"


def _reason(exc: Exception) -> str:
    """The exception's kind and text (never the request URL, which may hold credentials)."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
