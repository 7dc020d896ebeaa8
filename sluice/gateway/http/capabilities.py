"""What a request asks of its model, checked against the model's card.

A model that cannot serve a field is refused with OpenAI's 400 naming that field
(``tools``, ``response_format``, ``messages[i].content[j]``), before any backend sees the
request: silently dropping a tool definition or a schema would answer a different question.
"""

from __future__ import annotations

from sluice.gateway.backends.contract import ModelCard
from sluice.gateway.errors import InvalidRequest
from sluice.gateway.http.schemas import ChatCompletionRequest, CompletionRequest

#: Content parts every chat model reads (a refusal part is an assistant's own text).
_TEXT_PARTS = frozenset({"text", "refusal"})


def check_serves(card: ModelCard, body: ChatCompletionRequest | CompletionRequest) -> None:
    if isinstance(body, CompletionRequest):
        if not card.serves("completions"):
            raise _unsupported(card, "model", "text completions (use /v1/chat/completions)")
        if body.token_prompts and not card.serves("token_prompts"):
            raise _unsupported(card, "prompt", "prompts of token ids (send text)")
        return
    if not card.serves("chat"):
        raise _unsupported(card, "model", "chat completions (use /v1/completions)")
    if (body.tools or body.data.get("functions")) and not card.serves("tools"):
        raise _unsupported(card, "tools" if body.tools else "functions", "tools")
    fmt = body.response_format
    if fmt is not None and fmt.type != "text" and not card.serves("json_schema"):
        raise _unsupported(card, "response_format", f"response_format {fmt.type}")
    if not card.serves("vision"):
        for i, message in enumerate(body.messages):
            for j, part in enumerate(message.parts or ()):
                kind = part.get("type")
                if kind not in _TEXT_PARTS:
                    raise _unsupported(card, f"messages[{i}].content[{j}]",
                                       f"{kind} content parts (text only)")


def _unsupported(card: ModelCard, param: str, what: str) -> InvalidRequest:
    return InvalidRequest(f"The model '{card.id}' does not support {what}.", param=param,
                          code="unsupported_parameter")
