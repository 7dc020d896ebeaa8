"""The echo backend: exact Mixtral token accounting, deterministic streaming, fault knobs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from typing import cast

import pytest
from pydantic import ValidationError

from sluice.gateway.backends.contract import (
    BackendError,
    ChatMessage,
    GenerationEvent,
    GenerationRequest,
    SamplingParams,
)
from sluice.plugins.echo import EchoBackend

REFERENCE_IDS = [1, 733, 16289, 28793, 22557, 733, 28748, 16289, 28793, 15359, 736, 2,
                 733, 16289, 28793, 1602, 460, 368, 28804, 733, 28748, 16289, 28793]


@pytest.fixture(scope="module")
def echo() -> EchoBackend:
    return EchoBackend(EchoBackend.Options())


def chat(*turns: tuple[str, str], **sampling: object) -> GenerationRequest:
    messages = tuple(ChatMessage(role, content) for role, content in turns)  # type: ignore[arg-type]
    return GenerationRequest("r", "echo", SamplingParams(**sampling), messages=messages)  # type: ignore[arg-type]


def completion(prompt: str, **sampling: object) -> GenerationRequest:
    return GenerationRequest("r", "echo", SamplingParams(**sampling), prompt=prompt)  # type: ignore[arg-type]


async def run(backend: EchoBackend, request: GenerationRequest) -> list[GenerationEvent]:
    return [event async for event in backend.generate(request)]


def text_of(events: list[GenerationEvent]) -> str:
    return "".join(e.text for e in events)


async def test_chat_prompt_is_mixtral_instruct_format(echo: EchoBackend) -> None:
    request = chat(("user", "Hello"), ("assistant", "Hi there"), ("user", "How are you?"))
    assert echo.tokenizer.prompt_ids(request) == REFERENCE_IDS
    assert echo.count_tokens(request) == len(REFERENCE_IDS)
    events = await run(echo, request)
    assert events[-1].usage is not None
    assert events[-1].usage.prompt_tokens == len(REFERENCE_IDS)
    assert text_of(events) == "How are you?"


async def test_system_message_joins_first_user_turn(echo: EchoBackend) -> None:
    request = chat(("system", "Be brief."), ("user", "Hello"))
    expected = [1, *echo.tokenizer.encode("[INST] Be brief.\n\nHello [/INST]")]
    assert echo.tokenizer.prompt_ids(request) == expected
    assert (await run(echo, request))[-1].usage.prompt_tokens == len(expected)  # type: ignore[union-attr]


@pytest.mark.parametrize("prompt", ["Once upon a time", "", "多语言 🦙 text\n\nwith lines"])
async def test_completion_prompt_is_bos_plus_text(echo: EchoBackend, prompt: str) -> None:
    request = completion(prompt)
    assert echo.tokenizer.prompt_ids(request) == [1, *echo.tokenizer.encode(prompt)]
    events = await run(echo, request)
    assert events[-1].usage.prompt_tokens == echo.count_tokens(request)  # type: ignore[union-attr]
    assert text_of(events) == prompt


async def test_answer_is_deterministic_and_token_exact(echo: EchoBackend) -> None:
    request = chat(("user", "The quick brown fox jumps over the lazy dog."))
    first, second = await run(echo, request), await run(echo, request)
    assert first == second
    ids = echo.tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    assert [e.tokens for e in first[:-1]] == [1] * len(ids)
    final = first[-1]
    assert final.finish_reason == "stop"
    assert final.usage is not None and final.usage.completion_tokens == len(ids)
    assert sum(e.tokens for e in first) == len(ids)


async def test_max_tokens_cuts_with_length(echo: EchoBackend) -> None:
    text = "one two three four five six seven"
    ids = echo.tokenizer.encode(text)
    events = await run(echo, chat(("user", text), max_tokens=3))
    assert text_of(events) == echo.tokenizer.decode(ids[:3])
    assert events[-1].finish_reason == "length"
    assert events[-1].usage.completion_tokens == 3  # type: ignore[union-attr]


async def test_max_output_tokens_option_caps_answer() -> None:
    backend = EchoBackend(EchoBackend.Options(max_output_tokens=2))
    events = await run(backend, completion("alpha beta gamma delta", max_tokens=100))
    assert events[-1].finish_reason == "length"
    assert events[-1].usage.completion_tokens == 2  # type: ignore[union-attr]


async def test_stop_string_cuts_before_it(echo: EchoBackend) -> None:
    events = await run(echo, chat(("user", "Paris is nice. Rome too."), stop=("Rome", ".")))
    assert text_of(events) == "Paris is nice"
    assert events[-1].finish_reason == "stop"
    # the token that completed the stop string was generated, so it is counted
    assert sum(e.tokens for e in events) == events[-1].usage.completion_tokens  # type: ignore[union-attr]


async def test_stop_string_spanning_tokens_and_absent_stop(echo: EchoBackend) -> None:
    events = await run(echo, completion("say stop here please", stop=("p h",)))
    assert text_of(events) == "say sto"
    assert events[-1].finish_reason == "stop"
    events = await run(echo, completion("nothing to see", stop=("zebra",)))
    assert text_of(events) == "nothing to see"


UTF8_TEXTS = ["🦙 llama", "鬱 depression", "日本語のテキスト", "emoji 😀🦙🎉 end", "𝄞 clef",
              "  leading spaces", "tab\tand\nnewline "]


@pytest.mark.parametrize("text", UTF8_TEXTS)
async def test_utf8_streams_whole_characters(echo: EchoBackend, text: str) -> None:
    events = await run(echo, completion(text))
    assert text_of(events) == text
    for event in events[:-1]:
        assert event.text and "\ufffd" not in event.text
    ids = echo.tokenizer.encode(text)
    assert sum(e.tokens for e in events) == len(ids)


async def test_byte_fallback_character_is_one_multi_token_event(echo: EchoBackend) -> None:
    events = await run(echo, completion("a🦙b"))
    llama = next(e for e in events if "🦙" in e.text)
    assert llama.text == "🦙" and llama.tokens == 4  # <0xF0> <0x9F> <0xA6> <0x99>


async def test_cut_inside_a_character_matches_sentencepiece_decode(echo: EchoBackend) -> None:
    ids = echo.tokenizer.encode("x 🦙")
    for k in range(len(ids) + 1):
        events = await run(echo, completion("x 🦙", max_tokens=k))
        assert text_of(events) == echo.tokenizer.decode(ids[:k])
        assert events[-1].usage.completion_tokens == k  # type: ignore[union-attr]


async def test_closing_the_stream_stops_generation() -> None:
    backend = EchoBackend(EchoBackend.Options(tokens_per_s=100))
    stream = cast(AsyncGenerator[GenerationEvent, None],
                  backend.generate(completion("word " * 200)))
    await stream.__anext__()
    await stream.__anext__()
    started = time.perf_counter()
    await stream.aclose()
    assert time.perf_counter() - started < 0.05
    with pytest.raises(StopAsyncIteration):
        await stream.__anext__()


async def test_cancelling_the_consumer_task_interrupts_the_wait() -> None:
    backend = EchoBackend(EchoBackend.Options(ttft_ms=10_000))
    task = asyncio.create_task(run(backend, completion("hello")))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_fail_after_tokens_raises_mid_stream() -> None:
    backend = EchoBackend(EchoBackend.Options(fail_after_tokens=3))
    got: list[GenerationEvent] = []
    with pytest.raises(BackendError):
        async for event in backend.generate(completion("one two three four five")):
            got.append(event)
    assert sum(e.tokens for e in got) == 3
    assert all(e.finish_reason is None for e in got)


@pytest.mark.parametrize("fatal", [False, True])
async def test_fail_fatal_marks_the_worker_broken(fatal: bool) -> None:
    backend = EchoBackend(EchoBackend.Options(fail_after_tokens=0, fail_fatal=fatal))
    with pytest.raises(BackendError) as caught:
        await run(backend, completion("hello"))
    assert caught.value.fatal is fatal


async def test_timing_knobs() -> None:
    backend = EchoBackend(EchoBackend.Options(start_delay_s=0.05, ttft_ms=40, tokens_per_s=200))
    started = time.perf_counter()
    await backend.start()
    assert time.perf_counter() - started >= 0.05
    started = time.perf_counter()
    stamps = []
    async for _ in backend.generate(completion("a b c d e")):  # 5 tokens
        stamps.append(time.perf_counter() - started)
    assert stamps[0] >= 0.04
    assert stamps[-1] >= 0.04 + 4 / 200


async def test_options_reject_unknown_keys_and_name_the_model() -> None:
    with pytest.raises(ValidationError):
        EchoBackend.Options(ttft=5)  # type: ignore[call-arg]
    backend = EchoBackend(EchoBackend.Options(model="echo-2"))
    assert [card.id for card in backend.models()] == ["echo-2"]


async def test_logprobs_on_request(echo: EchoBackend) -> None:
    events = await run(echo, completion("hi there", logprobs=True, top_logprobs=2))
    deltas = events[:-1]
    assert all(len(e.logprobs) == e.tokens for e in deltas)
    assert deltas[0].logprobs[0].logprob == 0.0 and deltas[0].logprobs[0].top
    assert (await run(echo, completion("hi there")))[0].logprobs == ()
