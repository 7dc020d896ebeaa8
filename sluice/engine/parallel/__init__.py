"""Tensor and expert parallelism over torch.distributed: one process per rank, each
running the same engine on the same requests with its shard of the weights. Serving such
an engine from one process (rank 0 leading) is sluice.engine.ranks."""

from sluice.engine.parallel.group import Group, agree_min, destroy, join
from sluice.engine.parallel.shard import Sharding

__all__ = ["Group", "Sharding", "agree_min", "destroy", "join"]
