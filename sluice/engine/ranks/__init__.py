"""Serving a parallel engine: rank 0 leads (the gateway's process), the other ranks follow
every state-changing call it makes. Built on sluice.engine.llm and sluice.engine.parallel
(which shards the model), so it sits beside them, not inside parallel/."""

from sluice.engine.ranks.launch import launch
from sluice.engine.ranks.mirror import Leader, follow

__all__ = ["Leader", "follow", "launch"]
