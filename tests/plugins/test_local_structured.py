"""The local engine serves response_format, tools and tool_choice for real (issue 15 item 4):
through the gateway to the official openai client on the tiny Mixtral (v1 tokenizer: JSON yes,
tools no), and tool calls on a tiny Mistral with a v3 tokenizer."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import jsonschema
import openai
import pytest

from sluice.gateway.backends.contract import (ChatMessage, GenerationRequest, NamedToolChoice, ResponseFormat,
                                              SamplingParams, Tool, ToolCall)
from sluice.gateway.settings import BackendConfig, PoolConfig
from sluice.plugins.local_engine import LocalEngineBackend
from tests.conftest import GatewayServer, echo_settings

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 99},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}}}
WEATHER = Tool("get_weather", "Weather in a city", {
    "type": "object", "additionalProperties": False, "required": ["city", "unit"],
    "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["C", "F"]}}})
TIME = Tool("get_time", "Time in a zone", {
    "type": "object", "additionalProperties": False, "required": ["zone"],
    "properties": {"zone": {"type": "string", "pattern": "^[A-Z]{3}$"}}})


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from sluice.gateway.db.session import migrate

    db = tmp_path_factory.mktemp("db") / "sluice.db"
    migrate(f"sqlite+aiosqlite:///{db}")
    backends = {"local": BackendConfig(
        plugin="local", options={"cache_dir": str(tmp_path_factory.mktemp("cache")), "num_kv_blocks": 256,
                                 "max_num_seqs": 8, "device": "cpu"},
        pool=PoolConfig(max_concurrency=8))}
    server = GatewayServer(echo_settings(f"sqlite+aiosqlite:///{db}", backends=backends)).start()
    yield server
    server.stop()


def client(server: GatewayServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=server.tenant_key(), max_retries=0)


def test_json_schema_answers_parse_and_validate(server: GatewayServer) -> None:
    api = client(server)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for seed in range(3):
        reply = api.chat.completions.create(model="tiny-mixtral", messages=[{"role": "user", "content": "Who?"}],
                                            response_format=fmt, max_tokens=80, seed=seed)
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON)
    stream = api.chat.completions.create(model="tiny-mixtral", messages=[{"role": "user", "content": "Who?"}],
                                         response_format={"type": "json_object"}, max_tokens=120, seed=1,
                                         temperature=0.7, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    if chunks[-1].choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert text.startswith("{")


def test_v1_model_refuses_tools_and_images_naming_the_field(server: GatewayServer) -> None:
    api = client(server)
    cards = {m.id: m for m in api.models.list().data}
    assert "json_schema" in cards["tiny-mixtral"].model_extra["capabilities"]
    assert "tools" not in cards["tiny-mixtral"].model_extra["capabilities"]
    with pytest.raises(openai.BadRequestError) as err:
        api.chat.completions.create(model="tiny-mixtral", messages=[{"role": "user", "content": "hi"}],
                                    tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    assert err.value.body["param"] == "tools"
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    with pytest.raises(openai.BadRequestError) as err:
        api.chat.completions.create(model="tiny-mixtral", messages=[
            {"role": "user", "content": "hi"},
            {"role": "user", "content": [{"type": "text", "text": "what is this?"}, image]}])
    assert err.value.body["param"] == "messages[1].content[1]"


def test_backend_refuses_image_parts_itself(tmp_path: Path) -> None:
    backend = LocalEngineBackend(LocalEngineBackend.Options(cache_dir=str(tmp_path), device="cpu"))
    backend._engine = object()  # started as far as the checks before the engine go
    part = {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}
    request = GenerationRequest("r", "tiny-mixtral", messages=(
        ChatMessage("user", "x", parts=({"type": "text", "text": "x"}, part)),))

    async def run() -> None:
        async for _ in backend.generate(request):
            pass

    with pytest.raises(Exception) as err:
        asyncio.run(run())
    assert getattr(err.value, "param", None) == "messages[0].content[1]" and err.value.status == 400


# ---- tools on a v3 tokenizer ------------------------------------------------------------

@pytest.fixture(scope="module")
def v3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import mistral_common
    from transformers import MixtralForCausalLM

    from tests.engine.conftest import _save, mixtral_config

    d = tmp_path_factory.mktemp("tiny-mixtral-v3")  # as Mixtral 8x22B: a v3 tokenizer
    _save(MixtralForCausalLM, mixtral_config(vocab_size=32768), d)
    shutil.copy(Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3",
                d / "tokenizer.model.v3")
    return d


@pytest.fixture(scope="module")
def v3_backend(v3_dir: Path):  # type: ignore[no-untyped-def]
    b = LocalEngineBackend(LocalEngineBackend.Options(model=str(v3_dir), device="cpu", num_kv_blocks=256,
                                                      max_num_seqs=8))
    asyncio.run(b.start())
    yield b
    asyncio.run(b.stop())


def ask(backend: LocalEngineBackend, *messages: ChatMessage, **kw) -> list:  # type: ignore[no-untyped-def]
    request = GenerationRequest("r", "m", messages=messages, tools=(WEATHER, TIME),
                                sampling=SamplingParams(max_tokens=120, seed=kw.pop("seed", 0)), **kw)

    async def run() -> list:  # type: ignore[type-arg]
        return [e async for e in backend.generate(request)]

    return asyncio.run(run())


def assemble(events: list) -> list[tuple[str, str, str]]:  # type: ignore[type-arg]
    """(id, name, arguments) of each call, from its streamed pieces."""
    calls: dict[int, list[str]] = {}
    for piece in (p for e in events for p in e.tool_calls):
        if piece.index not in calls:
            assert piece.id and piece.name and piece.arguments == ""  # the first piece opens the call
            calls[piece.index] = [piece.id, piece.name, ""]
        else:
            assert piece.id is None and piece.name is None
        calls[piece.index][2] += piece.arguments
    return [tuple(calls[i]) for i in sorted(calls)]  # type: ignore[misc]


def test_v3_model_card_says_tools(v3_backend: LocalEngineBackend) -> None:
    assert v3_backend.models()[0].serves("tools") and v3_backend.models()[0].serves("json_schema")


@pytest.mark.parametrize("seed", range(4))
def test_tool_choice_required_gives_valid_tool_calls(v3_backend: LocalEngineBackend, seed: int) -> None:
    # one call per answer (parallel_tool_calls false) keeps a random model's answer short
    events = ask(v3_backend, ChatMessage("user", "Weather in Paris?"), tool_choice="required", seed=seed,
                 parallel_tool_calls=False)
    last = events[-1]
    calls = assemble(events)
    assert last.finish_reason == "tool_calls" and calls
    schemas = {t.name: t.parameters for t in (WEATHER, TIME)}
    for call_id, name, arguments in calls:
        jsonschema.validate(json.loads(arguments), schemas[name])
        assert len(call_id) == 9
    assert sum(1 for e in events if any(p.arguments for p in e.tool_calls)) > 1  # streamed, not whole
    assert not "".join(e.text for e in events)  # a tool call is no content
    assert last.usage.completion_tokens == sum(e.tokens for e in events)


def test_named_tool_choice_calls_that_function_once(v3_backend: LocalEngineBackend) -> None:
    events = ask(v3_backend, ChatMessage("user", "Time?"), tool_choice=NamedToolChoice("get_time"), seed=3)
    [(_, name, arguments)] = assemble(events)
    assert name == "get_time" and events[-1].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(arguments), TIME.parameters)


def test_tool_choice_none_never_calls(v3_backend: LocalEngineBackend) -> None:
    for seed in range(3):
        events = ask(v3_backend, ChatMessage("user", "Weather?"), tool_choice="none", seed=seed)
        assert not any(e.tool_calls for e in events) and events[-1].finish_reason in ("stop", "length")


def test_a_named_tool_not_in_tools_is_a_400(v3_backend: LocalEngineBackend) -> None:
    with pytest.raises(Exception) as err:
        ask(v3_backend, ChatMessage("user", "x"), tool_choice=NamedToolChoice("nope"))
    assert err.value.status == 400 and err.value.param == "tool_choice"


def test_full_tool_round_trip_encodes_and_answers(v3_backend: LocalEngineBackend) -> None:
    [(call_id, name, arguments)] = assemble(ask(v3_backend, ChatMessage("user", "Weather in Paris?"),
                                                tool_choice="required", parallel_tool_calls=False))
    follow = (ChatMessage("user", "Weather in Paris?"),
              ChatMessage("assistant", tool_calls=(ToolCall(call_id, name, arguments),)),
              ChatMessage("tool", '{"temp": 21}', tool_call_id=call_id),)
    events = ask(v3_backend, *follow, tool_choice="none",
                 response_format=ResponseFormat("json_schema", schema=PERSON))
    assert events[-1].finish_reason == "stop"
    jsonschema.validate(json.loads("".join(e.text for e in events)), PERSON)
    probe = LocalEngineBackend(v3_backend.opts)  # the gateway's counting instance
    request = GenerationRequest("r", "m", messages=follow, tools=(WEATHER, TIME))
    assert probe.count_tokens(request) == len(v3_backend.prompt_ids(request))


def test_tool_calls_reach_the_openai_client_streamed_and_whole(v3_dir: Path, own_db: str) -> None:
    backends = {"local": BackendConfig(plugin="local", options={
        "model": str(v3_dir), "served_model_name": "tiny-v3", "device": "cpu", "num_kv_blocks": 256})}
    server = GatewayServer(echo_settings(own_db, backends=backends)).start()
    try:
        api = client(server)
        tools = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                   "parameters": dict(t.parameters)}} for t in (WEATHER, TIME)]
        messages = [{"role": "user", "content": "Weather in Paris?"}]
        reply = api.chat.completions.create(model="tiny-v3", messages=messages, tools=tools, max_tokens=120,
                                            tool_choice="required", parallel_tool_calls=False, seed=1)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content in (None, "")
        [call] = choice.message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments), {t.name: t.parameters for t in (WEATHER, TIME)}
                            [call.function.name])
        stream = api.chat.completions.create(model="tiny-v3", messages=messages, tools=tools, max_tokens=120,
                                             tool_choice="required", parallel_tool_calls=False, seed=1, stream=True,
                                             stream_options={"include_usage": True})
        chunks = list(stream)
        deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
        # OpenAI's shape: the call opens with index, id, type and name and empty arguments ...
        assert deltas[0].index == 0 and deltas[0].id and deltas[0].type == "function"
        assert deltas[0].function.name == call.function.name and deltas[0].function.arguments == ""
        # ... then its arguments arrive in pieces, in several chunks, as the model writes them
        fragments = [d.function.arguments for d in deltas[1:]]
        assert len(fragments) > 1 and all(d.id is None and d.function.name is None for d in deltas[1:])
        assert "".join(fragments) == call.function.arguments  # the same text the whole answer has
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
        assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens  # metered alike
        # several calls in one answer: each its own index, its own arguments, each valid
        for seed in range(8):  # the random model calls one tool or several, depending on the seed
            several = api.chat.completions.create(model="tiny-v3", messages=messages, tools=tools,
                                                  max_tokens=200, tool_choice="required", seed=seed, stream=True)
            calls: dict[int, list[str]] = {}
            finish = None
            for c in several:
                for d in c.choices[0].delta.tool_calls or []:
                    calls.setdefault(d.index, [d.function.name or "", ""])[1] += d.function.arguments or ""
                finish = c.choices[0].finish_reason or finish
            if finish == "tool_calls" and len(calls) > 1:
                break
        else:
            pytest.fail("no seed gave an answer with several tool calls")
        assert sorted(calls) == list(range(len(calls)))
        for name, arguments in calls.values():
            jsonschema.validate(json.loads(arguments), {t.name: t.parameters for t in (WEATHER, TIME)}[name])
        # the round trip: the assistant's call and the tool's result go back in
        follow = messages + [choice.message.model_dump(exclude_none=True),
                             {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
        again = api.chat.completions.create(model="tiny-v3", messages=follow, tools=tools, max_tokens=5)
        assert again.usage.prompt_tokens > reply.usage.prompt_tokens
    finally:
        server.stop()
