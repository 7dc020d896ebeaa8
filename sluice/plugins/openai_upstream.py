"""A backend that proxies to any OpenAI-compatible server (vLLM, Fireworks, OpenAI, ...).

Every request goes upstream with ``stream: true`` and
``stream_options.include_usage: true``; the SSE chunks become
:class:`GenerationEvent` deltas and the upstream's own ``usage`` is the final
Usage, so metering bills what the upstream reports. :meth:`count_tokens` is
only an estimate (Mixtral's tokenizer, or bytes / 4 with ``tokenizer = "none"``)
used before the request is sent, for rate limiting; it is also the fallback,
with a warning, for an upstream that reports no usage.

The HTTP client is aiohttp: one ``ClientSession`` per backend instance, opened in
:meth:`start` and closed in :meth:`stop`, over a keep-alive ``TCPConnector`` of
``max_connections`` (httpx's client cost 1.4-2.6 ms of CPU per proxied request).
``connect_timeout_s`` bounds getting a connection (pool wait included) and
``timeout_s`` every wait for upstream bytes, so a long generation that keeps
streaming never times out.

Failures become :class:`BackendError`::

    connect error / connect or pool timeout  -> 503, retryable
    read timeout (no bytes for timeout_s)    -> 504, retryable
    broken connection, bad stream            -> 502, retryable
    upstream 429                             -> 429, retryable
    upstream 401 / 403 (our credentials)     -> 502
    other upstream 4xx                       -> 400, with the upstream's message
    upstream 5xx                             -> 502, retryable
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any, Literal

import aiohttp
import orjson
from pydantic import Field
from yarl import URL

from sluice.gateway.backends.contract import (
    Backend,
    BackendError,
    BackendOptions,
    FinishReason,
    GenerationEvent,
    GenerationRequest,
    ModelCard,
    TokenLogprob,
    Usage,
)
from sluice.plugins._tokenizer import MixtralTokenizer

log = logging.getLogger("sluice.plugins.openai_upstream")

_FINISH: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "content_filter": "content_filter",
    "tool_calls": "stop",
    "function_call": "stop",
}


class OpenAIUpstreamBackend(Backend):
    name = "openai_upstream"

    class Options(BackendOptions):
        base_url: str  # e.g. http://127.0.0.1:9000/v1
        api_key: str | None = None
        models: dict[str, str] = Field(min_length=1)  # served name -> upstream model name
        timeout_s: float = Field(default=60.0, gt=0)
        connect_timeout_s: float = Field(default=5.0, gt=0)
        max_connections: int = Field(default=256, ge=1)
        #: How count_tokens estimates prompts (the upstream's usage is what gets metered).
        tokenizer: Literal["mistral", "none"] = "mistral"

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
        self._urls = {True: url.with_path(path + "/chat/completions", keep_query=True),
                      False: url.with_path(path + "/completions", keep_query=True)}
        # what error messages may show: no user:password, no query string
        port = url.explicit_port
        self._where = f"{url.scheme}://{url.host}" + (f":{port}" if port else "")
        self.tokenizer = MixtralTokenizer() if options.tokenizer == "mistral" else None
        self._session: aiohttp.ClientSession | None = None
        self._warned_no_usage = False

    def models(self) -> list[ModelCard]:
        return [ModelCard(id=served, owned_by="upstream") for served in self.opts.models]

    async def start(self) -> None:
        opts = self.opts
        headers = {"accept": "text/event-stream", "content-type": "application/json"}
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
        if request.messages is None:
            text_bytes = len((request.prompt or "").encode())
        else:
            text_bytes = sum(len(m.content.encode()) + 4 for m in request.messages)
        return 1 + (text_bytes + 3) // 4

    def _count_completion(self, text: str, chunks: int) -> int:
        return len(self.tokenizer.encode(text)) if self.tokenizer is not None else chunks

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        if self._session is None:
            raise BackendError("openai_upstream backend is not started", status=503, retryable=True)
        upstream_model = self.opts.models.get(request.model)
        if upstream_model is None:
            raise BackendError(f"model '{request.model}' is not served here", status=404)
        chat = request.messages is not None
        body = orjson.dumps(_request_body(request, upstream_model))
        text_parts: list[str] = []
        streamed = 0  # completion tokens already reported in deltas
        finish: FinishReason | None = None
        usage: Usage | None = None
        try:
            async with self._session.post(self._urls[chat], data=body) as response:
                if response.status != 200:
                    raise self._status_error(response.status, response.headers.get("retry-after"),
                                             await response.read())
                async for data in _sse_data(response.content):
                    if data == b"[DONE]":
                        continue  # read on to the body's end, so the connection is reused
                    chunk = orjson.loads(data)
                    if "error" in chunk:
                        raise BackendError(
                            f"upstream error mid-stream: {_error_message(chunk)}", status=502
                        )
                    if chunk.get("usage"):
                        usage = Usage(
                            prompt_tokens=int(chunk["usage"].get("prompt_tokens") or 0),
                            completion_tokens=int(chunk["usage"].get("completion_tokens") or 0),
                        )
                    for choice in chunk.get("choices") or ():
                        event = _delta(choice, chat)
                        if choice.get("finish_reason"):
                            finish = _FINISH.get(choice["finish_reason"], "stop")
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

        if usage is None:
            if not self._warned_no_usage:
                self._warned_no_usage = True
                log.warning(
                    "upstream %s sent no usage; counting tokens locally (%s), which may "
                    "differ from the upstream's own count", self._where, self.opts.tokenizer,
                )
            usage = Usage(
                prompt_tokens=self.count_tokens(request),
                completion_tokens=self._count_completion("".join(text_parts), streamed),
            )
        yield GenerationEvent(
            tokens=max(0, usage.completion_tokens - streamed),
            finish_reason=finish or "stop",
            usage=usage,
        )

    def _status_error(self, status: int, retry_after: str | None, content: bytes
                      ) -> BackendError:
        message = _error_message(_json_or_none(content))
        if status == 429:
            hint = f" (retry after {retry_after}s)" if retry_after else ""
            return BackendError(f"upstream rate limit: {message}{hint}", status=429, retryable=True)
        if status in (401, 403):
            return BackendError(f"upstream rejected the gateway's credentials ({status})",
                                status=502)
        if 400 <= status < 500:
            return BackendError(message, status=400)
        return BackendError(f"upstream {self._where} failed ({status}): {message}",
                            status=502, retryable=True)


def _request_body(request: GenerationRequest, upstream_model: str) -> dict[str, Any]:
    s = request.sampling
    body: dict[str, Any] = {
        "model": upstream_model,
        "stream": True,
        "stream_options": {"include_usage": True},
        "n": 1,
        "temperature": s.temperature,
        "top_p": s.top_p,
    }
    if request.messages is not None:
        body["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
        if s.logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = s.top_logprobs
    else:
        body["prompt"] = request.prompt
        if s.logprobs:
            body["logprobs"] = s.top_logprobs  # legacy completions: an int
    if s.max_tokens is not None:
        body["max_tokens"] = s.max_tokens
    if s.stop:
        body["stop"] = list(s.stop)
    if s.seed is not None:
        body["seed"] = s.seed
    if s.top_k != -1:
        body["top_k"] = s.top_k  # not OpenAI's; vLLM and most open servers accept it
    return body


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


def _delta(choice: dict[str, Any], chat: bool) -> GenerationEvent | None:
    if chat:
        text = (choice.get("delta") or {}).get("content") or ""
        logprobs = _chat_logprobs(choice.get("logprobs"))
    else:
        text = choice.get("text") or ""
        logprobs = _completion_logprobs(choice.get("logprobs"))
    if not text and not logprobs:
        return None
    return GenerationEvent(text=text, tokens=len(logprobs) or 1, logprobs=logprobs)


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
