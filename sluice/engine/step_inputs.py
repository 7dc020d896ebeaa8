"""A step's inputs in static device buffers, filled through page-locked host twins.

Tokens of a step are laid out [decode tokens | prefill chunks]. Decode-only steps read
``DecodeInputs`` (what the decode CUDA graphs are captured against), steps with prefill
chunks ``VarlenInputs`` (the varlen graphs' inputs, read by eager steps too). One extra
cache block at the end of the KV cache is scratch: padded rows write there.
"""

from __future__ import annotations

import numpy as np
import torch

from sluice.engine.layers.attention import AttentionKernels, AttentionMetadata
from sluice.engine.scheduler import ScheduledBatch


def cache_slot(block_table: list[int], pos: int, block_size: int) -> int:
    """The KV-cache slot of a sequence's token at ``pos``."""
    return block_table[pos // block_size] * block_size + pos % block_size


class _HostTwins:
    """Two static device buffers (int64 and int32) with page-locked host twins: a step
    fills the twins once the previous copy out of them is done, then copies them over."""

    def __init__(self, host64: torch.Tensor, host32: torch.Tensor, device: torch.device,
                 kernels: AttentionKernels | None) -> None:
        pin = device.type == "cuda"
        self.device = device
        self.kernels = kernels  # passed to attention in every step's metadata
        self.host64 = host64.pin_memory() if pin else host64
        self.host32 = host32.pin_memory() if pin else host32
        self.dev64, self.dev32 = self.host64.to(device), self.host32.to(device)
        self.copied: torch.cuda.Event | None = None

    def _await_copy(self) -> None:
        if self.copied is not None:
            self.copied.synchronize()

    def _push(self, len32: int) -> None:
        """Copy the int64 twin and the first ``len32`` int32 entries over, asynchronously."""
        self.dev64.copy_(self.host64, non_blocking=True)
        self.dev32[:len32].copy_(self.host32[:len32], non_blocking=True)
        if self.device.type == "cuda":
            self.copied = torch.cuda.Event()
            self.copied.record()


class DecodeInputs(_HostTwins):
    """The decode graphs' static inputs, packed into two device buffers so that a replay
    needs two host-to-device copies: int64 [ids | positions | slots] and int32
    [context lengths | block tables], each filled in a page-locked host twin.
    Padded rows (bucket > batch) read one token and write to the scratch slot."""

    def __init__(self, max_bs: int, max_blocks: int, scratch_slot: int, device: torch.device,
                 kernels: AttentionKernels | None = None) -> None:
        self.max_bs, self.max_blocks, self.scratch = max_bs, max_blocks, scratch_slot
        host64 = torch.zeros(3, max_bs, dtype=torch.int64)
        host64[2] = scratch_slot
        host32 = torch.zeros(max_bs * (1 + max_blocks), dtype=torch.int32)
        host32[:max_bs] = 1
        super().__init__(host64, host32, device, kernels)

    def views(self) -> dict[str, torch.Tensor]:
        """Contiguous views of the device buffers (what the graphs are captured against)."""
        n = self.max_bs
        return {"ids": self.dev64[0], "pos": self.dev64[1], "slots": self.dev64[2], "ctx": self.dev32[:n],
                "tables": self.dev32[n:].view(n, self.max_blocks)}

    def args(self, bucket: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """(input_ids, positions, metadata) of the first ``bucket`` rows."""
        s = self.views()
        meta = AttentionMetadata(slot_mapping=s["slots"][:bucket], decode_block_tables=s["tables"][:bucket],
                                 decode_context_lens=s["ctx"][:bucket], kernels=self.kernels)
        return s["ids"][:bucket], s["pos"][:bucket], meta

    def reset(self) -> None:
        """Every row padding (what the graphs are captured with): a capture's warm-up run
        between steps then writes only to the scratch slot."""
        self._await_copy()
        self.fill([], self.max_bs, 1)
        self.dev64.copy_(self.host64)
        self.dev32.copy_(self.host32)

    def fill(self, seqs: list, bucket: int, block_size: int, ahead: bool = False) -> None:
        """Write the host twins for ``seqs`` padded to ``bucket`` rows. ``ahead``: each
        sequence's next token, sampled by a step whose result is not on the host yet
        (its id is left to the caller; its position is one past the last known token)."""
        B, n = len(seqs), self.max_bs
        h64 = self.host64.numpy()
        h32 = self.host32.numpy()
        tables = h32[n:].reshape(n, self.max_blocks)
        for i, q in enumerate(seqs):
            p = q.num_tokens - 1 + ahead
            table = q.block_table
            h64[0, i] = 0 if ahead else q.token_ids[p]
            h64[1, i] = p
            h64[2, i] = cache_slot(table, p, block_size)
            h32[i] = p + 1
            tables[i, :len(table)] = table
        h64[0, B:bucket] = 0
        h64[1, B:bucket] = 0
        h64[2, B:bucket] = self.scratch
        h32[B:bucket] = 1

    def load(self, seqs: list, bucket: int, block_size: int, next_ids: torch.Tensor | None = None) -> None:
        """Fill the host twins (once the previous copy out of them is done) and copy them
        over. ``next_ids`` (len(seqs),) on the device: the tokens the previous step sampled,
        not yet read back, copied into the ids after the host twins (stream order)."""
        self._await_copy()
        self.fill(seqs, bucket, block_size, ahead=next_ids is not None)
        self._push(self.max_bs + bucket * self.max_blocks)  # context lengths, then the bucket's table rows
        if next_ids is not None:
            self.dev64[0, :len(seqs)].copy_(next_ids, non_blocking=True)


class VarlenInputs(_HostTwins):
    """Inputs of a step with prefill chunks, in two static device buffers that the varlen
    graphs are captured against (and eager steps read too): int64 [ids | positions |
    slots] per token and int32 [query_start (S+1) | seq_lens (S) | block tables (S, W)],
    each filled in a page-locked host twin and copied in one transfer. Rows past the
    step's tokens (up to the graph's padded count) read token 0 and write the scratch
    slot; sequence rows past the batch have no query tokens."""

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int, scratch_slot: int,
                 device: torch.device, kernels: AttentionKernels | None = None) -> None:
        self.max_tokens, self.max_seqs, self.max_blocks, self.scratch = max_tokens, max_seqs, max_blocks, scratch_slot
        super().__init__(torch.zeros(3, max_tokens, dtype=torch.int64),
                         torch.zeros(2 * max_seqs + 1 + max_seqs * max_blocks, dtype=torch.int32), device, kernels)
        self.reset()

    def reset(self) -> None:
        """No sequences, every token row padding (what the graphs are captured with)."""
        self._await_copy()
        self.host64[0:2] = 0
        self.host64[2] = self.scratch
        self.host32.zero_()
        self.dev64.copy_(self.host64)
        self.dev32.copy_(self.host32)

    def views(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """(input_ids, positions, metadata) of the first ``num_tokens`` token rows."""
        S = self.max_seqs
        meta = AttentionMetadata(slot_mapping=self.dev64[2, :num_tokens], query_start=self.dev32[:S + 1],
                                 seq_lens=self.dev32[S + 1:2 * S + 1],
                                 block_tables=self.dev32[2 * S + 1:].view(S, self.max_blocks), kernels=self.kernels)
        return self.dev64[0, :num_tokens], self.dev64[1, :num_tokens], meta

    def fill(self, batch: ScheduledBatch, num_rows: int, block_size: int) -> list[int]:
        """Write the host twins for ``batch`` padded to ``num_rows`` token rows; returns
        the rows that sample (every decode, and each prefill chunk that ends its prompt)."""
        seqs = len(batch.decode) + len(batch.prefill)
        if seqs > self.max_seqs or num_rows > self.max_tokens:
            raise ValueError(f"step of {seqs} sequences / {num_rows} tokens exceeds "
                             f"{self.max_seqs} / {self.max_tokens}")
        S = self.max_seqs
        h64 = self.host64.numpy()
        h32 = self.host32.numpy()
        starts, lens = h32[:S + 1], h32[S + 1:2 * S + 1]
        tables = h32[2 * S + 1:].reshape(S, self.max_blocks)
        rows: list[int] = []
        n = 0
        for i, q in enumerate(batch.decode):
            p = q.num_tokens - 1
            h64[0, n], h64[1, n], h64[2, n] = q.token_ids[p], p, cache_slot(q.block_table, p, block_size)
            starts[i], lens[i] = n, q.num_tokens
            tables[i, :len(q.block_table)] = q.block_table
            rows.append(n)
            n += 1
        for j, (q, k) in enumerate(zip(batch.prefill, batch.chunk_lens), start=len(batch.decode)):
            a, b = q.num_computed_tokens, q.num_computed_tokens + k
            table = q.block_table
            starts[j], lens[j] = n, b
            tables[j, :len(table)] = table
            positions = np.arange(a, b)
            h64[0, n:n + k] = q.token_ids[a:b]
            h64[1, n:n + k] = positions
            h64[2, n:n + k] = np.asarray(table)[positions // block_size] * block_size + positions % block_size
            n += k
            if b == q.num_tokens:
                rows.append(n - 1)
        starts[seqs:] = n
        lens[seqs:] = 0
        h64[0:2, n:num_rows] = 0
        h64[2, n:num_rows] = self.scratch
        return rows

    def load(self, batch: ScheduledBatch, num_rows: int, block_size: int) -> torch.Tensor:
        """Fill the host twins (once the previous copy out of them is done), copy them over,
        and return the sampling rows as a device tensor."""
        self._await_copy()
        rows = self.fill(batch, num_rows, block_size)
        seqs = len(batch.decode) + len(batch.prefill)
        # int64 whole (24 bytes a row: cheaper than three pieces); int32 up to the batch's table rows
        self._push(2 * self.max_seqs + 1 + seqs * self.max_blocks)
        out = torch.tensor(rows, dtype=torch.int64)
        return out.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else out
