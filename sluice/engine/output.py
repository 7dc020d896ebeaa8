"""What a step reports per request, and the text side of finishing: detokenization
and stop strings (text that might start a stop string is held back until it cannot)."""

from __future__ import annotations

from dataclasses import dataclass, field

from sluice.engine.sampling import SampledToken
from sluice.engine.sequence import Sequence
from sluice.engine.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class RequestOutput:
    """One request's progress in one step: a delta, plus the totals so far."""

    request_id: str
    seq_id: int
    text: str  # new text (may lag tokens while a stop string could be forming)
    token_ids: list[int]  # tokens generated this step
    logprobs: list[SampledToken]
    num_prompt_tokens: int
    num_completion_tokens: int
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length", "cancelled"
    stop_token_id: int | None = None  # set when an EOS / stop token id ended the request


@dataclass
class Completion:
    """A finished request (what LLM.generate returns)."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[SampledToken] = field(default_factory=list)


class TextState:
    """The text of one sequence's completion as it grows."""

    def __init__(self, tokenizer: Tokenizer, seq: Sequence) -> None:
        self.detok = IncrementalDetokenizer(tokenizer, seq.prompt_token_ids)
        self.stops = seq.params.stop
        self.text = ""
        self.emitted = 0  # chars of self.text already returned

    def add_token(self, seq: Sequence) -> bool:
        """Detokenize the newest token; True when a stop string ended the text."""
        self.text += self.detok.step(seq.token_ids)
        if not self.stops:
            return False
        window = self.text[max(0, self.emitted - max(map(len, self.stops))):]
        offset = len(self.text) - len(window)
        hits = [i for i in (window.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[:offset + min(hits)]
            return True
        return False

    def delta(self, final: bool) -> str:
        """New text that is safe to show: a suffix that could begin a stop string waits."""
        end = len(self.text)
        if not final:
            for s in self.stops:
                for k in range(min(len(s) - 1, end - self.emitted), 0, -1):
                    if self.text.endswith(s[:k]):
                        end = min(end, len(self.text) - k)
                        break
        out, self.emitted = self.text[self.emitted:end], max(self.emitted, end)
        return out
