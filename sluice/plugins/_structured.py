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
    held back and parsed as the model's tool calls when the generation ends."""

    def __init__(self, tokenizer: Tokenizer, request: GenerationRequest) -> None:
        self.token = tokenizer.tool_calls_id if request.tools else None
        self.active = False
        self.started = False
        self.text = ""

    def feed(self, token_ids: list[int], text: str) -> bool:
        """True when this piece belongs to a tool call (and must not be shown as content)."""
        if not self.started and token_ids:
            self.started = True
            self.active = self.token is not None and token_ids[0] == self.token
        if self.active:
            self.text += text
        return self.active

    def calls(self) -> tuple[ToolCallDelta, ...] | None:
        """The parsed calls, or None when the text is not a complete call list."""
        try:
            parsed: Any = json.loads(self.text)
        except ValueError:
            return None
        if isinstance(parsed, dict):
            parsed = [parsed]
        if not isinstance(parsed, list) or not all(isinstance(c, dict) and "name" in c for c in parsed):
            return None
        return tuple(ToolCallDelta(index=i, id=_call_id(c.get("id")), name=str(c["name"]),
                                   arguments=json.dumps(c.get("arguments", {}), ensure_ascii=False))
                     for i, c in enumerate(parsed))


def _call_id(given: Any) -> str:
    """The model's id if it wrote one, else a fresh one in Mistral's 9-character form (so the
    id survives the next turn's encoding unchanged)."""
    if isinstance(given, str) and given:
        return given
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(9))
