"""The engine's synchronous front: add requests, then step until done.

    llm = LLM("/path/to/checkpoint")
    [c] = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=16))
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from sluice.engine.config import EngineConfig, ModelConfig
from sluice.engine.kernel_cache import COMPILES, use_kernel_cache
from sluice.engine.kernels.fused_moe import TILES_ENV
from sluice.engine.warm_record import WarmRecord, warm_key
from sluice.engine.errors import ConfigError, RequestError
from sluice.engine.kv_cache import BlockManager
from sluice.engine.kv_sizing import profile_tokens
from sluice.engine.loader import load_model
from sluice.engine.model_runner import ModelRunner, attention_kernels
from sluice.engine.models.mixtral import CausalLM
from sluice.engine.output import Completion, RequestOutput, TextState
from sluice.engine.parallel import Sharding
from sluice.engine.parallel.group import use_device
from sluice.engine.precompile import Precompile, start_precompile
from sluice.engine.sampling import Draw, SamplingParams, accept, adjust, draw, needs_host_history
from sluice.engine.scheduler import ScheduledBatch, Scheduler
from sluice.engine.sequence import Sequence
from sluice.engine.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class _Launched:
    """A step on the device: its batch, the sequences that sample, and their tokens still
    on the device (``draw``). A step launched ahead whose sampling reads the host's view
    of the previous tokens (penalties, grammars) holds its ``logits`` until that view is
    complete (LLM._sample)."""

    batch: ScheduledBatch
    samplers: list[Sequence]
    draw: Draw | None = None
    logits: torch.Tensor | None = None


# What a row of a step launched ahead samples with once its sequence has ended (the row
# is discarded): nothing that reads the ended sequence's state.
_ENDED = SamplingParams(temperature=0, max_tokens=None)


class LLM:
    def __init__(self, model: str | Path | None = None, *, tokenizer: Tokenizer | None = None,
                 model_config: ModelConfig | None = None, progress: bool = True, **options: Any) -> None:
        """Load ``model`` (a HF checkpoint directory), or build random weights from
        ``model_config`` when no path is given (benchmarks). ``options`` are EngineConfig fields."""
        try:
            self.config = EngineConfig(model=str(model) if model else None, **options)
        except ValidationError as exc:
            raise ConfigError(f"engine options: {exc}") from None
        self.kernel_cache = use_kernel_cache(self.config.compile_cache_dir)  # before anything compiles
        if model is not None:
            model_config = ModelConfig.from_file(model)
        if model_config is None:
            raise ConfigError("LLM needs a checkpoint path or a model_config")
        cfg = model_config.with_experts_per_tok(self.config.num_experts_per_tok)
        device = self.config.resolve_device()
        use_device(device)  # this thread's CUDA device (a data-parallel worker's GPU)
        dtype = self.config.resolve_dtype(cfg, device)
        self.fp8 = self.config.wants_fp8(cfg, device)
        self.sharding = Sharding.join(self.config.parallel, self.config.world_size, device, cfg)
        self.max_model_len = min(self.config.max_model_len or 8192, cfg.max_position_embeddings)
        self.timings: dict[str, float] = {}
        record = self._warm_record(cfg, device, dtype, model)
        known = record.activations() if record is not None else None
        self.precompile = self._precompile(cfg, device, dtype, model, known)
        began = time.perf_counter()
        with self._compiling():
            net = load_model(cfg, device, dtype, model, fp8=self.fp8, seed=self.config.seed,
                             max_positions=self.max_model_len, progress=progress, stats=self.timings,
                             shard=self.sharding)
        self.timings["load_s"] = time.perf_counter() - began
        self.model: CausalLM = net
        self.tokenizer = tokenizer or load_tokenizer(model, cfg.bos_token_id, cfg.eos_token_ids)
        self.eos_ids = set(cfg.eos_token_ids) | set(self.tokenizer.eos_ids)
        began = time.perf_counter()

        def reload() -> CausalLM:  # the weights again, for a wake that has no host copy
            return load_model(cfg, device, dtype, model, fp8=self.fp8, seed=self.config.seed,
                              max_positions=self.max_model_len, progress=False, shard=self.sharding)

        with self._compiling():  # KV sizing's prefill waits for the kernels compiling for it
            self.runner = ModelRunner(net, self.config, self.max_model_len, reload, known)
        if record is not None and known is None and self.runner.activations is not None:
            record.write(self.runner.activations)  # measured by this start: the next one skips it
        self.timings["runner_s"] = time.perf_counter() - began  # KV sizing
        if not self.config.warm_in_background:
            with self._compiling():
                self.runner.warm_up()
        self.timings.update(self.runner.timings)
        self.timings.update(COMPILES.as_timings())
        if self.precompile is not None:
            self.timings.update(self.precompile.timings())
        self.steps = 0  # steps run since the start or the last wake
        self.block_manager = BlockManager(self.runner.num_blocks, self.config.block_size,
                                          self.config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, self.config.max_num_seqs, self.config.max_num_batched_tokens)
        self.scheduler.token_buckets = tuple(self.runner.varlen_sizes)
        self.asleep = False
        #: Called in step() once the forward is enqueued, before sampling waits for it
        #: (AsyncLLM hands the previous step's outputs over there).
        self.on_launch: Callable[[], None] | None = None
        self.sequences: dict[int, Sequence] = {}
        self._text: dict[int, TextState] = {}
        #: Decode steps launched one ahead of reading the last one's tokens back (step()).
        #: Not across ranks: each rank would have to take the same decision at once.
        self.lookahead = self.config.step_lookahead and not self.sharding.active
        self._in_flight: _Launched | None = None
        pending = f", {self.precompile.pending()} still compiling" if self.precompile is not None else ""
        log.info("engine ready: %s on %s (%s%s), %d KV blocks of %d tokens; loaded in %.2fs, KV cache sized in "
                 "%.2fs; %d kernels compiled (%.1fs of compiler time%s)", cfg.architecture, device, dtype,
                 (", fp8 weights" + (f", MoE tiles from {os.environ[TILES_ENV]}" if os.environ.get(TILES_ENV) else "")
                  if self.fp8 else ""), self.runner.num_blocks, self.config.block_size,
                 self.timings["load_s"], self.timings["runner_s"], COMPILES.kernels, COMPILES.seconds, pending)

    def _precompile(self, cfg: ModelConfig, device: Any, dtype: Any, model: str | Path | None,
                    activations: int | None) -> Precompile | None:
        """On CUDA (one GPU per engine), compile the start's kernels on a thread pool while
        the weights load (engine/precompile.py); this thread's launches share that pool.
        Not on a restart: a warm record (``activations``) comes from a start that compiled
        them into this kernel cache already (unless the cache was emptied since), and
        reading them back is quick."""
        if device.type != "cuda" or self.sharding.active or self.config.compile_threads == 0:
            return None
        if activations is not None and any(self.kernel_cache.iterdir()):
            return None
        max_blocks = -(-self.max_model_len // self.config.block_size)
        profile = None if self.config.num_kv_blocks else profile_tokens(self.config, max_blocks)
        return start_precompile(cfg, self.config, device, dtype, model, self.fp8, self.max_model_len,
                                attention_kernels(self.config, cfg, device), profile, self.config.compile_threads)

    def _compiling(self) -> contextlib.AbstractContextManager[None]:
        """While the start's kernels compile on the pool, this thread's launches share it
        (a kernel compiling there is waited for, not compiled a second time)."""
        pool = self.precompile
        return pool.attached() if pool is not None and not pool.finished else contextlib.nullcontext()

    def _warm_record(self, cfg: ModelConfig, device: Any, dtype: Any, model: str | Path | None) -> WarmRecord | None:
        """On CUDA, this model's warm record beside the kernel cache (engine/warm_record.py):
        an earlier start's activation bytes, so KV sizing skips its prefill."""
        if device.type != "cuda" or self.sharding.active:
            return None
        return WarmRecord(self.kernel_cache, warm_key(cfg, self.config, dtype, self.fp8, device,
                                                       Path(model) if model else None))

    # ---- sleep ----------------------------------------------------------

    def sleep(self) -> None:
        """Give the GPU memory back (weights, KV cache and the prefix cache with it, CUDA
        graphs); the weights' host copy or checkpoint is the next wake's source. Only
        between requests; takes no longer than freeing memory (engine/offload.py)."""
        if self.asleep:
            return
        if self.has_unfinished():
            raise RequestError("cannot sleep with requests in flight")
        self._in_flight = None  # a step launched ahead whose sequences were all aborted (runner.sleep syncs)
        self.runner.sleep()
        self.block_manager = BlockManager(self.runner.num_blocks, self.config.block_size,
                                          self.config.enable_prefix_caching)
        self.scheduler.blocks = self.block_manager
        self.asleep = True

    def wake(self) -> str:
        """Weights back on the device and a fresh KV cache; CUDA graphs are captured
        again while idle after the next first token. Returns where the weights came from
        ("host" or "checkpoint"; "" when awake already)."""
        if not self.asleep:
            return ""
        with self._compiling():
            source = self.runner.wake()
        self.asleep = False
        self.steps = 0
        return source

    def warm_step(self) -> bool:
        """One piece of background warm-up (a CUDA graph; the weights' host copy is
        started in its own thread), only once the engine has produced a token since its
        start or wake, and only between requests. False when there is nothing to do now."""
        if self.asleep or self.steps == 0 or self.has_unfinished():
            return False
        with self._compiling():
            return self.runner.warm_step()

    def warm_up(self) -> None:
        """Every CUDA graph now (what `sluice warmup` and benchmarks call)."""
        with self._compiling():
            self.runner.warm_up()
        self.timings.update(self.runner.timings)
        self.timings.update(COMPILES.as_timings())

    # ---- requests -------------------------------------------------------

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> Sequence:
        """Queue a request (text is encoded with BOS; pass ids for chat-templated prompts)."""
        seq = self.make_sequence(prompt, params, request_id)
        self.enqueue(seq)
        return seq

    def make_sequence(self, prompt: str | list[int], params: SamplingParams | None = None,
                      request_id: str | None = None) -> Sequence:
        """Tokenize and validate (raises RequestError) without touching engine state."""
        params = params or SamplingParams()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self._validate(ids, params)
        seq = Sequence(ids, params)
        seq.request_id = request_id or f"req-{seq.seq_id}"
        return seq

    def enqueue(self, seq: Sequence) -> None:
        self.sequences[seq.seq_id] = seq
        self._text[seq.seq_id] = TextState(self.tokenizer, seq)
        self.scheduler.add(seq)

    def abort(self, seq_id: int) -> None:
        """Cancel a request now; its KV blocks are freed at once."""
        seq = self.sequences.pop(seq_id, None)
        if seq is not None:
            self._text.pop(seq_id, None)
            self.scheduler.finish(seq, "cancelled")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ---- the step -------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one step and return its outputs. With ``step_lookahead`` a decode step is
        launched before the previous step's tokens are read back (``_launch_ahead``): this
        call then returns the outputs of the step launched by the last call, and the one
        it launched is on the device meanwhile."""
        if self.asleep:
            raise RequestError("the engine is asleep: wake() it first")
        launched, self._in_flight = self._in_flight, None
        if launched is not None and all(s.is_finished for s in launched.batch.decode):
            launched = None  # every one of its sequences was aborted since: nothing to read
        earlier = launched is not None
        if not earlier:
            batch = self.scheduler.schedule()
            if not batch:
                return []
            launched = self._launch(batch)
        ahead = self._launch_ahead(launched) if self.lookahead else None
        if earlier and ahead is None and self.on_launch is not None:
            self.on_launch()  # nothing launched now, but the GPU is still on `launched`: hand over
        outputs = self._resolve(launched)
        if ahead is not None and not all(s.is_finished for s in ahead.batch.decode):
            if ahead.draw is None:  # the host's view is complete now: sample while the forward runs
                self._sample(ahead)
            self._in_flight = ahead
        return outputs

    def _launch(self, batch: ScheduledBatch, after: _Launched | None = None) -> _Launched:
        """Enqueue a step's forward and its sampling. ``after``: the step whose sampled
        tokens are this one's inputs, still on the device; where this step's sampling
        reads the host's view of those tokens, it waits (the logits are kept)."""
        self.runner.capture_on_first_use = self.steps > 0
        with self._compiling():
            logits = self.runner.run(batch, after.draw.token_ids if after is not None else None)
        if self.on_launch is not None:  # the forward is enqueued; the GPU is busy for a while
            self.on_launch()
        self.steps += 1
        launched = _Launched(batch, self._sampling_sequences(batch), logits=logits)
        if after is None or not any(needs_host_history(s.params) for s in launched.samplers):
            self._sample(launched)
        return launched

    def _sample(self, launched: _Launched) -> None:
        """Adjust the step's logits (bias, penalties, grammar masks: host state) and draw
        its tokens on the device; rows of sequences ended meanwhile sample as _ENDED."""
        samplers = launched.samplers
        params = [_ENDED if s.is_finished else s.params for s in samplers]
        with torch.inference_mode():  # the logits are the forward's (inference) tensor, adjusted in place
            adjust(launched.logits, params, samplers)
            launched.draw = draw(launched.logits, params, [s.generator for s in samplers])
        launched.logits = None

    def _launch_ahead(self, last: _Launched) -> _Launched | None:
        """The next decode step of ``last``'s sequences, launched before ``last``'s tokens
        are read back, so that the host's work on them (reading them back, detokenizing,
        the next step's inputs, grammar masks) overlaps the device's next forward. Only
        where that next step is what the scheduler would run anyway: a decode-only step,
        no waiting request it could admit, no sequence certain to end with ``last``'s token,
        and a KV slot for each without preempting. A sequence that ends with ``last``'s token all the
        same (a stop token or string, an abort) has that row of the step discarded; the KV
        it wrote lies past its tokens."""
        batch = last.batch
        if batch.prefill or self.scheduler.can_admit():
            return None
        if any(seq.is_finished or self._length_reached(seq, pending=1) for seq in batch.decode):
            return None
        if not all(self.block_manager.ensure_slots(seq, seq.num_tokens + 1) for seq in batch.decode):
            return None  # (slots taken for the others are this step's next ones anyway)
        return self._launch(ScheduledBatch(decode=list(batch.decode)), after=last)

    def _resolve(self, launched: _Launched) -> list[RequestOutput]:
        """Read a launched step's tokens back and apply them (sequences that ended since it
        was launched are skipped)."""
        assert launched.draw is not None
        live = [(s, t) for s, t in zip(launched.samplers, launched.draw.result()) if not s.is_finished]
        accept([s.params for s, _ in live], [t for _, t in live])
        return self._postprocess(launched.batch, dict(live))

    def _sampling_sequences(self, batch: ScheduledBatch) -> list[Sequence]:
        done = [s for s, n in zip(batch.prefill, batch.chunk_lens) if s.num_computed_tokens + n == s.num_tokens]
        return batch.decode + done

    def _postprocess(self, batch: ScheduledBatch, sampled: dict[Sequence, Any]) -> list[RequestOutput]:
        for seq, n in zip(batch.sequences, [1] * len(batch.decode) + batch.chunk_lens):
            if seq.is_finished:  # ended (aborted, or by the step before) after this step was launched
                continue
            seq.num_computed_tokens += n
            self.block_manager.commit(seq)
        outputs = []
        for seq, tok in sampled.items():
            seq.append(tok)
            reason = self._finish_reason(seq)
            text = self._text[seq.seq_id]
            if tok.token_id not in self._stop_ids(seq):  # a stop token adds no text
                if text.add_token(seq):
                    reason = "stop"
            by_token = reason == "stop" and tok.token_id in self._stop_ids(seq)
            outputs.append(RequestOutput(
                seq.request_id, seq.seq_id, text.delta(final=reason is not None), [tok.token_id], [tok],
                seq.num_prompt_tokens, seq.num_completion_tokens, reason is not None, reason,
                tok.token_id if by_token else None))
            if reason is not None:
                self.scheduler.finish(seq, reason)
                del self.sequences[seq.seq_id], self._text[seq.seq_id]
        return outputs

    def _stop_ids(self, seq: Sequence) -> set[int]:
        return set(seq.params.stop_token_ids) | (set() if seq.params.ignore_eos else self.eos_ids)

    def _finish_reason(self, seq: Sequence) -> str | None:
        if seq.token_ids[-1] in self._stop_ids(seq):
            return "stop"
        return "length" if self._length_reached(seq) else None

    def _length_reached(self, seq: Sequence, pending: int = 0) -> bool:
        """Whether ``seq``, with ``pending`` more tokens, is at max_tokens or max_model_len."""
        limit = seq.params.max_tokens
        return ((limit is not None and seq.num_completion_tokens + pending >= limit)
                or seq.num_tokens + pending >= self.max_model_len)

    def _validate(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise RequestError("prompt is empty")
        if len(ids) >= self.max_model_len:
            raise RequestError(f"prompt has {len(ids)} tokens; max_model_len is {self.max_model_len}")
        vocab = self.model.config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise RequestError(f"prompt holds a token id outside the vocabulary [0, {vocab})")
        total = min(len(ids) + (params.max_tokens or self.max_model_len), self.max_model_len)
        if self.block_manager.blocks_needed(total) > self.block_manager.num_blocks:
            raise RequestError(f"request needs {total} tokens of KV cache; the cache holds "
                               f"{self.block_manager.num_blocks * self.block_manager.block_size}")

    # ---- convenience ----------------------------------------------------

    def generate(self, prompts: Seq[str | list[int]], params: SamplingParams | Seq[SamplingParams] | None = None
                 ) -> list[Completion]:
        """Run prompts to completion (continuously batched); results in prompt order."""
        plist = params if isinstance(params, Seq) else [params or SamplingParams()] * len(prompts)
        seqs = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        texts = {s.seq_id: "" for s in seqs}
        while self.has_unfinished():
            for out in self.step():
                if out.seq_id in texts:
                    texts[out.seq_id] += out.text
        return [Completion(s.request_id, s.prompt_token_ids, s.completion_token_ids, texts[s.seq_id],
                           s.finish_reason, list(s.sampled)) for s in seqs]

