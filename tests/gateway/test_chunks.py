"""The streamed chunks' bytes: a text chunk cut from a template is the chunk encoded whole."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from sluice.gateway.backends.contract import GenerationEvent, GenerationRequest, TokenLogprob, ToolCallDelta
from sluice.gateway.http.formats import ChatFormat, TextFormat
from sluice.gateway.http.streaming import sse
from sluice.gateway.pipeline.call import Call, Choice
from sluice.gateway.pipeline.chunks import ChunkEncoder

TEXTS = ["Hello", " world", ' "quoted" \\ back', "line\nbreak\ttab", "é ü ß", "日本語", "🙂🚀",
         "\u2028\u2029", "\x85\x0b\x0c\x1c\x1d\x1e\r", "\x00\x1f", "</script>", "a" * 300]


def make_call(fmt: ChatFormat | TextFormat, n: int, include_usage: bool, want_logprobs: bool) -> Call:
    requests = [GenerationRequest(f"req_{i}", "m", prompt="p") for i in range(n)]
    return Call(request_id="req_abc123", endpoint="chat", principal=None, model="tiny-mixtral",  # type: ignore[arg-type]
                pool=None, requests=requests, count_prompt=lambda: 7, prompt_text="",  # type: ignore[arg-type]
                conversation=[], reserve_tokens=0, fmt=fmt, span=None, stream=True,
                include_usage=include_usage, want_logprobs=want_logprobs,
                choices=[Choice() for _ in range(n)])


class Reference:
    """The chunk built as a dict and encoded whole (what every chunk was before templates)."""

    def __init__(self, call: Call) -> None:
        self.call = call
        self.head: dict[str, Any] = {"id": call.response_id, "object": call.fmt.chunk_object,
                                     "created": call.created, "model": call.model,
                                     "system_fingerprint": None}
        self.first = [True] * len(call.requests)

    def chunk(self, index: int, text: str | None, finish: str | None,
              lps: list[TokenLogprob] | None, event: GenerationEvent) -> bytes:
        if event.system_fingerprint:
            self.head["system_fingerprint"] = event.system_fingerprint
        if event.response_extra:
            self.head.update(event.response_extra)
        body = {**self.head, "choices": [self.call.fmt.delta(index, text, finish, lps,
                                                             self.first[index], event)]}
        if self.call.include_usage:
            body["usage"] = None
        self.first[index] = False
        return sse(body)


def events(n: int) -> list[tuple[int, GenerationEvent]]:
    out: list[tuple[int, GenerationEvent]] = []
    for k, text in enumerate(TEXTS):
        for index in range(n):
            out.append((index, GenerationEvent(text=text, tokens=1)))
        if k == 3:  # a backend that sends its fingerprint and extra fields mid-stream
            out.append((0, GenerationEvent(text="fp", tokens=1, system_fingerprint="fp_1",
                                           response_extra={"service_tier": "default"})))
        if k == 5:
            out.append((n - 1, GenerationEvent(text="", tokens=1, tool_calls=(
                ToolCallDelta(index=0, id="call_1", name="f", arguments="{}"),))))
            out.append((0, GenerationEvent(text="lp", tokens=1, logprobs=(
                TokenLogprob("lp", -0.5, (("lp", -0.5), ("x", -2.0))),))))
    for index in range(n):
        out.append((index, GenerationEvent(text="end", tokens=1, finish_reason="stop")))
    return out


@pytest.mark.parametrize("fmt", [ChatFormat(), TextFormat()], ids=["chat", "text"])
@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("want_logprobs", [False, True])
@pytest.mark.parametrize("n", [1, 2])
def test_every_chunk_is_the_whole_object_encoded(fmt, include_usage, want_logprobs, n) -> None:
    call = make_call(fmt, n, include_usage, want_logprobs)
    encoder, reference = ChunkEncoder(call), Reference(call)
    for index, event in events(n):
        lps = list(event.logprobs) if want_logprobs else None
        text = event.text if event.text or encoder.first[index] else None
        got = encoder.chunk(index, text, event.finish_reason, lps, event)
        assert got == reference.chunk(index, text, event.finish_reason, lps, event)
        assert got.startswith(b"data: ") and got.endswith(b"\n\n")
        orjson.loads(got[6:])  # valid JSON
    assert encoder.head == reference.head


def test_usage_chunk_closes_with_the_head_as_it_ended() -> None:
    call = make_call(ChatFormat(), 1, True, False)
    encoder = ChunkEncoder(call)
    encoder.chunk(0, "a", None, None, GenerationEvent(text="a", tokens=1, system_fingerprint="fp_9"))
    closing = orjson.loads(encoder.usage()[6:])
    assert closing["choices"] == [] and closing["system_fingerprint"] == "fp_9"
    assert closing["usage"]["prompt_tokens"] == 7


def test_every_event_survives_a_line_reader_that_splits_on_unicode_line_ends() -> None:
    """httpx's aiter_lines (str.splitlines' rules) breaks lines on U+0085, U+2028 and
    U+2029 too: a chunk whose text holds one raw must still read back as one event."""
    from httpx._decoders import LineDecoder

    call = make_call(ChatFormat(), 1, True, False)
    encoder = ChunkEncoder(call)
    stream = b"".join(encoder.chunk(0, event.text, event.finish_reason, None, event) for _, event in events(1))
    lines = LineDecoder().decode(stream.decode()) + LineDecoder().flush()
    texts = [orjson.loads(line[6:])["choices"][0]["delta"].get("content") for line in lines if line]
    assert len(texts) == len(events(1))  # one line per event: none was cut
    assert "".join(t or "" for t in texts) == "".join(event.text for _, event in events(1))
