"""Read a checkpoint's tensors into page-locked host memory, one decoder layer ahead.

A cold start from page-cached safetensors is bound by three copies: page cache ->
process memory, process memory -> page-locked staging, staging -> GPU. ``LayerStager``
does the first two as one: worker threads ``preadv`` each tensor's bytes straight from
the shard file into a page-locked buffer (the reads release the GIL and run in
parallel), while the GPU copies the previous layer out of the other buffer. Two
buffers, each the size of the largest layer, are reused for the whole load; a CUDA
event per buffer keeps a buffer from being refilled before its copies have finished.

Tensor offsets come from the safetensors header (8-byte little-endian length, then a
JSON object of ``{name: {dtype, shape, data_offsets}}``; data follows the header).
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import struct
import weakref
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from sluice.engine.errors import CheckpointError

log = logging.getLogger(__name__)

DTYPES = {
    "F8_E4M3": torch.float8_e4m3fn, "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
    "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
CHUNK = 8 << 20  # bytes per read: big tensors are split across threads (8 MB read fastest on an H200 host)
ALIGN = 256
PAGE = 4096


@dataclass(frozen=True)
class Extent:
    """Where one tensor's bytes lie in its shard file."""

    file: Path
    start: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def read_header(path: Path) -> dict[str, Extent]:
    """name -> Extent for every tensor of one safetensors file."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors header ({exc})") from None
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{path.name}: tensor {name} has unsupported dtype {info['dtype']}")
        out[name] = Extent(path, 8 + n + begin, end - begin, dtype, tuple(info["shape"]))
    return out


def packed_layout(sizes: list[int], align: int = ALIGN) -> tuple[list[int], int]:
    """Byte offsets of buffers of ``sizes`` packed back to back, each start ``align``ed,
    and the total they take."""
    offsets, total = [], 0
    for size in sizes:
        offsets.append(total)
        total += -(-size // align) * align
    return offsets, total


def pinned_buffer(nbytes: int) -> torch.Tensor:
    """Host bytes page-locked with cudaHostRegister for full-speed copies (torch's pinned
    allocator would round a 47 GB request up to 64 GB). Pageable where that fails.
    The bytes are anonymous memory advised to use huge pages and faulted in by 8 threads
    before they are registered: 19.1 GB/s on the H200 host against 3.6 GB/s for
    registering malloc'd memory, which leaves every fault to cudaHostRegister
    (bench/pinning.py, docs/performance.md). ``SLUICE_PINNING=register`` does the latter;
    ``mmap:N`` sets the threads."""
    cuda = torch.cuda.is_available()
    method, _, threads = os.environ.get("SLUICE_PINNING", "mmap:8" if cuda else "register").partition(":")
    if method == "mmap" and nbytes:
        host = _mapped(nbytes, int(threads or 8))
    else:
        host = torch.empty(nbytes, dtype=torch.uint8)
    if nbytes and torch.cuda.is_available():
        cudart = torch.cuda.cudart()
        err = cudart.cudaHostRegister(host.data_ptr(), nbytes, 0)
        if int(err) != 0:
            log.warning("cudaHostRegister failed (%s): host buffer stays pageable", err)
        else:
            weakref.finalize(host, cudart.cudaHostUnregister, host.data_ptr())
    return host


def _mapped(nbytes: int, threads: int) -> torch.Tensor:
    """Zeroed anonymous memory on transparent huge pages where the kernel allows, every
    page faulted in by ``threads`` threads (unmapped once the tensor and its views are gone)."""
    mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        mm.madvise(mmap.MADV_HUGEPAGE)
    host = torch.frombuffer(mm, dtype=torch.uint8)  # holds mm
    step = -(-nbytes // max(1, threads) // PAGE) * PAGE
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="pin") as pool:  # torch writes without the GIL
        list(pool.map(lambda start: host[start:start + step:PAGE].zero_(), range(0, nbytes, step)))
    return host


class LayerStager:
    """Stage groups of tensors (one group per decoder layer) in page-locked memory, the
    next group read while the caller copies the current one to the GPU.

        stager = LayerStager(extents, [names_of_layer_0, names_of_layer_1, ...])
        for n in range(len(groups)):
            tensors = stager.take(n)     # name -> pinned CPU tensor
            ...copy them to the GPU (non_blocking is safe)...
            stager.release(n)            # the buffer may be refilled once those copies end
        stager.close()
    """

    def __init__(self, extents: dict[str, Extent], groups: Sequence[Sequence[str]], threads: int | None = None) -> None:
        self.extents = extents
        self.groups = [list(g) for g in groups]
        size = max((self._layout(g)[1] for g in self.groups), default=0)
        self.buffers = [pinned_buffer(size), pinned_buffer(size)]
        self.events: list[torch.cuda.Event | None] = [None, None]
        self.pool = ThreadPoolExecutor(max(2, threads or min(16, os.cpu_count() or 4)), thread_name_prefix="stage")
        self.fds: dict[Path, int] = {}
        self.pending: dict[int, Future[dict[str, torch.Tensor]]] = {}
        self.bytes_read = 0
        if self.groups:
            self.pending[0] = self.pool.submit(self._fill, 0)

    def _layout(self, names: list[str]) -> tuple[list[int], int]:
        return packed_layout([self.extents[name].nbytes for name in names])

    def _fd(self, path: Path) -> int:
        if path not in self.fds:
            self.fds[path] = os.open(path, os.O_RDONLY)
        return self.fds[path]

    def _read(self, fd: int, view: memoryview, offset: int, path: Path) -> None:
        done = 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise CheckpointError(f"{path.name}: file ends before the tensor data does")
            done += got

    def _fill(self, n: int) -> dict[str, torch.Tensor]:
        slot = n % 2
        event = self.events[slot]
        if event is not None:
            event.synchronize()  # the GPU has finished copying the group that used this buffer
        buf = self.buffers[slot]
        raw = memoryview(buf.numpy())
        names = self.groups[n]
        offsets, _ = self._layout(names)
        reads = []
        for name, off in zip(names, offsets):
            e = self.extents[name]
            fd = self._fd(e.file)
            for c in range(0, e.nbytes, CHUNK):
                size = min(CHUNK, e.nbytes - c)
                reads.append(self.pool.submit(self._read, fd, raw[off + c: off + c + size], e.start + c, e.file))
        for r in reads:
            r.result()
        self.bytes_read += sum(self.extents[name].nbytes for name in names)
        return {name: buf[off:off + self.extents[name].nbytes].view(self.extents[name].dtype)
                .view(self.extents[name].shape) for name, off in zip(names, offsets)}

    def take(self, n: int) -> dict[str, torch.Tensor]:
        """Group ``n``'s tensors (waits for their reads); starts reading group ``n + 1``."""
        staged = self.pending.pop(n).result()
        if n + 1 < len(self.groups):
            # the reads of n + 1 wait (in a worker) for the GPU to finish with its buffer
            self.pending[n + 1] = self.pool.submit(self._fill, n + 1)
        return staged

    def release(self, n: int) -> None:
        """The caller has queued every copy out of group ``n``'s buffer."""
        if torch.cuda.is_available():
            event = torch.cuda.Event()
            event.record()
            self.events[n % 2] = event

    def close(self) -> None:
        for future in self.pending.values():
            future.cancel()
        self.pool.shutdown(wait=True)
        for event in self.events:  # the last copies out of the buffers end before they can be freed
            if event is not None:
                event.synchronize()
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
