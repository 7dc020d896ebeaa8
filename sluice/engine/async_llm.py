"""AsyncLLM: the step loop in a background thread, one asyncio stream per request.

    engine = AsyncLLM(LLM(path))
    async for out in engine.generate(prompt_ids, SamplingParams(max_tokens=64)):
        print(out.text, end="")

Requests and aborts reach the engine thread as commands, applied between steps. A step's
outputs go back in one hand-over per event loop (one ``call_soon_threadsafe``, however
many requests are streaming), so the loop wakes once per step rather than once per token.
On a GPU they go back once the next step's forward is enqueued (``LLM.on_launch``): the
consumers' Python (detokenized text, SSE chunks, metering) then runs while the GPU
computes, instead of competing for the GIL with the thread preparing that step. That
delays each token by the next step's preparation (well under a millisecond); with no
next step they go at once.
Closing a stream early aborts its sequence: at once when the engine is between
steps, otherwise right after the current step; either way its blocks are freed
before the next step is scheduled. While it has nothing to do (after its first token)
the thread warms the engine up one piece at a time (``LLM.warm_step``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
from collections import deque
from collections.abc import AsyncIterator, Iterator
from typing import Any

from sluice.engine.llm import LLM
from sluice.engine.output import RequestOutput
from sluice.engine.parallel.group import use_device
from sluice.engine.sampling import SamplingParams

log = logging.getLogger(__name__)


class AsyncLLM:
    def __init__(self, llm: LLM, deliver_after_launch: bool | None = None) -> None:
        """``deliver_after_launch``: hand a step's outputs over once the next step is
        launched (default: on CUDA, where launching returns before the step is done)."""
        self.llm = llm
        self._switch_held = llm.config.gil_switch_interval_s is not None
        if self._switch_held:  # process-wide, while any AsyncLLM runs: see EngineConfig
            _hold_switch_interval(llm.config.gil_switch_interval_s)
        if deliver_after_launch is None:  # SLUICE_DELIVER_AFTER_LAUNCH=0: at once (A/B runs)
            deliver_after_launch = llm.runner.device.type == "cuda" and \
                os.environ.get("SLUICE_DELIVER_AFTER_LAUNCH", "1") != "0"
        self._held: list[tuple[int, RequestOutput | BaseException]] = []  # outputs awaiting the next launch
        if deliver_after_launch:
            llm.on_launch = self._release_held
        self._lock = threading.Lock()  # held while the LLM's state is touched
        self._priority = 0  # callers waiting for the lock that the background warm-up yields to
        self._priority_lock = threading.Lock()
        self._commands: deque[tuple[str, Any]] = deque()  # ("add", Sequence) | ("abort", seq_id)
        self._streams: dict[int, _Stream] = {}
        self._wake = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="engine-step-loop", daemon=True)
        self._thread.start()

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; closing the iterator early cancels it."""
        if self._stopped:
            raise RuntimeError("AsyncLLM is closed")
        seq = self.llm.make_sequence(prompt, params, request_id)  # raises RequestError here
        stream = self._streams[seq.seq_id] = _Stream(seq.seq_id, asyncio.get_running_loop())
        self._send("add", seq)
        finished = False
        try:
            while not finished:
                if not stream.items:
                    await stream.wait()
                item = stream.items.popleft()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(seq.seq_id, None)
            if not finished:
                self.abort(seq.seq_id)

    def abort(self, seq_id: int) -> None:
        self._send("abort", seq_id)
        if self._lock.acquire(blocking=False):  # engine between steps: free the blocks now
            try:
                self._apply_commands()
            finally:
                self._lock.release()

    def sleep(self) -> None:
        """LLM.sleep() between steps (call from a worker thread in async code; waits at
        most for the step or the one CUDA graph capture under way)."""
        with self._first_in_line():
            self._apply_commands()
            self.llm.sleep()

    def wake(self) -> str:
        with self._first_in_line():
            source = self.llm.wake()
        self._wake.set()  # requests queued while asleep run now
        return source

    @contextlib.contextmanager
    def _first_in_line(self) -> Iterator[None]:
        """The lock, taken ahead of the background warm-up (which would otherwise take it
        back piece after piece: a lock is not fair) once its current piece is done."""
        with self._priority_lock:
            self._priority += 1
        try:
            with self._lock:
                yield
        finally:
            with self._priority_lock:
                self._priority -= 1

    def close(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=30)
        if self._switch_held:
            self._switch_held = False
            _release_switch_interval()

    # ---- engine thread --------------------------------------------------

    def _send(self, kind: str, arg: Any) -> None:
        self._commands.append((kind, arg))
        self._wake.set()

    def _apply_commands(self) -> None:
        while self._commands:
            kind, arg = self._commands.popleft()
            if kind == "add":
                self.llm.enqueue(arg)
            else:
                self.llm.abort(arg)

    def _run(self) -> None:
        use_device(self.llm.runner.device)  # triton launches on the thread's current device
        while not self._stopped:
            self._wake.wait()
            self._wake.clear()
            while not self._stopped:
                try:
                    with self._lock:
                        self._apply_commands()
                        if self.llm.asleep or not self.llm.has_unfinished():
                            break
                        outputs = self.llm.step()
                except Exception as exc:  # a failed step fails every request in flight
                    log.exception("engine step failed")
                    self._release_held()
                    self._fail_all(exc)
                    break
                items = [(out.seq_id, out) for out in outputs]
                if self.llm.on_launch is not None and items:
                    self._held.extend(items)  # handed over when the next step is launched
                else:
                    self._release_held()  # (a step that launched nothing releases them too)
                    self._deliver(items)
            self._release_held()  # no next step: at once
            self._warm_while_idle()

    def _release_held(self) -> None:
        held, self._held = self._held, []
        if held:
            self._deliver(held)

    def _warm_while_idle(self) -> None:
        """Background warm-up (CUDA graphs, the weights' host copy), one piece at a time
        while no command is waiting: a request that arrives waits for one piece at most."""
        while not self._stopped and not self._commands and not self._priority:
            try:
                with self._lock:
                    if self._commands or self._priority or not self.llm.warm_step():
                        return
            except Exception:  # warming is an optimisation: the engine serves without it
                log.exception("background warm-up failed")
                return

    def _deliver(self, items: list[tuple[int, RequestOutput | BaseException]]) -> None:
        """Hand a step's outputs to their streams: one callback per consumers' event loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, Any]]] = {}
        for seq_id, item in items:
            stream = self._streams.get(seq_id)
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((stream, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_hand_over, batch)
            except RuntimeError:  # the consumers' event loop is gone
                for stream, _ in batch:
                    self._send("abort", stream.seq_id)

    def _fail_all(self, exc: Exception) -> None:
        with self._lock:
            for seq_id in list(self.llm.sequences):
                self.llm.abort(seq_id)
        self._deliver([(seq_id, exc) for seq_id in list(self._streams)])

    @property
    def num_free_blocks(self) -> int:
        return self.llm.block_manager.num_free_blocks


_switch_lock = threading.Lock()
_switch_users = 0
_switch_saved = 0.005


def _hold_switch_interval(seconds: float) -> None:
    """The GIL switch interval while at least one AsyncLLM holds it; the first saves
    Python's, the last to let go puts it back."""
    global _switch_users, _switch_saved
    with _switch_lock:
        if _switch_users == 0:
            _switch_saved = sys.getswitchinterval()
        _switch_users += 1
        sys.setswitchinterval(seconds)


def _release_switch_interval() -> None:
    global _switch_users
    with _switch_lock:
        _switch_users -= 1
        if _switch_users == 0:
            sys.setswitchinterval(_switch_saved)


class _Stream:
    """One request's outputs on their way to its consumer (touched on the consumer's loop only)."""

    __slots__ = ("seq_id", "loop", "items", "waiter")

    def __init__(self, seq_id: int, loop: asyncio.AbstractEventLoop) -> None:
        self.seq_id = seq_id
        self.loop = loop
        self.items: deque[RequestOutput | BaseException] = deque()
        self.waiter: asyncio.Future[None] | None = None

    async def wait(self) -> None:
        self.waiter = self.loop.create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    def put(self, item: RequestOutput | BaseException) -> None:
        self.items.append(item)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


def _hand_over(batch: list[tuple[_Stream, Any]]) -> None:
    for stream, item in batch:
        stream.put(item)

