"""Dispatch: a call's choices run on a worker of its backend's pool, their events merged.

Every event updates the call's accounting (tokens, text, timings) as it passes, so that
however the call ends, what the client was given is what gets metered.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator

from sluice.gateway.backends.contract import BackendError, GenerationEvent, GenerationRequest
from sluice.gateway.backends.runtime import Pool
from sluice.gateway.errors import SluiceError, UpstreamFailed, from_status
from sluice.gateway.pipeline.call import Call, Choice

CACHE_BACKEND = "cache"  # the usage row's backend for an answer served from the cache

log = logging.getLogger("sluice.dispatch")


async def dispatch(call: Call) -> AsyncIterator[tuple[int, GenerationEvent]]:
    """Every choice's events as ``(choice index, event)``, merged in arrival order."""
    call.dispatched = True
    if call.cache_key is not None and call.replay is None:
        call.recorded = [[] for _ in call.requests]
    if len(call.requests) == 1:
        async for event in _run_choice(call, 0):
            yield 0, event
        return
    queue: asyncio.Queue[tuple[int, GenerationEvent | BaseException | None]] = asyncio.Queue()

    async def pump(index: int) -> None:
        try:
            async for event in _run_choice(call, index):
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


async def _run_choice(call: Call, index: int) -> AsyncIterator[GenerationEvent]:
    """One choice: replayed from the cache, or run on the call's backend; in a model group,
    on the next backend of the plan while the failed attempt has sent nothing."""
    choice = call.choices[index]
    if call.replay is not None:
        call.served_by = CACHE_BACKEND
        for event in call.replay[index]:
            _account(call, choice, event)
            yield event
        return
    record = call.recorded[index] if call.recorded is not None else None
    plan = call.plan
    attempt = 0
    while True:
        pool, request = call.pool, call.requests[index]
        if plan is not None:
            target = plan.attempts[attempt]
            pool = plan.router.pools[target.route.backend_name]
            if target.model != request.model:
                request = dataclasses.replace(request, model=target.model)
        sent = False
        try:
            async for event in _generate(call, choice, pool, request):
                sent = True
                _account(call, choice, event)
                if record is not None:
                    record.append(event)
                yield event
        except BackendError as exc:
            delay = None if sent or plan is None else plan.delay_before_next(exc)
            if plan is not None and exc.retryable:  # a refused request says nothing of health
                plan.router.failed(pool.name, plan.group)
                call.span.add_event("attempt", {"backend": pool.name, "error": str(exc)[:200]})
            if delay is None:
                raise
            log.info("%s: backend %s failed before its first byte (%s); next attempt in %.2fs",
                     call.request_id, pool.name, exc, delay)
            await asyncio.sleep(delay)
            attempt += 1
            continue
        if plan is not None:
            plan.router.succeeded(pool.name)
        call.served_by = pool.name
        return


def _account(call: Call, choice: Choice, event: GenerationEvent) -> None:
    """What the client is given is what gets metered: tokens, text, timings."""
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
    if event.tool_calls or event.refusal or event.reasoning or event.extra or \
            event.system_fingerprint or event.response_extra:
        choice.parts.add(event)  # tool calls, refusal, ... for the whole answer
    if event.usage is not None:
        # The backend's own counts are authoritative (an upstream's tokenizer may differ
        # from our estimate).
        choice.tokens = event.usage.completion_tokens
        choice.usage = event.usage
        call.prompt_tokens = call.reported_prompt_tokens(event.usage)


async def _generate(call: Call, choice: Choice, pool: Pool,
                    request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
    """The events of one attempt on one pool's worker (leased, then released)."""
    choice.queued_at = time.time_ns()
    worker = await pool.acquire()
    choice.dispatched_at = time.time_ns()
    failed = False
    generation = worker.backend.generate(request)
    try:
        async for event in generation:
            yield event
    except BackendError as exc:
        failed = exc.fatal
        raise
    except (asyncio.CancelledError, GeneratorExit):
        raise
    except Exception as exc:
        failed = True
        log.exception("backend %s crashed serving %s", pool.name, call.request_id)
        raise UpstreamFailed(f"backend '{pool.name}' failed: {exc}") from exc
    finally:
        choice.done_at = time.time_ns()
        try:
            await generation.aclose()
        finally:
            pool.release(worker, failed=failed)


def as_sluice_error(exc: BaseException) -> SluiceError:
    """What the client is told about a failure (a backend's status kept)."""
    if isinstance(exc, SluiceError):
        return exc
    if isinstance(exc, BackendError):
        return from_status(exc.status, str(exc), headers=exc.headers, param=exc.param,
                           code=exc.code)
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return SluiceError("request cancelled")
    return SluiceError("internal server error")
