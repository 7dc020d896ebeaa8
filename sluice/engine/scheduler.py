"""Continuous batching with chunked prefill and preemption by recompute.

Each step first gives every running, fully prefilled sequence one decode token,
then spends what is left of the token budget on prefill chunks: sequences part
way through their prompt first, then new arrivals in order. When the cache runs
out of blocks, the most recently admitted sequence is preempted: its blocks are
freed and it goes back to the front of the queue, to be recomputed later (its
full blocks usually come back from the prefix cache).

When the runner replays steps from CUDA graphs captured at padded token counts
(``token_buckets``), a step just past one of them (say 50 decodes and a 1024-token
prompt: 1074, padded to 1536) would spend the padding's compute for nothing. Past
TRIM_FROM_TOKENS, where the step's cost grows with its tokens, the last prefill chunk
is cut back to land on the graph below when that drops fewer tokens than padding
would add; the cut tokens go into the next step.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from sluice.engine.kv_cache import BlockManager
from sluice.engine.sequence import Sequence, Status

# Below this many tokens a Mixtral step costs about the same whatever its size (weights
# dominate), so padding is nearly free and a trimmed chunk would only delay its prompt.
TRIM_FROM_TOKENS = 512


@dataclass
class ScheduledBatch:
    decode: list[Sequence] = field(default_factory=list)
    prefill: list[Sequence] = field(default_factory=list)
    chunk_lens: list[int] = field(default_factory=list)  # new tokens per prefill sequence

    @property
    def sequences(self) -> list[Sequence]:
        return self.decode + self.prefill

    @property
    def num_tokens(self) -> int:
        return len(self.decode) + sum(self.chunk_lens)

    def __bool__(self) -> bool:
        return bool(self.decode or self.prefill)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.num_preemptions = 0
        self.token_buckets: tuple[int, ...] = ()  # step sizes the runner has graphs for, ascending

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def can_admit(self) -> bool:
        """Whether the next schedule() could start a waiting request (a seat and a free
        block); a backlog it cannot start leaves the running batch's decode step as is."""
        return bool(self.waiting) and len(self.running) < self.max_num_seqs and self.blocks.num_free_blocks > 0

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        for seq in list(self.running):
            if seq.status is not Status.RUNNING or seq.num_computed_tokens < seq.num_tokens - 1:
                continue  # preempted meanwhile, or still prefilling
            while not self.blocks.ensure_slots(seq, seq.num_tokens):
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING and budget > 0:
                batch.decode.append(seq)
                budget -= 1
        for seq in [s for s in self.running if s.num_computed_tokens < s.num_tokens - 1]:
            budget = self._schedule_chunk(seq, batch, budget)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            self.blocks.allocate_prefix(seq)
            left = self._schedule_chunk(seq, batch, budget)
            if left == budget:  # no room: undo and wait for blocks to free up
                self.blocks.free_sequence(seq)
                break
            budget = left
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
        self._fit_bucket(batch)
        return batch

    def _fit_bucket(self, batch: ScheduledBatch) -> None:
        """Trim the last prefill chunk down to a graph size (module docstring)."""
        if not batch.prefill:
            return
        n = batch.num_tokens
        up = next((b for b in self.token_buckets if b >= n), None)
        down = max((b for b in self.token_buckets if b < n), default=0)
        if up is None or up == n or down < TRIM_FROM_TOKENS:
            return
        trim = n - down
        if trim < up - n and trim < batch.chunk_lens[-1]:
            batch.chunk_lens[-1] -= trim

    def _schedule_chunk(self, seq: Sequence, batch: ScheduledBatch, budget: int) -> int:
        room = (len(seq.block_table) + self.blocks.num_free_blocks) * self.blocks.block_size
        chunk = min(seq.num_tokens - seq.num_computed_tokens, budget, room - seq.num_computed_tokens)
        if chunk <= 0 or not self.blocks.ensure_slots(seq, seq.num_computed_tokens + chunk):
            return budget
        batch.prefill.append(seq)
        batch.chunk_lens.append(chunk)
        return budget - chunk

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free_sequence(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        """Free a finished or aborted sequence's blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free_sequence(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason
