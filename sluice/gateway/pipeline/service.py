"""The request path of /v1/chat/completions and /v1/completions.

:class:`Gateway` holds the stages (authenticator, registry, admission, guardrails,
runtime, meter, audit, telemetry) created in ``create_app``; a :class:`Call` is one
request travelling through them. However a call ends — finished, refused, failed, or the
client gone mid-stream — ``finish`` records exactly one usage event for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace

from sluice.gateway.accounts.tenants import Accounts
from sluice.gateway.ledger.audit import AuditLog
from sluice.gateway.accounts.auth import Principal
from sluice.gateway.backends.contract import (
    BackendError,
    ChatMessage,
    GenerationEvent,
    GenerationRequest,
    SamplingParams,
    TokenLogprob,
    Usage,
)
from sluice.gateway.errors import (
    InvalidRequest,
    NotFound,
    ServiceUnavailable,
    SluiceError,
    UpstreamFailed,
    from_status,
)
from sluice.gateway.http.formats import ChatFormat, TextFormat, usage_dict
from sluice.gateway.pipeline.guard import StreamBlocked
from sluice.gateway.ledger.metering import Meter, UsageRecord
from sluice.gateway.backends.registry import ModelRegistry
from sluice.gateway.pipeline.ratelimit import Admission as LimiterAdmission
from sluice.gateway.backends.runtime import Pool, Runtime
from sluice.gateway.http.schemas import ChatCompletionRequest, CompletionRequest
from sluice.gateway.settings import Settings
from sluice.gateway.pipeline.stages import Admission, Authenticator, Guardrails, violation
from sluice.gateway.http.streaming import DONE, sse
from sluice.gateway.telemetry import Telemetry, gen_ai_attributes

log = logging.getLogger("sluice.service")

CLIENT_CLOSED = 499  # nginx's status for a client that went away; recorded, never sent


@dataclass
class Choice:
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
    request_id: str
    endpoint: str
    principal: Principal
    model: str
    pool: Pool
    requests: list[GenerationRequest]
    count_prompt: Callable[[], int]  # the backend's token count, asked for only when needed
    prompt_text: str
    conversation: list[tuple[str, str]]
    reserve_tokens: int
    fmt: ChatFormat | TextFormat
    span: Any
    stream: bool = False
    include_usage: bool = False
    want_logprobs: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.perf_counter)
    ttft_s: float | None = None
    status: int = 200
    choices: list[Choice] = field(default_factory=list)
    admission: LimiterAdmission | None = None
    headers: dict[str, str] = field(default_factory=dict)
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


class Gateway:
    def __init__(
        self,
        settings: Settings,
        *,
        auth: Authenticator,
        accounts: Accounts,
        registry: ModelRegistry,
        runtime: Runtime,
        probes: dict[str, Any],
        admission: Admission,
        guardrails: Guardrails,
        meter: Meter,
        audit: AuditLog,
        telemetry: Telemetry,
    ) -> None:
        self.settings = settings
        self.auth = auth
        self.keys = auth.keys
        self.accounts = accounts
        self.registry = registry
        self.runtime = runtime
        self.admission = admission
        self.guardrails = guardrails
        self.meter = meter
        self.audit = audit
        self.telemetry = telemetry
        # One never-started instance per backend, for what needs no worker (token counts).
        self._probes = probes

    # -- building a call ---------------------------------------------------------------

    def chat_call(self, request_id: str, principal: Principal, body: ChatCompletionRequest,
                  span: Any) -> Call:
        messages = tuple(ChatMessage(m.role, m.text()) for m in body.messages)
        conversation = [(m.role, m.content) for m in messages]
        last_user = next(content for role, content in reversed(conversation) if role == "user")
        return self._call(
            request_id, principal, body, span, endpoint="chat", fmt=ChatFormat(),
            make=lambda rid, sp: GenerationRequest(rid, body.model, sp, messages=messages),
            prompt_text=last_user, conversation=conversation,
            logprobs=body.logprobs, top_logprobs=body.top_logprobs or 0,
        )

    def completion_call(self, request_id: str, principal: Principal, body: CompletionRequest,
                        span: Any) -> Call:
        prompt = body.prompt_text()
        return self._call(
            request_id, principal, body, span, endpoint="completions", fmt=TextFormat(),
            make=lambda rid, sp: GenerationRequest(rid, body.model, sp, prompt=prompt),
            prompt_text=prompt, conversation=[("user", prompt)],
            logprobs=body.logprobs is not None, top_logprobs=body.logprobs or 0,
        )

    def _call(self, request_id: str, principal: Principal,
              body: ChatCompletionRequest | CompletionRequest, span: Any, *, endpoint: str,
              fmt: ChatFormat | TextFormat, make: Any, prompt_text: str,
              conversation: list[tuple[str, str]], logprobs: bool, top_logprobs: int) -> Call:
        route = self.registry.get(body.model)
        if route is None:
            raise NotFound(
                f"The model '{body.model}' does not exist", param="model", code="model_not_found"
            )
        principal.check_model(body.model)
        if body.n > self.settings.max_n:
            raise InvalidRequest(f"n must be at most {self.settings.max_n}", param="n")
        if self.settings.db_outage == "refuse" and not self.meter.healthy:
            raise ServiceUnavailable("usage cannot be recorded right now; try again shortly")
        requests = []
        for i in range(body.n):
            sampling = SamplingParams(
                max_tokens=body.token_limit(),
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                seed=None if body.seed is None else body.seed + i,
                stop=tuple(body.stops()),
                logprobs=logprobs,
                top_logprobs=top_logprobs,
            )
            rid = request_id if body.n == 1 else f"{request_id}-{i}"
            requests.append(make(rid, sampling))
        card = route.card
        reserve = body.token_limit() or card.context_length or self.settings.default_reserve_tokens
        span.set_attributes(gen_ai_attributes(model=body.model, operation=endpoint,
                                              system=route.backend_name))
        return Call(
            request_id=request_id,
            endpoint=endpoint,
            principal=principal,
            model=body.model,
            pool=self.runtime.pools[route.backend_name],
            requests=requests,
            count_prompt=functools.partial(self._probes[route.backend_name].count_tokens,
                                           requests[0]),
            prompt_text=prompt_text,
            conversation=conversation,
            reserve_tokens=reserve,
            fmt=fmt,
            span=span,
            stream=body.stream,
            include_usage=bool(body.stream_options and body.stream_options.include_usage),
            want_logprobs=logprobs,
            choices=[Choice(logprobs=[] if logprobs else None) for _ in requests],
        )

    def stage(self, call: Call, name: str) -> Any:
        """A child span of the call's request span (nothing at all when tracing is off:
        even no-op spans cost a few percent of a request)."""
        if not self.telemetry.tracing:
            return contextlib.nullcontext()
        return self.telemetry.tracer.start_as_current_span(
            name, context=trace.set_span_in_context(call.span))

    async def admit(self, call: Call) -> None:
        """Rate limits, then the input guard. A refusal still ends the call (one usage row)."""
        try:
            with self.stage(call, "ratelimit"):
                await self.admission.admit(call)
            with self.stage(call, "guard.input"):
                await self.guardrails.check_input(call)
        except BaseException as exc:
            self._fail(call, exc)
            self.finish(call)
            raise

    # -- running it --------------------------------------------------------------------

    async def complete(self, call: Call) -> dict[str, Any]:
        """Run every choice to the end, check the answers, and return the response body."""
        try:
            async for _ in self._events(call):
                pass
            with self.stage(call, "guard.output"):
                for choice in call.choices:
                    await self.guardrails.check_output(call, "".join(choice.text))
        except (asyncio.CancelledError, GeneratorExit):
            call.status = CLIENT_CLOSED
            raise
        except BaseException as exc:
            self._fail(call, exc)
            raise _as_sluice_error(exc) from None
        finally:
            self.finish(call)
        return {
            "id": call.response_id,
            "object": call.fmt.object,
            "created": call.created,
            "model": call.model,
            "choices": [
                call.fmt.choice(i, "".join(c.text), c.finish_reason, c.logprobs)
                for i, c in enumerate(call.choices)
            ],
            "usage": call.usage(),
            "system_fingerprint": None,
        }

    async def stream(self, call: Call) -> AsyncIterator[bytes]:
        """The SSE body. Tokens are counted as they are handed to the transport, so a
        client that goes away is billed for what it was sent. With the output guard on,
        text is released once a rolling-window check has covered it."""
        head = {"id": call.response_id, "object": call.fmt.chunk_object, "created": call.created,
                "model": call.model, "system_fingerprint": None}
        first = [True] * len(call.requests)
        guards = [self.guardrails.stream(call) for _ in call.requests]

        def chunk(index: int, text: str | None, finish: str | None,
                  lps: list[TokenLogprob] | None) -> bytes:
            body = {**head, "choices": [call.fmt.delta(index, text, finish, lps, first[index])]}
            if call.include_usage:
                body["usage"] = None
            first[index] = False
            return sse(body)

        try:
            async for index, event in self._events(call):
                text: str | None = event.text
                guard = guards[index]
                if guard is not None:
                    text = await guard.feed(event.text) if event.text else ""
                    if event.finish_reason:
                        text += await guard.finish()
                lps = list(event.logprobs) if call.want_logprobs else None
                if text or first[index] or event.finish_reason:
                    yield chunk(index, text if text or first[index] else None,
                                event.finish_reason, lps)
            if call.include_usage:
                yield sse({**head, "choices": [], "usage": call.usage()})
            yield DONE
        except (asyncio.CancelledError, GeneratorExit):
            call.status = CLIENT_CLOSED
            raise
        except StreamBlocked as exc:
            await self.guardrails.enforce_stream_block(call, exc.verdict)
            call.status = 400
            yield sse(violation("output", exc.verdict).body())
            yield DONE
        except BaseException as exc:
            self._fail(call, exc)
            yield sse(_as_sluice_error(exc).body())
            yield DONE
        finally:
            self.finish(call)

    async def _events(self, call: Call) -> AsyncIterator[tuple[int, GenerationEvent]]:
        """Every choice's events, merged, with the call's accounting kept up to date."""
        call.dispatched = True
        if len(call.requests) == 1:
            async for event in self._choice(call, 0):
                yield 0, event
            return
        queue: asyncio.Queue[tuple[int, GenerationEvent | BaseException | None]] = asyncio.Queue()

        async def pump(index: int) -> None:
            try:
                async for event in self._choice(call, index):
                    await queue.put((index, event))
                await queue.put((index, None))
            except BaseException as exc:
                await queue.put((index, exc))

        tasks = [asyncio.create_task(pump(i)) for i in range(len(call.requests))]
        try:
            remaining = len(tasks)
            while remaining:
                index, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _choice(self, call: Call, index: int) -> AsyncIterator[GenerationEvent]:
        choice = call.choices[index]
        choice.queued_at = time.time_ns()
        worker = await call.pool.acquire()
        choice.dispatched_at = time.time_ns()
        failed = False
        generation = worker.backend.generate(call.requests[index])
        try:
            async for event in generation:
                if event.tokens and choice.first_token_at is None:
                    choice.first_token_at = time.time_ns()
                    if call.ttft_s is None:
                        call.ttft_s = time.perf_counter() - call.started
                choice.tokens += event.tokens
                if event.text:
                    choice.text.append(event.text)
                if choice.logprobs is not None:
                    choice.logprobs.extend(event.logprobs)
                if event.finish_reason:
                    choice.finish_reason = event.finish_reason
                if event.usage is not None:
                    # The backend's own counts are authoritative (an upstream's tokenizer
                    # may differ from our estimate).
                    choice.tokens = event.usage.completion_tokens
                    call.prompt_tokens = event.usage.prompt_tokens
                yield event
        except BackendError as exc:
            failed = exc.fatal
            raise
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:
            failed = True
            log.exception("backend %s crashed serving %s", call.pool.name, call.request_id)
            raise UpstreamFailed(f"backend '{call.pool.name}' failed: {exc}") from exc
        finally:
            choice.done_at = time.time_ns()
            try:
                await generation.aclose()
            finally:
                call.pool.release(worker, failed=failed)

    # -- ending it ---------------------------------------------------------------------

    def _fail(self, call: Call, exc: BaseException) -> None:
        call.status = _as_sluice_error(exc).status

    def finish(self, call: Call) -> None:
        """Meter, settle the rate limit, record metrics and close the trace. Once."""
        if call.finished:
            return
        call.finished = True
        if not call.dispatched:
            call.prompt_tokens = 0  # refused before any backend saw it: nothing to bill
        latency_s = time.perf_counter() - call.started
        reasons = sorted({c.finish_reason for c in call.choices if c.finish_reason})
        self.meter.record(UsageRecord(
            request_id=call.request_id,
            tenant_id=call.principal.tenant_id,
            key_id=call.principal.key_id,
            model=call.model,
            endpoint=call.endpoint,
            prompt_tokens=call.prompt_tokens,
            completion_tokens=call.completion_tokens,
            status=call.status,
            finish_reason=",".join(reasons) or None,
            latency_ms=latency_s * 1000,
            ttft_ms=call.ttft_s * 1000 if call.ttft_s is not None else None,
            created_at=dt.datetime.now(dt.UTC),
        ))
        self.admission.settle(call)
        self.telemetry.observe_request(
            model=call.model, endpoint=call.endpoint, status=call.status, latency_s=latency_s,
            ttft_s=call.ttft_s, prompt_tokens=call.prompt_tokens,
            completion_tokens=call.completion_tokens,
        )
        if self.telemetry.tracing:
            self._trace_stages(call, reasons)

    def _trace_stages(self, call: Call, reasons: list[str]) -> None:
        """Spans for the backend's stages, from the timestamps the call collected."""
        tracer = self.telemetry.tracer
        parent = trace.set_span_in_context(call.span)
        for c in call.choices:
            stages = [("queue", c.queued_at, c.dispatched_at),
                      ("prefill", c.dispatched_at, c.first_token_at),
                      ("decode", c.first_token_at, c.done_at)]
            for name, start, end in stages:
                if start is not None and end is not None:
                    tracer.start_span(name, context=parent, start_time=start).end(end_time=end)
        with tracer.start_as_current_span("metering", context=parent):
            pass
        call.span.set_attributes(gen_ai_attributes(
            model=call.model, input_tokens=call.prompt_tokens,
            output_tokens=call.completion_tokens, finish_reasons=reasons or None))
        call.span.set_attribute("http.response.status_code", call.status)
        call.span.end()


def _as_sluice_error(exc: BaseException) -> SluiceError:
    if isinstance(exc, SluiceError):
        return exc
    if isinstance(exc, BackendError):
        return from_status(exc.status, str(exc))
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return SluiceError("request cancelled")
    return SluiceError("internal server error")
