"""Sleep parks the weights in host memory and frees the cache; wake gives the same model back."""

from __future__ import annotations

import pytest
import torch

from sluice.engine.errors import RequestError
from sluice.engine.llm import LLM
from sluice.engine.sampling import SamplingParams

PROMPT = [1, 415, 2936, 9060, 285, 1142, 28705, 461]


def greedy(llm: LLM) -> list[int]:
    [out] = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    return out.token_ids


@pytest.mark.parametrize("dtype", ["float32", "fp8"])
def test_sleep_then_wake_gives_identical_greedy_output(tiny_mixtral, dtype):
    llm = LLM(tiny_mixtral, dtype=dtype, device="cpu", num_kv_blocks=16, progress=False)
    before = greedy(llm)
    llm.sleep()
    assert all(t.numel() == 0 for t in llm.model.parameters())
    # nothing keeps device bytes alive behind an emptied tensor: not the tensor, not a base
    # it was a view of (FP8 scales once were views, and held ~1 MiB a layer asleep)
    for t in list(llm.model.parameters()) + list(llm.model.buffers()):
        assert t.untyped_storage().nbytes() == 0 and (t._base is None or t._base.untyped_storage().nbytes() == 0)
    assert llm.runner.kv_cache.numel() == 0
    with pytest.raises(RequestError, match="asleep"):
        llm.step()
    llm.wake()
    assert greedy(llm) == before
    llm.sleep()  # a second round reuses the parked copy
    llm.wake()
    assert greedy(llm) == before


def test_sleep_refuses_requests_in_flight(tiny_mixtral):
    llm = LLM(tiny_mixtral, dtype="float32", device="cpu", num_kv_blocks=16, progress=False)
    llm.add_request(PROMPT, SamplingParams(max_tokens=4))
    with pytest.raises(RequestError, match="in flight"):
        llm.sleep()
    while llm.has_unfinished():
        llm.step()
    llm.sleep()
    assert llm.asleep and torch.equal(torch.tensor(llm.block_manager.num_free_blocks), torch.tensor(16))


def test_wake_takes_the_host_copy_once_parked_and_the_checkpoint_before(tiny_mixtral):
    llm = LLM(tiny_mixtral, dtype="float32", device="cpu", num_kv_blocks=16, progress=False)
    before = greedy(llm)
    llm.warm_step()  # starts the host copy in its thread (CPU: no graphs to capture)
    llm.runner.parking._thread.join()
    assert llm.runner.parking.complete
    llm.sleep()
    assert llm.wake() == "host" and greedy(llm) == before


def test_a_sleep_during_the_host_copy_stops_it_and_the_wake_reads_the_rest_from_the_checkpoint(tiny_mixtral, monkeypatch):
    from sluice.engine import offload

    monkeypatch.setattr(offload, "CHUNK", 1)  # one tensor a chunk
    llm = LLM(tiny_mixtral, dtype="float32", device="cpu", num_kv_blocks=16, progress=False)
    before = greedy(llm)
    parking = llm.runner.parking
    layout, calls = offload.packed_layout, []

    def second_chunk_waits_for_the_sleep(sizes):  # the copy is still running when sleep comes
        calls.append(1)
        if len(calls) == 2:
            parking._cancel.wait(10)
        return layout(sizes)

    monkeypatch.setattr(offload, "packed_layout", second_chunk_waits_for_the_sleep)
    parking.park_in_background()
    llm.sleep()  # waits for one chunk at most, never for the whole copy
    parked = len(llm.runner.parking._chunks)
    assert not llm.runner.parking.complete and parked < len(list(llm.model.parameters()))
    assert llm.wake() == "host+checkpoint" and greedy(llm) == before
    llm.runner.parking.park()  # goes on from where it stopped
    assert llm.runner.parking.complete
    llm.sleep()
    assert llm.wake() == "host" and greedy(llm) == before


def test_warm_up_waits_for_a_first_token(tiny_mixtral):
    llm = LLM(tiny_mixtral, dtype="float32", device="cpu", num_kv_blocks=16, progress=False)
    assert llm.warm_step() is False and llm.runner.parking._thread is None  # nothing before a first token
    greedy(llm)
    llm.warm_step()
    assert llm.runner.parking._thread is not None


def test_the_async_engine_parks_its_weights_while_idle_after_a_request(tiny_mixtral):
    import asyncio
    import time

    from sluice.engine.async_llm import AsyncLLM

    engine = AsyncLLM(LLM(tiny_mixtral, dtype="float32", device="cpu", num_kv_blocks=16, progress=False))
    parking = engine.llm.runner.parking

    async def ask() -> list[int]:
        ids = []
        async for out in engine.generate(PROMPT, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)):
            ids += out.token_ids
        return ids

    time.sleep(0.2)
    assert parking._thread is None  # nothing is warmed before a first token
    before = asyncio.run(ask())
    deadline = time.monotonic() + 10
    while not parking.complete:  # the engine thread started the copy once idle
        assert time.monotonic() < deadline
        time.sleep(0.01)
    engine.sleep()
    assert engine.wake() == "host" and asyncio.run(ask()) == before
    engine.close()


def test_a_sleep_goes_ahead_of_the_background_warm_up(tiny_mixtral):
    """The warm-up takes the engine's lock one piece at a time; a sleep asked for meanwhile
    gets it after the piece under way, not after the whole warm-up (a lock is not fair)."""
    import asyncio
    import threading
    import time

    from sluice.engine.async_llm import AsyncLLM

    engine = AsyncLLM(LLM(tiny_mixtral, dtype="float32", device="cpu", num_kv_blocks=16, progress=False))
    pieces = []
    started = threading.Event()

    def endless_piece() -> bool:  # a warm-up that never runs out of work
        pieces.append(time.monotonic())
        started.set()
        time.sleep(0.005)
        return True

    engine.llm.warm_step = endless_piece

    async def ask() -> None:
        async for _ in engine.generate(PROMPT, SamplingParams(temperature=0, max_tokens=2)):
            pass

    asyncio.run(ask())
    assert started.wait(10)
    asked = len(pieces)
    sleeper = threading.Thread(target=engine.sleep, daemon=True)  # a broken priority fails, not hangs
    sleeper.start()
    sleeper.join(30)
    assert not sleeper.is_alive() and engine.llm.asleep
    assert len(pieces) <= asked + 1  # at most the piece under way
    engine.wake()
    engine.close()
