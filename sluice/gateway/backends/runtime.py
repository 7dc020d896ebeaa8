"""The serverless runtime: one worker pool per backend, scaled between min and max workers.

A worker is one started instance of a backend. Requests lease a worker with spare
concurrency; when none has any, the pool starts another (up to ``max_workers``) and
the request waits in a bounded queue. A cold start is shared by everyone waiting for
it. Workers idle for ``idle_timeout_s`` are stopped (down to ``min_workers``, which
may be zero), and since only a worker with nothing in flight is idle, scale-down
never drops a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from sluice.gateway.backends.contract import Backend, BackendError
from sluice.gateway.errors import ServiceUnavailable
from sluice.gateway.backends.config import PoolConfig

log = logging.getLogger("sluice.runtime")

MAX_START_BACKOFF_S = 60.0


class WorkerState(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    BUSY = "busy"
    SLEEPING = "sleeping"
    WAKING = "waking"
    STOPPING = "stopping"


COMING = (WorkerState.STARTING, WorkerState.WAKING)  # capacity on its way


@dataclass(eq=False)
class Worker:
    id: int
    backend: Backend
    state: WorkerState = WorkerState.STARTING
    inflight: int = 0
    served: int = 0
    started_at: float = 0.0
    cold_start_s: float | None = None
    wake_s: float | None = None
    last_used: float = field(default_factory=time.monotonic)


class Pool:
    def __init__(self, name: str, factory: Callable[[], Backend], config: PoolConfig) -> None:
        self.name = name
        self.config = config
        self._factory = factory
        self._workers: list[Worker] = []
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._next_id = 1
        self._closed = False
        self._failures = 0
        self._retry_at = 0.0
        self.last_error: str | None = None
        self.last_cold_start_s: float | None = None
        self.cold_starts = 0
        self.last_wake_s: float | None = None
        self.wakes = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reaper: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        self._reaper = asyncio.create_task(self._reap_idle(), name=f"pool-{self.name}-reaper")
        for _ in range(self.config.min_workers):
            self._spawn()

    async def close(self, drain_timeout_s: float = 30.0) -> None:
        """Refuse new work, let in-flight requests finish, stop every worker."""
        self._closed = True
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        deadline = time.monotonic() + drain_timeout_s
        while any(w.inflight for w in self._workers) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._reaper:
            self._reaper.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*(self._stop(w) for w in list(self._workers)), return_exceptions=True)

    # -- leasing -----------------------------------------------------------------------

    async def acquire(self) -> Worker:
        """A ready worker with spare concurrency; waits (bounded) for one if needed."""
        worker = self._pick()
        if worker is not None:
            return self._lease(worker)
        if self._closed:
            raise ServiceUnavailable(f"backend '{self.name}' is shutting down")
        self._scale_up()
        # Requests waiting for a worker that is starting are not "queued": they are its load.
        if len(self._waiters) >= self.config.queue_size + self._capacity_starting():
            raise ServiceUnavailable(
                f"backend '{self.name}' is overloaded ({len(self._waiters)} requests queued)",
                retry_after_s=1,
            )
        deadline = time.monotonic() + self.config.queue_timeout_s
        while True:
            self._scale_up()
            if self._failures and not self._workers:
                raise ServiceUnavailable(
                    f"backend '{self.name}' failed to start: {self.last_error}",
                    retry_after_s=max(1.0, self._retry_at - time.monotonic()),
                )
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
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
            if self._closed:
                raise ServiceUnavailable(f"backend '{self.name}' is shutting down")
            worker = self._pick()
            if worker is not None:
                return self._lease(worker)

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
        if failed and worker in self._workers:
            log.error("backend %s: worker %d failed; replacing it", self.name, worker.id)
            self._workers.remove(worker)
            self._track(self._stop(worker))
            if self._waiters or len(self._workers) < self.config.min_workers:
                self._spawn()
        elif worker.state is WorkerState.BUSY:
            worker.state = WorkerState.READY
        self._wake(1)

    def _pick(self) -> Worker | None:
        best = None
        for worker in self._workers:
            if worker.state in (WorkerState.READY, WorkerState.BUSY) and (
                worker.inflight < self.config.max_concurrency
            ):
                if best is None or worker.inflight < best.inflight:
                    best = worker
        return best

    def _lease(self, worker: Worker) -> Worker:
        worker.inflight += 1
        worker.served += 1
        worker.state = WorkerState.BUSY
        return worker

    def _wake(self, count: int) -> None:
        for waiter in list(self._waiters)[:count]:
            if not waiter.done():
                waiter.set_result(None)

    # -- scaling -----------------------------------------------------------------------

    def _capacity_starting(self) -> int:
        coming = sum(w.state in COMING for w in self._workers)
        return coming * self.config.max_concurrency

    def _scale_up(self) -> None:
        if len(self._waiters) < self._capacity_starting():
            return  # a start or wake under way will absorb everyone waiting
        asleep = next((w for w in self._workers if w.state is WorkerState.SLEEPING), None)
        if asleep is not None:
            asleep.state = WorkerState.WAKING  # waking beats a cold start
            self._track(self._wake_worker(asleep))
            return
        if len(self._workers) >= self.config.max_workers or time.monotonic() < self._retry_at:
            return
        self._spawn()

    async def _wake_worker(self, worker: Worker) -> None:
        began = time.monotonic()
        try:
            await asyncio.wait_for(worker.backend.wake(), self.config.start_timeout_s)
        except Exception as exc:
            log.error("backend %s: worker %d failed to wake (%s); replacing it",
                      self.name, worker.id, exc)
            self._workers.remove(worker)
            self._track(self._stop(worker))
            self._wake(len(self._waiters))
            return
        worker.wake_s = self.last_wake_s = time.monotonic() - began
        self.wakes += 1
        worker.state = WorkerState.READY
        worker.last_used = time.monotonic()
        log.info("backend %s: worker %d awake in %.2fs", self.name, worker.id, worker.wake_s)
        self._wake(self.config.max_concurrency)

    async def _sleep_worker(self, worker: Worker) -> None:
        worker.state = WorkerState.SLEEPING
        worker.last_used = time.monotonic()
        try:
            await worker.backend.sleep()
        except Exception as exc:
            log.error("backend %s: worker %d failed to sleep (%s); stopping it",
                      self.name, worker.id, exc)
            if worker in self._workers:
                self._workers.remove(worker)
            await self._stop(worker)

    def _spawn(self) -> None:
        worker = Worker(id=self._next_id, backend=self._factory())
        self._next_id += 1
        self._workers.append(worker)
        self._track(self._start(worker))

    async def _start(self, worker: Worker) -> None:
        began = time.monotonic()
        worker.started_at = began
        try:
            await asyncio.wait_for(worker.backend.start(), self.config.start_timeout_s)
        except Exception as exc:
            self._workers.remove(worker)
            self._failures += 1
            backoff = min(MAX_START_BACKOFF_S, 0.5 * 2 ** (self._failures - 1))
            self._retry_at = time.monotonic() + backoff
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.error("backend %s: start failed (%s); next try in %.1fs", self.name, exc, backoff)
            self._wake(len(self._waiters))
            return
        worker.cold_start_s = time.monotonic() - began
        worker.state = WorkerState.READY
        worker.last_used = time.monotonic()
        self.cold_starts += 1
        self.last_cold_start_s = worker.cold_start_s
        self._failures = 0
        self.last_error = None
        log.info("backend %s: worker %d ready in %.2fs", self.name, worker.id, worker.cold_start_s)
        self._wake(self.config.max_concurrency)

    async def _stop(self, worker: Worker) -> None:
        worker.state = WorkerState.STOPPING
        try:
            await worker.backend.stop()
        except Exception as exc:
            log.warning("backend %s: worker %d stop failed: %s", self.name, worker.id, exc)

    async def _reap_idle(self) -> None:
        period = min(1.0, self.config.idle_timeout_s / 4)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            config = self.config
            for worker in list(self._workers):
                idle_s = now - worker.last_used
                if worker.state is WorkerState.SLEEPING and worker.inflight == 0:
                    if config.stop_after_sleep_s is not None and idle_s >= config.stop_after_sleep_s:
                        self._workers.remove(worker)
                        log.info("backend %s: worker %d slept long enough, stopping",
                                 self.name, worker.id)
                        await self._stop(worker)
                    continue
                awake = sum(w.state in (WorkerState.READY, WorkerState.BUSY)
                            for w in self._workers)
                if (
                    worker.state is WorkerState.READY
                    and worker.inflight == 0
                    and idle_s >= config.idle_timeout_s
                    and awake > config.min_workers
                ):
                    if config.idle_action == "sleep" and worker.backend.supports_sleep:
                        log.info("backend %s: worker %d idle, sleeping", self.name, worker.id)
                        await self._sleep_worker(worker)
                    else:
                        self._workers.remove(worker)
                        log.info("backend %s: worker %d idle, stopping", self.name, worker.id)
                        await self._stop(worker)

    def _track(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- visibility --------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return not (self._failures and not self._workers)

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "backend": self.name,
            "config": self.config.model_dump(),
            "queue_depth": len(self._waiters),
            "cold_starts": self.cold_starts,
            "last_cold_start_s": self.last_cold_start_s,
            "wakes": self.wakes,
            "last_wake_s": self.last_wake_s,
            "last_error": self.last_error,
            "start_failures": self._failures,
            "workers": [
                {
                    "id": w.id,
                    "state": str(w.state),
                    "inflight": w.inflight,
                    "served": w.served,
                    "cold_start_s": w.cold_start_s,
                    "wake_s": w.wake_s,
                    "idle_s": round(now - w.last_used, 3) if w.inflight == 0 else 0.0,
                }
                for w in self._workers
            ],
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
