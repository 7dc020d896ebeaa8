"""What the guard model reads: message text neutralised, flattened and cut to its budget.

Llama Guard judges ONE user turn of a fixed template (reference/llamaguard.md), so three
things stand between a conversation and the guard model:

1. **Neutralising.** Message text must not be able to end the conversation section early,
   open a second category list, or start a turn of its own. Text is NFKC-normalised (so
   full-width look-alikes of ``<`` and ``:`` become plain), line breaks are made plain
   ``\\n``, and then: every ``<|`` gets a zero-width space (no Llama 3 special token can be
   spelled), every ``<`` that opens a ``BEGIN``/``END`` marker becomes ``‹``, and a line
   that starts like a turn or template line (``User:``, ``Agent:``, ``Assistant:``,
   ``System:``, ``Developer:``, ``Tool:``, ``Task:``, ``S1:``) gets ``꞉`` (U+A789) in
   place of its colon. The model still reads the words; the template sees none of them.
2. **Flattening.** Every turn the model will see is moderated, not only the last user
   turn: system, developer, user, tool and (client-supplied) assistant turns are labelled
   ``[role]`` and joined into the one user turn Llama Guard judges. A conversation of one
   user turn is sent as is (the reference prompt byte for byte).
3. **Budget.** Each guard call must fit the guard model's context: its content is at most
   ``GuardBudget.window_bytes(template)`` UTF-8 bytes, and a token always covers at least one byte,
   so the prompt fits whatever the text is (the template's own bytes, categories
   included, are measured per policy and taken off the context). Content longer than one window is moderated in
   overlapping windows (``overlap_bytes``, so nothing is only seen cut in two), at most
   ``max_windows`` per check. Beyond that, the tenant's ``long_input`` policy decides:
   ``"block"`` refuses the request; ``"sample"`` (default) moderates the head and tail of
   every turn (``turn_edge_bytes`` each, most recent turns first) plus the most recent
   content up to the budget, and reports what was left out (``Selection.skipped_bytes``).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

_LINE_BREAKS = re.compile(r"\r\n?|[\x0b\x0c\x85\u2028\u2029]")
_SPECIAL = re.compile(r"<\|")
_MARKER = re.compile(r"<(?=[ \t/]*(?:BEGIN|END)\b)", re.I)
_LABEL = re.compile(
    r"^([ \t>*_#-]*(?:user|agent|assistant|system|developer|tool|function|task|s\d+)[ \t]*):",
    re.I | re.M)
_GAP = "\n[…]\n"  # joins pieces of a sampled conversation


def neutralise(text: str) -> str:
    """Message text that cannot forge the Llama Guard template or Llama 3 special tokens."""
    text = _LINE_BREAKS.sub("\n", unicodedata.normalize("NFKC", text))
    text = _SPECIAL.sub("<\u200b|", text)
    text = _MARKER.sub("\u2039", text)
    return _LABEL.sub("\\1\ua789", text)


class GuardBudget(BaseModel):
    """The guard model's context and how much moderation one request may cost."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    context_tokens: int = Field(default=8192, ge=1024)  # the guard deployment's max_model_len
    answer_tokens: int = Field(default=24, ge=1)  # what the guard may generate
    max_windows: int = Field(default=8, ge=1)  # guard calls per check
    overlap_bytes: int = Field(default=256, ge=0)
    turn_edge_bytes: int = Field(default=512, ge=16)  # head and tail kept of each turn

    def window_bytes(self, template_bytes: int) -> int:
        """Content bytes per guard call next to a template of `template_bytes` (the rendered
        prompt without content: task, categories, instructions, chat headers)."""
        return max(self.overlap_bytes + 256,
                   self.context_tokens - self.answer_tokens - template_bytes)

    def capacity(self, template_bytes: int) -> int:
        """Content bytes that `max_windows` overlapping windows cover."""
        w = self.window_bytes(template_bytes)
        return w + (self.max_windows - 1) * (w - self.overlap_bytes)


@dataclass(frozen=True, slots=True)
class Selection:
    windows: tuple[str, ...]  # the content of each guard call
    total_bytes: int  # the flattened conversation
    skipped_bytes: int  # left unmoderated by "sample" (0 when all was covered)


def conversation_of(messages: Sequence[Any], tools: Sequence[Any] = ()) -> list[tuple[str, str]]:
    """(role, text) of everything the model will read: each message's text with its
    refusal and the tool calls it carries (name and arguments), and the tool definitions
    (name, description, JSON Schema) as a leading "tools" turn. What the guard moderates
    and what the entropy price scores."""
    turns: list[tuple[str, str]] = []
    if tools:
        turns.append(("tools", "\n".join(
            f"{t.name}: {t.description or ''} {json.dumps(t.parameters or {}, ensure_ascii=False)}"
            for t in tools)))
    for m in messages:
        text = m.content
        if getattr(m, "refusal", None):
            text += ("\n" if text else "") + m.refusal
        for call in getattr(m, "tool_calls", ()):
            text += ("\n" if text else "") + f"{call.name}({call.arguments})"
        turns.append((m.role, text))
    return turns


def flatten(messages: Sequence[tuple[str, str]]) -> list[str]:
    """Each non-empty turn as neutralised text, labelled with its role when there are several."""
    turns = [(role, text) for role, text in messages if text]
    if len(turns) == 1 and turns[0][0] == "user":
        return [neutralise(turns[0][1])]
    return [f"[{neutralise(role)}]\n{neutralise(text)}" for role, text in turns]


def select(segments: Sequence[str], budget: GuardBudget, template_bytes: int, *,
           sample: bool) -> Selection | None:
    """Windows covering `segments` within `budget`; None when they do not fit and `sample`
    is False (the caller refuses the request)."""
    raw = "\n\n".join(segments).encode("utf-8", "surrogatepass")
    total = len(raw)
    size = budget.window_bytes(template_bytes)
    if total <= budget.capacity(template_bytes):
        return Selection(_windows(raw, size, budget.overlap_bytes), total, 0)
    if not sample:
        return None
    spans = _sampled_spans(segments, budget, budget.capacity(template_bytes))
    pieces = [raw[a:b].decode("utf-8", "ignore") for a, b in spans]
    text = _GAP.join(pieces).encode("utf-8")
    covered = sum(b - a for a, b in spans)
    return Selection(_windows(text, size, budget.overlap_bytes), total, total - covered)


def _sampled_spans(segments: Sequence[str], budget: GuardBudget,
                   capacity: int) -> list[tuple[int, int]]:
    """Byte ranges of the flattened text: each turn's head and tail (latest turns first),
    then the most recent content, within the capacity less the gaps' markers."""
    gap = len(_GAP.encode())
    room = capacity - gap
    edge = budget.turn_edge_bytes
    bounds, offset = [], 0
    for seg in segments:
        size = len(seg.encode("utf-8", "surrogatepass"))
        bounds.append((offset, offset + size))
        offset += size + 2  # the "\n\n" between turns
    total = offset - 2
    spans: list[tuple[int, int]] = []
    for start, end in reversed(bounds):
        edges = [(start, end)] if end - start <= 2 * edge else \
            [(start, start + edge), (end - edge, end)]
        need = sum(b - a + gap for a, b in edges)
        if need > room:
            break
        spans += edges
        room -= need
    spans.append((max(0, total - room), total))  # the most recent content fills the rest
    merged: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _windows(raw: bytes, size: int, overlap: int) -> tuple[str, ...]:
    if len(raw) <= size:
        return (raw.decode("utf-8", "ignore"),)
    step = size - overlap
    starts = range(0, len(raw) - overlap, step)
    # A cut inside a multi-byte character drops that character's stray bytes.
    return tuple(raw[s:s + size].decode("utf-8", "ignore") for s in starts)
