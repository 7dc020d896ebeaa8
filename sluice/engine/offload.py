"""Where the weights wait while the engine sleeps, so that going to sleep is only
freeing device memory.

The slow part of parking a model in host memory is taking the memory (allocating and
page-locking ~47 GB took 25-32 s on an H200 host), not the copy. So the copy is made
once, in a background thread, while the engine serves: the weights never change, and
the thread copies them chunk by chunk into page-locked host buffers on its own CUDA
stream. A sleep then frees the device memory at once, and a wake copies the chunks back
into one device allocation. A sleep that comes before the copy is complete stops it
and frees the memory all the same; that wake copies back what was parked and reads
only the rest from the checkpoint (``reload`` inside loader.reading_only; its pages are
normally still in the page cache). Weights are parked in the order of the model:
embeddings, decoder layer 0, 1, ..., then the rest, so what a cut-short copy holds is
whole layers but for the last one it reached.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

import torch
from torch import nn

from sluice.engine.loader import reading_only
from sluice.engine.staging import packed_layout, pinned_buffer

log = logging.getLogger(__name__)

CHUNK = 1 << 30  # bytes of host memory taken at a time: how long a sleep may wait for the thread


def _part(name: str) -> str:
    """The module a weight belongs to, as load_model's ``parts`` names it: ``layers.N``
    for a decoder layer's, else the top-level module (``embed_tokens``, ``lm_head``, ...)."""
    head, _, rest = name.partition(".")
    return f"{head}.{rest.partition('.')[0]}" if head == "layers" else head


def _order(name: str) -> int:
    part = _part(name)
    return -1 if part == "embed_tokens" else int(part[7:]) if part.startswith("layers.") else 1 << 30


def _weights(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer by name: embeddings, each decoder layer's, then the rest."""
    return sorted([*model.named_parameters(), *model.named_buffers()], key=lambda item: _order(item[0]))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class WeightParking:
    def __init__(self, model: nn.Module, reload: Callable[[], nn.Module]) -> None:
        self.model = model
        self.reload = reload  # builds the model again from its checkpoint (load_model)
        self.device = next(model.parameters()).device
        self._chunks: list[tuple[torch.Tensor, list[int], list[int]]] = []  # (host bytes, tensor ids, offsets)
        self._shapes: list[tuple[torch.Size, torch.dtype]] = []
        self._thread: threading.Thread | None = None
        self._cancel = threading.Event()
        self.complete = False  # every weight has its host copy
        self.released = False
        self.timings: dict[str, float] = {}  # park_s, release_s, restore_s, restore_{host,checkpoint}_bytes

    # ---- parking -------------------------------------------------------------

    def park_in_background(self) -> None:
        """Start the host copy in a thread (a no-op when done, running or asleep)."""
        if self.complete or self.released or (self._thread is not None and self._thread.is_alive()):
            return
        self._cancel.clear()
        self._thread = threading.Thread(target=self.park, name="engine-weight-parking", daemon=True)
        self._thread.start()

    def park(self) -> None:
        """Copy every weight into host memory, CHUNK bytes at a time (stops early when
        a sleep cancels it; the next call goes on from there)."""
        began = time.perf_counter()
        weights = [t for _, t in _weights(self.model)]
        cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if cuda else None
        if stream is not None:
            stream.wait_stream(torch.cuda.default_stream(self.device))
        done = {i for _, ids, _ in self._chunks for i in ids}
        for ids in self._groups([i for i in range(len(weights)) if i not in done], weights):
            if self._cancel.is_set():
                return
            offsets, total = packed_layout([_nbytes(weights[i]) for i in ids])
            host = pinned_buffer(total) if cuda else torch.empty(total, dtype=torch.uint8)
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                for i, off in zip(ids, offsets):
                    t = weights[i]
                    host[off:off + _nbytes(t)].view(t.dtype).view(t.shape).copy_(t, non_blocking=cuda)
            if stream is not None:
                stream.synchronize()
            self._chunks.append((host, ids, offsets))
        self.complete = True
        self.timings["park_s"] = self.timings.get("park_s", 0.0) + time.perf_counter() - began
        log.info("weights parked in host memory (%.1f GB) in %.1fs", sum(c[0].numel() for c in self._chunks) / 1e9,
                 self.timings["park_s"])

    @staticmethod
    def _groups(ids: list[int], weights: list[torch.Tensor]) -> list[list[int]]:
        groups: list[list[int]] = [[]]
        size = 0
        for i in ids:
            if groups[-1] and size + _nbytes(weights[i]) > CHUNK:
                groups.append([])
                size = 0
            groups[-1].append(i)
            size += _nbytes(weights[i])
        return [g for g in groups if g]

    # ---- sleep and wake ------------------------------------------------------

    def release(self) -> None:
        """Free every weight's device memory (the parking thread, if running, stops after
        its current chunk)."""
        began = time.perf_counter()
        self._cancel.set()
        if self._thread is not None:
            self._thread.join()
        weights = [t for _, t in _weights(self.model)]
        self._shapes = [(t.shape, t.dtype) for t in weights]
        for t in weights:
            t.data = torch.empty(0, dtype=t.dtype, device=self.device)
        self.released = True
        self.timings["release_s"] = time.perf_counter() - began

    def restore(self) -> str:
        """Weights back on the device; returns where from: "host" (the parked copy, one
        device allocation), "checkpoint" (nothing was parked) or "host+checkpoint" (the
        parked weights from host, the modules holding the others read again)."""
        began = time.perf_counter()
        weights = _weights(self.model)
        parked = {i for _, ids, _ in self._chunks for i in ids}
        missing = [i for i in range(len(weights)) if i not in parked]
        cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if cuda and self._chunks else None
        arena = torch.empty(sum(c[0].numel() for c in self._chunks), dtype=torch.uint8, device=self.device)
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self.device))
        # its own stream: these copies run while the checkpoint's reads below go on
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            base = 0
            for host, ids, offsets in self._chunks:
                arena[base:base + host.numel()].copy_(host, non_blocking=True)
                for i, off in zip(ids, offsets):
                    shape, dtype = self._shapes[i]
                    start = base + off
                    weights[i][1].data = arena[start:start + shape.numel() * dtype.itemsize].view(dtype).view(shape)
                base += host.numel()
        read = 0
        if missing:
            with reading_only({_part(weights[i][0]) for i in missing}):
                fresh = dict(_weights(self.reload()))
            for i in missing:
                name, t = weights[i]
                new = fresh[name]
                if (new.shape, new.dtype) != self._shapes[i]:
                    raise RuntimeError(f"reloaded {name} is {new.dtype} {list(new.shape)}, not as before the sleep")
                t.data = new.data
                read += _nbytes(new)
        if cuda:
            torch.cuda.synchronize(self.device)
        self.released = False
        self._cancel.clear()
        self.timings["restore_s"] = time.perf_counter() - began
        self.timings["restore_host_bytes"] = float(arena.numel())
        self.timings["restore_checkpoint_bytes"] = float(read)
        return "checkpoint" if not parked else "host+checkpoint" if missing else "host"
