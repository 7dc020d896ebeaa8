"""Step lookahead (LLM.step): a decode step launched before the last step's tokens are
read back gives exactly what the lock-step engine gives, and ends with nothing held."""

from __future__ import annotations

import random

import pytest

from sluice.engine.llm import LLM
from sluice.engine.sampling import SamplingParams


def engine(path, lookahead: bool) -> LLM:
    return LLM(path, device="cpu", dtype="float32", block_size=4, num_kv_blocks=48, max_num_seqs=8,
               max_num_batched_tokens=32, progress=False, step_lookahead=lookahead)


def count_ahead(llm: LLM) -> list[int]:
    """Wrap runner.run: the list counts the steps launched with on-device next ids."""
    launched: list[int] = []
    run = llm.runner.run

    def counting(batch, next_ids=None):
        if next_ids is not None:
            launched.append(len(batch.decode))
        return run(batch, next_ids)

    llm.runner.run = counting
    return launched


def prompts(n: int, seed: int = 3) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 500) for _ in range(rng.randrange(3, 20))] for _ in range(n)]


def test_lookahead_gives_the_lockstep_tokens(tiny_mixtral):
    ps = prompts(6)
    plain = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    lockstep = engine(tiny_mixtral, False)
    free = lockstep.block_manager.num_free_blocks
    # a stop token each request meets mid-way: the step launched after it is discarded
    first = [c.token_ids for c in lockstep.generate(ps, plain)]
    params = [
        SamplingParams(temperature=0, max_tokens=12, stop_token_ids=(first[0][4],)),
        SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=9, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logprobs=True, top_logprobs=2),
        SamplingParams(temperature=1.0, top_k=5, seed=11, max_tokens=15, ignore_eos=True, logprobs=True),
        SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=12, stop_token_ids=(first[5][7],)),
    ]
    want = lockstep.generate(ps, params)
    assert lockstep.block_manager.num_free_blocks == free

    llm = engine(tiny_mixtral, True)
    launched = count_ahead(llm)
    got = llm.generate(ps, params)
    assert launched, "no step was launched ahead"
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids
        assert g.finish_reason == w.finish_reason
        assert [t.logprob for t in g.logprobs] == pytest.approx([t.logprob for t in w.logprobs], abs=1e-4, nan_ok=True)
        for gt, wt in zip(g.logprobs, w.logprobs):  # (batches differ in shape: float noise)
            assert [i for i, _ in gt.top_logprobs] == [i for i, _ in wt.top_logprobs]
            assert [v for _, v in gt.top_logprobs] == pytest.approx([v for _, v in wt.top_logprobs], abs=1e-4)
    assert got[0].finish_reason == "stop" and len(got[0].token_ids) < 12
    assert llm._in_flight is None and not llm.has_unfinished()
    assert llm.block_manager.num_free_blocks == free


def test_sampling_that_reads_the_host_waits_for_the_last_tokens_not_the_launch(tiny_mixtral):
    """Penalties and grammars read the previous tokens on the host: the step is launched
    ahead all the same and samples once they are in, giving the lock-step tokens."""
    from sluice.engine.structured import Constraint, Grammars

    ps = prompts(3, seed=9)

    def params(llm: LLM) -> list[SamplingParams]:
        grammars = Grammars(llm.tokenizer, llm.model.config.vocab_size)
        return [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, frequency_penalty=1.5,
                               presence_penalty=0.5, logit_bias=((7, 3.0),)),
                SamplingParams(temperature=0.9, seed=2, max_tokens=40, constraint=Constraint(grammars.json_object())),
                SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)]

    lockstep = engine(tiny_mixtral, False)
    want = lockstep.generate(ps, params(lockstep))
    llm = engine(tiny_mixtral, True)
    launched = count_ahead(llm)
    got = llm.generate(ps, params(llm))
    assert launched
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert [c.finish_reason for c in got] == [c.finish_reason for c in want]
    assert got[1].text.startswith("{")


def test_abort_while_a_step_is_launched_ahead(tiny_mixtral):
    llm = engine(tiny_mixtral, True)
    free = llm.block_manager.num_free_blocks
    a, b = prompts(2, seed=4)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    [want_b] = engine(tiny_mixtral, True).generate([b], params)
    sa, sb = llm.add_request(a, params), llm.add_request(b, params)
    got: dict[int, list[int]] = {sa.seq_id: [], sb.seq_id: []}
    while llm._in_flight is None:
        for out in llm.step():
            got[out.seq_id] += out.token_ids
    llm.abort(sa.seq_id)  # its row of the step in flight is discarded
    before = len(got[sa.seq_id])
    while llm.has_unfinished():
        for out in llm.step():
            got[out.seq_id] += out.token_ids
    assert len(got[sa.seq_id]) == before
    assert got[sb.seq_id] == want_b.token_ids
    assert llm._in_flight is None
    assert llm.block_manager.num_free_blocks == free

    # every sequence of the step in flight aborted: the engine is idle, sleeps and serves again
    s = llm.add_request(a, params)
    while llm._in_flight is None:
        llm.step()
    llm.abort(s.seq_id)
    assert not llm.has_unfinished()
    llm.sleep()
    assert llm._in_flight is None
    llm.wake()
    assert llm.block_manager.num_free_blocks == free
    [again] = llm.generate([b], params)
    assert again.token_ids == want_b.token_ids


def test_a_backlog_that_cannot_start_keeps_the_lookahead(tiny_mixtral):
    """With every seat taken, waiting requests change nothing about the next decode step:
    it is still launched ahead, and each request yields its lock-step tokens."""
    ps = prompts(5, seed=6)
    params = SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)
    want = LLM(tiny_mixtral, device="cpu", dtype="float32", block_size=4, num_kv_blocks=48, max_num_seqs=2,
               progress=False, step_lookahead=False).generate(ps, params)
    llm = LLM(tiny_mixtral, device="cpu", dtype="float32", block_size=4, num_kv_blocks=48, max_num_seqs=2,
              progress=False)
    queued: list[bool] = []
    run = llm.runner.run

    def counting(batch, next_ids=None):
        if next_ids is not None:
            queued.append(bool(llm.scheduler.waiting))
        return run(batch, next_ids)

    llm.runner.run = counting
    got = llm.generate(ps, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert any(queued)  # launched ahead while requests waited for a seat


def test_every_call_that_returns_outputs_hands_over_first(tiny_mixtral):
    """AsyncLLM hands a call's outputs to the streams at the next on_launch: a call that
    launches nothing (its step in flight ends some rows) must still call it, or the last
    outputs wait a whole step longer."""
    llm = engine(tiny_mixtral, True)
    calls = [0]
    llm.on_launch = lambda: calls.__setitem__(0, calls[0] + 1)
    for p, n in zip(prompts(3, seed=8), (3, 6, 9)):
        llm.add_request(p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    while llm.has_unfinished():
        before = calls[0]
        if llm.step():
            assert calls[0] > before
