"""Tensor and expert parallelism over torch.distributed: one process per rank, each
running the same engine on the same requests with its shard of the weights."""

from sluice.engine.parallel.group import Group, agree_min, destroy, join
from sluice.engine.parallel.launch import launch
from sluice.engine.parallel.mirror import Leader, follow
from sluice.engine.parallel.shard import Sharding

__all__ = ["Group", "Leader", "Sharding", "agree_min", "destroy", "follow", "join", "launch"]
