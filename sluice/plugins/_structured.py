"""What the local engine does with ``response_format``, ``tools`` and ``tool_choice``.

- ``response_format`` ``json_object`` / ``json_schema``: a grammar constraint on decoding
  (engine/structured.py), so the answer parses (and validates against the schema) whenever
  it ends by itself rather than by ``max_tokens``.
- ``tools`` on a Mistral tokenizer with tool support: mistral-common puts them in the prompt
  (plugins/_tokenizer.py); the model opens a tool call with its ``[TOOL_CALLS]`` token and
  writes ``[{"name": ..., "arguments": {...}}, ...]``. ``tool_choice`` ``"required"`` or a
  named function forces that token and a grammar over the listed tools' argument schemas;
  ``"none"`` bans the token; ``"auto"`` leaves the choice to the model.
- :class:`ToolCallReader` turns the model's ``[TOOL_CALLS]`` output into OpenAI tool calls.
"""

from __future__ import annotations

import json
import secrets
import string
from typing import Any

from sluice.engine.structured import Constraint, GrammarError, Grammars
from sluice.engine.tokenizer import Tokenizer
from sluice.gateway.backends.contract import (BackendError, GenerationRequest, NamedToolChoice,
                                              ToolCallDelta)

_ID_ALPHABET = string.ascii_letters + string.digits


def check_content_parts(request: GenerationRequest) -> None:
    """A text-only model refuses image/audio/file parts, naming the first one."""
    for i, message in enumerate(request.messages or ()):
        for j in message.non_text_parts():
            kind = (message.parts or ())[j].get("type")
            if kind != "refusal":
                raise BackendError(f"this model reads text only; messages[{i}].content[{j}] is {kind}",
                                   status=400, param=f"messages[{i}].content[{j}]", code="unsupported_parameter")


def constraint_for(request: GenerationRequest, tokenizer: Tokenizer, grammars: Grammars) -> Constraint | None:
    """The decoding constraint the request asks for (None: free text). Raises BackendError 400.
    A response_format wins over tool_choice (a JSON answer is then the model's only way out)."""
    try:
        fmt = request.response_format
        if fmt is not None and fmt.type == "json_object":
            return Constraint(grammars.json_object())  # its grammar never allows [TOOL_CALLS]
        if fmt is not None and fmt.type == "json_schema":
            if fmt.schema is None:
                raise BackendError("response_format json_schema needs a schema", status=400,
                                   param="response_format.json_schema.schema")
            return Constraint(grammars.json_schema(fmt.schema, param="response_format"))
        return _tool_constraint(request, tokenizer, grammars)
    except GrammarError as exc:
        raise BackendError(str(exc), status=400, param=exc.param) from None


def _tool_constraint(request: GenerationRequest, tokenizer: Tokenizer, grammars: Grammars) -> Constraint | None:
    choice = request.tool_choice
    if not request.tools or choice in (None, "auto") or tokenizer.tool_calls_id is None:
        return None
    if choice == "none":
        return Constraint(banned=[tokenizer.tool_calls_id])
    functions = [{"name": t.name, "parameters": dict(t.parameters or {"type": "object", "properties": {}})}
                 for t in request.tools if t.type == "function"]
    if isinstance(choice, NamedToolChoice):
        functions = [f for f in functions if f["name"] == choice.name]
        if not functions:
            raise BackendError(f"tool_choice names '{choice.name}', which is not in tools", status=400,
                               param="tool_choice")
    single = isinstance(choice, NamedToolChoice) or request.parallel_tool_calls is False
    return Constraint(grammars.tool_calls(functions, single=single), forced=[tokenizer.tool_calls_id])


class ToolCallReader:
    """Watches a generation: when its first token is ``[TOOL_CALLS]``, the text after it is
    read as the model's ``[{"name": ..., "arguments": {...}}, ...]`` as it arrives and turned
    into OpenAI's streamed tool calls: each call's first piece (index, id, name, arguments
    "") once its name is known, then its arguments as the model writes them. The fragments
    of a call add up to the model's own argument text (a call without arguments gets
    ``{}``), so a streamed and a whole answer carry the same calls.

    Text that stops being a call list is content from there on (all of it when no call
    had been opened)."""

    def __init__(self, tokenizer: Tokenizer, request: GenerationRequest) -> None:
        self.token = tokenizer.tool_calls_id if request.tools else None
        self.active = False
        self.started = False
        self.scanner = _CallScanner()

    def feed(self, token_ids: list[int], text: str) -> tuple[str, tuple[ToolCallDelta, ...]]:
        """The content and tool-call pieces this piece of output adds."""
        if not self.started and token_ids:
            self.started = True
            self.active = self.token is not None and token_ids[0] == self.token
        if not self.active:
            return text, ()
        return self.scanner.feed(text)

    def leftover(self) -> str:
        """At the end: the text held back for a call list that never opened a call (content)."""
        scanner = self.scanner
        return scanner.held if self.active and not scanner.calls and scanner.state != "broken" else ""

    @property
    def called(self) -> bool:
        """Whether the answer opened at least one tool call."""
        return bool(self.scanner.calls)

    @property
    def complete(self) -> bool:
        """Whether every call the answer opened was closed, with nothing after the list."""
        return self.called and self.scanner.state == "done"


class _Call:
    __slots__ = ("index", "id", "name", "pending", "opened", "has_arguments")

    def __init__(self, index: int) -> None:
        self.index = index
        self.id: str | None = None
        self.name: str | None = None
        self.pending = ""  # arguments written before the name (sent once it is known)
        self.opened = False  # its first piece (id, name) has been sent
        self.has_arguments = False


_WS = " \t\r\n"


class _CallScanner:
    """An incremental reader of a JSON list of ``{"name", "arguments"[, "id"]}`` objects (or
    one such object), one character at a time. States: ``start`` (before ``[``), ``list``
    (between calls), ``key`` (in a call, before a key), ``colon``, ``value`` (before a value),
    ``string`` (a key or name/id string), ``raw`` (inside the arguments or an unknown value),
    ``after`` (after a value), ``done`` and ``broken``."""

    def __init__(self) -> None:
        self.state = "start"
        self.single = False  # one object, not a list
        self.calls: list[_Call] = []
        self.call: _Call | None = None
        self.held = ""  # the text before any call opened (content if the list breaks then)
        self.string = ""  # the string being read (raw, escapes kept)
        self.string_role = ""  # "key", "name" or "id"
        self.escaped = False
        self.key = ""
        self.value_key = ""  # the key whose raw value is being read
        self.depth = 0  # brackets open in a raw value
        self.in_string = False  # a raw value's own strings
        self.primitive = False  # a raw value that is a number, true, false or null

    def feed(self, text: str) -> tuple[str, tuple[ToolCallDelta, ...]]:
        """The content (text that is not a call list) and call pieces ``text`` adds."""
        if self.state == "broken":
            return text, ()
        out: list[ToolCallDelta] = []
        args: list[str] = []  # the current call's argument characters from this piece
        content = ""
        for i, ch in enumerate(text):
            while not self._step(ch, out, args):
                pass  # read again in the state it led to
            if self.state == "broken":
                content = text[i:] if self.calls else self.held + text
                break
        self._flush(out, args)
        if not self.calls:
            self.held += text
        return content, tuple(out)

    def _step(self, ch: str, out: list[ToolCallDelta], args: list[str]) -> bool:
        """Advance by ``ch``; False when ``ch`` must be read again in the new state."""
        state = self.state
        if state == "raw":
            return self._raw(ch, out, args)
        if state == "string":
            self._string(ch, out, args)
            return True
        if ch in _WS:
            return True
        if state == "start" and ch in "[{":
            self.single = ch == "{"
            self.state = "list"
            return ch == "["
        if state == "list" and ch == "{":
            self._flush(out, args)
            self.call = _Call(len(self.calls))
            self.calls.append(self.call)
            self.state = "key"
        elif state == "list" and ch == "," and self.calls:
            pass
        elif state == "list" and ch == "]":
            self.state = "done"
        elif state == "key" and ch == '"':
            self.state, self.string_role, self.string = "string", "key", ""
        elif state == "colon" and ch == ":":
            self.state = "value"
        elif state == "value":
            return self._value(ch, args)
        elif state == "after" and ch == ",":
            self.state = "key"
        elif state == "after" and ch == "}":
            self._close_call(out, args)
        else:
            self.state = "broken"
        return True

    def _value(self, ch: str, args: list[str]) -> bool:
        if self.key in ("name", "id") and ch == '"':
            self.state, self.string_role, self.string = "string", self.key, ""
            return True
        self.state, self.value_key, self.depth, self.in_string = "raw", self.key, 0, False
        self.primitive = ch not in '{["'
        return False

    def _string(self, ch: str, out: list[ToolCallDelta], args: list[str]) -> None:
        if self.escaped:
            self.escaped = False
        elif ch == "\\":
            self.escaped = True
        elif ch == '"':
            try:
                value = json.loads(f'"{self.string}"')
            except ValueError:
                self.state = "broken"
                return
            role, self.state = self.string_role, "after"
            if role == "key":
                self.key, self.state = value, "colon"
            elif self.call is not None:
                setattr(self.call, role, value)
                if role == "name":
                    self._open(out, args)
            return
        self.string += ch

    def _raw(self, ch: str, out: list[ToolCallDelta], args: list[str]) -> bool:
        """A value read as text (the arguments, streamed; any other key's, skipped)."""
        if self.primitive and (ch in ",}" or ch in _WS):
            self.state = "after"
            return False
        if self.in_string:
            if self.escaped:
                self.escaped = False
            elif ch == "\\":
                self.escaped = True
            elif ch == '"':
                self.in_string = False
        elif ch == '"':
            self.in_string = True
        elif ch in "{[":
            self.depth += 1
        elif ch in "}]":
            self.depth -= 1
        if self.value_key == "arguments" and self.call is not None:
            self.call.has_arguments = True
            args.append(ch)
        if not self.primitive and not self.in_string and self.depth == 0:
            self.state = "after"  # the closing bracket or quote was the value's last character
        return True

    def _open(self, out: list[ToolCallDelta], args: list[str]) -> None:
        call = self.call
        if call is None or call.opened or call.name is None:
            return
        call.opened = True
        out.append(ToolCallDelta(index=call.index, id=_call_id(call.id), name=call.name, arguments=""))
        if call.pending:
            out.append(ToolCallDelta(index=call.index, id=None, name=None, arguments=call.pending, type=None))
            call.pending = ""

    def _flush(self, out: list[ToolCallDelta], args: list[str]) -> None:
        """The current call's argument characters of this piece, as one fragment."""
        if not args or self.call is None:
            return
        text = "".join(args)
        args.clear()
        if self.call.opened:
            out.append(ToolCallDelta(index=self.call.index, id=None, name=None, arguments=text, type=None))
        else:
            self.call.pending += text

    def _close_call(self, out: list[ToolCallDelta], args: list[str]) -> None:
        call = self.call
        self._flush(out, args)
        if call is None or call.name is None:
            self.state = "broken"  # a call without a name
            return
        if not call.has_arguments:
            call.pending += "{}"
        self._open(out, args)
        if call.pending:
            out.append(ToolCallDelta(index=call.index, id=None, name=None, arguments=call.pending, type=None))
            call.pending = ""
        self.call = None
        self.state = "done" if self.single else "list"


def _call_id(given: Any) -> str:
    """The model's id if it wrote one, else a fresh one in Mistral's 9-character form (so the
    id survives the next turn's encoding unchanged)."""
    if isinstance(given, str) and given:
        return given
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(9))
