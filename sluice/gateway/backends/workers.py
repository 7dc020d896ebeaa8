"""A pool's workers, their states, and the record of their transitions.

    starting ──> ready <──> busy
                   │  ^
        idle: sleep│  │wake             idle (or failed): stop
                   v  │
    going_to_sleep ──> sleeping ──> waking        any ──> stopping ──> (gone)

A state names what is true now: ``sleeping`` only once the backend's sleep() has
returned (its accelerator memory released), a stopping worker still holds its memory
(and its place under max_workers) until stop() returns. ``starting``, ``waking``,
``going_to_sleep`` and ``stopping`` are transitions; each one is timed.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from sluice.gateway.backends.contract import Backend


class WorkerState(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    BUSY = "busy"
    GOING_TO_SLEEP = "going_to_sleep"
    SLEEPING = "sleeping"
    WAKING = "waking"
    STOPPING = "stopping"


SERVING = (WorkerState.READY, WorkerState.BUSY)
# Capacity on its way: a worker going to sleep is woken as soon as its sleep returns
# when anyone is waiting, so it counts as coming too.
COMING = (WorkerState.STARTING, WorkerState.WAKING, WorkerState.GOING_TO_SLEEP)
TRANSITION_OF = {WorkerState.STARTING: "start", WorkerState.WAKING: "wake",
                 WorkerState.GOING_TO_SLEEP: "sleep", WorkerState.STOPPING: "stop"}
KINDS = ("start", "wake", "sleep", "stop")


@dataclass(eq=False)
class Worker:
    id: int
    backend: Backend
    state: WorkerState = WorkerState.STARTING
    inflight: int = 0
    served: int = 0
    state_since: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    cold_start_s: float | None = None
    wake_s: float | None = None
    wake_when_asleep: bool = False  # someone arrived while it was going to sleep
    device: str | None = None  # its pool's device it holds (data-parallel pools)

    def enter(self, state: WorkerState) -> float:
        """Move to ``state``; returns the seconds spent in the previous one."""
        now = time.monotonic()
        spent = now - self.state_since
        self.state, self.state_since = state, now
        return spent


@dataclass(frozen=True, slots=True)
class Transition:
    kind: str  # start, wake, sleep, stop
    worker: int
    duration_s: float
    ok: bool
    at: float  # wall-clock time it ended


class TransitionLog:
    """Counts, last and longest durations per kind, and the most recent transitions."""

    def __init__(self, keep: int = 32) -> None:
        self.recent: deque[Transition] = deque(maxlen=keep)
        self.count = dict.fromkeys(KINDS, 0)
        self.failed = dict.fromkeys(KINDS, 0)
        self.last_s: dict[str, float | None] = dict.fromkeys(KINDS)
        self.max_s: dict[str, float | None] = dict.fromkeys(KINDS)

    def record(self, kind: str, worker: Worker, duration_s: float, ok: bool = True) -> None:
        self.recent.append(Transition(kind, worker.id, round(duration_s, 4), ok, time.time()))
        if not ok:
            self.failed[kind] += 1
            return
        self.count[kind] += 1
        self.last_s[kind] = duration_s
        longest = self.max_s[kind]
        self.max_s[kind] = duration_s if longest is None else max(longest, duration_s)

    def status(self) -> dict[str, Any]:
        return {
            kind: {"count": self.count[kind], "failed": self.failed[kind], "last_s": self.last_s[kind],
                   "max_s": self.max_s[kind]}
            for kind in KINDS
        } | {"recent": [{"kind": t.kind, "worker": t.worker, "duration_s": t.duration_s, "ok": t.ok,
                         "at": t.at} for t in self.recent]}


def worker_status(worker: Worker, now: float) -> dict[str, Any]:
    in_transition = worker.state in TRANSITION_OF
    return {
        "id": worker.id,
        "device": worker.device,
        "state": str(worker.state),
        "state_for_s": round(now - worker.state_since, 3),
        "transition": TRANSITION_OF.get(worker.state) if in_transition else None,
        "inflight": worker.inflight,
        "served": worker.served,
        "cold_start_s": worker.cold_start_s,
        "wake_s": worker.wake_s,
        "idle_s": round(now - worker.last_used, 3) if worker.inflight == 0 else 0.0,
    }
