"""Tools through sluice: definitions forwarded, calls returned whole and streamed, and a
full round trip (assistant tool_calls -> tool message -> answer)."""

from __future__ import annotations

import json

import openai

from tests.contract.conftest import Sent
from tests.contract.upstream import TOOL_CALLS, RecordingUpstream

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}, "strict": True}},
    {"type": "function", "function": {
        "name": "get_time", "parameters": {"type": "object",
                                           "properties": {"tz": {"type": "string"}}}}},
]
EXPECTED = [(c["id"], c["name"], "".join(c["arguments"])) for c in TOOL_CALLS]


def test_tool_calls_whole(client: openai.OpenAI, upstream: RecordingUpstream,
                          sent: Sent) -> None:
    resp = client.chat.completions.create(
        model="tools", messages=[{"role": "user", "content": "Weather and time in Paris?"}],
        tools=TOOLS, tool_choice="auto", parallel_tool_calls=True)  # type: ignore[arg-type]
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert [(c.id, c.function.name, c.function.arguments) for c in calls] == EXPECTED  # type: ignore[union-attr]
    assert choice.message.content is None
    assert upstream.last().body == sent.bodies[-1]  # tools, tool_choice: as sent


async def test_tool_calls_streamed_as_openai_does(
    aclient: openai.AsyncOpenAI, upstream: RecordingUpstream,
) -> None:
    stream = await aclient.chat.completions.create(
        model="tools", messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}},
        stream=True)  # type: ignore[arg-type]
    pieces, finish = [], None
    async for chunk in stream:
        for choice in chunk.choices:
            pieces += choice.delta.tool_calls or []
            finish = choice.finish_reason or finish
    await aclient.close()
    assert finish == "tool_calls"
    firsts = [p for p in pieces if p.id]
    assert [(p.index, p.id, p.function.name) for p in firsts] == [  # type: ignore[union-attr]
        (0, "call_weather", "get_weather"), (1, "call_time", "get_time")]
    for index, (_, _, arguments) in enumerate(EXPECTED):
        fragments = [p.function.arguments or "" for p in pieces if p.index == index]  # type: ignore[union-attr]
        assert len([f for f in fragments if f]) == 2  # fragments arrive as fragments
        assert "".join(fragments) == arguments
    assert upstream.last().json["tool_choice"] == {"type": "function",
                                                   "function": {"name": "get_weather"}}


def test_full_tool_round_trip(client: openai.OpenAI, upstream: RecordingUpstream,
                              sent: Sent) -> None:
    messages: list = [{"role": "user", "content": "Weather in Paris?"}]
    first = client.chat.completions.create(model="tools", messages=messages, tools=TOOLS)  # type: ignore[arg-type]
    call = (first.choices[0].message.tool_calls or [])[0]
    assert json.loads(call.function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
    messages += [first.choices[0].message,
                 {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    answer = client.chat.completions.create(model="answer", messages=messages, tools=TOOLS)  # type: ignore[arg-type]
    assert answer.choices[0].message.content == "It is sunny, 21 C"
    assert answer.choices[0].finish_reason == "stop"
    got = upstream.last().json
    assert upstream.last().body == sent.bodies[-1]
    assert got["messages"][1]["tool_calls"][0]["id"] == "call_weather"
    assert got["messages"][2] == {"role": "tool", "tool_call_id": "call_weather",
                                  "content": "sunny, 21 C"}


def test_tools_to_a_model_without_tool_support_is_a_400_naming_tools(
    client: openai.OpenAI,
) -> None:
    try:
        client.chat.completions.create(model="echo", tools=TOOLS,  # type: ignore[arg-type]
                                       messages=[{"role": "user", "content": "x"}])
    except openai.BadRequestError as exc:
        assert exc.body["param"] == "tools"  # type: ignore[index]
    else:
        raise AssertionError("tools were accepted by a model that cannot call them")
