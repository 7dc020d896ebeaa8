"""Chunk trimming to the runner's graph sizes: a step just past a captured token count
gives up the tail of its last prefill chunk to the next step instead of padding up."""

from __future__ import annotations

from sluice.engine.kv_cache import BlockManager
from sluice.engine.sampling import SamplingParams
from sluice.engine.scheduler import Scheduler
from sluice.engine.sequence import Sequence

BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 1536, 2048)


def _scheduler(buckets=BUCKETS) -> Scheduler:
    s = Scheduler(BlockManager(512, 16, enable_prefix_caching=False), max_num_seqs=8, max_num_batched_tokens=2048)
    s.token_buckets = buckets
    return s


def _prompt(n: int, start: int) -> Sequence:
    return Sequence([start + i for i in range(n)], SamplingParams(max_tokens=4))


def _run(batch) -> None:
    """What a step does to the sequences' bookkeeping (no model)."""
    for seq, n in zip(batch.prefill, batch.chunk_lens):
        seq.num_computed_tokens += n


def test_step_just_past_a_graph_is_cut_back_to_it():
    s = _scheduler()
    a, b = _prompt(700, 0), _prompt(400, 5000)
    s.add(a)
    s.add(b)
    first = s.schedule()
    assert first.chunk_lens == [700, 324] and first.num_tokens == 1024  # not 1100 padded to 1536
    _run(first)
    second = s.schedule()
    assert second.prefill == [b] and second.chunk_lens == [76]  # the rest of b, next step


def test_no_cut_when_padding_is_cheaper_or_the_step_small():
    s = _scheduler()
    s.add(_prompt(1000, 0))
    s.add(_prompt(500, 5000))
    assert s.schedule().chunk_lens == [1000, 500]  # 1500: 36 of padding beats cutting 476
    small = _scheduler()
    small.add(_prompt(300, 0))
    small.add(_prompt(30, 5000))
    assert small.schedule().chunk_lens == [300, 30]  # 330 < TRIM_FROM_TOKENS: pad to 512
    none = _scheduler(buckets=())
    none.add(_prompt(700, 0))
    none.add(_prompt(400, 5000))
    assert none.schedule().chunk_lens == [700, 400]  # no graphs (CPU, eager): nothing to fit


def test_a_chunk_is_never_cut_to_nothing():
    s = _scheduler()
    s.add(_prompt(1030, 0))
    s.add(_prompt(5, 5000))
    assert s.schedule().chunk_lens == [1030, 5]  # cutting 11 would empty the 5-token chunk
