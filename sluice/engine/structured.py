"""Constrained decoding: JSON (any object, or a JSON Schema) and forced tool calls, by xgrammar.

xgrammar was chosen by measurement over llguidance (bench/grammar_mask.py, docs/performance.md):
on Mixtral's 32000-token vocabulary its per-step mask costs ~0.005 ms at batch 1 and ~0.3 ms
at batch 64 on the CPU against llguidance's ~0.06 ms and ~9.5 ms, because it precomputes
most of each grammar state's token mask when it compiles the grammar.

    grammars = Grammars(tokenizer, vocab_size=32000)      # once per model (~0.3 s: the vocabulary)
    c = Constraint(grammars.json_schema(schema))          # once per request: its parse state
    SamplingParams(..., constraint=c)

Each step the sampler asks every constrained row for its allowed tokens, all rows into one
(B, ceil(V/32)) int32 bitmask built on the CPU, and applies it to the logits in place
(:func:`apply_constraints`) on the logits' device, after the model ran and outside any CUDA
graph, then tells each constraint the token it got (:meth:`Constraint.accept`). Once a
grammar is complete only the stop tokens are allowed, so a constrained request ends with EOS.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from sluice.engine.errors import RequestError
from sluice.engine.tokenizer import Tokenizer
from sluice.engine.transfer import upload


class GrammarError(RequestError):
    """A schema the grammar library cannot compile (``param`` names the request field)."""

    def __init__(self, message: str, param: str = "response_format") -> None:
        super().__init__(message)
        self.param = param


class Grammars:
    """Compiles grammars for one tokenizer (xgrammar caches compiled schemas itself)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int | None = None) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        self.vocab_size = vocab_size or tokenizer.vocab_size  # the logits' width (may be padded)
        info = xgr.TokenizerInfo(tokenizer.token_bytes(), xgr.VocabType.RAW, vocab_size=self.vocab_size,
                                 stop_token_ids=list(tokenizer.eos_ids))
        self.compiler = xgr.GrammarCompiler(info, max_threads=2)
        self.tool_calls_id = tokenizer.tool_calls_id

    def json_object(self) -> Any:
        """OpenAI's ``json_object``: any JSON object."""
        return self._compile({"type": "object"}, strict=False)

    def json_schema(self, schema: Mapping[str, Any], param: str = "response_format") -> Any:
        """JSON matching ``schema`` (strict: no properties beyond those listed)."""
        return self._compile(schema, strict=True, param=param)

    def tool_calls(self, tools: Sequence[Mapping[str, Any]], single: bool = False) -> Any:
        """Mistral's tool-call list after ``[TOOL_CALLS]``: ``[{"name": ..., "arguments": {...}}]``,
        each name one of ``tools`` (OpenAI function dicts) with arguments matching its schema."""
        calls = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                  "properties": {"name": {"const": t["name"]},
                                 "arguments": t.get("parameters") or {"type": "object", "properties": {}}}}
                 for t in tools]
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if single:
            schema["maxItems"] = 1
        # Mistral writes "[TOOL_CALLS] [..." (a space-led piece): the space is allowed, not forced
        return self._compile(schema, strict=True, param="tools", space_first=True)

    def _compile(self, schema: Mapping[str, Any], strict: bool, param: str = "response_format",
                 space_first: bool = False) -> Any:
        xgr = self.xgr
        try:
            if not space_first:
                return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False,
                                                         strict_mode=strict)
            body = xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=strict)
            return self.compiler.compile_grammar(xgr.Grammar.concat(xgr.Grammar.from_ebnf('root ::= " "?'), body))
        except (RuntimeError, ValueError, TypeError) as exc:  # xgrammar's InvalidJSONError is a RuntimeError
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise GrammarError(f"{param}: the schema cannot be enforced ({first})", param) from None


class Constraint:
    """One request's decoding constraint: optional ``forced`` tokens first (e.g. ``[TOOL_CALLS]``),
    then a compiled grammar; or only ``banned`` tokens (e.g. no tool call for tool_choice "none").
    Holds the request's parse state: one per request, never shared."""

    def __init__(self, grammar: Any = None, forced: Sequence[int] = (), banned: Sequence[int] = ()) -> None:
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(grammar) if grammar is not None else None
        self.forced = list(forced)
        self.banned = list(banned)
        self.failed = False  # a token the grammar refused was accepted (cannot happen when masked)

    def fill(self, bitmask: torch.Tensor, row: int) -> bool:
        """Write this row's allowed tokens; False when the library's batch fill should do it."""
        words = bitmask[row]
        if self.forced:
            words.zero_()
            token = self.forced[0]
            words[token // 32] = _bit(token % 32)
            return True
        if self.matcher is None:
            for token in self.banned:
                words[token // 32] &= ~_bit(token % 32)
            return True
        if self.matcher.is_terminated():  # asked again after its stop token: only stop tokens
            words.zero_()
            for token in self.matcher.stop_token_ids:
                words[token // 32] |= _bit(token % 32)
            return True
        return False

    def accept(self, token: int) -> None:
        if self.forced:
            self.failed |= token != self.forced.pop(0)
        elif self.matcher is not None and not self.matcher.is_terminated():
            self.failed |= not self.matcher.accept_token(token)

    @property
    def done(self) -> bool:
        return self.matcher is not None and not self.forced and self.matcher.is_terminated()


def _bit(i: int) -> int:
    """Bit ``i`` of an int32 word, as a Python int torch stores without overflow."""
    return -(1 << 31) if i == 31 else 1 << i


class _Bitmasks:
    """Reused CPU bitmask buffers (pinned when CUDA is there, so the copy is asynchronous)."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[int, int], torch.Tensor] = {}

    def get(self, rows: int, words: int) -> torch.Tensor:
        key = (rows, words)
        if key not in self.buffers:
            with torch.inference_mode(False):  # a normal tensor: the engine fills it under inference mode, tests not
                self.buffers[key] = torch.empty((rows, words), dtype=torch.int32, pin_memory=torch.cuda.is_available())
        return self.buffers[key].fill_(-1)


_bitmasks = _Bitmasks()


def apply_constraints(logits: torch.Tensor, constraints: Sequence[Constraint | None]) -> None:
    """Mask, in place, what each row's constraint forbids; logits (S, V), one row per sequence."""
    rows = [i for i, c in enumerate(constraints) if c is not None]
    if not rows:
        return
    import xgrammar as xgr

    seen: set[int] = set()
    S, V = logits.shape
    bitmask = _bitmasks.get(S, (V + 31) // 32)  # (S, ceil(V/32)) int32, every bit set: all allowed
    matchers, matcher_rows = [], []
    for i in rows:
        c = constraints[i]
        assert c is not None
        if id(c) in seen:
            raise RequestError("a Constraint holds one request's parse state: give each request its own")
        seen.add(id(c))
        if not c.fill(bitmask, i):
            matchers.append(c.matcher)
            matcher_rows.append(i)
    if len(matchers) == 1:  # no thread pool for one row (its dispatch costs more than the fill)
        matchers[0].fill_next_token_bitmask(bitmask, matcher_rows[0])
    elif matchers:
        _batch().batch_fill_next_token_bitmask(matchers, bitmask, matcher_rows)
    mask = bitmask.to(logits.device, non_blocking=True)
    # The rows as a tensor we upload: given a list, xgrammar copies it from pageable memory,
    # which waits for the forward queued ahead of it (the lookahead's next step).
    indices = upload(torch.tensor(rows, dtype=torch.int32), logits.device) if len(rows) < S else None
    xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=V, indices=indices)


def accept_tokens(constraints: Sequence[Constraint | None], tokens: Sequence[int]) -> None:
    """Advance each constraint by its row's token (grammar rows in one native call)."""
    batched: list[Constraint] = []
    picked: list[int] = []
    for c, token in zip(constraints, tokens):
        if c is None:
            continue
        if c.forced or c.matcher is None or c.matcher.is_terminated():
            c.accept(token)
        else:
            batched.append(c)
            picked.append(token)
    if batched:
        import xgrammar as xgr

        accepted = xgr.BatchGrammarMatcher.batch_accept_token([c.matcher for c in batched], picked)
        for c, ok in zip(batched, accepted):
            c.failed |= not ok


_BATCH: list[Any] = []


def _batch() -> Any:
    if not _BATCH:
        import xgrammar as xgr

        _BATCH.append(xgr.BatchGrammarMatcher(max_threads="auto"))
    return _BATCH[0]
