"""CPU work off the event loop: a bounded thread pool, a byte-based token estimate, and
per-tenant concurrency slots.

Why threads and not processes: the CPU work on the request path is tokenization and
argon2 password hashing, and SentencePiece, argon2-cffi and Hugging Face ``tokenizers``'
``encode_batch`` release the GIL for the whole native call. Measured with
``python tests/reliability/gil_release.py`` (a second thread sleeps 1 ms in a loop; the
longest gap between its wake-ups is how long the call held the GIL): SentencePiece on
1 MB 805 ms, longest gap 8 ms; five argon2 verifications 1,410 ms, gap 42 ms (the loaded
machine's noise); ``tokenizers`` ``encode_batch([1 MB])`` 444 ms, gap 42 ms. Only
``tokenizers``' plain ``encode`` holds the GIL throughout (798 ms, gap 791 ms), so the
engine's HF tokenizer calls ``encode_batch``. A process pool would add pickling of 1 MB
prompts and token lists for nothing.

Threads still compete with the event loop for CPUs: there is one per core (at most 4)
and each runs at a lower priority (nice +10 on Linux), so the loop thread wins.

The pool is also the event loop's default executor (installed in the lifespan), so a
backend's ``asyncio.to_thread`` lands on the same bounded set of threads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import math
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

from sluice.gateway.backends.contract import GenerationRequest
from sluice.gateway.errors import RateLimitExceeded, ServiceUnavailable

log = logging.getLogger("sluice.workers")

P = ParamSpec("P")
T = TypeVar("T")

# SentencePiece/BPE tokenizers average 3.5-4.5 bytes per token on English and code, about
# 1 token per 3 bytes on CJK; 4 keeps the estimate at or under the real count for most
# text, so an estimate-based 429 is one the exact count would have given too.
BYTES_PER_TOKEN = 4
TOKENS_PER_MESSAGE = 4  # role markers and separators of a chat template
GIL_SWITCH_INTERVAL_S = 0.001
WORKER_NICE = 10  # added to the process's nice value for worker threads (Linux)


def estimate_prompt_tokens(request: GenerationRequest) -> int:
    """A cheap (no tokenizer) estimate of the prompt's tokens, from its UTF-8 size.

    Linear in the prompt's length with a tiny constant (``str.encode`` is C); used to
    check rate limits before anything is tokenized."""
    if request.prompt_ids is not None:
        return len(request.prompt_ids)
    if request.messages is None:
        return 1 + math.ceil(_utf8_len(request.prompt or "") / BYTES_PER_TOKEN)
    total = 1
    for message in request.messages:
        total += TOKENS_PER_MESSAGE + math.ceil(_utf8_len(message.content or "") / BYTES_PER_TOKEN)
    return total


def _utf8_len(text: str) -> int:
    if text.isascii():
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))


class CpuPool:
    """A fixed set of threads for CPU-bound calls, with a bounded backlog.

    ``run`` refuses (503, Retry-After) once ``threads + backlog`` calls are queued or
    running, so a flood of expensive requests queues a bounded amount of work instead of
    growing without limit. A cancelled caller's call still finishes in its thread (a
    native call cannot be interrupted); the slot is given back when it does.
    """

    def __init__(self, threads: int | None = None, backlog: int = 64) -> None:
        # One thread per core: more only contend with the event loop for the same CPUs.
        threads = threads or max(1, min(4, os.cpu_count() or 1))
        if threads < 1 or backlog < 0:
            raise ValueError("threads must be >= 1 and backlog >= 0")
        self.threads = threads
        self.limit = threads + backlog
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="sluice-cpu", initializer=_lower_priority)
        self._busy = 0

    @property
    def busy(self) -> int:
        """Calls queued or running."""
        return self._busy

    async def run(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        if self._busy >= self.limit:
            raise ServiceUnavailable("the server is busy; try again shortly", retry_after_s=1)
        self._busy += 1
        loop = asyncio.get_running_loop()
        try:
            future = self.executor.submit(functools.partial(fn, *args, **kwargs))
        except BaseException:
            self._busy -= 1
            raise
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(self._done))
        return await asyncio.wrap_future(future, loop=loop)

    def _done(self) -> None:
        self._busy -= 1

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Make this pool the loop's default executor (``asyncio.to_thread`` uses it), and
        shorten the GIL switch interval: work that is partly Python (a chat template over a
        1 MB message) holds the GIL between native calls, and the loop thread waits up to
        one interval each time it wakes; 5 ms (CPython's default) a wake-up adds up to tens
        of ms per request."""
        loop.set_default_executor(self.executor)
        sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_INTERVAL_S))

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


class TenantSlots:
    """At most ``limit`` requests of one tenant in flight at once (0: no bound).

    A tenant over its bound gets a 429 at once (no queueing: a queued request would still
    hold a connection and memory), so one tenant's burst cannot occupy every worker."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._active: dict[str, int] = {}

    def active(self, tenant_id: str) -> int:
        return self._active.get(tenant_id, 0)

    def acquire(self, tenant_id: str) -> Callable[[], None]:
        """Take a slot; returns its release (idempotent). RateLimitExceeded when full."""
        if self.limit <= 0:
            return _nothing
        n = self._active.get(tenant_id, 0)
        if n >= self.limit:
            raise RateLimitExceeded(
                f"Too many concurrent requests: this tenant may have {self.limit} in flight; "
                "retry when one has finished.",
                headers={"Retry-After": "1"}, code="concurrency_limit_exceeded")
        self._active[tenant_id] = n + 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            left = self._active.get(tenant_id, 1) - 1
            if left > 0:
                self._active[tenant_id] = left
            else:
                self._active.pop(tenant_id, None)

        return release

    @contextmanager
    def slot(self, tenant_id: str) -> Iterator[None]:
        release = self.acquire(tenant_id)
        try:
            yield
        finally:
            release()


def _lower_priority() -> None:
    """Run this worker thread at a lower CPU priority than the event loop's thread.

    Releasing the GIL is not enough on a busy machine: the loop thread also needs a CPU,
    and the kernel shares CPUs between threads of equal priority. On Linux a thread is a
    task with a nice value of its own, so the loop wins every contended time slice."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICE)


def _nothing() -> None:
    return None
