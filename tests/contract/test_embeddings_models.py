"""/v1/embeddings through openai_upstream, /v1/models capabilities, trace propagation."""

from __future__ import annotations

import httpx
import openai

from tests.conftest import GatewayServer
from tests.contract.conftest import Sent, usage_row
from tests.contract.upstream import RecordingUpstream


def test_embeddings_forwarded_and_metered(client: openai.OpenAI, gateway: GatewayServer,
                                          upstream: RecordingUpstream, sent: Sent) -> None:
    raw = client.embeddings.with_raw_response.create(model="embed", input=["a b", "c"],
                                                     encoding_format="float")
    resp = raw.parse()
    assert [d.embedding for d in resp.data] == [[0.0, 0.5, -1.0], [0.25, 0.5, -1.0]]
    assert resp.usage.prompt_tokens == 6
    assert upstream.last("/v1/embeddings").body == sent.bodies[-1]
    row = usage_row(gateway, raw.headers["x-request-id"])
    assert (row.endpoint, row.prompt_tokens, row.completion_tokens) == ("embeddings", 6, 0)


def test_embeddings_on_a_model_without_them_is_a_400(client: openai.OpenAI) -> None:
    try:
        client.embeddings.create(model="echo", input="x")
    except openai.BadRequestError as exc:
        assert exc.body["param"] == "model"  # type: ignore[index]
    else:
        raise AssertionError("echo has no embeddings")


def test_models_show_capabilities(gateway: GatewayServer, key: str) -> None:
    models = httpx.get(gateway.base_url + "/v1/models",
                       headers={"Authorization": f"Bearer {key}"}).json()["data"]
    by_id = {m["id"]: m for m in models}
    assert set(by_id["echo"]["capabilities"]) == {"chat", "completions"}
    assert {"tools", "json_schema", "embeddings", "vision"} <= set(
        by_id["plain"]["capabilities"])


def test_traceparent_is_propagated_upstream(gateway: GatewayServer, key: str,
                                           upstream: RecordingUpstream) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    r = httpx.post(gateway.base_url + "/v1/chat/completions", json={
        "model": "plain", "messages": [{"role": "user", "content": "x"}]}, headers={
        "Authorization": f"Bearer {key}", "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
    assert r.status_code == 200
    sent_up = upstream.last().headers["traceparent"]
    assert sent_up.split("-")[1] == trace_id
