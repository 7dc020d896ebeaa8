"""The echo/Mixtral prompt count cache (plugins/_tokenizer.py) gives exactly the count of
the uncached chat encoding: random conversations (system prompts, runs of users, final
assistant prefixes, tool calls and results, conversations Mistral's format refuses),
counted cold, then again from the cache, against len(prompt_ids) / the refusal estimate."""

from __future__ import annotations

import random

from sluice.engine.tokenizer import ChatEncodingError
from sluice.gateway.backends.contract import ChatMessage, GenerationRequest, ToolCall
from sluice.plugins._tokenizer import COUNT_CACHE_MAX_CHARS, MixtralTokenizer

WORDS = ("hello", "naïve", "café", "weather", "Paris", "¿qué?", "漢字", "🙂", "42", "\n", "  spaced  ",
         "[INST]", "[/INST]", "<s>", "")


def _message(rng: random.Random, role: str) -> ChatMessage:
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 8)))
    if role == "assistant" and rng.random() < 0.2:
        call = ToolCall(id=rng.choice(("abcDEF123", "call_1", "x")), name="get_weather",
                        arguments=rng.choice(('{"city": "Paris"}', "")))
        return ChatMessage("assistant", text, tool_calls=(call,))
    if role == "tool":
        return ChatMessage("tool", text, name=rng.choice((None, "get_weather")),
                           tool_call_id=rng.choice((None, "abcDEF123", "call_1")))
    return ChatMessage(role, text, name=rng.choice((None, None, "bob")))


def _uncached(tok: MixtralTokenizer, request: GenerationRequest) -> int:
    try:
        return len(tok.prompt_ids(request))
    except ChatEncodingError:
        return 1 + sum(len(tok.encode(m.content)) for m in request.messages or ())


def test_cached_count_equals_the_chat_encoding() -> None:
    tok = MixtralTokenizer()
    rng = random.Random(18)
    roles = ("system", "user", "user", "assistant", "tool", "developer")
    requests = [GenerationRequest(request_id=str(i), model="m",
                                  messages=tuple(_message(rng, rng.choice(roles)) for _ in range(rng.randint(1, 7))))
                for i in range(400)]
    refused = 0
    for request in requests:
        expected = _uncached(tok, request)
        refused += expected != len(tok.prompt_ids(request)) if _encodes(tok, request) else 1
        assert tok.count_prompt(request) == expected  # cold (computed from the key)
        assert tok.count_prompt(request) == expected  # a cache hit
    assert tok._count_key.cache_info().hits >= len(requests)
    assert 0 < refused < len(requests)  # both paths exercised


def _encodes(tok: MixtralTokenizer, request: GenerationRequest) -> bool:
    try:
        tok.prompt_ids(request)
    except ChatEncodingError:
        return False
    return True


def test_long_conversations_bypass_the_cache() -> None:
    tok = MixtralTokenizer()
    request = GenerationRequest(request_id="r", model="m",
                                messages=(ChatMessage("user", "word " * (COUNT_CACHE_MAX_CHARS // 5 + 1)),))
    before = tok._count_key.cache_info().currsize
    assert tok.count_prompt(request) == len(tok.prompt_ids(request))
    assert tok._count_key.cache_info().currsize == before
