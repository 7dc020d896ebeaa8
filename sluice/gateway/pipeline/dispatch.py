"""Dispatch: a call's choices run on a worker of its backend's pool, their events merged.

Every event updates the call's accounting (tokens, text, timings) as it passes, so that
however the call ends, what the client was given is what gets metered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from sluice.gateway.backends.contract import BackendError, GenerationEvent
from sluice.gateway.errors import SluiceError, UpstreamFailed, from_status
from sluice.gateway.pipeline.call import Call

log = logging.getLogger("sluice.dispatch")


async def dispatch(call: Call) -> AsyncIterator[tuple[int, GenerationEvent]]:
    """Every choice's events as ``(choice index, event)``, merged in arrival order."""
    call.dispatched = True
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


def as_sluice_error(exc: BaseException) -> SluiceError:
    """What the client is told about a failure (a backend's status kept)."""
    if isinstance(exc, SluiceError):
        return exc
    if isinstance(exc, BackendError):
        return from_status(exc.status, str(exc))
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return SluiceError("request cancelled")
    return SluiceError("internal server error")
