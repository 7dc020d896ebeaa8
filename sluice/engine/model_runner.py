"""Runs the model on a scheduled batch: builds inputs, owns the KV cache and CUDA graphs.

Tokens of a step are laid out [decode tokens | prefill chunks]. On CUDA a step replays
a graph when one fits it: a decode-only step one captured at a padded batch-size
bucket, a step with prefill chunks (varlen) one captured at a padded token count with
room for every sequence row, since the varlen attention kernel's launch depends on
those two numbers alone. Steps past the largest graph run eagerly through the same
static inputs. One extra cache block at the end is scratch: padded rows write there.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from sluice.engine.config import EngineConfig, ModelConfig
from sluice.engine.errors import ConfigError
from sluice.engine.layers.attention import AttentionMetadata
from sluice.engine.layers.attention import paged_varlen_attention as paged_varlen_reference
from sluice.engine.models.mixtral import CausalLM
from sluice.engine.scheduler import ScheduledBatch
from sluice.engine.staging import packed_layout, pinned_buffer

log = logging.getLogger(__name__)

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
# Varlen steps (prefill chunks, with or without decodes) replay the graph of the smallest
# of these token counts that holds them, up to max_num_batched_tokens and the model's
# own limit (MoE.graph_max_tokens). Spacing caps the padding at 1/3 above 512 tokens.
VARLEN_GRAPH_TOKENS = (16, 32, 64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)


def varlen_graph_sizes(model: torch.nn.Module, max_tokens: int) -> list[int]:
    """VARLEN_GRAPH_TOKENS up to the smaller of ``max_tokens`` and every module's
    ``graph_max_tokens()``, and that cap itself: a full step has its own graph."""
    limits = [m.graph_max_tokens() for m in model.modules() if hasattr(m, "graph_max_tokens")]
    cap = min([max_tokens] + [x for x in limits if x is not None])
    return [n for n in VARLEN_GRAPH_TOKENS if n < cap] + [cap]


def cache_slot(block_table: list[int], pos: int, block_size: int) -> int:
    """The KV-cache slot of a sequence's token at ``pos``."""
    return block_table[pos // block_size] * block_size + pos % block_size


class ModelRunner:
    def __init__(self, model: CausalLM, engine: EngineConfig, max_model_len: int) -> None:
        self.model = model
        self.config: ModelConfig = model.config
        self.device = next(model.parameters()).device
        self.dtype = model.embed_tokens.weight.dtype
        self.block_size = engine.block_size
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        if self.device.type == "cuda":
            self._use_triton_attention()
        self.timings: dict[str, float] = {}  # start-up phases, seconds
        self.varlen_sizes = [] if engine.enforce_eager else self._varlen_graph_sizes(engine.max_num_batched_tokens)
        began = time.perf_counter()
        self.num_blocks = engine.num_kv_blocks or self._auto_num_blocks(engine)
        self.timings["kv_profile_s"] = time.perf_counter() - began
        self._allocate_cache(self.num_blocks + 1)
        scratch = self.num_blocks * self.block_size
        self.varlen = VarlenInputs(engine.max_num_batched_tokens, engine.max_num_seqs, self.max_blocks_per_seq,
                                   scratch, self.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.varlen_graphs: dict[int, torch.cuda.CUDAGraph] = {}  # padded token count -> graph
        self.inputs: DecodeInputs | None = None  # the decode graphs' static inputs
        self.static: dict[str, torch.Tensor] = {}  # their views, and each graph's output
        self._buckets: dict[int, int] = {}  # decode batch size -> captured (padded) size
        self._max_graph_bs = min(engine.max_num_seqs, GRAPH_BATCH_SIZES[-1])
        self._graph_ptrs: tuple[int, ...] = ()  # device addresses the graphs were captured against
        self._pool = None  # the graphs' shared memory pool
        self._capture_failed: set[int] = set()  # varlen sizes whose capture after a wake failed
        self._host: torch.Tensor | None = None  # weights parked by sleep() (pinned on CUDA)
        self.recaptured_on_wake = False
        if self.device.type == "cuda" and not engine.enforce_eager:
            began = time.perf_counter()
            self._capture_graphs(self._max_graph_bs)
            self.timings["graph_capture_s"] = time.perf_counter() - began

    def _use_triton_attention(self) -> None:
        from sluice.engine.kernels.paged_attention import paged_decode_attention  # triton: CUDA only
        from sluice.engine.kernels.varlen_attention import paged_varlen_attention

        d = self.config.head_dim
        if d >= 16 and d & (d - 1) == 0 and self.block_size & (self.block_size - 1) == 0:
            for attn in self.model.attention_layers():
                attn.decode_fn = paged_decode_attention
                attn.varlen_fn = paged_varlen_attention

    def _varlen_graph_sizes(self, max_tokens: int) -> list[int]:
        """Token counts to capture varlen graphs at: none without the triton attention
        (the reference reads lengths on the host), else up to the model's limit."""
        if self.device.type != "cuda" or self.model.attention_layers()[0].varlen_fn is paged_varlen_reference:
            return []
        return varlen_graph_sizes(self.model, max_tokens)

    # ---- the step -------------------------------------------------------

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> torch.Tensor:
        """Forward one step; returns fp32 logits (S, V) for the sequences that sample now:
        every decode, and every prefill whose chunk reaches the end of its tokens."""
        B = len(batch.decode)
        if not batch.prefill:
            if B in self._buckets:
                return self.model.compute_logits(self._replay(batch))
            input_ids, positions, meta, sample_rows = self._prepare_decode(batch)
            return self.model.compute_logits(self.model(input_ids, positions, meta)[sample_rows])
        n = batch.num_tokens
        size = next((x for x in self.varlen_sizes if x >= n), None)
        if size is None:
            input_ids, positions, meta, rows = self.prepare_varlen(batch)
            hidden = self.model(input_ids, positions, meta)
        elif size in self.varlen_graphs:
            rows = self.varlen.load(batch, size, self.block_size)
            self.varlen_graphs[size].replay()
            hidden = self.static[f"varlen{size}"]
        else:  # not captured since the last wake: run padded (the capture's warm-up), then capture
            rows = self.varlen.load(batch, size, self.block_size)
            hidden = self.model(*self.varlen.views(size))
            if size not in self._capture_failed:
                try:
                    self.varlen_graphs[size] = self._capture(f"varlen{size}", self.varlen.views(size))
                except RuntimeError as exc:  # e.g. invalidated by another engine's work on the device
                    self._capture_failed.add(size)
                    log.warning("varlen CUDA graph for %d tokens not captured (%s); eager until the next wake",
                                size, exc)
        return self.model.compute_logits(hidden[rows])

    def prepare_varlen(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        """(input_ids, positions, metadata, sampling rows) of a step run eagerly as varlen
        (views of the static inputs: valid until the next step)."""
        rows = self.varlen.load(batch, batch.num_tokens, self.block_size)
        return *self.varlen.views(batch.num_tokens), rows

    def _prepare_decode(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        """Inputs of a decode-only step too large for the decode graphs."""
        seqs = batch.decode
        pos = [s.num_tokens - 1 for s in seqs]
        width = max(len(s.block_table) for s in seqs)
        meta = AttentionMetadata(
            slot_mapping=self._tensor([cache_slot(s.block_table, p, self.block_size) for s, p in zip(seqs, pos)],
                                      torch.int64),
            decode_block_tables=self._tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs],
                                             torch.int32),
            decode_context_lens=self._tensor([s.num_tokens for s in seqs], torch.int32))
        ids = self._tensor([s.token_ids[p] for s, p in zip(seqs, pos)], torch.int64)
        return ids, self._tensor(pos, torch.int64), meta, torch.arange(len(seqs), device=self.device)

    def _tensor(self, data: list, dtype: torch.dtype) -> torch.Tensor:
        t = torch.tensor(data, dtype=dtype)
        return t.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else t

    # ---- KV cache -------------------------------------------------------

    def _block_bytes(self) -> int:
        c = self.config
        return 2 * c.num_layers * self.block_size * c.num_kv_heads * c.head_dim * self.dtype.itemsize

    def _auto_num_blocks(self, engine: EngineConfig) -> int:
        if self.device.type != "cuda":
            # CPU: room for every sequence at full length, capped at 2 GiB of cache
            return max(self.max_blocks_per_seq,
                       min(engine.max_num_seqs * self.max_blocks_per_seq, (2 << 30) // self._block_bytes()))
        peak = self._measure_peak(engine.max_num_batched_tokens)
        # A mid-size batch too, so that its kernel variants (the MoE's 128..512-token tiles)
        # JIT-compile here rather than stall the first such step under load.
        self._measure_peak(min(256, engine.max_num_batched_tokens))
        free, total = torch.cuda.mem_get_info(self.device)
        used = total - free
        activations = max(0, peak - torch.cuda.memory_allocated(self.device))
        # Eager steps need a full step's activations; the graphs' pool keeps its own for
        # good. Captured largest first (start-up) the graphs share one step's worth, but
        # after a wake they are captured in order of first use, and a capture cannot reuse
        # smaller blocks freed by earlier ones: at worst every size keeps its own
        # (activations grow about linearly with tokens), so reserve that.
        reserve = activations * (1 + sum(self.varlen_sizes) / engine.max_num_batched_tokens)
        budget = total * engine.memory_fraction - used - reserve
        blocks = int(budget // self._block_bytes()) - 1
        if blocks < self.max_blocks_per_seq:
            raise ConfigError(f"only {blocks} KV blocks fit in memory_fraction={engine.memory_fraction}; "
                              f"one sequence of max_model_len needs {self.max_blocks_per_seq}")
        return blocks

    def _measure_peak(self, num_tokens: int) -> int:
        """Peak memory of a prefill of ``num_tokens`` tokens, with a throwaway cache."""
        num_tokens = min(num_tokens, self.max_blocks_per_seq * self.block_size)
        nblocks = -(-num_tokens // self.block_size)
        self._allocate_cache(nblocks)
        torch.cuda.reset_peak_memory_stats(self.device)
        meta = AttentionMetadata(
            slot_mapping=torch.arange(num_tokens, device=self.device),
            query_start=torch.tensor([0, num_tokens], dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=self.device),
            block_tables=torch.arange(nblocks, dtype=torch.int32, device=self.device)[None])
        ids = torch.zeros(num_tokens, dtype=torch.int64, device=self.device)
        with torch.inference_mode():
            self.model.compute_logits(self.model(ids, torch.arange(num_tokens, device=self.device), meta)[-1:])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        self._allocate_cache(0)
        return peak

    def _allocate_cache(self, num_blocks: int) -> None:
        """One allocation for every layer's K and V (a single address to re-take on wake)."""
        c = self.config
        layers = self.model.attention_layers()
        for attn in layers:  # drop the old cache before taking the new one
            attn.k_cache = attn.v_cache = torch.empty(0)
        self.kv_cache = torch.zeros((len(layers), 2, num_blocks, self.block_size, c.num_kv_heads, c.head_dim),
                                    dtype=self.dtype, device=self.device)
        for attn, kv in zip(layers, self.kv_cache):
            attn.k_cache, attn.v_cache = kv[0], kv[1]  # (num_blocks, block_size, Hkv, D) each

    # ---- sleep / wake ------------------------------------------------------

    def _weights(self) -> list[torch.Tensor]:
        return list(self.model.parameters()) + list(self.model.buffers())

    def _layout(self, shapes: list[tuple[torch.Size, torch.dtype]]) -> tuple[list[int], int]:
        return packed_layout([shape.numel() * dtype.itemsize for shape, dtype in shapes])

    def _pointers(self) -> tuple[int, ...]:
        return tuple(t.data_ptr() for t in self._weights()) + (self.kv_cache.data_ptr(),)

    # Whether sleep keeps the decode graphs (and their memory pool) for a wake that finds
    # every address unchanged. Off: on the H100 and H200 the weights never came back at the
    # same addresses, so kept graphs were always re-captured and only held memory asleep.
    keep_graphs_asleep = False

    def sleep(self) -> None:
        """Weights to host memory (copied once: they never change), then every weight,
        the KV cache and (unless ``keep_graphs_asleep``) the decode graphs released."""
        if self.graphs and not self.keep_graphs_asleep:
            self.graphs.clear()
            self.varlen_graphs.clear()
            self._buckets = {}
            self.static, self.inputs = {}, None
        weights = self._weights()
        if self._host is None:
            self._shapes = [(t.shape, t.dtype) for t in weights]
            offsets, total = self._layout(self._shapes)
            self._host = pinned_buffer(total) if self.device.type == "cuda" else torch.empty(total, dtype=torch.uint8)
            for t, off in zip(weights, offsets):
                self._host[off:off + t.numel() * t.element_size()].view(t.dtype).view(t.shape).copy_(t)
        for t in weights:
            t.data = torch.empty(0, dtype=t.dtype, device=self.device)
        self._allocate_cache(0)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            # cuBLAS workspaces (32 MiB each on Hopper) live in the caching allocator and
            # pin whole segments that empty_cache could otherwise return: 488 -> 6 MiB
            # reserved on a 4-layer model (H200)
            clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
            if clear is not None:
                clear()
            torch.cuda.empty_cache()

    def wake(self) -> None:
        """Weights back as views of one device allocation (one host-to-device copy) and
        a zeroed KV cache. Kept graphs are reused when every address is the one they were
        captured against; otherwise (or when sleep dropped them) they are captured again
        (``recaptured_on_wake``)."""
        assert self._host is not None, "wake() without sleep()"
        offsets, total = self._layout(self._shapes)
        arena = torch.empty(total, dtype=torch.uint8, device=self.device)
        arena.copy_(self._host, non_blocking=True)
        for t, off, (shape, dtype) in zip(self._weights(), offsets, self._shapes):
            t.data = arena[off:off + shape.numel() * dtype.itemsize].view(dtype).view(shape)
        self._allocate_cache(self.num_blocks + 1)
        self.recaptured_on_wake = bool(self._graph_ptrs) and (not self.graphs or self._pointers() != self._graph_ptrs)
        if self.recaptured_on_wake:
            # decode graphs now; each varlen graph on its first step (a wake is on the way
            # to a first token, and most wakes soon meet few of the sizes)
            self.graphs.clear()
            self.varlen_graphs.clear()
            self._capture_failed.clear()
            self._capture_graphs(self._max_graph_bs, varlen=False)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # ---- CUDA graphs for decode ------------------------------------------

    def _capture_graphs(self, max_bs: int, varlen: bool = True) -> None:
        """Varlen graphs (unless ``varlen`` is False: then each is captured on its first
        use), largest first, then decode graphs, all in one memory pool (they never run at
        once, and each output is read before the next replay)."""
        self.inputs = DecodeInputs(max_bs, self.max_blocks_per_seq, self.num_blocks * self.block_size, self.device)
        self.static = self.inputs.views()
        sizes = [b for b in GRAPH_BATCH_SIZES if b <= max_bs]
        self._pool = None
        s = self.static
        with torch.inference_mode():
            self.varlen.reset()
            for n in reversed(self.varlen_sizes if varlen else []):
                self.model(*self.varlen.views(n))  # warm up outside the graph
                self.varlen_graphs[n] = self._capture(f"varlen{n}", self.varlen.views(n))
            for bs in reversed(sizes):
                meta = AttentionMetadata(slot_mapping=s["slots"][:bs], decode_block_tables=s["tables"][:bs],
                                         decode_context_lens=s["ctx"][:bs])
                args = (s["ids"][:bs], s["pos"][:bs], meta)
                self.model(*args)  # warm up outside the graph
                self.graphs[bs] = self._capture(f"out{bs}", args)
            torch.cuda.synchronize(self.device)
        self._buckets = {b: next(x for x in sizes if x >= b) for b in range(1, max_bs + 1)}
        self._graph_ptrs = self._pointers()
        log.info("captured CUDA graphs: decode at batch sizes %s, varlen at token counts %s",
                 sizes, sorted(self.varlen_graphs) or "(each on first use)")

    def _capture(self, name: str, args: tuple) -> torch.cuda.CUDAGraph:
        """Capture the model on ``args`` (static inputs; warmed up by the caller) in the
        shared pool, its output kept as ``self.static[name]``. Capture records; it runs
        nothing. Thread-local error mode: other threads (another engine in the process)
        may use the device meanwhile."""
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            self.static[name] = self.model(*args)
        self._pool = graph.pool()
        return graph

    def _replay(self, batch: ScheduledBatch) -> torch.Tensor:
        B = len(batch.decode)
        bucket = self._buckets[B]
        assert self.inputs is not None
        self.inputs.load(batch.decode, bucket, self.block_size)
        self.graphs[bucket].replay()
        return self.static[f"out{bucket}"][:B]


class _HostTwins:
    """Two static device buffers (int64 and int32) with page-locked host twins: a step
    fills the twins once the previous copy out of them is done, then copies them over."""

    def __init__(self, host64: torch.Tensor, host32: torch.Tensor, device: torch.device) -> None:
        pin = device.type == "cuda"
        self.device = device
        self.host64 = host64.pin_memory() if pin else host64
        self.host32 = host32.pin_memory() if pin else host32
        self.dev64, self.dev32 = self.host64.to(device), self.host32.to(device)
        self.copied: torch.cuda.Event | None = None

    def _await_copy(self) -> None:
        if self.copied is not None:
            self.copied.synchronize()

    def _push(self, len32: int) -> None:
        """Copy the int64 twin and the first ``len32`` int32 entries over, asynchronously."""
        self.dev64.copy_(self.host64, non_blocking=True)
        self.dev32[:len32].copy_(self.host32[:len32], non_blocking=True)
        if self.device.type == "cuda":
            self.copied = torch.cuda.Event()
            self.copied.record()


class DecodeInputs(_HostTwins):
    """The decode graphs' static inputs, packed into two device buffers so that a replay
    needs two host-to-device copies: int64 [ids | positions | slots] and int32
    [context lengths | block tables], each filled in a page-locked host twin.
    Padded rows (bucket > batch) read one token and write to the scratch slot."""

    def __init__(self, max_bs: int, max_blocks: int, scratch_slot: int, device: torch.device) -> None:
        self.max_bs, self.max_blocks, self.scratch = max_bs, max_blocks, scratch_slot
        host64 = torch.zeros(3, max_bs, dtype=torch.int64)
        host64[2] = scratch_slot
        host32 = torch.zeros(max_bs * (1 + max_blocks), dtype=torch.int32)
        host32[:max_bs] = 1
        super().__init__(host64, host32, device)

    def views(self) -> dict[str, torch.Tensor]:
        """Contiguous views of the device buffers (what the graphs are captured against)."""
        n = self.max_bs
        return {"ids": self.dev64[0], "pos": self.dev64[1], "slots": self.dev64[2], "ctx": self.dev32[:n],
                "tables": self.dev32[n:].view(n, self.max_blocks)}

    def fill(self, seqs: list, bucket: int, block_size: int) -> None:
        """Write the host twins for ``seqs`` padded to ``bucket`` rows."""
        B, n = len(seqs), self.max_bs
        h64 = self.host64.numpy()
        h32 = self.host32.numpy()
        tables = h32[n:].reshape(n, self.max_blocks)
        for i, q in enumerate(seqs):
            p = q.num_tokens - 1
            table = q.block_table
            h64[0, i] = q.token_ids[p]
            h64[1, i] = p
            h64[2, i] = cache_slot(table, p, block_size)
            h32[i] = q.num_tokens
            tables[i, :len(table)] = table
        h64[0, B:bucket] = 0
        h64[1, B:bucket] = 0
        h64[2, B:bucket] = self.scratch
        h32[B:bucket] = 1

    def load(self, seqs: list, bucket: int, block_size: int) -> None:
        """Fill the host twins (once the previous copy out of them is done) and copy them over."""
        self._await_copy()
        self.fill(seqs, bucket, block_size)
        self._push(self.max_bs + bucket * self.max_blocks)  # context lengths, then the bucket's table rows


class VarlenInputs(_HostTwins):
    """Inputs of a step with prefill chunks, in two static device buffers that the varlen
    graphs are captured against (and eager steps read too): int64 [ids | positions |
    slots] per token and int32 [query_start (S+1) | seq_lens (S) | block tables (S, W)],
    each filled in a page-locked host twin and copied in one transfer. Rows past the
    step's tokens (up to the graph's padded count) read token 0 and write the scratch
    slot; sequence rows past the batch have no query tokens."""

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int, scratch_slot: int,
                 device: torch.device) -> None:
        self.max_tokens, self.max_seqs, self.max_blocks, self.scratch = max_tokens, max_seqs, max_blocks, scratch_slot
        super().__init__(torch.zeros(3, max_tokens, dtype=torch.int64),
                         torch.zeros(2 * max_seqs + 1 + max_seqs * max_blocks, dtype=torch.int32), device)
        self.reset()

    def reset(self) -> None:
        """No sequences, every token row padding (what the graphs are captured with)."""
        self.host64[0:2] = 0
        self.host64[2] = self.scratch
        self.host32.zero_()
        self.dev64.copy_(self.host64)
        self.dev32.copy_(self.host32)

    def views(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """(input_ids, positions, metadata) of the first ``num_tokens`` token rows."""
        S = self.max_seqs
        meta = AttentionMetadata(slot_mapping=self.dev64[2, :num_tokens], query_start=self.dev32[:S + 1],
                                 seq_lens=self.dev32[S + 1:2 * S + 1],
                                 block_tables=self.dev32[2 * S + 1:].view(S, self.max_blocks))
        return self.dev64[0, :num_tokens], self.dev64[1, :num_tokens], meta

    def fill(self, batch: ScheduledBatch, num_rows: int, block_size: int) -> list[int]:
        """Write the host twins for ``batch`` padded to ``num_rows`` token rows; returns
        the rows that sample (every decode, and each prefill chunk that ends its prompt)."""
        seqs = len(batch.decode) + len(batch.prefill)
        if seqs > self.max_seqs or num_rows > self.max_tokens:
            raise ValueError(f"step of {seqs} sequences / {num_rows} tokens exceeds "
                             f"{self.max_seqs} / {self.max_tokens}")
        S = self.max_seqs
        h64 = self.host64.numpy()
        h32 = self.host32.numpy()
        starts, lens = h32[:S + 1], h32[S + 1:2 * S + 1]
        tables = h32[2 * S + 1:].reshape(S, self.max_blocks)
        rows: list[int] = []
        n = 0
        for i, q in enumerate(batch.decode):
            p = q.num_tokens - 1
            h64[0, n], h64[1, n], h64[2, n] = q.token_ids[p], p, cache_slot(q.block_table, p, block_size)
            starts[i], lens[i] = n, q.num_tokens
            tables[i, :len(q.block_table)] = q.block_table
            rows.append(n)
            n += 1
        for j, (q, k) in enumerate(zip(batch.prefill, batch.chunk_lens), start=len(batch.decode)):
            a, b = q.num_computed_tokens, q.num_computed_tokens + k
            table = q.block_table
            starts[j], lens[j] = n, b
            tables[j, :len(table)] = table
            positions = np.arange(a, b)
            h64[0, n:n + k] = q.token_ids[a:b]
            h64[1, n:n + k] = positions
            h64[2, n:n + k] = np.asarray(table)[positions // block_size] * block_size + positions % block_size
            n += k
            if b == q.num_tokens:
                rows.append(n - 1)
        starts[seqs:] = n
        lens[seqs:] = 0
        h64[0:2, n:num_rows] = 0
        h64[2, n:num_rows] = self.scratch
        return rows

    def load(self, batch: ScheduledBatch, num_rows: int, block_size: int) -> torch.Tensor:
        """Fill the host twins (once the previous copy out of them is done), copy them over,
        and return the sampling rows as a device tensor."""
        self._await_copy()
        rows = self.fill(batch, num_rows, block_size)
        seqs = len(batch.decode) + len(batch.prefill)
        # int64 whole (24 bytes a row: cheaper than three pieces); int32 up to the batch's table rows
        self._push(2 * self.max_seqs + 1 + seqs * self.max_blocks)
        out = torch.tensor(rows, dtype=torch.int64)
        return out.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else out
