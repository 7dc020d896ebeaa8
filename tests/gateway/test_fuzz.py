"""Property-based: generated requests against /openapi.json never get a 5xx."""

from __future__ import annotations

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import GatewayServer

# JSON-ish values of every shape, to put where the schema wants something else.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=10,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "tool", "developer", "robot"]),
         "content": st.one_of(st.text(max_size=60), json_values)}
    ),
    max_size=4,
)
chat_bodies = st.fixed_dictionaries(
    {"model": st.sampled_from(["echo", "echo", "echo", "missing", ""]),
     "messages": messages | messages | json_values},
    optional={
        "max_tokens": st.integers(-5, 40) | json_values,
        "max_completion_tokens": st.integers(-5, 40),
        "temperature": st.floats(-1, 3, allow_nan=False) | st.text(max_size=3),
        "top_p": st.floats(-1, 2, allow_nan=False),
        "n": st.integers(-1, 12),
        "stop": st.text(max_size=5) | st.lists(st.text(max_size=4), max_size=6) | json_values,
        "stream": st.booleans() | json_values,
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | json_values,
        "seed": st.integers(-(2**70), 2**70),
        "user": st.text(max_size=10),
        "logprobs": st.booleans(),
        "top_logprobs": st.integers(-3, 30),
        "unexpected": json_values,
    },
)
completion_bodies = st.fixed_dictionaries(
    {"model": st.sampled_from(["echo", "echo", "missing"]),
     "prompt": st.text(max_size=60) | st.lists(st.text(max_size=10), max_size=3) | json_values},
    optional={
        "max_tokens": st.integers(-5, 40) | json_values,
        "logprobs": st.integers(-2, 8),
        "stream": st.booleans(),
        "echo": json_values,
    },
)


def test_openapi_document_covers_the_fuzzed_paths(sqlite_server: GatewayServer) -> None:
    doc = httpx.get(sqlite_server.base_url + "/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models"} <= set(doc["paths"])


def test_generated_requests_never_get_a_5xx(sqlite_server: GatewayServer) -> None:
    key = sqlite_server.tenant_key()
    http = httpx.Client(base_url=sqlite_server.base_url, timeout=30)
    statuses: dict[int, int] = {}

    @settings(max_examples=1100, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(
        path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
        chat=chat_bodies,
        completion=completion_bodies,
        raw=st.sampled_from([None] * 5 + [b""]) | st.binary(max_size=64),
        auth=st.sampled_from(["good"] * 6 + ["none", "garbage", "wrong"]),
    )
    def check(path: str, chat: dict, completion: dict, raw: bytes | None, auth: str) -> None:
        headers = {
            "good": {"Authorization": f"Bearer {key}"},
            "none": {},
            "garbage": {"Authorization": "Basic Zm9vOmJhcg=="},
            "wrong": {"Authorization": "Bearer sk-" + "x" * 52},
        }[auth]
        body = chat if path.endswith("chat/completions") else completion
        if raw is not None:
            r = http.post(path, content=raw, headers=headers)
        else:
            r = http.post(path, json=body, headers=headers)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert r.status_code < 500, (path, body, r.text)
        assert "x-request-id" in r.headers
        if r.status_code >= 400:
            assert set(r.json()["error"]) >= {"message", "type", "param", "code"}

    check()
    http.close()
    assert sum(statuses.values()) >= 1000
    assert statuses.get(200, 0) > 50, statuses  # the generator reaches valid requests too
    assert {400, 401, 404} <= set(statuses), statuses
