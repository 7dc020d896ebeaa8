"""Tokenizers and chat encodings, one per model family, each from its reference:

- Mixtral/Mistral (SentencePiece ``tokenizer.model[.vN]``): prompts encoded by mistral-common's
  own request encoder (``ChatCompletionRequest`` → ``MistralTokenizer.encode_chat_completion``),
  the implementation Mistral publishes; tools, tool calls and tool results for v2+ tokenizers.
- Llama 3 and other ``tokenizer.json`` checkpoints: the checkpoint's own jinja chat template
  (``tokenizer_config.json`` ``chat_template``), rendered as transformers renders it.

Plus incremental detokenization that never splits a UTF-8 character.

Chat messages are OpenAI-shaped dicts (``role``, ``content`` text, assistant ``tool_calls``,
tool ``tool_call_id``/``name``); ``(role, content)`` pairs are accepted too. A conversation
ending with an assistant message is continued (mistral-common's ``prefix``, transformers'
``continue_final_message``): the model writes on from the assistant's text.
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
import string
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from sluice.engine.errors import ConfigError, RequestError


class ChatEncodingError(RequestError):
    """A conversation the model's chat format cannot encode; ``param`` names the field."""

    def __init__(self, message: str, param: str = "messages") -> None:
        super().__init__(message)
        self.param = param


def default_sentencepiece_model() -> Path:
    """Mixtral 8x7B's tokenizer.model, as shipped in mistral-common."""
    import mistral_common

    return Path(os.path.dirname(mistral_common.__file__)) / "data" / "tokenizer.model.v1"


def _as_dict(message: Any) -> dict[str, Any]:
    if isinstance(message, Mapping):
        return dict(message)
    if isinstance(message, tuple):
        return {"role": message[0], "content": message[1]}
    raise TypeError(f"a chat message is a dict or a (role, content) pair, got {type(message).__name__}")


class Tokenizer(abc.ABC):
    bos_id: int | None
    eos_ids: tuple[int, ...]
    vocab_size: int
    #: The token that opens the model's tool calls (Mistral's ``[TOOL_CALLS]``); None: no tools.
    tool_calls_id: int | None = None

    @abc.abstractmethod
    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...

    @abc.abstractmethod
    def decode(self, ids: list[int]) -> str: ...

    @abc.abstractmethod
    def token_text(self, token_id: int) -> str:
        """How one token reads on its own (for logprobs)."""

    @abc.abstractmethod
    def apply_chat_template(self, messages: Iterable[Any], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Prompt ids for a conversation (and OpenAI ``tools``), ready for the assistant's turn.
        Raises RequestError for a conversation the format cannot encode."""

    @property
    def supports_tools(self) -> bool:
        return self.tool_calls_id is not None

    def token_bytes(self) -> list[bytes]:
        """Each token's bytes as it appears in generated text (for grammar libraries)."""
        raise NotImplementedError


class SentencePieceTokenizer(Tokenizer):
    """Mixtral/Mistral: raw text through SentencePiece, chats through mistral-common."""

    def __init__(self, path: str | Path | None = None) -> None:
        import sentencepiece
        from mistral_common.exceptions import MistralCommonException
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        path = Path(path) if path else default_sentencepiece_model()
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
            # the version comes from the file name (tokenizer.model.v3), as mistral-common reads it
            self.mistral = MistralTokenizer.from_file(str(path))
        except (OSError, RuntimeError, MistralCommonException) as exc:
            raise ConfigError(f"{path}: cannot load SentencePiece model ({exc})") from None
        self.bos_id, self.eos_ids = self.sp.bos_id(), (self.sp.eos_id(),)
        self.vocab_size = self.sp.get_piece_size()
        self.version = str(self.mistral.instruct_tokenizer.tokenizer.version.value)
        # encode_instruct decodes every encoded prompt back to text for Tokenized.text, half
        # of a short chat's encoding time ("remove once 1.13.0 lands", mistral-common says).
        # This instance is private and only ever asked for .tokens: its instruct tokenizer
        # skips that decode (the ids are untouched; .text reads "").
        self.mistral.instruct_tokenizer.decode = _no_text  # type: ignore[method-assign]
        tool_calls = self.sp.piece_to_id("[TOOL_CALLS]")
        self.tool_calls_id = tool_calls if self.sp.is_control(tool_calls) else None

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return ([self.bos_id] if add_bos else []) + self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def token_text(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id).replace("\u2581", " ")

    def token_bytes(self) -> list[bytes]:
        sp, out = self.sp, []
        for i in range(self.vocab_size):
            piece = sp.id_to_piece(i)
            if sp.is_control(i) or sp.is_unknown(i):
                out.append(b"")
            elif sp.is_byte(i):  # "<0xF0>": one raw byte of a UTF-8 sequence
                out.append(bytes((int(piece[3:5], 16),)))
            else:
                out.append(piece.replace("\u2581", " ").encode())
        return out

    def apply_chat_template(self, messages: Iterable[Any], tools: list[dict[str, Any]] | None = None) -> list[int]:
        from mistral_common.exceptions import MistralCommonException
        from mistral_common.protocol.instruct.request import ChatCompletionRequest
        from pydantic import ValidationError

        if tools and not self.supports_tools:
            raise ChatEncodingError(f"this model's tokenizer ({self.version}) has no tool support", param="tools")
        try:
            request = ChatCompletionRequest(messages=_mistral_messages(messages), tools=tools or None)
            return list(self.mistral.encode_chat_completion(request).tokens)
        except (ValidationError, MistralCommonException, AssertionError, ValueError) as exc:
            raise ChatEncodingError(f"messages: {_first_line(exc)}") from None


def _no_text(tokens: list[int], special_token_policy: Any = None) -> str:
    return ""


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def mistral_call_id(call_id: str | None) -> str:
    """Mistral tokenizers want 9 alphanumeric characters; other ids map to such a
    string deterministically, so a call and its result still pair up."""
    if call_id and len(call_id) == 9 and call_id.isalnum():
        return call_id
    digest = hashlib.sha256((call_id or "").encode()).digest()
    alphabet = string.ascii_letters + string.digits
    return "".join(alphabet[b % len(alphabet)] for b in digest[:9])


def _mistral_messages(messages: Iterable[Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for m in map(_as_dict, messages):
        role, content = m["role"], m.get("content") or ""
        if role == "developer":
            role = "system"
        if role in ("tool", "function"):
            out.append({"role": "tool", "content": content, "name": m.get("name"),
                        "tool_call_id": mistral_call_id(m.get("tool_call_id")) if m.get("tool_call_id") else None})
        elif role == "assistant" and m.get("tool_calls"):
            calls = [{"id": mistral_call_id(c.get("id")), "type": "function",
                      "function": {"name": c["function"]["name"], "arguments": c["function"].get("arguments") or "{}"}}
                     for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": content or None, "tool_calls": calls})
        else:
            out.append({"role": role, "content": content})
    if out and out[-1]["role"] == "assistant" and not out[-1].get("tool_calls"):
        out[-1]["prefix"] = True  # continue the final assistant message
    return out


class HFTokenizer(Tokenizer):
    """tokenizer.json via `tokenizers`; chats by the checkpoint's jinja ``chat_template``."""

    def __init__(self, path: str | Path, bos_id: int | None = None, eos_ids: tuple[int, ...] = (),
                 chat_template: str | None = None, special_tokens: Mapping[str, str] | None = None) -> None:
        from tokenizers import Tokenizer as Tok

        try:
            self.tok = Tok.from_file(str(path))
        except Exception as exc:  # tokenizers raises plain Exception subclasses
            raise ConfigError(f"{path}: cannot load tokenizer.json ({exc})") from None
        begin = self.tok.token_to_id("<|begin_of_text|>")
        self.bos_id = bos_id if bos_id is not None else begin
        eot = self.tok.token_to_id("<|eot_id|>")
        self.eos_ids = tuple(dict.fromkeys([*eos_ids, *([eot] if eot is not None else [])]))
        self.vocab_size = self.tok.get_vocab_size()
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})  # bos_token, eos_token as the template names them

    @classmethod
    def from_checkpoint(cls, directory: Path, bos_id: int | None = None,
                        eos_ids: tuple[int, ...] = ()) -> HFTokenizer:
        config: dict[str, Any] = {}
        if (directory / "tokenizer_config.json").exists():
            config = json.loads((directory / "tokenizer_config.json").read_text())
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        specials = {k: v["content"] if isinstance(v, dict) else v for k, v in config.items()
                    if k.endswith("_token") and isinstance(v, (str, dict))}
        return cls(directory / "tokenizer.json", bos_id, eos_ids, template, specials)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        # encode_batch, not encode: it releases the GIL while it works (encode holds it for
        # the whole call, ~0.8 s per MB, stalling the gateway's event loop thread too).
        ids = self.tok.encode_batch([text], add_special_tokens=False)[0].ids
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        return self.tok.decode([token_id], skip_special_tokens=False)

    def token_bytes(self) -> list[bytes]:
        """Byte-level BPE pieces mapped back through GPT-2's byte alphabet (a piece may hold
        part of a UTF-8 character, which decoding the token alone would turn into U+FFFD);
        SentencePiece-style pieces by their ``▁`` and ``<0xNN>`` conventions."""
        special = {t.content for t in self.tok.get_added_tokens_decoder().values() if t.special}
        byte_level = json.loads(self.tok.to_str()).get("decoder", {}).get("type") == "ByteLevel"
        unbyte = {c: b for b, c in _gpt2_byte_alphabet().items()}
        out = []
        for i in range(self.vocab_size):
            piece = self.tok.id_to_token(i)
            if piece is None or piece in special:
                out.append(b"")
            elif byte_level:
                out.append(bytes(unbyte[c] for c in piece) if all(c in unbyte for c in piece) else piece.encode())
            elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                out.append(bytes((int(piece[3:5], 16),)))
            else:
                out.append(piece.replace("\u2581", " ").encode())
        return out

    def apply_chat_template(self, messages: Iterable[Any], tools: list[dict[str, Any]] | None = None) -> list[int]:
        import jinja2

        if not self.chat_template:
            raise ChatEncodingError("this model's tokenizer_config.json has no chat_template; "
                                    "use /v1/completions", param="messages")
        msgs = [_as_dict(m) for m in messages]
        final = msgs[-1] if msgs and msgs[-1]["role"] == "assistant" else None
        try:
            text = _jinja_template(self.chat_template).render(
                messages=msgs, tools=tools or None, add_generation_prompt=final is None, **self.special_tokens)
        except jinja2.TemplateError as exc:
            raise ChatEncodingError(f"messages: {exc}") from None
        if final is not None and (content := (final.get("content") or "").strip()):
            # continue_final_message, as transformers does it: cut after the final text
            text = text[:text.rindex(content) + len(content)]
        return self.encode(text, add_bos=False)


def _gpt2_byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level BPE vocabularies are written in."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b], extra = chr(256 + extra), extra + 1
    return table


_TEMPLATES: dict[str, Any] = {}


def _jinja_template(source: str) -> Any:
    """Compiled as transformers compiles chat templates: sandboxed, trim/lstrip blocks,
    loop controls, ``raise_exception``, ``strftime_now`` and a non-escaping ``tojson``."""
    if source not in _TEMPLATES:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise jinja2.TemplateError(message)

        def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
                   separators: Any = None, sort_keys: bool = False) -> str:
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = tojson
        env.globals.update(raise_exception=raise_exception,
                           strftime_now=lambda fmt: datetime.now().strftime(fmt))
        _TEMPLATES[source] = env.from_string(source)
    return _TEMPLATES[source]


def load_tokenizer(model_dir: str | Path | None, bos_id: int | None = None,
                   eos_ids: tuple[int, ...] = ()) -> Tokenizer:
    """A Mistral tokenizer file in the checkpoint (``tokenizer.model.vN`` before
    ``tokenizer.model``: Mistral's HF repos ship both, and only the first names its
    version), else ``tokenizer.json``; no checkpoint: Mixtral's default."""
    d = Path(model_dir) if model_dir else None
    if d is None:
        return SentencePieceTokenizer()
    versioned = sorted(d.glob("tokenizer.model.v*"))
    if versioned:
        return SentencePieceTokenizer(versioned[-1])
    if (d / "tokenizer.model").exists():
        return SentencePieceTokenizer(d / "tokenizer.model")
    if (d / "tokenizer.json").exists():
        return HFTokenizer.from_checkpoint(d, bos_id, eos_ids)
    return SentencePieceTokenizer()


class IncrementalDetokenizer:
    """Turns a growing id list into text deltas; holds back an incomplete character.

    Decodes a short window [prefix_offset:] and diffs it against [prefix_offset:read_offset],
    so leading-space rules of the tokenizer see the same context both times."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.read_offset = len(prompt_ids)
        self.prefix_offset = max(len(prompt_ids) - 5, 0)

    def step(self, ids: list[int]) -> str:
        prefix = self.tokenizer.decode(ids[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""  # nothing new yet, or a character is still incomplete
        self.prefix_offset, self.read_offset = self.read_offset, len(ids)
        return full[len(prefix):]
