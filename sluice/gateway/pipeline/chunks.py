"""The SSE events of one streamed answer: OpenAI's chunk objects as ``data: {...}\\n\\n``.

Most chunks of a stream carry a piece of text and nothing else. Their bytes are those of
a per-choice template, the encoded chunk cut where its text goes, joined around the text's
own JSON: the same bytes as encoding the whole object, without building it per token.
Any other chunk (the first, the last, logprobs, tool calls, refusal, extra fields) is
built and encoded whole.
"""

from __future__ import annotations

from typing import Any

import orjson

from sluice.gateway.backends.contract import GenerationEvent, TokenLogprob
from sluice.gateway.http.formats import has_content
from sluice.gateway.http.streaming import event_json, sse
from sluice.gateway.pipeline.call import Call

_MARK = "\x00sluice-chunk-text\x00"  # where a template's text goes (JSON-escaped, so unique)


class ChunkEncoder:
    def __init__(self, call: Call) -> None:
        self.call = call
        self.head: dict[str, Any] = {
            "id": call.response_id, "object": call.fmt.chunk_object, "created": call.created,
            "model": call.model, "system_fingerprint": None}
        self.first = [True] * len(call.requests)
        self._templates: dict[int, tuple[bytes, bytes]] = {}

    def chunk(self, index: int, text: str | None, finish: str | None,
              lps: list[TokenLogprob] | None, event: GenerationEvent) -> bytes:
        """One choice's chunk (``text`` None: no content field)."""
        if (text and finish is None and lps is None and not self.first[index]
                and not event.system_fingerprint and not event.response_extra
                and not has_content(event)):
            template = self._templates.get(index) or self._template(index)
            return template[0] + event_json(text) + template[1]
        if event.system_fingerprint or event.response_extra:
            if event.system_fingerprint:
                self.head["system_fingerprint"] = event.system_fingerprint
            if event.response_extra:
                self.head.update(event.response_extra)
            self._templates.clear()
        out = self._encode(index, text, finish, lps, event)
        self.first[index] = False
        return out

    def usage(self) -> bytes:
        """The closing chunk of ``stream_options.include_usage``: no choices, the usage."""
        return sse({**self.head, "choices": [], "usage": self.call.usage()})

    def _encode(self, index: int, text: str | None, finish: str | None,
                lps: list[TokenLogprob] | None, event: GenerationEvent | None) -> bytes:
        body = {**self.head, "choices": [self.call.fmt.delta(index, text, finish, lps,
                                                             self.first[index], event)]}
        if self.call.include_usage:
            body["usage"] = None
        return sse(body)

    def _template(self, index: int) -> tuple[bytes, bytes]:
        before, mark, after = self._encode(index, _MARK, None, None, None).partition(
            orjson.dumps(_MARK))
        assert mark, "a chunk template lost its text"
        self._templates[index] = (before, after)
        return before, after
