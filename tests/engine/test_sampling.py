"""Sampling and text: seeds, stop strings, logprobs, prefix caching, async cancellation."""

from __future__ import annotations

import asyncio
import time

import pytest

from sluice.engine.async_llm import AsyncLLM
from sluice.engine.llm import LLM
from sluice.engine.sampling import SamplingParams

PROMPT = [1, 415, 2936, 9060, 285, 1142, 28705, 461, 10575, 754, 272, 17898, 3914, 28723]


@pytest.fixture(scope="module")
def llm(tiny_mixtral) -> LLM:
    return LLM(tiny_mixtral, device="cpu", dtype="float32", block_size=4, num_kv_blocks=128, progress=False)


def test_same_seed_same_text_whatever_the_batch(llm):
    params = SamplingParams(temperature=1.0, top_k=50, seed=1234, max_tokens=12, ignore_eos=True)
    alone = llm.generate([PROMPT], params)[0]
    others = [SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True, seed=s) for s in range(4)]
    crowd = llm.generate([PROMPT[:5], PROMPT, PROMPT[3:], PROMPT[:9], PROMPT[1:]], [others[0], params, *others[1:]])
    assert crowd[1].token_ids == alone.token_ids and crowd[1].text == alone.text
    other_seed = llm.generate([PROMPT], SamplingParams(temperature=1.0, top_k=50, seed=99, max_tokens=12,
                                                      ignore_eos=True))[0]
    assert other_seed.token_ids != alone.token_ids


def test_top_k_one_is_greedy_and_logprobs_are_reported(llm):
    greedy = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=True,
                                                   top_logprobs=3))[0]
    top1 = llm.generate([PROMPT], SamplingParams(temperature=1.5, top_k=1, seed=5, max_tokens=6,
                                                 ignore_eos=True))[0]
    assert top1.token_ids == greedy.token_ids
    for tok in greedy.logprobs:
        assert len(tok.top_logprobs) == 3
        assert tok.top_logprobs[0] == (tok.token_id, pytest.approx(tok.logprob))
        assert tok.logprob <= 0


def test_stop_string_truncates_and_is_never_streamed(llm):
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    full = llm.generate([PROMPT], params)[0].text
    stop = full[10:13]
    seq = llm.add_request(PROMPT, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=(stop,)))
    deltas = []
    while llm.has_unfinished():
        deltas += [(o.text, o.finish_reason) for o in llm.step() if o.seq_id == seq.seq_id]
    text = "".join(d for d, _ in deltas)
    assert text == full[: full.find(stop)]
    assert deltas[-1][1] == "stop" and seq.finish_reason == "stop"


def test_stop_token_and_max_tokens(llm):
    free = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 8
    stopped = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=8,
                                                    stop_token_ids=(free.token_ids[3],)))[0]
    first = free.token_ids.index(free.token_ids[3])
    assert stopped.finish_reason == "stop" and stopped.token_ids == free.token_ids[: first + 1]


def test_prefix_cache_hit_reuses_blocks(llm):
    prompt = PROMPT + [28705, 461, 10575, 754, 272, 17898]  # 20 tokens = 5 full blocks of 4
    first = llm.add_request(prompt, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    llm.step()
    blocks = list(first.block_table)
    while llm.has_unfinished():
        llm.step()
    free_before = llm.block_manager.num_free_blocks
    second = llm.add_request(prompt + [415, 2936], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    batch = llm.scheduler.schedule()
    assert second.block_table[:5] == blocks[:5]  # the same physical blocks
    assert batch.chunk_lens == [2]  # only the two new tokens are computed
    assert llm.block_manager.num_free_blocks == free_before - 6  # 5 cached blocks taken back + 1 new
    llm.abort(second.seq_id)
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_prefix_caching_changes_no_output(tiny_mixtral, llm):
    plain = LLM(tiny_mixtral, device="cpu", dtype="float32", block_size=4, num_kv_blocks=128,
                enable_prefix_caching=False, progress=False)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    prompts = [PROMPT, PROMPT + [461, 10575], PROMPT[:8] + [754, 272]]
    assert [c.token_ids for c in plain.generate(prompts, params)] == [
        c.token_ids for c in llm.generate(prompts, params)]


def test_async_streams_and_cancellation_frees_blocks(llm):
    engine = AsyncLLM(llm)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    expected = llm_tokens = None

    async def collect(prompt):
        out = []
        async for o in engine.generate(prompt, params):
            out += o.token_ids
        return out

    async def main():
        nonlocal llm_tokens
        llm_tokens = await asyncio.gather(collect(PROMPT), collect(PROMPT[:7]))
        stream = engine.generate(PROMPT, SamplingParams(temperature=0, max_tokens=400, ignore_eos=True))
        await anext(stream)
        await anext(stream)
        assert llm.block_manager.num_free_blocks < llm.block_manager.num_blocks
        await stream.aclose()  # the client went away
        deadline = time.monotonic() + 2
        while llm.block_manager.num_free_blocks != llm.block_manager.num_blocks:
            assert time.monotonic() < deadline, "cancelled sequence still holds blocks"
            await asyncio.sleep(0.001)
        assert not llm.sequences

    try:
        asyncio.run(main())
    finally:
        engine.close()
    expected = [c.token_ids for c in llm.generate([PROMPT, PROMPT[:7]], params)]
    assert llm_tokens == expected
