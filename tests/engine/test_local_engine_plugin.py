"""sluice.plugins.local_engine: the engine behind the gateway's Backend contract."""

from __future__ import annotations

import asyncio
import time

import pytest
from pydantic import ValidationError

from sluice.gateway.backends.contract import BackendError, ChatMessage, GenerationRequest, SamplingParams
from sluice.plugins.local_engine import LocalEngineBackend

REFERENCE_IDS = [1, 733, 16289, 28793, 22557, 733, 28748, 16289, 28793, 15359, 736, 2,
                 733, 16289, 28793, 1602, 460, 368, 28804, 733, 28748, 16289, 28793]


def chat(*turns, **sampling) -> GenerationRequest:
    return GenerationRequest(request_id="r1", model="tiny-mixtral",
                             messages=tuple(ChatMessage(r, c) for r, c in turns),
                             sampling=SamplingParams(**sampling))


async def collect(backend, request):
    return [e async for e in backend.generate(request)]


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    opts = LocalEngineBackend.Options(cache_dir=str(tmp_path_factory.mktemp("cache")), device="cpu",
                                      max_num_seqs=8, num_kv_blocks=256, max_model_len=1024)
    b = LocalEngineBackend(opts)
    asyncio.run(b.start())
    yield b
    asyncio.run(b.stop())


def test_options_forbid_unknown_keys():
    with pytest.raises(ValidationError):
        LocalEngineBackend.Options(modle="x")
    assert LocalEngineBackend.name == "local"


def test_tiny_default_model_is_served_and_cached(backend):
    assert [m.id for m in backend.models()] == ["tiny-mixtral"]
    assert (backend.model_dir / "config.json").exists() and (backend.model_dir / "model.safetensors").exists()


def test_count_tokens_is_what_generate_uses(backend):
    req = chat(("user", "Hello"), ("assistant", "Hi there"), ("user", "How are you?"), max_tokens=5,
               temperature=0)
    assert backend.count_tokens(req) == len(REFERENCE_IDS)
    events = asyncio.run(collect(backend, req))
    final = events[-1]
    assert final.usage.prompt_tokens == len(REFERENCE_IDS)
    assert final.usage.completion_tokens == sum(e.tokens for e in events) <= 5
    assert final.finish_reason in ("stop", "length") and all(e.finish_reason is None for e in events[:-1])
    completion = GenerationRequest("r2", "tiny-mixtral", prompt="Once upon a time",
                                   sampling=SamplingParams(max_tokens=3, temperature=0))
    events = asyncio.run(collect(backend, completion))
    assert events[-1].usage.prompt_tokens == backend.count_tokens(completion) == 5  # BOS + 4 pieces


def test_seeded_generation_is_reproducible_with_logprobs(backend):
    req = chat(("user", "Tell me a story"), max_tokens=8, temperature=0.8, seed=11, logprobs=True, top_logprobs=2)
    a, b = asyncio.run(collect(backend, req)), asyncio.run(collect(backend, req))
    assert "".join(e.text for e in a) == "".join(e.text for e in b)
    lps = [lp for e in a for lp in e.logprobs]
    assert len(lps) == a[-1].usage.completion_tokens and all(len(lp.top) == 2 for lp in lps)


def test_closing_the_stream_cancels_and_frees_blocks(backend):
    llm = backend._engine.llm

    async def main():
        gen = backend.generate(chat(("user", "Go on forever"), max_tokens=500, temperature=0))
        await anext(gen)
        await anext(gen)
        await gen.aclose()
        deadline = time.monotonic() + 2
        while llm.block_manager.num_free_blocks != llm.block_manager.num_blocks:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.001)

    asyncio.run(main())
    assert not llm.sequences


def test_prompt_too_long_is_a_client_error(backend):
    req = GenerationRequest("r3", "tiny-mixtral", prompt="hello " * 2000, sampling=SamplingParams(max_tokens=4))
    with pytest.raises(BackendError) as info:
        asyncio.run(collect(backend, req))
    assert info.value.status == 400 and "max_model_len" in str(info.value)


def test_sleep_and_wake_keep_the_output(backend):
    assert LocalEngineBackend.supports_sleep
    req = chat(("user", "Hello"), max_tokens=6, temperature=0)
    before = asyncio.run(collect(backend, req))

    async def cycle():
        await backend.sleep()
        await backend.sleep()  # already asleep: a no-op
        await backend.wake()
        return await collect(backend, req)

    after = asyncio.run(cycle())
    assert "".join(e.text for e in after) == "".join(e.text for e in before)
    assert backend.wake_source in ("host", "checkpoint")
    with pytest.raises(ValueError, match="idle_action"):  # the pool's idle_action is the one in force
        LocalEngineBackend.Options(idle_action="sleep")
