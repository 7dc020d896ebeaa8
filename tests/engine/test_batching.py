"""Continuous batching: whatever shares the batch, each request yields what it yields alone."""

from __future__ import annotations

import random

from sluice.engine.llm import LLM
from sluice.engine.sampling import SamplingParams


CANCELLED = (3, 10, 13)  # each cancelled once it has produced 2 tokens


def requests() -> list[tuple[list[int], SamplingParams]]:
    rng = random.Random(7)
    shared = [rng.randrange(3, 32000) for _ in range(12)]  # a common prefix for some prompts
    out = []
    for i in range(16):
        n = rng.randrange(3, 40)
        prompt = [1] + (shared if i % 4 == 0 else []) + [rng.randrange(3, 32000) for _ in range(n)]
        params = (SamplingParams(temperature=0, max_tokens=rng.randrange(4, 14), ignore_eos=True) if i % 2
                  else SamplingParams(temperature=0.9, top_p=0.9, seed=i, max_tokens=rng.randrange(4, 14),
                                      ignore_eos=True))
        if i in CANCELLED:  # long enough to be cancelled mid-generation
            params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
        out.append((prompt, params))
    return out


def test_staggered_cancelled_preempted_requests_match_solo_runs(tiny_mixtral):
    reqs = requests()
    solo_llm = LLM(tiny_mixtral, device="cpu", dtype="float32", block_size=4, num_kv_blocks=64, progress=False)
    solo = [solo_llm.generate([p], sp)[0].token_ids for p, sp in reqs]

    # 24 blocks of 4 tokens cannot hold 8 running sequences: preemption must happen
    llm = LLM(tiny_mixtral, device="cpu", dtype="float32", block_size=4, num_kv_blocks=24,
              max_num_seqs=8, max_num_batched_tokens=16, progress=False)
    arrive = {i: i // 2 for i in range(16)}  # two new requests every step
    seqs: dict[int, object] = {}
    got: dict[int, list[int]] = {i: [] for i in range(16)}
    finished: set[int] = set()
    cancelled: set[int] = set()
    step = 0
    while len(seqs) < 16 or llm.has_unfinished():
        for i, at in arrive.items():
            if at == step:
                seqs[i] = llm.add_request(*reqs[i])
        for i in CANCELLED:
            if len(got[i]) >= 2 and i not in cancelled:
                llm.abort(seqs[i].seq_id)
                cancelled.add(i)
        by_seq = {s.seq_id: i for i, s in seqs.items()}
        for out in llm.step():
            got[by_seq[out.seq_id]] += out.token_ids
            if out.finished:
                finished.add(by_seq[out.seq_id])
        step += 1
        assert step < 500

    assert llm.scheduler.num_preemptions > 0
    assert finished == set(range(16)) - set(CANCELLED)
    for i in finished:
        assert got[i] == solo[i], f"request {i}"
    assert cancelled == set(CANCELLED)
    for i in CANCELLED:
        assert got[i] == solo[i][: len(got[i])] and len(got[i]) < len(solo[i])
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
