"""OpenAI fidelity of the local engine through the gateway, to the official openai client (issue 15):
logit_bias and presence/frequency penalties applied by the sampler; ``prompt`` as a string, strings,
token ids or lists of token ids on /v1/completions."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from sluice.gateway.settings import BackendConfig, PoolConfig
from sluice.plugins.local_engine import LocalEngineBackend
from tests.conftest import GatewayServer, echo_settings

MODEL = "tiny-mixtral"
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def server(own_db: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    cache = str(tmp_path_factory.mktemp("cache"))
    backends = {
        "local": BackendConfig(plugin="local", options={"cache_dir": cache, "num_kv_blocks": 256,
                                                        "max_num_seqs": 8, "device": "cpu"},
                               pool=PoolConfig(max_concurrency=8)),
        "echo": BackendConfig(plugin="echo"),
    }
    server = GatewayServer(echo_settings(own_db, backends=backends)).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api(server: GatewayServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=server.tenant_key(), max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The tiny model's tokenizer (the real Mixtral one), without starting an engine."""
    return LocalEngineBackend(LocalEngineBackend.Options(cache_dir=str(tmp_path_factory.mktemp("t")))).tokenizer


def greedy_tokens(api: openai.OpenAI, **kw: object) -> list[str]:
    reply = api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=0, **kw)
    return list(reply.choices[0].logprobs.tokens)


# ---- logit_bias and penalties -------------------------------------------------------------

def test_negative_bias_on_the_greedy_token_changes_the_answer(api: openai.OpenAI, tokenizer) -> None:  # type: ignore[no-untyped-def]
    free = greedy_tokens(api)
    assert free == greedy_tokens(api)  # greedy: the same every time
    banned = [i for i in range(32000) if tokenizer.token_text(i) == free[0]]
    biased = greedy_tokens(api, logit_bias={str(i): -100 for i in banned})
    assert biased[0] != free[0] and free[0] not in biased
    chat = api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                       temperature=0, logit_bias={"1234": 100}, logprobs=True)
    assert chat.choices[0].message.content == " er" * 6 or chat.choices[0].message.content == "er" + " er" * 5
    for item in chat.choices[0].logprobs.content:  # the reported distribution is the biased one
        assert item.token == " er" and item.logprob > -1e-3


def test_frequency_and_presence_penalties_break_a_greedy_repeat(api: openai.OpenAI) -> None:
    bias = {"1234": 5}  # enough to make greedy repeat " er" (id 1234) forever
    assert greedy_tokens(api, logit_bias=bias) == [" er"] * 12
    frequency = greedy_tokens(api, logit_bias=bias, frequency_penalty=2)
    assert 1 <= frequency.count(" er") < 12  # each use costs 2: after a few, another token wins
    small = {"1234": 2}  # still a repeat without penalties; a presence penalty of 2 cancels it once used
    assert greedy_tokens(api, logit_bias=small) == [" er"] * 12
    assert greedy_tokens(api, logit_bias=small, presence_penalty=2).count(" er") == 1
    encouraged = greedy_tokens(api, frequency_penalty=-2)  # negative: repeats what it said
    assert len(set(encouraged)) < len(set(greedy_tokens(api)))
    # seeded sampling with penalties is as reproducible as without
    seeded = [api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, seed=7, temperature=1,
                                     frequency_penalty=1.5, logit_bias={"1234": 3}).choices[0].text
              for _ in range(2)]
    assert seeded[0] == seeded[1]


@pytest.mark.parametrize(("field", "value"), [
    ("presence_penalty", 2.5), ("frequency_penalty", -3), ("logit_bias", {"1234": 101}),
    ("logit_bias", {"er": 1}), ("logit_bias", {"999999": 1}), ("logit_bias", {"1234": "x"}),
])
def test_out_of_range_values_are_a_400_naming_the_field(api: openai.OpenAI, field: str, value: object) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                    **{field: value})
    # a wrong type is the schema's answer, naming the key ("logit_bias.1234")
    assert err.value.body["param"].split(".")[0] == field and err.value.body["type"] == "invalid_request_error"
