"""The serverless runtime: one worker pool per backend, scaled between min and max workers.

A worker is one started instance of a backend (its states: backends/workers.py).
Requests lease a worker with spare concurrency, first come first served; when none has
any, the pool wakes a sleeping worker or starts another (up to ``max_workers``) and the
request waits in a bounded queue. A start or wake is shared by everyone waiting for
it. Workers idle for ``idle_timeout_s`` sleep or stop (down to ``min_workers``, which may
be zero); only a worker with nothing in flight is idle, so scale-down never drops a
request, and a request that arrives while a worker goes to sleep or stops is served by
the wake or start that follows at once. A stopping worker keeps its place under
``max_workers`` until its memory is released, so a new start never overlaps it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from sluice.gateway.backends.contract import Backend, BackendError
from sluice.gateway.backends.lifecycle import WorkerSet
from sluice.gateway.backends.workers import Worker, WorkerState, worker_status
from sluice.gateway.errors import ServiceUnavailable
from sluice.gateway.backends.config import PoolConfig

__all__ = ["Pool", "Runtime", "Worker", "WorkerState"]

log = logging.getLogger("sluice.runtime")


class Pool:
    def __init__(self, name: str, factory: Callable[..., Backend], config: PoolConfig) -> None:
        """``factory()`` makes a worker's backend; ``factory(device)`` in a pool with
        ``devices`` (data parallel), one worker per device."""
        self.name = name
        self.config = config
        self.workers = WorkerSet(name, factory, config, self._changed)
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._reaper: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        self._reaper = asyncio.create_task(self.workers.reap_idle(), name=f"pool-{self.name}-reaper")
        for _ in range(self.config.min_workers):
            self.workers.spawn()

    async def close(self, drain_timeout_s: float = 30.0) -> None:
        """Refuse new work, let in-flight requests finish, stop every worker."""
        self.workers.closed = True
        self._notify(len(self._waiters))
        deadline = time.monotonic() + drain_timeout_s
        while any(w.inflight for w in self.workers.workers) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._reaper:
            self._reaper.cancel()
        await self.workers.close()

    # -- leasing -----------------------------------------------------------------------

    async def acquire(self) -> Worker:
        """A ready worker with spare concurrency; waits (bounded, in order of arrival) for one."""
        if not self._waiters and (worker := self.workers.pick()) is not None:
            return self._lease(worker)
        self._refuse_if_closed()
        # Requests waiting for a worker that is on its way are not "queued": they are its load.
        if len(self._waiters) >= self.config.queue_size + self.workers.coming():
            self._scale_up()
            raise ServiceUnavailable(
                f"backend '{self.name}' is overloaded ({len(self._waiters)} requests queued)",
                retry_after_s=1,
            )
        deadline = time.monotonic() + self.config.queue_timeout_s
        woken = False
        while True:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            # woken but out-raced for the slot: it keeps its place at the head of the queue
            (self._waiters.appendleft if woken else self._waiters.append)(waiter)
            self._scale_up()
            if self.workers.failures and not self.workers.workers:
                self._waiters.remove(waiter)
                raise ServiceUnavailable(
                    f"backend '{self.name}' failed to start: {self.workers.last_error}",
                    retry_after_s=max(1.0, self.workers.retry_at - time.monotonic()),
                )
            try:
                await asyncio.wait_for(waiter, max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise ServiceUnavailable(
                    f"backend '{self.name}' had no free capacity within "
                    f"{self.config.queue_timeout_s:g}s",
                    retry_after_s=1,
                ) from None
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
                if waiter.done() and not waiter.cancelled():
                    self._notify(self.workers.spare())  # pass on a wake-up it may not use
            self._refuse_if_closed()
            if (worker := self.workers.pick()) is not None:
                return self._lease(worker)
            woken = True

    @contextlib.asynccontextmanager
    async def lease(self) -> AsyncIterator[Worker]:
        """``async with pool.lease() as worker``: a worker for the block; one that raised
        something other than a non-fatal BackendError is replaced."""
        worker = await self.acquire()
        failed = False
        try:
            yield worker
        except BackendError as exc:
            failed = exc.fatal
            raise
        except Exception:
            failed = True
            raise
        finally:
            self.release(worker, failed=failed)

    def release(self, worker: Worker, *, failed: bool = False) -> None:
        worker.inflight -= 1
        worker.last_used = time.monotonic()
        if failed and worker in self.workers.workers and worker.state is not WorkerState.STOPPING:
            log.error("backend %s: worker %d failed; replacing it", self.name, worker.id)
            self.workers.retire(worker)
        elif worker.state is WorkerState.BUSY and worker.inflight == 0:
            worker.enter(WorkerState.READY)
        self._notify(self.workers.spare())

    def _lease(self, worker: Worker) -> Worker:
        worker.inflight += 1
        worker.served += 1
        if worker.state is WorkerState.READY:
            worker.enter(WorkerState.BUSY)
        self._notify(self.workers.spare())  # room left: the next in line may take it
        return worker

    def _refuse_if_closed(self) -> None:
        if self.workers.closed:
            raise ServiceUnavailable(f"backend '{self.name}' is shutting down")

    def _notify(self, count: int) -> None:
        """Let the first ``count`` waiters (in order) look for a worker again."""
        for waiter in list(self._waiters)[:count]:
            if not waiter.done():
                waiter.set_result(None)

    def _scale_up(self) -> None:
        if self.workers.closed:
            return
        if len(self._waiters) > self.workers.coming() + self.workers.spare():
            self.workers.add_capacity()  # else a start or wake under way absorbs everyone waiting

    def _changed(self, start_failed: bool) -> None:
        """A transition ended: waiting requests take the capacity, or fail with the start."""
        self._notify(len(self._waiters) if start_failed else self.workers.spare())
        if not start_failed:
            self._scale_up()

    # -- visibility --------------------------------------------------------------------

    @property
    def cold_starts(self) -> int:
        return self.workers.transitions.count["start"]

    @property
    def wakes(self) -> int:
        return self.workers.transitions.count["wake"]

    @property
    def ready(self) -> bool:
        return not (self.workers.failures and not self.workers.workers)

    def load(self) -> int:
        """Requests this pool holds now, running or queued (least-busy balancing)."""
        return len(self._waiters) + sum(w.inflight for w in self.workers.workers)

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        t = self.workers.transitions
        return {
            "backend": self.name,
            "config": self.config.model_dump(),
            "queue_depth": len(self._waiters),
            "cold_starts": t.count["start"],
            "last_cold_start_s": t.last_s["start"],
            "wakes": t.count["wake"],
            "last_wake_s": t.last_s["wake"],
            "last_error": self.workers.last_error,
            "start_failures": self.workers.failures,
            "transitions": t.status(),
            "workers": [worker_status(w, now) for w in self.workers.workers],
        }


class Runtime:
    """Every backend's pool, created in the app's lifespan."""

    def __init__(self) -> None:
        self.pools: dict[str, Pool] = {}

    def add(self, pool: Pool) -> None:
        self.pools[pool.name] = pool

    async def start(self) -> None:
        for pool in self.pools.values():
            await pool.start()

    async def close(self) -> None:
        await asyncio.gather(*(p.close() for p in self.pools.values()))

    def status(self) -> list[dict[str, Any]]:
        return [p.status() for p in self.pools.values()]
