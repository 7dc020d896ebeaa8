"""The wire schema (sluice/gateway/http/schemas.py): OpenAI's request types, OpenAI's
errors, never a Python type name."""

from __future__ import annotations

import time

import pytest

from sluice.gateway.errors import InvalidRequest
from sluice.gateway.http.schemas import ChatCompletionRequest, CompletionRequest

USER = {"role": "user", "content": "hi"}


def refused(body: dict) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        ChatCompletionRequest.model_validate({"model": "m", **body})
    return caught.value


def test_every_role_and_the_message_the_client_got_back_are_accepted() -> None:
    body = ChatCompletionRequest.model_validate({"model": "m", "messages": [
        {"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
        {"role": "system", "content": "sys", "name": "s"},
        USER,
        {"role": "assistant", "content": None, "refusal": None, "annotations": [],
         "audio": None, "tool_calls": [{"id": "c1", "type": "function",
                                        "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
        {"role": "function", "name": "f", "content": None},
        {"role": "user", "content": [{"type": "text", "text": "look"},
                                     {"type": "image_url", "image_url": {"url": "u"}}]},
    ], "n": None, "logprobs": None, "stream": None, "temperature": None})
    assert [m.role for m in body.messages] == [
        "developer", "system", "user", "assistant", "tool", "function", "user"]
    assert body.messages[3].tool_calls[0].arguments == "{}"
    assert body.messages[4].tool_call_id == "c1"
    assert body.messages[6].content == "look" and body.messages[6].non_text_parts() == [1]
    assert body.n == 1 and body.temperature is None and body.stream is False


@pytest.mark.parametrize(("body", "param", "says"), [
    ({"messages": [USER], "surprise": 1}, "surprise",
     "Unrecognized request argument supplied: surprise"),
    ({}, "messages", "Missing required parameter: 'messages'"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "robot"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content",
     "expected string or array, got integer"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "x": 1}]}]},
     "messages[0].content[0].type", "image"),
    ({"messages": [USER, {"role": "user", "content": "x", "refusal": None}]}, "messages[1]",
     "'refusal' was unexpected"),
    ({"messages": [USER], "temperature": "hot"}, "temperature",
     "expected number or null, got string"),
    ({"messages": [USER], "temperature": 3}, "temperature", "maximum of 2"),
    ({"messages": [USER], "stop": ["a", "b", "c", "d", "e"]}, "stop", "too long"),
    ({"messages": [USER], "top_logprobs": 2}, "top_logprobs", "logprobs"),
    ({"messages": [USER], "stream_options": {"include_usage": True}}, "stream_options",
     "stream"),
])
def test_errors_name_openais_param(body: dict, param: str, says: str) -> None:
    error = refused(body)
    assert error.param == param and says in error.message
    assert "str" not in (error.param or "").split(".")  # never a Python type name


def test_a_large_invalid_body_is_explained_cheaply() -> None:
    messages = [{"role": "user", "content": "hello world " * 20}] * 5000
    bad = {"role": "user", "content": [{"type": "text", "text": "x", "bad": 1}]}
    started = time.perf_counter()
    error = refused({"messages": [*messages, bad]})
    # only the failing item is looked at again (the whole body took ~0.6 s of CPU)
    assert time.perf_counter() - started < 0.3
    assert error.param == "messages[5000].content[0]"


def test_completions_take_each_of_openais_prompt_forms() -> None:
    def prompts(prompt: object) -> list:  # type: ignore[type-arg]
        return CompletionRequest.model_validate({"model": "m", "prompt": prompt}).prompts

    assert prompts("x") == ["x"] and prompts(["x"]) == ["x"] and prompts(["x", "y"]) == ["x", "y"]
    assert prompts([1, 2]) == [(1, 2)] and prompts([[1], [2, 3]]) == [(1,), (2, 3)]
    body = CompletionRequest.model_validate({"model": "m", "prompt": ["a", "b"], "n": 2, "seed": 5})
    requests = body.generation_requests("r")
    assert [(r.prompt, r.sampling.seed) for r in requests] == [("a", 5), ("a", 6), ("b", 5), ("b", 6)]
    for bad in ([], [[]], [[1, -1]], [1, "a"], [[1], "a"]):
        with pytest.raises(InvalidRequest) as caught:
            CompletionRequest.model_validate({"model": "m", "prompt": bad})
        assert caught.value.param == "prompt"
