"""/v1/completions ``prompt`` forms through openai_upstream: token ids are forwarded unchanged;
several prompts are fanned out as ``n`` is, each upstream call with its own prompt as sent,
each metered."""

from __future__ import annotations

import openai
import orjson

from tests.contract.conftest import Sent, usage_row
from tests.contract.upstream import RecordingUpstream
from tests.conftest import GatewayServer


def completions_sent(upstream: RecordingUpstream, since: int) -> list[dict]:  # type: ignore[type-arg]
    return [r.json for r in upstream.requests[since:] if r.path == "/v1/completions"]


def test_token_ids_are_forwarded_unchanged(client: openai.OpenAI, upstream: RecordingUpstream,
                                           sent: Sent) -> None:
    for prompt in ([1, 415, 2936], [[1, 415, 2936]]):  # one prompt: the body goes as the client sent it
        reply = client.completions.create(model="plain", prompt=prompt, max_tokens=5)
        assert reply.choices[0].text == "Hello from upstream"
        assert upstream.last("/v1/completions").body == sent.bodies[-1]


def test_several_prompts_are_one_upstream_call_each(gateway: GatewayServer, client: openai.OpenAI,
                                                    upstream: RecordingUpstream, sent: Sent) -> None:
    for prompts in (["one", "two", "three"], [[1, 2], [3, 4, 5]]):
        since = len(upstream.requests)
        raw = client.completions.with_raw_response.create(model="plain", prompt=prompts, max_tokens=5, seed=9)
        reply = raw.parse()
        assert [c.index for c in reply.choices] == list(range(len(prompts)))
        calls = completions_sent(upstream, since)
        assert sorted(orjson.dumps(c["prompt"]) for c in calls) == sorted(orjson.dumps(p) for p in prompts)
        client_body = orjson.loads(sent.bodies[-1])
        for c in calls:  # nothing else changed: seeds are the client's (one choice per prompt)
            assert {k: v for k, v in c.items() if k != "prompt"} == \
                {k: v for k, v in client_body.items() if k != "prompt"}
        # the upstream's usage, each call's prompt billed (11 tokens each in the recording upstream)
        assert reply.usage.prompt_tokens == 11 * len(prompts)
        row = usage_row(gateway, raw.headers["x-request-id"])
        assert row.prompt_tokens == 11 * len(prompts)


def test_echo_cannot_take_token_ids(client: openai.OpenAI) -> None:
    try:
        client.completions.create(model="echo", prompt=[[5, 6]], max_tokens=2)
    except openai.BadRequestError as err:
        assert err.body["param"] == "prompt"  # type: ignore[index]
    else:
        raise AssertionError("echo took token ids")
