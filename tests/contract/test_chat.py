"""The official openai client through sluice to a recording upstream: what the client got
and what the upstream received, for plain chat."""

from __future__ import annotations

import httpx
import openai
import orjson
import pytest

from tests.conftest import GatewayServer
from tests.contract.conftest import Sent, usage_row
from tests.contract.upstream import COMPLETION_DETAILS, FINGERPRINT, PROMPT_DETAILS, RecordingUpstream


def test_second_turn_with_the_message_object_is_forwarded_byte_for_byte(
    client: openai.OpenAI, upstream: RecordingUpstream, sent: Sent,
) -> None:
    messages: list = [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Say hello"}]
    first = client.chat.completions.create(model="plain", messages=messages)
    assert first.choices[0].message.content == "Hello from upstream"
    messages += [first.choices[0].message, {"role": "user", "content": "Again"}]
    second = client.chat.completions.create(model="plain", messages=messages)
    assert second.choices[0].message.content == "Hello from upstream"
    # nothing injected, nothing dropped: the upstream got the client's very bytes
    assert upstream.last().body == sent.bodies[-1]
    forwarded = upstream.last().json["messages"][2]
    assert forwarded["role"] == "assistant" and forwarded["refusal"] is None
    assert forwarded["content"] == "Hello from upstream"


async def test_async_multi_turn_and_streaming(
    aclient: openai.AsyncOpenAI, upstream: RecordingUpstream,
) -> None:
    messages: list = [{"role": "user", "content": "Say hello"}]
    first = await aclient.chat.completions.create(model="plain", messages=messages)
    messages += [first.choices[0].message, {"role": "user", "content": "Again, streamed"}]
    stream = await aclient.chat.completions.create(model="plain", messages=messages,
                                                   stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "Hello from upstream"
    got = upstream.last().json
    assert got["stream"] is True and got["stream_options"] == {"include_usage": True}
    assert got["messages"][1]["content"] == "Hello from upstream"
    await aclient.close()


def test_explicit_nulls_are_accepted_and_forwarded(
    gateway: GatewayServer, key: str, upstream: RecordingUpstream,
) -> None:
    body = (b'{"model":"plain","messages":[{"role":"user","content":"hi"}],"n":null,'
            b'"logprobs":null,"stream":null,"temperature":null,"top_p":null,"stop":null,'
            b'"seed":null,"max_tokens":null,"user":"u-1"}')
    r = httpx.post(gateway.base_url + "/v1/chat/completions", content=body,
                   headers={"Authorization": f"Bearer {key}",
                            "content-type": "application/json"})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "Hello from upstream"
    assert upstream.last().body == body


def test_parameters_forwarded_unchanged_and_omitted_ones_not_invented(
    gateway: GatewayServer, key: str, upstream: RecordingUpstream,
) -> None:
    body = {
        "model": "renamed", "messages": [
            {"role": "developer", "content": [{"type": "text", "text": "Be terse."}]},
            {"role": "user", "content": "hi", "name": "ann"}],
        "presence_penalty": 0.5, "frequency_penalty": -0.25, "user": "end-user-7",
        "metadata": {"team": "blue"}, "logit_bias": {"1734": -100}, "seed": 42,
        "stop": ["\n\n"], "max_completion_tokens": 50, "store": False,
        "service_tier": "auto", "reasoning_effort": "low", "top_p": 0.5,
        "parallel_tool_calls": False, "modalities": ["text"],
        "prediction": {"type": "content", "content": "Hello"}, "top_logprobs": 2,
        "logprobs": True, "verbosity": "low", "safety_identifier": "sid",
    }
    r = httpx.post(gateway.base_url + "/v1/chat/completions", json=body,
                   headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    got = upstream.last().json
    assert got == {**body, "model": "plain"}  # the served name maps to the upstream's
    assert list(got) == list(body)  # in the client's order
    assert "temperature" not in got and "n" not in got and "stream" not in got


def test_response_format_forwarded_and_refused_by_a_model_without_it(
    client: openai.OpenAI, upstream: RecordingUpstream,
) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "A", "schema": schema,
                                                  "strict": True}}
    client.chat.completions.create(model="plain", messages=[{"role": "user", "content": "x"}],
                                   response_format=fmt)  # type: ignore[arg-type]
    assert upstream.last().json["response_format"] == fmt
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="echo", messages=[{"role": "user",
                                                                "content": "x"}],
                                       response_format=fmt)  # type: ignore[arg-type]
    assert caught.value.body["param"] == "response_format"  # type: ignore[index]


def test_refusal_reaches_the_client_whole_and_streamed(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="refusal",
                                           messages=[{"role": "user", "content": "x"}])
    message = whole.choices[0].message
    assert message.refusal == "I can't help with that." and message.content is None
    stream = client.chat.completions.create(model="refusal", stream=True,
                                            messages=[{"role": "user", "content": "x"}])
    pieces = [c.choices[0].delta.refusal for c in stream if c.choices]
    assert "".join(p or "" for p in pieces) == "I can't help with that."


def test_reasoning_content_reaches_the_client(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="reasoning",
                                           messages=[{"role": "user", "content": "x"}])
    assert whole.choices[0].message.content == "Done."
    assert whole.choices[0].message.reasoning_content == "Think first."  # type: ignore[attr-defined]


def test_usage_details_fingerprint_and_metering_from_the_upstream(
    client: openai.OpenAI, gateway: GatewayServer,
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="plain", messages=[{"role": "user", "content": "x"}])
    resp = raw.parse()
    assert resp.system_fingerprint == FINGERPRINT
    assert resp.service_tier == "default"  # any other top-level field, as the upstream sent
    assert resp.usage is not None
    assert resp.usage.prompt_tokens_details.model_dump(exclude_none=True) == PROMPT_DETAILS  # type: ignore[union-attr]
    assert resp.usage.completion_tokens_details.model_dump(  # type: ignore[union-attr]
        exclude_none=True) == COMPLETION_DETAILS
    row = usage_row(gateway, raw.headers["x-request-id"])
    assert (row.prompt_tokens, row.completion_tokens) == (11, 3)

    stream = client.chat.completions.create(model="plain", stream=True,
                                            stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": "x"}])
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 11
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == 2  # type: ignore[union-attr]
    assert all(c.system_fingerprint == FINGERPRINT for c in chunks)
    assert all(c.service_tier == "default" for c in chunks)


def test_a_client_that_asked_no_usage_gets_no_usage_chunk(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="plain", stream=True,
                                            messages=[{"role": "user", "content": "x"}])
    assert all(c.usage is None for c in stream)


def test_image_part_to_a_text_only_model_names_the_part(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="echo", messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}])
    assert caught.value.body["param"] == "messages[0].content[1]"  # type: ignore[index]


def test_unknown_field_gets_openais_400(gateway: GatewayServer, key: str) -> None:
    r = httpx.post(gateway.base_url + "/v1/chat/completions", headers={
        "Authorization": f"Bearer {key}"}, json={
        "model": "plain", "messages": [{"role": "user", "content": "x"}], "surprise": 1})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "surprise"
    assert r.json()["error"]["message"] == "Unrecognized request argument supplied: surprise"
    assert orjson.loads(r.content)["error"]["type"] == "invalid_request_error"


def test_completions_forwarded_unchanged(client: openai.OpenAI, upstream: RecordingUpstream,
                                         sent: Sent) -> None:
    resp = client.completions.create(model="plain", prompt="Say hello", max_tokens=5,
                                     presence_penalty=0.1)
    assert resp.choices[0].text == "Hello from upstream"
    assert upstream.last("/v1/completions").body == sent.bodies[-1]
