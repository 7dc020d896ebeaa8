"""The local engine's tool calls are read as they are generated: ToolCallReader against whole-text
parsing, whatever the pieces the text arrives in."""

from __future__ import annotations

import json
import random

import pytest

from sluice.gateway.backends.contract import GenerationRequest, Tool
from sluice.plugins._structured import ToolCallReader

TOOL_CALLS = 5  # the [TOOL_CALLS] token id of the fake tokenizer


class FakeTokenizer:
    tool_calls_id = TOOL_CALLS


REQUEST = GenerationRequest("r", "m", messages=(), tools=(Tool("f"),))


def read(text: str, cuts: list[int]) -> tuple[ToolCallReader, str, list]:  # type: ignore[type-arg]
    """Feed [TOOL_CALLS] then ``text`` cut at ``cuts``; the content and every piece."""
    reader = ToolCallReader(FakeTokenizer(), REQUEST)  # type: ignore[arg-type]
    content, pieces = reader.feed([TOOL_CALLS], "")
    assert not content and not pieces
    content, pieces_all = "", []
    for start, end in zip([0, *cuts], [*cuts, len(text)]):
        more, pieces = reader.feed([100], text[start:end])
        content += more
        pieces_all += pieces
    return reader, content, pieces_all


def calls_of(pieces: list) -> list[tuple[str, str, str]]:  # type: ignore[type-arg]
    calls: dict[int, list[str]] = {}
    for p in pieces:
        if p.index not in calls:
            assert p.id and p.name and p.arguments == "" and p.type == "function"
            calls[p.index] = [p.id, p.name, ""]
        else:
            assert p.id is None and p.name is None
        calls[p.index][2] += p.arguments
    return [tuple(calls[i]) for i in sorted(calls)]  # type: ignore[misc]


WELL_FORMED = [
    ' [{"name": "get_weather", "arguments": {"city": "Pa\\"ris}", "unit": "C"}}, '
    '{"name": "t", "arguments": {"z": [1, {"a": "]"}], "e": "\\u00e9"}}]',
    '{"arguments": {"x": 1}, "id": "abcdefghi", "name": "f"}',  # one object, arguments first, an id
    '[{"id": "abc123xyz", "name": "f", "arguments": null}, {"name": "g"}]',
    '[{"name":"f","arguments":{}}]',
]


@pytest.mark.parametrize("text", WELL_FORMED)
def test_pieces_add_up_to_the_whole_parse_in_any_chunking(text: str) -> None:
    parsed = json.loads(text)
    parsed = parsed if isinstance(parsed, list) else [parsed]
    rng = random.Random(0)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, min(12, len(text) - 1))))
        reader, content, pieces = read(text, cuts)
        calls = calls_of(pieces)
        assert content == "" and reader.complete
        assert [name for _, name, _ in calls] == [c["name"] for c in parsed]
        for (call_id, _, arguments), want in zip(calls, parsed):
            assert json.loads(arguments) == want.get("arguments", {})
            assert call_id == want.get("id", call_id) and len(call_id) == 9


def test_arguments_are_the_models_own_text() -> None:
    text = '[{"name": "f", "arguments": {"a":  1, "b": [true, null]}}]'
    _, _, pieces = read(text, [20, 33, 40])
    assert calls_of(pieces)[0][2] == '{"a":  1, "b": [true, null]}'
    assert len([p for p in pieces if p.arguments]) == 3  # one fragment per piece of text that held some


def test_a_call_opens_as_soon_as_its_name_is_read() -> None:
    reader = ToolCallReader(FakeTokenizer(), REQUEST)  # type: ignore[arg-type]
    reader.feed([TOOL_CALLS], "")
    assert reader.feed([1], ' [{"name": "get_') == ("", ())
    _, pieces = reader.feed([1], 'weather", "arguments": {"ci')
    assert [(p.name, p.arguments) for p in pieces] == [("get_weather", ""), (None, '{"ci')]
    assert not reader.complete


def test_text_that_is_no_call_list_is_content() -> None:
    reader, content, pieces = read("not json at all", [3, 8])
    assert content == "not json at all" and not pieces and not reader.called
    reader, content, pieces = read('[{"name": "f", "arguments": {"a": 1}} then words', [10, 30])
    assert content == "then words" and calls_of(pieces)[0][1:] == ("f", '{"a": 1}')
    assert not reader.complete  # finish_reason stays the engine's, not "tool_calls"


def test_a_list_that_never_opens_a_call_is_content_at_the_end() -> None:
    reader, content, pieces = read(" [ ", [2])
    assert content == "" and not pieces and reader.leftover() == " [ "
    reader, _, _ = read('[{"name": "f"}]', [])
    assert reader.leftover() == ""


def test_a_call_cut_short_is_incomplete() -> None:
    reader, content, pieces = read('[{"name": "f", "arguments": {"a": 1', [12])
    assert content == "" and calls_of(pieces)[0][2] == '{"a": 1' and not reader.complete


def test_without_the_call_token_everything_is_content() -> None:
    reader = ToolCallReader(FakeTokenizer(), REQUEST)  # type: ignore[arg-type]
    assert reader.feed([7], '[{"name": "f"}]') == ('[{"name": "f"}]', ())
    no_tools = ToolCallReader(FakeTokenizer(), GenerationRequest("r", "m", messages=()))  # type: ignore[arg-type]
    assert no_tools.feed([TOOL_CALLS], "x") == ("x", ())
