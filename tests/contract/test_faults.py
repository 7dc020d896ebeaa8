"""Upstream faults stay visible: a cut stream, a rate limit, and n > 1 metering."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import GatewayServer
from tests.contract.conftest import usage_row
from tests.contract.upstream import LIMIT_HEADERS, RecordingUpstream


def test_truncated_stream_ends_in_an_error_event_and_bills_what_was_sent(
    gateway: GatewayServer, key: str,
) -> None:
    with httpx.stream("POST", gateway.base_url + "/v1/chat/completions", headers={
            "Authorization": f"Bearer {key}"}, json={
            "model": "truncated", "stream": True,
            "messages": [{"role": "user", "content": "tell a story"}]}) as r:
        request_id = r.headers["x-request-id"]
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = httpx.Response(200, content=events[-2]).json()
    assert "error" in error and "finish_reason" in error["error"]["message"]
    finishes = [httpx.Response(200, content=e).json()["choices"][0]["finish_reason"]
                for e in events[:-2]]
    assert finishes == [None] * len(finishes)  # never a clean "stop"
    row = usage_row(gateway, request_id)
    assert row.status == 502 and row.completion_tokens == 3  # the three pieces it was sent


def test_truncated_stream_raises_in_the_official_client(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="truncated", stream=True,
                                            messages=[{"role": "user", "content": "x"}])
    text = []
    with pytest.raises(openai.APIError):
        for chunk in stream:
            text += [c.delta.content or "" for c in chunk.choices]
    assert "".join(text) == "Once upon a"


def test_upstream_429_passes_retry_after_and_ratelimit_headers(client: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="limited",
                                       messages=[{"role": "user", "content": "x"}])
    headers = caught.value.response.headers
    for name, value in LIMIT_HEADERS.items():
        assert headers[name] == value
    assert "Rate limit reached" in caught.value.message


def test_n_fanned_out_meters_every_upstream_prompt(
    client: openai.OpenAI, gateway: GatewayServer, upstream: RecordingUpstream,
) -> None:
    before = len(upstream.requests)
    raw = client.chat.completions.with_raw_response.create(
        model="plain", n=2, seed=5, messages=[{"role": "user", "content": "x"}])
    resp = raw.parse()
    assert len(resp.choices) == 2
    calls = [r.json for r in upstream.requests[before:]]
    assert len(calls) == 2 and all("n" not in c for c in calls)
    assert sorted(c["seed"] for c in calls) == [5, 6]
    assert resp.usage is not None and resp.usage.prompt_tokens == 22  # 11 per upstream call
    row = usage_row(gateway, raw.headers["x-request-id"])
    assert (row.prompt_tokens, row.completion_tokens) == (22, 6)


def test_streamed_request_refused_upstream_gets_the_status_and_headers(
    client: openai.OpenAI, gateway: GatewayServer,
) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="limited", stream=True,
                                       messages=[{"role": "user", "content": "x"}])
    assert caught.value.response.headers["retry-after"] == "7"
    assert caught.value.response.headers["x-ratelimit-reset-requests"] == "7s"
    row = usage_row(gateway, caught.value.response.headers["x-request-id"])
    assert row.status == 429
