"""The echo backend: deterministic, token-accurate, and cheap enough to load-test the gateway.

It answers with the text of the last user message (chat) or the prompt
(completions), tokenized with Mixtral's real SentencePiece tokenizer, so token
counts, ``max_tokens`` cuts, stop strings and UTF-8 streaming behave like a real
Mixtral deployment while the "model" costs nothing.

Counting: prompt tokens are the Mixtral instruct prompt
(``<s>[INST] user [/INST] answer</s>[INST] next [/INST]``), exactly what
:meth:`EchoBackend.count_tokens` returns. Completion tokens are the answer's
tokens that were generated; the end-of-sequence token of a natural stop is not
counted. Events carry one token each, except that byte-fallback tokens which
only together form one UTF-8 character are sent as one event (``tokens`` > 1).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Sequence
from typing import ClassVar

from pydantic import Field

from sluice.gateway.backends.contract import (
    Backend,
    BackendError,
    BackendOptions,
    FinishReason,
    GenerationEvent,
    GenerationRequest,
    ModelCard,
    TokenLogprob,
    Usage,
)
from sluice.plugins._tokenizer import MixtralTokenizer


class EchoBackend(Backend):
    name = "echo"
    supports_sleep: ClassVar[bool] = True

    class Options(BackendOptions):
        model: str = "echo"
        start_delay_s: float = Field(default=0.0, ge=0)  # simulated cold start, slept in start()
        # simulated transitions, for the runtime's tests (sleep and wake like a GPU backend's)
        stop_delay_s: float = Field(default=0.0, ge=0)
        sleep_delay_s: float = Field(default=0.0, ge=0)
        wake_delay_s: float = Field(default=0.0, ge=0)
        ttft_ms: float = Field(default=0.0, ge=0)  # time to first token
        tokens_per_s: float = Field(default=0.0, ge=0)  # 0: as fast as possible
        max_output_tokens: int = Field(default=256, ge=0)
        device: str | None = None  # set by a data-parallel pool (any name: nothing runs on it)
        #: Fault injection for crash/recovery tests: raise BackendError mid-stream
        #: once this many completion tokens were streamed (if the answer is that long).
        fail_after_tokens: int | None = Field(default=None, ge=0)
        #: With fail_after_tokens: mark the injected error fatal (the worker is broken
        #: and the runtime must replace it) instead of failing only this request.
        fail_fatal: bool = False

    def __init__(self, options: BackendOptions) -> None:
        if not isinstance(options, EchoBackend.Options):
            raise TypeError(f"EchoBackend needs EchoBackend.Options, got {type(options).__name__}")
        super().__init__(options)
        self.opts = options
        self.asleep = False
        _tokenizer()  # loaded once per process, when the first backend is built (start-up)

    @property
    def tokenizer(self) -> MixtralTokenizer:
        return _tokenizer()

    def models(self) -> list[ModelCard]:
        return [ModelCard(id=self.opts.model)]

    async def start(self) -> None:
        if self.opts.start_delay_s:
            await asyncio.sleep(self.opts.start_delay_s)

    async def stop(self) -> None:
        await asyncio.sleep(self.opts.stop_delay_s)

    async def sleep(self) -> None:
        await asyncio.sleep(self.opts.sleep_delay_s)
        self.asleep = True

    async def wake(self) -> None:
        await asyncio.sleep(self.opts.wake_delay_s)
        self.asleep = False

    def count_tokens(self, request: GenerationRequest) -> int:
        return self.tokenizer.count_prompt(request)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        if self.asleep:
            raise BackendError("echo: a sleeping worker was given work", fatal=True)
        opts, sampling = self.opts, request.sampling
        # Tokenizing a long prompt takes CPU time (0.4 s per MB): on a worker thread, never
        # the event loop (SentencePiece releases the GIL while it encodes).
        # A short one (the usual chat) is tokenized right here: tens of microseconds (the
        # count is mostly a cache hit, admission counted it), less than two thread hops.
        answer = _answer_text(request)
        if len(answer) + _prompt_chars(request) <= INLINE_MAX_CHARS:
            prompt_tokens = self.count_tokens(request)
            answer_ids = self.tokenizer.encode(answer)
        else:
            prompt_tokens = await asyncio.to_thread(self.count_tokens, request)
            answer_ids = await asyncio.to_thread(self.tokenizer.encode, answer)
        limit = opts.max_output_tokens
        if sampling.max_tokens is not None:
            limit = min(limit, sampling.max_tokens)
        ids = answer_ids[:limit]
        finish: FinishReason = "length" if len(answer_ids) > limit else "stop"
        pieces = list(self.tokenizer.stream_text(ids))
        if sampling.stop:
            pieces, stopped = _cut_at_stop(pieces, sampling.stop)
            if stopped:
                finish = "stop"

        loop = asyncio.get_running_loop()
        first_due = loop.time() + opts.ttft_ms / 1000
        sent_tokens = 0  # completion tokens generated so far
        for text, n in pieces:
            if opts.fail_after_tokens is not None and sent_tokens >= opts.fail_after_tokens:
                raise BackendError(
                    f"echo: injected failure after {sent_tokens} tokens (fail_after_tokens)",
                    fatal=opts.fail_fatal,
                )
            due = first_due  # the piece is due when its last token is
            if opts.tokens_per_s:
                due += (sent_tokens + n - 1) / opts.tokens_per_s
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            sent_tokens += n
            if text:
                logprobs = _logprobs(text, n, sampling.top_logprobs) if sampling.logprobs else ()
                yield GenerationEvent(text=text, tokens=n, logprobs=logprobs)
        held = sum(n for text, n in pieces if not text)  # tokens whose text a stop string ate
        completion = sum(n for _, n in pieces)
        yield GenerationEvent(
            tokens=held,
            finish_reason=finish,
            usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion),
        )


@functools.cache
def _tokenizer() -> MixtralTokenizer:
    """One tokenizer for every echo backend of the process (it is read-only, and
    SentencePiece encodes from several threads at once). Loading it is ~0.26 s of mostly
    Python work holding the GIL: done when the first backend is built at start-up, never
    again when a pool scaled to zero cold-starts a worker while requests are served."""
    tokenizer = MixtralTokenizer()
    tokenizer.token_bytes(0)  # the byte table too
    return tokenizer


# Requests with up to this many characters of prompt and answer (~256 tokens, as the
# pipeline's inline count) are tokenized on the loop.
INLINE_MAX_CHARS = 1024


def _prompt_chars(request: GenerationRequest) -> int:
    if request.messages is None:
        return len(request.prompt or "")
    return sum(len(m.content) for m in request.messages)


def _answer_text(request: GenerationRequest) -> str:
    if request.messages is None:
        return request.prompt or ""
    for message in reversed(request.messages):
        if message.role == "user":
            return message.content
    return ""


def _cut_at_stop(
    pieces: list[tuple[str, int]], stops: Sequence[str]
) -> tuple[list[tuple[str, int]], bool]:
    """Generation ends with the piece that completes the first stop string to appear;
    the text from the stop string on is dropped (its tokens still count)."""
    full = "".join(text for text, _ in pieces)
    ends: list[int] = []  # end offset of each piece in ``full``
    offset = 0
    for text, _ in pieces:
        offset += len(text)
        ends.append(offset)
    best: tuple[int, int] | None = None  # (index of completing piece, stop's start)
    for stop in stops:
        start = full.find(stop) if stop else -1
        if start < 0:
            continue
        done_at = next(i for i, end in enumerate(ends) if end >= start + len(stop))
        if best is None or (done_at, start) < best:
            best = (done_at, start)
    if best is None:
        return pieces, False
    last, cut = best
    kept = []
    for (text, n), end in zip(pieces[: last + 1], ends, strict=False):
        begin = end - len(text)
        kept.append((text[: max(0, cut - begin)], n))
    return kept, True


def _logprobs(text: str, n: int, top: int) -> tuple[TokenLogprob, ...]:
    """The echo is certain of every token: log-probability 0 (a multi-token piece
    puts its text on the first token)."""
    alternatives = ((text, 0.0),) if top > 0 else ()
    rest = (TokenLogprob(token="", logprob=0.0) for _ in range(n - 1))
    return (TokenLogprob(token=text, logprob=0.0, top=alternatives), *rest)
