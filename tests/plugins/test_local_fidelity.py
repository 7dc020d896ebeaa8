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
from tests.contract.conftest import usage_row

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


# ---- /v1/completions prompt forms ---------------------------------------------------------

def complete(api: openai.OpenAI, prompt: object, **kw: object):  # type: ignore[no-untyped-def]
    return api.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, **kw)  # type: ignore[arg-type]


def test_each_prompt_form_is_served_in_openai_order(server: GatewayServer, api: openai.OpenAI,  # type: ignore[no-untyped-def]
                                                    tokenizer) -> None:  # type: ignore[no-untyped-def]
    texts = [PROMPT, "The weather today", "Hello"]
    alone = [complete(api, t) for t in texts]
    raw = api.completions.with_raw_response.create(model=MODEL, prompt=texts, n=2, max_tokens=6, temperature=0)
    together = raw.parse()
    assert [c.index for c in together.choices] == list(range(6))
    for p, single in enumerate(alone):  # choice index = prompt * n + choice
        assert [c.text for c in together.choices[2 * p:2 * p + 2]] == [single.choices[0].text] * 2
    # usage: every prompt once, every choice's completion
    assert together.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert together.usage.completion_tokens == 2 * sum(a.usage.completion_tokens for a in alone)
    row = usage_row(server, raw.headers["x-request-id"])  # and metered so
    assert (row.prompt_tokens, row.completion_tokens) == (together.usage.prompt_tokens,
                                                          together.usage.completion_tokens)

    ids = [tokenizer.encode(t) for t in texts]  # what the engine runs for each text (BOS first)
    assert [len(i) for i in ids] == [a.usage.prompt_tokens for a in alone]
    one = complete(api, ids[0])  # a list of token ids is one prompt, straight to the engine
    assert one.choices[0].text == alone[0].choices[0].text and one.usage.prompt_tokens == len(ids[0])
    many = complete(api, ids)  # a list of token-id lists: one choice each
    assert [c.text for c in many.choices] == [a.choices[0].text for a in alone]
    assert many.usage.prompt_tokens == sum(map(len, ids))
    assert [c.text for c in complete(api, [texts[1]]).choices] == [alone[1].choices[0].text]


def test_several_prompts_stream_with_their_index(api: openai.OpenAI, tokenizer) -> None:  # type: ignore[no-untyped-def]
    prompts = [tokenizer.encode(PROMPT), tokenizer.encode("Hello")]
    whole = complete(api, prompts, n=2)
    texts = [""] * 4
    finished = set()
    usage = None
    for chunk in complete(api, prompts, n=2, stream=True, stream_options={"include_usage": True}):
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finished.add(c.index)
        usage = chunk.usage or usage
    assert texts == [c.text for c in whole.choices] and finished == {0, 1, 2, 3}
    assert usage is not None and usage.prompt_tokens == whole.usage.prompt_tokens == sum(map(len, prompts))


@pytest.mark.parametrize("prompt", [[], [[]], [[1, -3]], [[1, 999999]], ["a"] * 5])
def test_a_prompt_the_model_cannot_take_is_a_400_naming_prompt(api: openai.OpenAI, prompt: object) -> None:
    with pytest.raises(openai.BadRequestError) as err:  # 5 prompts of n=2: over max_n (8)
        complete(api, prompt, n=2)
    assert err.value.body["param"] == "prompt"


def test_token_ids_to_a_backend_without_them_are_a_400_naming_prompt(api: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        api.completions.create(model="echo", prompt=[1, 2, 3], max_tokens=2)
    assert err.value.body["param"] == "prompt" and "token ids" in err.value.body["message"]
    texts = api.completions.create(model="echo", prompt=["one", "two"], max_tokens=2)  # text: served
    assert [c.index for c in texts.choices] == [0, 1] and texts.choices[0].text != texts.choices[1].text
    card = api.models.retrieve(MODEL).model_extra["capabilities"]
    assert "token_prompts" in card and "token_prompts" not in api.models.retrieve("echo").model_extra["capabilities"]


def test_the_input_guard_reads_every_prompt_and_refuses_token_ids(server: GatewayServer, api: openai.OpenAI) -> None:
    from sluice.gateway.pipeline.guard import Guard

    async def guard_model(prompt: str) -> str:  # stands in for LlamaGuard
        return "unsafe\nS1" if "BADWORD" in prompt else "safe"

    server.gateway.pipeline.guardrails.guard = Guard(guard_model)
    try:
        assert len(complete(api, ["fine", "also fine"]).choices) == 2
        with pytest.raises(openai.BadRequestError):  # the second prompt is read too
            complete(api, ["fine", "say BADWORD"])
        with pytest.raises(openai.BadRequestError) as err:  # ids cannot be read: refused, not waved through
            complete(api, [1, 415, 2936])
        assert err.value.body["param"] == "prompt"
    finally:
        server.gateway.pipeline.guardrails.guard = None


def test_every_prompt_counts_against_a_tokens_per_minute_limit(server: GatewayServer) -> None:
    api = openai.OpenAI(base_url=server.base_url + "/v1", api_key=server.tenant_key(tpm=200), max_retries=0)
    prompts = [  # ~60 tokens each by the byte estimate; four are over 200 before any is run
        "The committee met on Tuesday to review the budget for next year and agreed to postpone "
        "the decision on the new library until the engineers report on the foundations.",
        "Our cat spends most afternoons asleep on the windowsill, waking only when a delivery van "
        "stops outside or when somebody opens the drawer where the treats are kept.",
        "During the storm the ferry stayed in the harbour, so the travellers drank tea in the "
        "station cafe and compared stories about journeys that had gone wrong before.",
        "She planted tomatoes, beans and a row of sunflowers along the fence, then wrote the date "
        "of each sowing in a notebook that already held eleven summers of careful records.",
    ]
    assert len(api.completions.create(model="echo", prompt=prompts[0], max_tokens=4).choices) == 1
    with pytest.raises(openai.RateLimitError):
        api.completions.create(model="echo", prompt=prompts, max_tokens=4)
