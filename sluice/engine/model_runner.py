"""Runs the model on a scheduled batch; owns the KV cache, the CUDA graphs and the
weights' parking place.

A step's inputs live in static buffers (engine/step_inputs.py); on CUDA a step replays
a graph when one is captured for its size (engine/cuda_graphs.py) and runs eagerly on
the same inputs otherwise. Graphs are captured on first use once the engine has produced
a token, and the rest (and the weights' host copy, engine/offload.py) by ``warm_step``
while the engine is idle: never on the way to a first token.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from sluice.engine.config import EngineConfig, ModelConfig
from sluice.engine.cuda_graphs import CudaGraphs, varlen_graph_sizes
from sluice.engine.kv_sizing import allocate_cache, auto_num_blocks
from sluice.engine.layers.attention import AttentionKernels, AttentionMetadata
from sluice.engine.models.mixtral import CausalLM
from sluice.engine.offload import WeightParking
from sluice.engine.parallel.group import agree_min
from sluice.engine.scheduler import ScheduledBatch
from sluice.engine.step_inputs import DecodeInputs, VarlenInputs, cache_slot
from sluice.engine.transfer import upload

log = logging.getLogger(__name__)

__all__ = ["ModelRunner", "DecodeInputs", "VarlenInputs", "varlen_graph_sizes"]


def attention_kernels(engine: EngineConfig, model: ModelConfig, device: torch.device) -> AttentionKernels | None:
    """The triton attention kernels when the config and device allow, else None (the
    layers' torch references)."""
    if not engine.triton_attention(device, model):
        return None
    from sluice.engine.kernels.paged_attention import paged_decode_attention  # triton: CUDA only
    from sluice.engine.kernels.varlen_attention import paged_varlen_attention

    return AttentionKernels(decode=paged_decode_attention, varlen=paged_varlen_attention)


def step_sizes(model: CausalLM, engine: EngineConfig, device: torch.device,
               kernels: AttentionKernels | None) -> list[int]:
    """The varlen token buckets steps are padded to (graphs or not): none without CUDA
    graphs, and none without the triton attention (the reference reads lengths on the host)."""
    if device.type != "cuda" or engine.enforce_eager or kernels is None:
        return []
    return varlen_graph_sizes(model, engine.max_num_batched_tokens)


def step_inputs(engine: EngineConfig, max_blocks_per_seq: int, scratch_slot: int, device: torch.device,
                kernels: AttentionKernels | None) -> tuple[DecodeInputs, VarlenInputs]:
    """The static inputs of decode-only and varlen steps (engine/step_inputs.py)."""
    decode = DecodeInputs(min(engine.max_num_seqs, 64), max_blocks_per_seq, scratch_slot, device, kernels)
    varlen = VarlenInputs(engine.max_num_batched_tokens, engine.max_num_seqs, max_blocks_per_seq, scratch_slot,
                          device, kernels)
    return decode, varlen


class ModelRunner:
    def __init__(self, model: CausalLM, engine: EngineConfig, max_model_len: int,
                 reload: Callable[[], torch.nn.Module], activations: int | None = None) -> None:
        """``activations``: a full step's activation bytes from an earlier start (skips
        measuring them, engine/kv_sizing.py)."""
        self.model = model
        self.config: ModelConfig = model.config
        self.device = next(model.parameters()).device
        self.dtype = model.embed_tokens.weight.dtype
        self.block_size = engine.block_size
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        self.kernels = attention_kernels(engine, self.config, self.device)
        cuda_graphs = self.device.type == "cuda" and not engine.enforce_eager
        self.varlen_sizes = step_sizes(model, engine, self.device, self.kernels)
        self.timings: dict[str, float] = {}  # start-up phases, seconds
        began = time.perf_counter()
        self.activations = activations  # bytes; what auto sizing measured (or was given)
        if engine.num_kv_blocks:
            self.num_blocks = engine.num_kv_blocks
        else:
            self.num_blocks, self.activations = auto_num_blocks(
                model, engine, self.max_blocks_per_seq, self.varlen_sizes, self.kernels, activations)
        self.num_blocks = agree_min(self.num_blocks, self.device)  # ranks schedule alike only on equal caches
        self.timings["kv_profile_s"] = time.perf_counter() - began
        self.kv_cache = allocate_cache(model, self.num_blocks + 1, self.block_size)
        scratch = self.num_blocks * self.block_size
        decode, self.varlen = step_inputs(engine, self.max_blocks_per_seq, scratch, self.device, self.kernels)
        self.graphs = CudaGraphs(model, decode, self.varlen, self.varlen_sizes, self.block_size) \
            if cuda_graphs else None
        self.parking = WeightParking(model, reload)
        # Set by the engine once it has produced a token (since its start or wake): from
        # then on a step whose size has no CUDA graph captures it first.
        self.capture_on_first_use = False

    # ---- the step -------------------------------------------------------

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, next_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Forward one step; returns fp32 logits (S, V) for the sequences that sample now:
        every decode, and every prefill whose chunk reaches the end of its tokens.
        ``next_ids`` (decode-only steps): each sequence's next input token, still on the
        device (sampled by the step before, whose result the host has not read yet); the
        sequences' own state then ends one token short of this step's input."""
        graphs = self.graphs
        if not batch.prefill:
            if graphs is not None and len(batch.decode) in graphs.buckets:
                if self.capture_on_first_use:
                    graphs.ensure("decode", graphs.buckets[len(batch.decode)])
                return self.model.compute_logits(graphs.run_decode(batch, next_ids))
            input_ids, positions, meta, sample_rows = self._prepare_decode(batch, next_ids)
            return self.model.compute_logits(self.model(input_ids, positions, meta)[sample_rows])
        n = batch.num_tokens
        size = next((x for x in self.varlen_sizes if x >= n), None)
        if size is not None and graphs is not None and (
                size in graphs.varlen or (self.capture_on_first_use and graphs.ensure("varlen", size))):
            rows = self.varlen.load(batch, size, self.block_size)
            hidden = graphs.replay_varlen(size)
        elif size is not None:  # no graph of this size yet: eager on the same padded inputs,
            # so that its kernels are the ones precompiled for that size (engine/precompile.py)
            rows = self.varlen.load(batch, size, self.block_size)
            hidden = self.model(*self.varlen.views(size))
        else:  # eager, on exactly the step's tokens
            input_ids, positions, meta, rows = self.prepare_varlen(batch)
            hidden = self.model(input_ids, positions, meta)
        return self.model.compute_logits(hidden[rows])

    def prepare_varlen(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        """(input_ids, positions, metadata, sampling rows) of a step run eagerly as varlen
        (views of the static inputs: valid until the next step)."""
        rows = self.varlen.load(batch, batch.num_tokens, self.block_size)
        return *self.varlen.views(batch.num_tokens), rows

    def _prepare_decode(self, batch: ScheduledBatch, next_ids: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        """Inputs of a decode-only step without the static decode inputs (CPU, eager, or
        more sequences than the largest graph)."""
        seqs = batch.decode
        pos = [s.num_tokens - (next_ids is None) for s in seqs]
        width = max(len(s.block_table) for s in seqs)
        meta = AttentionMetadata(
            slot_mapping=self._tensor([cache_slot(s.block_table, p, self.block_size) for s, p in zip(seqs, pos)],
                                      torch.int64),
            decode_block_tables=self._tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs],
                                             torch.int32),
            decode_context_lens=self._tensor([p + 1 for p in pos], torch.int32), kernels=self.kernels)
        ids = next_ids if next_ids is not None else self._tensor([s.token_ids[p] for s, p in zip(seqs, pos)], torch.int64)
        return ids, self._tensor(pos, torch.int64), meta, torch.arange(len(seqs), device=self.device)

    def _tensor(self, data: list, dtype: torch.dtype) -> torch.Tensor:
        return upload(torch.tensor(data, dtype=dtype), self.device)

    # ---- warming up while idle --------------------------------------------

    def warm_step(self) -> bool:
        """One piece of the work left to be warm (the weights' host copy is started in
        its own thread; one CUDA graph is captured). False when nothing is left."""
        self.parking.park_in_background()
        return self.graphs is not None and self.graphs.capture_next()

    def warm_up(self) -> None:
        """Every CUDA graph now (benchmarks, `sluice warmup`); the weights' host copy is
        left to the background."""
        began = time.perf_counter()
        if self.graphs is not None:
            self.graphs.capture_all()
        self.timings["graph_capture_s"] = time.perf_counter() - began

    # ---- sleep / wake ------------------------------------------------------

    def sleep(self) -> None:
        """Free the GPU: graphs, KV cache and weights (whose host copy, when complete, is
        the source of the next wake). Never copies: see engine/offload.py."""
        if self.graphs is not None:
            self.graphs.clear()
        self.parking.release()
        self.kv_cache = allocate_cache(self.model, 0, self.block_size)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            # cuBLAS workspaces (32 MiB each on Hopper) live in the caching allocator and
            # pin whole segments that empty_cache could otherwise return: 488 -> 6 MiB
            # reserved on a 4-layer model (H200)
            clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
            if clear is not None:
                clear()
            torch.cuda.empty_cache()

    def wake(self) -> str:
        """Weights back on the device and a zeroed KV cache; graphs are captured again
        when the engine is next idle. Returns where the weights came from."""
        source = self.parking.restore()
        self.kv_cache = allocate_cache(self.model, self.num_blocks + 1, self.block_size)
        return source
