"""The request path of /v1/chat/completions and /v1/completions, in order:

    auth        stages.Authenticator    API key -> Principal             (the route calls it)
    intake      intake.Intake           body -> Call (model routed, n checked)
    rate limit  stages.RateLimitStage   reserve against key and tenant limits
    input guard stages.Guardrails       LlamaGuard on the prompt
    spend       spend.Spend             budgets reserved, response cache looked up
    dispatch    dispatch.dispatch       choices run on the backend's pool, events merged
    output guard stages.Guardrails      LlamaGuard on the answer (streams: rolling windows)
    finish      finish.Recorder         one usage record (priced), rate limit and budgets
                                        settled, cache filled, metrics, trace

A :class:`~sluice.gateway.pipeline.call.Call` is what every stage takes. However a call
ends (finished, refused, failed, or the client gone mid-stream) ``finish`` runs once.
The stages are built in the lifespan (sluice/gateway/state.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from opentelemetry import trace

from sluice.gateway.accounts.auth import Principal
from sluice.gateway.http.formats import has_content, response_fields
from sluice.gateway.http.schemas import ChatCompletionRequest, CompletionRequest
from sluice.gateway.http.streaming import DONE, sse
from sluice.gateway.pipeline.call import CLIENT_CLOSED, Call
from sluice.gateway.pipeline.chunks import ChunkEncoder
from sluice.gateway.pipeline.dispatch import as_sluice_error, dispatch
from sluice.gateway.pipeline.finish import Recorder
from sluice.gateway.pipeline.guard import StreamBlocked
from sluice.gateway.pipeline.intake import Intake
from sluice.gateway.pipeline.spend import Spend
from sluice.gateway.pipeline.stages import Authenticator, Guardrails, RateLimitStage, violation
from sluice.gateway.telemetry import Telemetry
from sluice.gateway.workers import estimate_prompt_tokens
from sluice.gateway.workers import CpuPool, TenantSlots


class Pipeline:
    def __init__(self, *, auth: Authenticator, intake: Intake, ratelimit: RateLimitStage,
                 guardrails: Guardrails, spend: Spend, recorder: Recorder,
                 telemetry: Telemetry, workers: CpuPool | None = None,
                 slots: TenantSlots | None = None) -> None:
        self.auth = auth
        # CPU work off the event loop and per-tenant in-flight bounds (edge, issue 18).
        self.workers = workers
        self.slots = slots or TenantSlots(0)
        self._releases: dict[str, Callable[[], None]] = {}
        self.intake = intake
        self.ratelimit = ratelimit
        self.guardrails = guardrails
        self.spend = spend
        self.recorder = recorder
        self.telemetry = telemetry

    # -- opening a call ----------------------------------------------------------------

    def chat_call(self, request_id: str, principal: Principal, body: ChatCompletionRequest,
                  span: Any) -> Call:
        return self.intake.chat(request_id, principal, body, span)

    def completion_call(self, request_id: str, principal: Principal, body: CompletionRequest,
                        span: Any) -> Call:
        return self.intake.completion(request_id, principal, body, span)

    async def admit(self, call: Call) -> Call:
        """Rate limits, then the input guard. A refusal still ends the call (one usage row)."""
        try:
            self._releases[call.request_id] = self.slots.acquire(call.principal.tenant_id)
            with self._span(call, "ratelimit"):
                await self.ratelimit.admit(call)  # on a byte estimate: nothing tokenized yet
            if self.guardrails.enabled:  # no guard span when guardrails are off
                with self._span(call, "guard.input"):
                    await self.guardrails.check_input(call)
            if self.workers is not None and not _small(call):
                call.prompt_tokens = await self.workers.run(call.count_prompt)  # off the loop
            with self._span(call, "spend"):
                await self.spend.admit(call)  # budgets reserved; the response cache asked
            await self.recorder.open(call)  # write-ahead usage record: no crash loses it
        except BaseException as exc:
            self._fail(call, exc)
            self.finish(call)
            raise
        return call

    # -- running it --------------------------------------------------------------------

    async def complete(self, call: Call) -> dict[str, Any]:
        """Run every choice to the end, check the answers, and return the response body."""
        try:
            async for _ in dispatch(call):
                pass
            if self.guardrails.enabled:  # no guard span when guardrails are off
                with self._span(call, "guard.output"):
                    for choice in call.choices:
                        await self.guardrails.check_output(call, "".join(choice.text))
        except (asyncio.CancelledError, GeneratorExit):
            call.status = CLIENT_CLOSED
            raise
        except BaseException as exc:
            self._fail(call, exc)
            raise as_sluice_error(exc) from None
        finally:
            self.finish(call)
        return {
            "id": call.response_id,
            "object": call.fmt.object,
            "created": call.created,
            "model": call.model,
            "choices": [
                call.fmt.choice(i, "".join(c.text), c.finish_reason, c.logprobs, c.parts)
                for i, c in enumerate(call.choices)
            ],
            "usage": call.usage(),
            **response_fields(c.parts for c in call.choices),  # system_fingerprint, ...
        }

    async def stream(self, call: Call) -> AsyncIterator[bytes]:
        """The SSE body. Tokens are counted as they are handed to the transport (the usage
        WAL's progress line just before), so a client that goes away is billed for what it
        was sent. With the output guard on, text is released once a rolling-window check
        has covered it."""
        chunks = ChunkEncoder(call)
        first = chunks.first
        guards = [self.guardrails.stream(call) for _ in call.requests]
        try:
            async for index, event in dispatch(call):
                text: str | None = event.text
                guard = guards[index]
                if guard is not None:
                    text = await guard.feed(event.text) if event.text else ""
                    if event.finish_reason:
                        text += await guard.finish()
                lps = list(event.logprobs) if call.want_logprobs else None
                if text or first[index] or event.finish_reason or has_content(event):
                    chunk = chunks.chunk(index, text if text or first[index] else None,
                                         event.finish_reason, lps, event)
                    # Logged before the send: a kill -9 between the two bills the one chunk
                    # the client may not have got, never less than it got.
                    self.recorder.progress(call)
                    yield chunk
            if call.include_usage:
                yield chunks.usage()
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
            yield sse(as_sluice_error(exc).body())
            yield DONE
        finally:
            self.finish(call)

    # -- ending it ---------------------------------------------------------------------

    def finish(self, call: Call) -> None:
        if (release := self._releases.pop(call.request_id, None)) is not None:
            release()
        self.recorder.finish(call)

    def _fail(self, call: Call, exc: BaseException) -> None:
        call.error = as_sluice_error(exc)
        call.status = call.error.status

    def _span(self, call: Call, name: str) -> Any:
        """A child span of the call's request span (nothing at all when tracing is off:
        even no-op spans cost a few percent of a request)."""
        if not self.telemetry.tracing:
            return contextlib.nullcontext()
        return self.telemetry.tracer.start_as_current_span(
            name, context=trace.set_span_in_context(call.span))


# Prompts up to this many estimated tokens are counted on the event loop (well under a
# millisecond); a hop to a worker thread would cost more than the count. Larger ones are
# counted on the worker pool, so no request can hold the loop.
INLINE_COUNT_TOKENS = 256


def _small(call: Call) -> bool:
    return (len(call.requests) > 0
            and estimate_prompt_tokens(call.requests[0]) <= INLINE_COUNT_TOKENS)
