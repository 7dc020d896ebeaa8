"""The gateway counts a chat's prompt tokens (rate limiting, metering) with a probe backend
that never starts; the engine runs the ids the started backend gives it. For the local
backend the two are one encoding (mistral-common's), checked on 50 generated conversations."""

from __future__ import annotations

import asyncio
import random

import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from sluice.gateway.backends.contract import ChatMessage, GenerationRequest, SamplingParams
from sluice.plugins.local_engine import LocalEngineBackend

WORDS = ("hello", "naïve", "café", "weather", "Paris", "¿qué?", "漢字", "🙂", "42", "\n", "  spaced  ", "[INST]")


def conversation(rng: random.Random) -> list[tuple[str, str]]:
    """System prompts (none, one, several), runs of user turns, assistant answers, and
    sometimes a final assistant prefix to continue."""
    def text() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8)))

    turns = [("system", text()) for _ in range(rng.choice((0, 0, 1, 2)))]
    for _ in range(rng.randint(1, 4)):
        turns += [("user", text()) for _ in range(rng.choice((1, 1, 2, 3)))]
        turns.append(("assistant", text()))
    if rng.random() < 0.7:
        turns.pop()  # usually ends on the user; otherwise the assistant's text is continued
    if rng.random() < 0.15:
        turns = [t for t in turns if t[0] == "system"] or [("system", text())]  # a system-only prompt
    return turns


@pytest.fixture(scope="module")
def options(tmp_path_factory):
    return LocalEngineBackend.Options(cache_dir=str(tmp_path_factory.mktemp("cache")), device="cpu",
                                      max_num_seqs=64, num_kv_blocks=512, max_model_len=512)


async def test_gateway_counted_prompt_tokens_equal_engine_prompt_tokens(options) -> None:
    probe = LocalEngineBackend(options)  # what the gateway counts with: never started
    backend = LocalEngineBackend(options)
    await backend.start()
    reference = MistralTokenizer.v1()
    rng = random.Random(19)
    requests = [GenerationRequest(f"r{i}", "tiny-mixtral", sampling=SamplingParams(max_tokens=1, temperature=0),
                                  messages=tuple(ChatMessage(r, c) for r, c in conversation(rng)))
                for i in range(50)]

    async def engine_prompt_tokens(request: GenerationRequest) -> int:
        events = [e async for e in backend.generate(request)]
        assert events[-1].usage is not None
        return events[-1].usage.prompt_tokens  # the engine's own count of the ids it ran

    try:
        ran = await asyncio.gather(*(engine_prompt_tokens(r) for r in requests))
    finally:
        await backend.stop()
    counted = [probe.count_tokens(r) for r in requests]
    assert counted == ran
    for request, n in zip(requests, counted):
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        if messages[-1]["role"] == "assistant":
            messages[-1]["prefix"] = True
        expected = reference.encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens
        assert probe.prompt_ids(request) == expected and n == len(expected)
    kinds = {(r.messages[-1].role, sum(m.role == "system" for m in r.messages) > 0) for r in requests}
    assert ("assistant", False) in kinds or ("assistant", True) in kinds  # prefixes were exercised
    assert any(all(m.role == "system" for m in r.messages) for r in requests)  # system-only too
