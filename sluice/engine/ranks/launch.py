"""A parallel engine started from one process: rank 0 in this process behind a
``Leader``, every other rank a spawned process that follows it (a gateway worker's
shape: requests reach rank 0 only). ``Leader.close`` ends them all.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sluice.engine.config import EngineConfig
from sluice.engine.parallel.group import destroy
from sluice.engine.ranks.mirror import Leader, follow

RENDEZVOUS_TIMEOUT = timedelta(minutes=10)  # every rank loads its shard before the first collective


def launch(model: str | Path, options: dict[str, Any]) -> Leader:
    """Rank 0 of an engine over ``options["world_size"]`` ranks on this host (ranks
    1.. spawned here); ``options`` are EngineConfig fields, as for ``LLM``."""
    from sluice.engine.llm import LLM

    world = int(options.get("world_size", 1))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    followers = [ctx.Process(target=_follower, args=(rank, world, port, str(model), options), daemon=True,
                             name=f"engine-rank-{rank}") for rank in range(1, world)]
    for p in followers:
        p.start()
    try:
        _rendezvous(0, world, port, options)
        return Leader(LLM(model, progress=False, **options), followers)
    except BaseException:
        for p in followers:
            p.kill()
        destroy()
        raise


def _rendezvous(rank: int, world: int, port: int, options: dict[str, Any]) -> None:
    cuda = EngineConfig(**options).resolve_device().type == "cuda"
    if cuda:
        torch.cuda.set_device(rank)  # one GPU a rank, in order (a data-parallel pool's TP groups: not yet)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=RENDEZVOUS_TIMEOUT)


def _follower(rank: int, world: int, port: int, model: str, options: dict[str, Any]) -> None:
    """A spawned rank's whole life. It ends with ``os._exit``: once the process group is
    destroyed only the interpreter's teardown is left, and there gloo's threads can abort
    the process ("terminate called without an active exception", seen under a loaded
    test run), turning a clean close into a SIGABRT exit code."""
    from sluice.engine.llm import LLM

    code = 1
    try:
        _rendezvous(rank, world, port, options)
        follow(LLM(model, progress=False, **options))
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            destroy()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
