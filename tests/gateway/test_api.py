"""The official openai client, unchanged, against a real uvicorn server running sluice."""

from __future__ import annotations

import datetime as dt

import httpx
import openai
import pytest

from tests.conftest import GatewayServer


def client(server: GatewayServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=key, max_retries=0)


def test_sync_chat_completion(sqlite_server: GatewayServer) -> None:
    key = sqlite_server.tenant_key()
    reply = client(sqlite_server, key).chat.completions.create(
        model="echo",
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Hello there, gateway"}],
    )
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.content == "Hello there, gateway"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 5  # "Hello there, gateway" in Mixtral's tokenizer
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streaming_chat_with_usage(sqlite_server: GatewayServer) -> None:
    key = sqlite_server.tenant_key()
    stream = client(sqlite_server, key).chat.completions.create(
        model="echo",
        messages=[{"role": "user", "content": "one two three four"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three four"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4


def test_max_tokens_stop_n_and_seed(sqlite_server: GatewayServer) -> None:
    api = client(sqlite_server, sqlite_server.tenant_key())
    cut = api.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "alpha beta gamma delta"}],
        max_completion_tokens=2,
    )
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 2
    stopped = api.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "alpha beta gamma delta"}],
        stop=[" gamma"], seed=7, temperature=0.5, top_p=0.9, user="u-1",
    )
    assert stopped.choices[0].message.content == "alpha beta"
    many = api.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "hi all"}], n=3, max_tokens=16
    )
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert all(c.message.content == "hi all" for c in many.choices)
    assert many.usage.completion_tokens == 3 * 2


async def test_async_client_and_completions(sqlite_server: GatewayServer) -> None:
    key = sqlite_server.tenant_key()
    api = openai.AsyncOpenAI(base_url=sqlite_server.base_url + "/v1", api_key=key, max_retries=0)
    reply = await api.completions.create(model="echo", prompt="The quick brown fox", max_tokens=3)
    assert reply.object == "text_completion"
    assert reply.choices[0].text == "The quick brown"
    assert reply.choices[0].finish_reason == "length"
    stream = await api.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "streamed async"}], stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "streamed async"
    models = await api.models.list()
    assert {m.id for m in models.data} >= {"echo", "slow-echo"}
    await api.close()


def test_errors_have_openai_shape_and_status(sqlite_server: GatewayServer) -> None:
    url = sqlite_server.base_url
    key = sqlite_server.tenant_key()
    auth = {"Authorization": f"Bearer {key}"}
    chat = {"model": "echo", "messages": [{"role": "user", "content": "x"}]}
    cases = [
        ({}, chat, 401),
        ({"Authorization": "Bearer sk-wrong"}, chat, 401),
        ({"Authorization": "Bearer sk-" + "a" * 52}, chat, 401),
        (auth, {**chat, "model": "nope"}, 404),
        (auth, {**chat, "temperature": "hot"}, 400),
        (auth, {**chat, "messages": []}, 400),
        (auth, {**chat, "surprise": 1}, 400),
        (auth, {"messages": chat["messages"]}, 400),
        (auth, {**chat, "n": 1000}, 400),
    ]
    with httpx.Client(base_url=url) as http:
        for headers, body, status in cases:
            r = http.post("/v1/chat/completions", json=body, headers=headers)
            assert r.status_code == status, (body, r.text)
            error = r.json()["error"]
            assert set(error) >= {"message", "type", "param", "code"}
            assert r.headers["x-request-id"].startswith("req_")
        bad_json = http.post("/v1/chat/completions", content=b"{not json", headers=auth)
        assert bad_json.status_code == 400
        huge = http.post("/v1/chat/completions", content=b"x" * (2 << 20), headers=auth)
        assert huge.status_code == 413
        assert http.get("/v1/nothing-here").status_code == 404
        assert http.get("/v1/chat/completions").status_code == 405


def test_key_scopes_revocation_and_expiry(sqlite_server: GatewayServer) -> None:
    scoped = client(sqlite_server, sqlite_server.tenant_key(models=["slow-echo"]))
    # a model the key may not use answers like an unknown one (no model enumeration)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        scoped.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x"}])
    assert [m.id for m in scoped.models.list().data] == ["slow-echo"]

    expired = client(sqlite_server, sqlite_server.tenant_key(expires_in=dt.timedelta(seconds=-1)))
    with pytest.raises(openai.AuthenticationError, match="expired"):
        expired.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x"}])

    accounts = sqlite_server.gateway.accounts
    tenant = "revocation"
    secret = sqlite_server.tenant_key(tenant)
    api = client(sqlite_server, secret)
    api.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x"}])
    key = next(k for k in sqlite_server.run(accounts.list_keys(tenant)))
    sqlite_server.run(accounts.revoke_key(key.id))
    sqlite_server.gateway.keys.invalidate()  # another process would see it within the TTL
    with pytest.raises(openai.AuthenticationError, match="revoked"):
        api.chat.completions.create(model="echo", messages=[{"role": "user", "content": "x"}])


def test_health_and_openapi(sqlite_server: GatewayServer) -> None:
    with httpx.Client(base_url=sqlite_server.base_url) as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        ready = http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["checks"]["database"] == "ok"
        doc = http.get("/openapi.json").json()
        assert doc["openapi"].startswith("3.1")
        assert "/v1/chat/completions" in doc["paths"]
        assert "ChatCompletionRequest" in doc["components"]["schemas"]
