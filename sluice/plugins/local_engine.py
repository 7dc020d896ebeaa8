"""The in-process inference engine (engine/) as a gateway backend.

Without a model path it serves a tiny random Mixtral generated on first start
(real Mixtral tokenizer, noise weights: its text is meaningless, and the log says
so). Token accounting: prompt tokens are exactly the ids the engine runs (chat
template applied); completion tokens are the tokens generated, except the EOS or
stop token that ends a request, which is not counted (the convention of every
sluice backend).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import ClassVar

from pydantic import create_model

from sluice.engine.config import ENGINE_FIELDS, EngineConfig
from sluice.gateway.backends.contract import (
    Backend,
    BackendError,
    BackendOptions,
    GenerationEvent,
    GenerationRequest,
    ModelCard,
    TEXT_CAPABILITIES,
    TokenLogprob,
    Usage,
)

log = logging.getLogger(__name__)

TINY_NAME = "tiny-mixtral"


@functools.cache
def preload_engine() -> threading.Thread:
    """Import the engine (torch, triton, the kernels' modules) and initialise CUDA and
    triton's driver in a background thread, once per process, as soon as a local backend
    is configured: several seconds that would otherwise sit on the first cold start's
    path, in front of the waiting request. ``LocalEngineBackend.prepare`` waits for it."""

    def run() -> None:
        try:
            import sluice.engine.async_llm  # noqa: F401
            import sluice.engine.llm  # noqa: F401
            import torch

            if torch.cuda.is_available():
                torch.cuda.init()
                from triton.runtime import driver

                driver.active.get_current_target()  # loads (on a fresh host: builds) its launcher utils
        except Exception:  # the cold start will import (and report) it again
            log.exception("preloading the engine failed")

    thread = threading.Thread(target=run, name="engine-preload", daemon=True)
    thread.start()
    return thread


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sluice"


class _LocalOptions(BackendOptions):
    served_model_name: str | None = None  # default: the directory's name, or "tiny-mixtral"
    cache_dir: str | None = None  # where the tiny model is generated (~/.cache/sluice)


# The backend's options: the two above and the engine's own config fields, as they are
# (model: a HF checkpoint directory, None: the tiny random Mixtral; dtype; ...).
LocalEngineOptions = create_model("LocalEngineOptions", __base__=_LocalOptions, __module__=__name__,
                                  **{name: (f.annotation, f) for name, f in EngineConfig.__pydantic_fields__.items()})


class LocalEngineBackend(Backend):
    name = "local"
    supports_sleep: ClassVar[bool] = True
    Options = LocalEngineOptions

    def __init__(self, options: BackendOptions) -> None:
        if not isinstance(options, LocalEngineBackend.Options):
            raise TypeError(f"LocalEngineBackend needs LocalEngineBackend.Options, got {type(options).__name__}")
        super().__init__(options)
        self.opts = options
        self._engine = None  # engine.async_llm.AsyncLLM once started
        self._tokenizer = None
        self._grammars = None  # engine.structured.Grammars, built on the first constrained request
        self.wake_source = ""  # where the last wake took the weights from: "host", "host+checkpoint", "checkpoint"
        preload_engine()

    # ---- lifecycle ------------------------------------------------------

    @property
    def model_dir(self) -> Path:
        if self.opts.model:
            return Path(self.opts.model).expanduser()
        return Path(self.opts.cache_dir or default_cache_dir()).expanduser() / TINY_NAME

    def models(self) -> list[ModelCard]:
        name = self.opts.served_model_name or (self.model_dir.name if self.opts.model else TINY_NAME)
        # JSON is enforced by grammar; tools only where the tokenizer has them (Mistral v2+)
        capabilities = TEXT_CAPABILITIES | {"json_schema", "token_prompts"} | (
            {"tools"} if self.tokenizer.supports_tools else set())
        return [ModelCard(id=name, context_length=self.opts.max_model_len, capabilities=frozenset(capabilities))]

    async def prepare(self) -> None:
        """At gateway start: wait for the engine's imports (preload_engine), so that the
        gateway takes requests once a cold start no longer has to import anything."""
        await asyncio.to_thread(preload_engine().join)

    async def start(self) -> None:
        if self._engine is None:
            self._engine = await asyncio.to_thread(self._load)

    async def stop(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            await asyncio.to_thread(engine.close)
            if (close_ranks := getattr(engine.llm, "close", None)) is not None:  # a parallel engine's
                await asyncio.to_thread(close_ranks)
            del engine
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    async def sleep(self) -> None:
        """GPU memory released: weights, KV cache, CUDA graphs (requests in flight:
        BackendError 409). Copies nothing (the weights' host copy is made in the
        background). A no-op when not started or already asleep."""
        if self._engine is not None:
            await asyncio.to_thread(self._engine_call, "sleep")

    async def wake(self) -> None:
        """Weights back on the GPU (from their host copy, or the checkpoint when the copy
        was not complete), fresh KV cache; ready to generate."""
        if self._engine is None:
            raise BackendError("local engine is not started", status=503, retryable=True)
        self.wake_source = await asyncio.to_thread(self._engine_call, "wake")
        timings = self._engine.llm.runner.parking.timings
        log.info("weights back from %s (%.1f GB from host, %.1f GB read again)", self.wake_source,
                 timings.get("restore_host_bytes", 0.0) / 1e9, timings.get("restore_checkpoint_bytes", 0.0) / 1e9)

    async def warmup(self) -> dict[str, float]:
        """Start, then compile and capture everything a start would otherwise leave to the
        background (fills the kernel cache: `sluice warmup`); returns the engine's timings."""
        await self.start()
        assert self._engine is not None
        await asyncio.to_thread(self._engine.llm.warm_up)
        return dict(self._engine.llm.timings)

    def _engine_call(self, method: str):  # noqa: ANN202 (the engine method's result)
        from sluice.engine.errors import EngineError

        try:
            return getattr(self._engine, method)()
        except EngineError as exc:
            raise BackendError(f"local engine: {exc}", status=409, retryable=True) from None

    def _load(self):
        from sluice.engine.async_llm import AsyncLLM
        from sluice.engine.errors import EngineError
        from sluice.engine.llm import LLM
        from sluice.engine.ranks import launch

        if not self.opts.model:
            self._ensure_tiny_model()
        engine = self.opts.model_dump(include=set(ENGINE_FIELDS) - {"model"})
        try:  # world_size > 1: rank 0 here, the other ranks spawned (engine/ranks/launch.py)
            llm = launch(self.model_dir, engine) if self.opts.world_size > 1 else LLM(self.model_dir, **engine)
        except EngineError as exc:
            raise BackendError(f"local engine: {exc}", status=500) from None
        self._tokenizer = llm.tokenizer
        return AsyncLLM(llm)

    def _ensure_tiny_model(self) -> None:
        from sluice.engine.config import PRESETS
        from sluice.engine.random_checkpoint import write_random_checkpoint

        target = self.model_dir
        if not (target / "config.json").exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tiny-"))
            write_random_checkpoint(tmp, PRESETS[TINY_NAME], seed=0)
            try:
                tmp.rename(target)
            except OSError:  # another worker won the race
                shutil.rmtree(tmp, ignore_errors=True)
        log.warning("serving %s: a tiny RANDOM Mixtral from %s; its text is noise (set a model path "
                    "for real output)", TINY_NAME, target)

    # ---- requests -------------------------------------------------------

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from sluice.engine.config import ModelConfig
            from sluice.engine.tokenizer import load_tokenizer

            cfg_file = self.model_dir / "config.json"
            cfg = ModelConfig.from_file(cfg_file) if cfg_file.exists() else None
            self._tokenizer = load_tokenizer(self.opts.model and self.model_dir,
                                             cfg.bos_token_id if cfg else None, cfg.eos_token_ids if cfg else ())
        return self._tokenizer

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        """The ids the engine runs, and the gateway counts: one chat encoding for both."""
        from sluice.engine.tokenizer import ChatEncodingError
        from sluice.plugins._tokenizer import chat_messages, chat_tools

        if request.prompt_ids is not None:  # token ids go to the engine as they are
            return list(request.prompt_ids)
        if request.messages is None:
            return self.tokenizer.encode(request.prompt or "")
        try:
            return self.tokenizer.apply_chat_template(chat_messages(request.messages), chat_tools(request))
        except ChatEncodingError as exc:
            raise BackendError(str(exc), status=400, param=exc.param) from None

    def count_tokens(self, request: GenerationRequest) -> int:
        return len(self.prompt_ids(request))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        from sluice.engine.errors import EngineError
        from sluice.engine.sampling import SamplingParams
        from sluice.plugins._structured import ToolCallReader, check_content_parts, constraint_for

        if self._engine is None:
            raise BackendError("local engine is not started", status=503, retryable=True)
        s = request.sampling
        check_content_parts(request)
        ids = await asyncio.to_thread(self.prompt_ids, request)  # off the event loop
        constraint = None
        if request.response_format is not None or request.tools:
            constraint = constraint_for(request, self.tokenizer, await asyncio.to_thread(self.grammars))
        vocab = self._engine.llm.model.config.vocab_size
        for param, tokens in (("prompt", request.prompt_ids or ()), ("logit_bias", (t for t, _ in s.logit_bias))):
            if any(token >= vocab for token in tokens):
                raise BackendError(f"{param} holds a token id outside the vocabulary [0, {vocab})",
                                   status=400, param=param)
        try:
            params = SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                                    max_tokens=s.max_tokens, seed=s.seed, stop=tuple(s.stop),
                                    logprobs=s.logprobs or s.top_logprobs > 0, top_logprobs=s.top_logprobs,
                                    presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty,
                                    logit_bias=s.logit_bias, constraint=constraint)
        except EngineError as exc:
            raise BackendError(str(exc), status=400, param=getattr(exc, "param", None)) from None
        stream = self._engine.generate(ids, params, request_id=request.request_id)
        tools = ToolCallReader(self.tokenizer, request)
        completion = 0
        try:
            async for out in stream:
                counted = len(out.token_ids) - (out.stop_token_id is not None)
                completion += counted
                logprobs = self._logprobs(out, s.logprobs)
                text, calls = tools.feed(out.token_ids, out.text)  # tool calls stream as they are read
                if not out.finished:
                    yield GenerationEvent(text=text, tokens=counted, logprobs=logprobs, tool_calls=calls)
                    continue
                text += tools.leftover()
                usage = Usage(prompt_tokens=out.num_prompt_tokens, completion_tokens=completion)
                reason = "stop" if out.finish_reason == "stop" else "length"
                if reason == "stop" and tools.complete:
                    reason = "tool_calls"  # a call cut short keeps "length", as OpenAI's does
                yield GenerationEvent(text=text, tokens=counted, logprobs=logprobs, tool_calls=calls,
                                      finish_reason=reason, usage=usage)
        except EngineError as exc:  # e.g. the prompt does not fit the context
            raise BackendError(str(exc), status=400) from None
        finally:
            await stream.aclose()  # closing early cancels the sequence and frees its blocks

    def grammars(self):  # noqa: ANN201 (engine.structured.Grammars, imported lazily)
        """The grammar compiler for this model's tokenizer (built once: ~0.3 s for the vocabulary)."""
        if self._grammars is None:
            from sluice.engine.structured import Grammars

            vocab = self._engine.llm.model.config.vocab_size if self._engine is not None else None
            self._grammars = Grammars(self.tokenizer, vocab)
        return self._grammars

    def _logprobs(self, out, wanted: bool) -> tuple[TokenLogprob, ...]:
        if not wanted:
            return ()
        text = self.tokenizer.token_text
        return tuple(TokenLogprob(text(t.token_id), t.logprob, tuple((text(i), lp) for i, lp in t.top_logprobs))
                     for t in out.logprobs if t.logprob is not None and t.token_id != out.stop_token_id)
