"""The block manager: who owns which KV-cache block, and prefix caching.

Blocks are reference-counted. A block that fills up gets a hash chained over
its tokens and every token before it; a new sequence whose prompt starts with
the same full blocks shares them instead of recomputing. Freed blocks keep
their hash until they are handed out again (least recently freed first), so a
prefix stays reusable while memory allows.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from sluice.engine.sequence import Sequence


def block_hash(prev: int | None, tokens: list[int]) -> int:
    return hash((prev, tuple(tokens)))


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: list[int] = field(default_factory=list)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # LRU order
        self.cached: dict[int, int] = {}  # hash -> block id

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate_prefix(self, seq: Sequence) -> None:
        """First admission: share cached blocks for the longest cached prefix of full blocks."""
        assert not seq.block_table
        if not self.enable_prefix_caching:
            return
        prev = None
        bs = self.block_size
        for i in range(seq.num_tokens // bs):
            tokens = seq.token_ids[i * bs:(i + 1) * bs]
            h = block_hash(prev, tokens)
            block_id = self.cached.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            self._take(block_id)
            seq.block_table.append(block_id)
            seq.block_hashes.append(h)
            prev = h
        # the last token is always computed again: its logits pick the next token
        seq.num_computed_tokens = min(len(seq.block_table) * bs, seq.num_tokens - 1)

    def ensure_slots(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow the block table to hold ``num_tokens``; all or nothing."""
        need = self.blocks_needed(num_tokens) - len(seq.block_table)
        if need > len(self.free):
            return False
        for _ in range(need):
            block_id = next(iter(self.free))
            block = self.blocks[block_id]
            if block.hash is not None and self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash, block.token_ids = None, []
            self._take(block_id)
            seq.block_table.append(block_id)
        return True

    def commit(self, seq: Sequence) -> None:
        """Register the hashes of blocks that are now full and computed."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(len(seq.block_hashes), seq.num_computed_tokens // bs):
            tokens = seq.token_ids[i * bs:(i + 1) * bs]
            h = block_hash(seq.block_hashes[-1] if seq.block_hashes else None, tokens)
            block = self.blocks[seq.block_table[i]]
            block.hash, block.token_ids = h, tokens
            self.cached.setdefault(h, block.block_id)
            seq.block_hashes.append(h)

    def free_sequence(self, seq: Sequence) -> None:
        # most recent blocks first into the LRU so a shared prefix outlives its tails
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table.clear()
        seq.block_hashes.clear()
        seq.num_computed_tokens = 0

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1
