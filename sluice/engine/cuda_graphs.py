"""CUDA graphs of the model's step, captured one at a time when the engine has time.

A decode-only step replays the graph captured at the smallest batch-size bucket that
holds it; a step with prefill chunks (varlen) the graph captured at the smallest padded
token count with room for every sequence row, since the varlen attention kernel's
launch depends on those two numbers alone. No graph is captured on the way to a first
token: until then steps run eagerly through the same static inputs. After it, a step
whose size has no graph captures it first (``ensure``: first use), and ``capture_next``
(called by the engine between steps while it has nothing to do) captures the missing
ones, decode sizes first. All graphs share one memory pool: they
never run at once, and each output is read before the next replay.
"""

from __future__ import annotations

import logging

import torch

from sluice.engine.scheduler import ScheduledBatch
from sluice.engine.step_inputs import DecodeInputs, VarlenInputs

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


def decode_graph_sizes(max_bs: int) -> list[int]:
    """The decode batch buckets up to ``max_bs`` sequences."""
    return [b for b in GRAPH_BATCH_SIZES if b <= max_bs]


class CudaGraphs:
    def __init__(self, model: torch.nn.Module, decode: DecodeInputs, varlen: VarlenInputs,
                 varlen_sizes: list[int], block_size: int) -> None:
        self.model = model
        self.block_size = block_size
        self.decode_inputs, self.varlen_inputs = decode, varlen
        self.decode_sizes = decode_graph_sizes(decode.max_bs)
        self.varlen_sizes = varlen_sizes
        self.buckets = {b: next(x for x in self.decode_sizes if x >= b) for b in range(1, decode.max_bs + 1)}
        self.decode: dict[int, torch.cuda.CUDAGraph] = {}  # bucket -> graph
        self.varlen: dict[int, torch.cuda.CUDAGraph] = {}  # padded token count -> graph
        self.outputs: dict[str, torch.Tensor] = {}  # each graph's output
        self._pool = None
        self._failed: set[tuple[str, int]] = set()

    def missing(self) -> list[tuple[str, int]]:
        """Graphs not captured yet, in the order ``capture_next`` takes them."""
        todo = [("decode", b) for b in self.decode_sizes if b not in self.decode]
        todo += [("varlen", n) for n in self.varlen_sizes if n not in self.varlen]
        return [g for g in todo if g not in self._failed]

    def capture_next(self) -> bool:
        """Capture one missing graph (between steps). False when none is missing."""
        todo = self.missing()
        if not todo:
            return False
        self.capture(*todo[0])
        return True

    def ensure(self, kind: str, size: int) -> bool:
        """Capture the graph of ``kind`` ("decode" or "varlen") and ``size`` unless it is
        captured or failed before (first use); whether it is there now."""
        if (kind, size) in self.missing():
            self.capture(kind, size)
        return size in (self.decode if kind == "decode" else self.varlen)

    def capture(self, kind: str, size: int) -> None:
        """Capture one graph, between steps: its static inputs are reset to padding first."""
        try:
            if kind == "decode":
                self.decode_inputs.reset()
                self.decode[size] = self._capture(f"decode{size}", self.decode_inputs.args(size))
            else:
                self.varlen_inputs.reset()
                self.varlen[size] = self._capture(f"varlen{size}", self.varlen_inputs.views(size))
        except RuntimeError as exc:  # e.g. invalidated by another engine's work on the device
            self._failed.add((kind, size))
            log.warning("%s CUDA graph for %d not captured (%s); eager until the next wake", kind, size, exc)
        if not self.missing():
            log.info("CUDA graphs captured: decode at batch sizes %s, varlen at token counts %s",
                     sorted(self.decode), sorted(self.varlen))

    def capture_all(self) -> None:
        while self.capture_next():
            pass

    def clear(self) -> None:
        """Drop every graph and the pool (before the weights move: sleep)."""
        self.decode.clear()
        self.varlen.clear()
        self.outputs.clear()
        self._failed.clear()
        self._pool = None

    def run_decode(self, batch: ScheduledBatch, next_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (B, D) of a decode-only step of at most max_bs sequences: its
        bucket's graph replayed, or the model run eagerly on the bucket's inputs.
        ``next_ids``: DecodeInputs.load's (a step launched ahead of the last one's tokens)."""
        B = len(batch.decode)
        bucket = self.buckets[B]
        self.decode_inputs.load(batch.decode, bucket, self.block_size, next_ids)
        graph = self.decode.get(bucket)
        if graph is None:
            return self.model(*self.decode_inputs.args(bucket))[:B]
        graph.replay()
        return self.outputs[f"decode{bucket}"][:B]

    def replay_varlen(self, size: int) -> torch.Tensor:
        """The hidden states of the (captured) varlen graph of ``size`` tokens replayed on
        the loaded inputs."""
        self.varlen[size].replay()
        return self.outputs[f"varlen{size}"]

    def _capture(self, name: str, args: tuple) -> torch.cuda.CUDAGraph:
        """Warm the model up on ``args`` (static inputs), then capture it in the shared pool.
        Thread-local error mode: other threads (another engine in the process, the weight
        parking copy) may use the device meanwhile."""
        with torch.inference_mode():
            self.model(*args)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                self.outputs[name] = self.model(*args)
        self._pool = graph.pool()
        return graph
