"""AsyncLLM hands a step's outputs over once the next step is launched (what it does on a
GPU, where the consumers' Python then overlaps the step): every stream still gets every
token, in order, and the last ones arrive when no step follows."""

from __future__ import annotations

import asyncio

import pytest

from sluice.engine.async_llm import AsyncLLM
from sluice.engine.llm import LLM
from sluice.engine.sampling import SamplingParams

PROMPT = [1, 415, 2936, 9060, 285, 1142, 28705, 461, 10575, 754, 272, 17898, 3914, 28723]


@pytest.fixture
def llm(tiny_mixtral) -> LLM:
    return LLM(tiny_mixtral, device="cpu", dtype="float32", block_size=4, num_kv_blocks=128, progress=False)


@pytest.mark.parametrize("after_launch", [True, False])
def test_every_stream_gets_every_token_in_order(llm, after_launch):
    prompts = [PROMPT, PROMPT[:5], PROMPT[3:], PROMPT[:9]]
    lengths = [7, 3, 11, 1]  # streams ending at different steps, one after its first token
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
    expected = [c.token_ids for c in llm.generate(prompts, params)]
    engine = AsyncLLM(llm, deliver_after_launch=after_launch)
    assert (llm.on_launch is not None) is after_launch

    async def collect(prompt, p):
        tokens, finished = [], []
        async for out in engine.generate(prompt, p):
            tokens += out.token_ids
            finished.append(out.finished)
        assert finished[-1] and not any(finished[:-1])
        return tokens

    async def main():
        first = await asyncio.gather(*(collect(q, p) for q, p in zip(prompts, params)))
        alone = await collect(PROMPT, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        return first, alone

    try:
        got, alone = asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        engine.close()
    assert got == expected
    assert alone == expected[0][:4]


def test_the_async_engine_shortens_the_gil_switch_interval_while_it_runs(tiny_mixtral):
    import sys

    before = sys.getswitchinterval()
    first = AsyncLLM(LLM(tiny_mixtral, dtype="float32", device="cpu", num_kv_blocks=16, progress=False))
    second = AsyncLLM(LLM(tiny_mixtral, dtype="float32", device="cpu", num_kv_blocks=16, progress=False))
    assert sys.getswitchinterval() == 0.0005
    first.close()  # closed out of order: the other still runs
    assert sys.getswitchinterval() == 0.0005
    second.close()
    second.close()  # twice: no effect
    assert sys.getswitchinterval() == before
    kept = AsyncLLM(LLM(tiny_mixtral, dtype="float32", device="cpu", num_kv_blocks=16, progress=False,
                        gil_switch_interval_s=None))
    assert sys.getswitchinterval() == before
    kept.close()
