"""The OpenAI-compatible upstream backend against a real local server (loadtests.mock_upstream)."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import cast

import orjson
import pytest

from sluice.gateway.backends.contract import (
    BackendError,
    ChatMessage,
    EmbeddingRequest,
    GenerationEvent,
    GenerationRequest,
    SamplingParams,
)
from loadtests.mock_upstream import WORDS, MockApp, start_server
from sluice.gateway.http.schemas import ChatCompletionRequest
from sluice.plugins.openai_upstream import OpenAIUpstreamBackend
from tests.contract.upstream import LIMIT_HEADERS, TOOL_CALLS, RecordingUpstream

TOKENS = 6
ANSWER = " ".join(WORDS[:TOKENS])


@pytest.fixture
async def mock() -> AsyncIterator[tuple[MockApp, int]]:
    app = MockApp(tokens=TOKENS)
    server = await start_server(app)
    port = server.sockets[0].getsockname()[1]
    yield app, port
    server.close()


def make_backend(port: int, **options: object) -> OpenAIUpstreamBackend:
    defaults: dict[str, object] = {
        "base_url": f"http://127.0.0.1:{port}/v1",
        "models": {"mock": "mock-model", "nousage": "nousage", "slow": "sleep-500",
                   "cut": "cut-3", "e429": "status-429", "e500": "status-500",
                   "e400": "status-400", "e401": "status-401"},
    }
    return OpenAIUpstreamBackend(OpenAIUpstreamBackend.Options.model_validate(defaults | options))


@pytest.fixture
async def upstream(mock: tuple[MockApp, int]) -> AsyncIterator[OpenAIUpstreamBackend]:
    backend = make_backend(mock[1])
    await backend.start()
    yield backend
    await backend.stop()


def chat(model: str = "mock", text: str = "tell me about foxes", **sampling: object
         ) -> GenerationRequest:
    return GenerationRequest("r", model, SamplingParams(**sampling),  # type: ignore[arg-type]
                             messages=(ChatMessage("user", text),))


async def run(backend: OpenAIUpstreamBackend, request: GenerationRequest
              ) -> list[GenerationEvent]:
    return [event async for event in backend.generate(request)]


async def test_chat_streams_deltas_and_passes_upstream_usage_through(
    upstream: OpenAIUpstreamBackend,
) -> None:
    events = await run(upstream, chat())
    assert "".join(e.text for e in events) == ANSWER
    assert [e.tokens for e in events[:-1]] == [1] * TOKENS
    final = events[-1]
    assert final.finish_reason == "stop"
    # the mock counts words (1 + 4), not Mixtral tokens: this is the upstream's number
    assert final.usage is not None
    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (5, TOKENS)
    assert upstream.count_tokens(chat()) != 5


async def test_completion_with_max_tokens(upstream: OpenAIUpstreamBackend) -> None:
    request = GenerationRequest("r", "mock", SamplingParams(max_tokens=2), prompt="once upon")
    events = await run(upstream, request)
    assert "".join(e.text for e in events) == "The quick"
    assert events[-1].finish_reason == "length"
    assert events[-1].usage is not None and events[-1].usage.completion_tokens == 2


async def test_request_sent_upstream(mock: tuple[MockApp, int]) -> None:
    backend = make_backend(mock[1], api_key="sk-upstream-secret")
    await backend.start()
    try:
        await run(backend, chat(temperature=0.2, top_p=0.9, max_tokens=5, stop=("\n",), seed=7,
                                logprobs=True, top_logprobs=3))
    finally:
        await backend.stop()
    head, body = mock[0].last_request
    assert head.startswith(b"POST /v1/chat/completions ")
    assert b"authorization: Bearer sk-upstream-secret" in head.lower().replace(
        b"bearer", b"Bearer")
    sent = orjson.loads(body)
    assert sent["model"] == "mock-model" and sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True} and "n" not in sent
    assert sent["messages"] == [{"role": "user", "content": "tell me about foxes"}]
    expected = {"temperature": 0.2, "top_p": 0.9, "max_tokens": 5, "stop": ["\n"], "seed": 7,
                "logprobs": True, "top_logprobs": 3}
    assert {k: sent[k] for k in expected} == expected
    assert "top_k" not in sent


async def test_connections_are_kept_alive(mock: tuple[MockApp, int],
                                          upstream: OpenAIUpstreamBackend) -> None:
    for _ in range(5):
        await run(upstream, chat())
    assert mock[0].connections == 1


async def test_max_connections_bounds_the_pool(mock: tuple[MockApp, int]) -> None:
    backend = make_backend(mock[1], max_connections=2)
    await backend.start()
    try:
        results = await asyncio.gather(*(run(backend, chat()) for _ in range(8)))
    finally:
        await backend.stop()
    assert all(events[-1].finish_reason == "stop" for events in results)
    assert mock[0].connections <= 2


async def test_waiting_too_long_for_a_pooled_connection_is_503(
    mock: tuple[MockApp, int],
) -> None:
    backend = make_backend(mock[1], max_connections=1, connect_timeout_s=0.1)
    await backend.start()
    try:
        busy = asyncio.create_task(run(backend, chat("slow")))  # holds the only connection
        await asyncio.sleep(0.05)
        with pytest.raises(BackendError) as caught:
            await run(backend, chat())
        assert (caught.value.status, caught.value.retryable) == (503, True)
        assert "no connection in time" in str(caught.value)
        assert (await busy)[-1].finish_reason == "stop"
    finally:
        await backend.stop()


async def test_base_url_query_string_is_kept(mock: tuple[MockApp, int]) -> None:
    backend = make_backend(mock[1], base_url=f"http://127.0.0.1:{mock[1]}/v1/?api-version=2")
    await backend.start()
    try:
        events = await run(backend, chat())
    finally:
        await backend.stop()
    assert events[-1].finish_reason == "stop"
    assert mock[0].last_request[0].startswith(b"POST /v1/chat/completions?api-version=2 ")


async def test_missing_usage_falls_back_to_tokenizer_with_one_warning(
    upstream: OpenAIUpstreamBackend, caplog: pytest.LogCaptureFixture,
) -> None:
    request = chat("nousage")
    with caplog.at_level(logging.WARNING, logger="sluice.plugins.openai_upstream"):
        events = await run(upstream, request)
        await run(upstream, request)
    usage = events[-1].usage
    assert usage is not None
    assert usage.prompt_tokens == upstream.count_tokens(request)
    assert usage.completion_tokens == len(upstream.tokenizer.encode(ANSWER))  # type: ignore[union-attr]
    assert sum(e.tokens for e in events) == usage.completion_tokens
    assert len([r for r in caplog.records if "no usage" in r.message]) == 1


@pytest.mark.parametrize(
    ("model", "status", "retryable", "says"),
    [("e429", 429, True, "mock failure 429"), ("e500", 502, True, "500"),
     ("e400", 400, False, "mock failure 400"), ("e401", 502, False, "credentials")],
)
async def test_upstream_status_errors_are_mapped(
    upstream: OpenAIUpstreamBackend, model: str, status: int, retryable: bool, says: str,
) -> None:
    with pytest.raises(BackendError) as caught:
        await run(upstream, chat(model))
    assert (caught.value.status, caught.value.retryable) == (status, retryable)
    assert says in str(caught.value)


async def test_connection_refused_is_503_without_credentials() -> None:
    with socket.socket() as probe:  # a port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    backend = make_backend(port, base_url=f"http://user:hunter2@127.0.0.1:{port}/v1?key=abc")
    await backend.start()
    try:
        with pytest.raises(BackendError) as caught:
            await run(backend, chat())
    finally:
        await backend.stop()
    assert (caught.value.status, caught.value.retryable) == (503, True)
    assert "hunter2" not in str(caught.value) and "abc" not in str(caught.value)
    assert f"127.0.0.1:{port}" in str(caught.value)


async def test_read_timeout_is_504(mock: tuple[MockApp, int]) -> None:
    backend = make_backend(mock[1], timeout_s=0.1)
    await backend.start()
    try:
        with pytest.raises(BackendError) as caught:
            await run(backend, chat("slow"))
    finally:
        await backend.stop()
    assert (caught.value.status, caught.value.retryable) == (504, True)


async def test_dropped_stream_is_502_after_partial_output(upstream: OpenAIUpstreamBackend) -> None:
    got: list[GenerationEvent] = []
    with pytest.raises(BackendError) as caught:
        async for event in upstream.generate(chat("cut")):
            got.append(event)
    assert caught.value.status == 502
    assert got and all(e.finish_reason is None for e in got)


async def test_closing_the_stream_cancels_and_the_pool_recovers(
    upstream: OpenAIUpstreamBackend,
) -> None:
    stream = cast(AsyncGenerator[GenerationEvent, None], upstream.generate(chat()))
    first = await stream.__anext__()
    assert first.text
    await stream.aclose()
    events = await asyncio.wait_for(run(upstream, chat()), timeout=5)
    assert events[-1].finish_reason == "stop"


async def test_unknown_model_and_not_started(mock: tuple[MockApp, int],
                                             upstream: OpenAIUpstreamBackend) -> None:
    with pytest.raises(BackendError) as caught:
        await run(upstream, chat("nope"))
    assert caught.value.status == 404
    with pytest.raises(BackendError) as caught:
        await run(make_backend(mock[1]), chat())
    assert caught.value.status == 503
    assert "mock" in [card.id for card in upstream.models()]


async def test_options_need_a_model_and_reject_unknown_keys() -> None:
    with pytest.raises(ValueError):
        OpenAIUpstreamBackend.Options(base_url="http://x/v1", models={})
    with pytest.raises(ValueError):
        OpenAIUpstreamBackend.Options(base_url="http://x/v1", models={"a": "b"}, retries=3)  # type: ignore[call-arg]


async def test_tokenizer_none_estimates_from_bytes() -> None:
    backend = make_backend(1, tokenizer="none")
    assert backend.tokenizer is None
    assert backend.count_tokens(chat(text="x" * 400)) == 1 + (400 + 4 + 3) // 4


# -- transparency, against the contract suite's recording upstream ------------------------

@pytest.fixture(scope="module")
def recorder() -> Iterator[RecordingUpstream]:
    server = RecordingUpstream().start()
    yield server
    server.stop()


@pytest.fixture
async def proxy(recorder: RecordingUpstream) -> AsyncIterator[OpenAIUpstreamBackend]:
    names = ("plain", "tools", "truncated", "limited", "embed")
    backend = OpenAIUpstreamBackend(OpenAIUpstreamBackend.Options(
        base_url=recorder.base_url, models={n: n for n in names} | {"alias": "plain"},
        tokenizer="none"))
    await backend.start()
    yield backend
    await backend.stop()


def client_request(raw: bytes) -> GenerationRequest:
    return ChatCompletionRequest.model_validate(orjson.loads(raw), raw).generation_requests(
        "req_1")[0]


async def test_the_clients_bytes_go_upstream_unchanged(
    proxy: OpenAIUpstreamBackend, recorder: RecordingUpstream,
) -> None:
    raw = (b'{"model": "plain", "messages": [{"role": "user", "content": "hi"}], '
           b'"presence_penalty": 0.5, "user": "u", "temperature": null}')
    events = await run(proxy, client_request(raw))
    assert recorder.last().body == raw  # not streamed: nothing had to change
    assert "".join(e.text for e in events) == "Hello from upstream"
    final = events[-1]
    assert final.finish_reason == "stop" and final.system_fingerprint == "fp_contract"
    assert final.usage is not None and final.usage.prompt_tokens_details == {
        "cached_tokens": 4, "audio_tokens": 0}


async def test_renamed_model_and_stream_usage_are_the_only_changes(
    proxy: OpenAIUpstreamBackend, recorder: RecordingUpstream,
) -> None:
    raw = b'{"model":"alias","messages":[{"role":"user","content":"hi"}],"stream":true}'
    await run(proxy, client_request(raw))
    assert recorder.last().json == {"model": "plain", "stream": True,
                                    "messages": [{"role": "user", "content": "hi"}],
                                    "stream_options": {"include_usage": True}}


@pytest.mark.parametrize("stream", [True, False])
async def test_tool_calls_come_back_as_deltas_with_the_upstreams_finish(
    proxy: OpenAIUpstreamBackend, stream: bool,
) -> None:
    raw = orjson.dumps({"model": "tools", "stream": stream,
                        "messages": [{"role": "user", "content": "weather?"}]})
    events = await run(proxy, client_request(raw))
    pieces = [p for e in events for p in e.tool_calls]
    for index, call in enumerate(TOOL_CALLS):
        mine = [p for p in pieces if p.index == index]
        assert [p.id for p in mine if p.id] == [call["id"]]
        assert [p.name for p in mine if p.name] == [call["name"]]
        assert "".join(p.arguments for p in mine) == "".join(call["arguments"])
    assert events[-1].finish_reason == "tool_calls"
    assert events[-1].usage is not None and events[-1].usage.completion_tokens == 9


async def test_a_stream_without_finish_reason_is_an_error(proxy: OpenAIUpstreamBackend) -> None:
    raw = b'{"model":"truncated","messages":[{"role":"user","content":"x"}],"stream":true}'
    got: list[GenerationEvent] = []
    with pytest.raises(BackendError) as caught:
        async for event in proxy.generate(client_request(raw)):
            got.append(event)
    assert caught.value.status == 502 and "finish_reason" in str(caught.value)
    assert "".join(e.text for e in got) == "Once upon a"


async def test_429_headers_are_kept(proxy: OpenAIUpstreamBackend) -> None:
    raw = b'{"model":"limited","messages":[{"role":"user","content":"x"}]}'
    with pytest.raises(BackendError) as caught:
        await run(proxy, client_request(raw))
    assert caught.value.status == 429
    assert {k.lower(): v for k, v in caught.value.headers.items()} == LIMIT_HEADERS


async def test_embeddings_forwarded_with_usage(proxy: OpenAIUpstreamBackend,
                                               recorder: RecordingUpstream) -> None:
    raw = b'{"model":"embed","input":["a","b"],"encoding_format":"float"}'
    result = await proxy.embed(EmbeddingRequest("r", "embed", ["a", "b"],
                                                body=orjson.loads(raw), raw=raw))
    assert recorder.last("/v1/embeddings").body == raw
    assert [d["index"] for d in result.data] == [0, 1]
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (6, 0)


async def test_a_whole_answer_may_take_longer_than_the_stream_read_timeout(
    mock: tuple[MockApp, int],
) -> None:
    backend = make_backend(mock[1], timeout_s=0.1, answer_timeout_s=5)
    await backend.start()
    try:
        raw = b'{"model":"slow","messages":[{"role":"user","content":"x"}]}'
        events = await run(backend, client_request(raw))  # not streamed: one 0.5 s answer
        assert events[-1].finish_reason == "stop"
        with pytest.raises(BackendError) as caught:  # streamed: 0.5 s without bytes
            await run(backend, client_request(raw.replace(b"}]}", b'}],"stream":true}')))
        assert caught.value.status == 504
    finally:
        await backend.stop()
