"""A pool's workers and their transitions: start, wake, sleep, stop, and the idle reaper.

Each transition runs as a task of its own and is timed (backends/workers.py); when one
ends, ``on_change`` tells the pool, which hands the capacity to waiting requests or
asks for more. A worker going to sleep is leased to no one; a stopping worker stays in
the set (and under ``max_workers``) until its backend's stop() has returned.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from sluice.gateway.backends.contract import Backend
from sluice.gateway.backends.workers import COMING, SERVING, TransitionLog, Worker, WorkerState
from sluice.gateway.backends.config import PoolConfig

log = logging.getLogger("sluice.runtime")

MAX_START_BACKOFF_S = 60.0


class WorkerSet:
    def __init__(self, name: str, factory: Callable[..., Backend], config: PoolConfig,
                 on_change: Callable[[bool], None]) -> None:
        self.name = name
        self.config = config
        self._factory = factory
        self._on_change = on_change  # called with True after a start failed
        self.workers: list[Worker] = []
        self.transitions = TransitionLog()
        self.failures = 0
        self.retry_at = 0.0
        self.last_error: str | None = None
        self.closed = False
        self._next_id = 1
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- what there is -------------------------------------------------------------------

    def pick(self) -> Worker | None:
        """The serving worker with the most spare concurrency, if any has some."""
        best = None
        for worker in self.workers:
            if worker.state in SERVING and worker.inflight < self.config.max_concurrency:
                if best is None or worker.inflight < best.inflight:
                    best = worker
        return best

    def spare(self) -> int:
        return sum(self.config.max_concurrency - w.inflight for w in self.workers if w.state in SERVING)

    def coming(self) -> int:
        """Concurrency on its way (starting, waking, or going to sleep: woken right after)."""
        return sum(w.state in COMING for w in self.workers) * self.config.max_concurrency

    def add_capacity(self) -> None:
        """Wake a sleeping worker, else start one (within max_workers and the back-off)."""
        asleep = next((w for w in self.workers if w.state is WorkerState.SLEEPING), None)
        if asleep is not None:  # waking beats a cold start
            asleep.enter(WorkerState.WAKING)
            self._track(self._wake(asleep))
        elif len(self.workers) < self.config.max_workers and time.monotonic() >= self.retry_at \
                and (self.config.devices is None or self._free_device() is not None):
            self.spawn()  # (workers still stopping count: their memory is not free yet)

    # -- transitions ---------------------------------------------------------------------

    def spawn(self) -> None:
        """Start a worker; in a data-parallel pool on a free device (none free: none started)."""
        if self.config.devices is None:
            backend, device = self._factory(), None
        elif (device := self._free_device()) is not None:
            backend = self._factory(device)  # the factory places the backend on it
        else:
            return
        worker = Worker(id=self._next_id, backend=backend, device=device)
        self._next_id += 1
        self.workers.append(worker)
        self._track(self._start(worker))

    def _free_device(self) -> str | None:
        """The first device no worker holds (a stopping one still holds its memory)."""
        held = {w.device for w in self.workers}
        return next((d for d in self.config.devices or () if d not in held), None)

    def retire(self, worker: Worker) -> None:
        """Stop a worker; it stays in the set (STOPPING) until its memory is released."""
        if worker.state is not WorkerState.STOPPING:
            worker.enter(WorkerState.STOPPING)
        self._track(self.stop(worker))

    async def _start(self, worker: Worker) -> None:
        try:
            await asyncio.wait_for(worker.backend.start(), self.config.start_timeout_s)
        except Exception as exc:
            self.workers.remove(worker)
            self.transitions.record("start", worker, time.monotonic() - worker.state_since, ok=False)
            self.failures += 1
            backoff = min(MAX_START_BACKOFF_S, 0.5 * 2 ** (self.failures - 1))
            self.retry_at = time.monotonic() + backoff
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.error("backend %s: start failed (%s); next try in %.1fs", self.name, exc, backoff)
            self._on_change(True)
            return
        worker.cold_start_s = worker.enter(WorkerState.READY)
        self.transitions.record("start", worker, worker.cold_start_s)
        worker.last_used = time.monotonic()
        self.failures = 0
        self.last_error = None
        log.info("backend %s: worker %d ready in %.2fs", self.name, worker.id, worker.cold_start_s)
        self._on_change(False)

    async def _wake(self, worker: Worker) -> None:
        try:
            await asyncio.wait_for(worker.backend.wake(), self.config.start_timeout_s)
        except Exception as exc:
            log.error("backend %s: worker %d failed to wake (%s); replacing it", self.name, worker.id, exc)
            self.transitions.record("wake", worker, time.monotonic() - worker.state_since, ok=False)
            self.retire(worker)
            return
        worker.wake_s = worker.enter(WorkerState.READY)
        self.transitions.record("wake", worker, worker.wake_s)
        worker.last_used = time.monotonic()
        log.info("backend %s: worker %d awake in %.2fs", self.name, worker.id, worker.wake_s)
        self._on_change(False)

    async def _sleep(self, worker: Worker) -> None:
        try:
            await worker.backend.sleep()
        except Exception as exc:
            log.error("backend %s: worker %d failed to sleep (%s); stopping it", self.name, worker.id, exc)
            self.transitions.record("sleep", worker, time.monotonic() - worker.state_since, ok=False)
            self.retire(worker)
            return
        spent = worker.enter(WorkerState.SLEEPING)  # only now: its memory is released
        self.transitions.record("sleep", worker, spent)
        worker.last_used = time.monotonic()
        log.info("backend %s: worker %d asleep in %.2fs", self.name, worker.id, spent)
        self._on_change(False)  # anyone who arrived meanwhile: it wakes at once

    async def stop(self, worker: Worker) -> None:
        if worker.state is not WorkerState.STOPPING:
            worker.enter(WorkerState.STOPPING)
        try:
            await worker.backend.stop()
        except Exception as exc:
            log.warning("backend %s: worker %d stop failed: %s", self.name, worker.id, exc)
        self.transitions.record("stop", worker, time.monotonic() - worker.state_since)
        if worker in self.workers:
            self.workers.remove(worker)
        if not self.closed:
            while len(self.workers) < self.config.min_workers:
                self.spawn()
            self._on_change(False)

    # -- idleness ------------------------------------------------------------------------

    async def reap_idle(self) -> None:
        """Forever: idle workers above min_workers sleep or stop; sleepers stop after
        ``stop_after_sleep_s``."""
        period = min(1.0, self.config.idle_timeout_s / 4)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            config = self.config
            for worker in list(self.workers):
                idle_s = now - worker.last_used
                if worker.state is WorkerState.SLEEPING:
                    if config.stop_after_sleep_s is not None and idle_s >= config.stop_after_sleep_s:
                        log.info("backend %s: worker %d slept long enough, stopping", self.name, worker.id)
                        self.retire(worker)
                    continue
                awake = sum(w.state in SERVING for w in self.workers)
                if (worker.state is WorkerState.READY and worker.inflight == 0
                        and idle_s >= config.idle_timeout_s and awake > config.min_workers):
                    if config.idle_action == "sleep" and worker.backend.supports_sleep:
                        log.info("backend %s: worker %d idle, sleeping", self.name, worker.id)
                        worker.enter(WorkerState.GOING_TO_SLEEP)
                        self._track(self._sleep(worker))
                    else:
                        log.info("backend %s: worker %d idle, stopping", self.name, worker.id)
                        self.retire(worker)

    async def close(self) -> None:
        self.closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*(self.stop(w) for w in list(self.workers)), return_exceptions=True)

    def _track(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
