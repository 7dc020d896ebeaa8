"""Linear layers: plain ``nn.Linear`` (``.weight`` [out, in], no bias) so a quantizer
can swap them module by module (gpt-fast style) without touching the model file.

Packed projections (qkv, gate_up) record their shard sizes so the loader can place
each checkpoint tensor in its rows.
"""

from __future__ import annotations

from torch import nn


class Linear(nn.Linear):
    """y = x W^T, no bias (no bias anywhere in this model family)."""

    def __init__(self, in_features: int, out_features: int, shard_sizes: tuple[int, ...] | None = None) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.weight.requires_grad_(False)
        self.shard_sizes = shard_sizes or (out_features,)  # rows per packed checkpoint tensor

    def reset_parameters(self) -> None:
        """Weights come from a checkpoint or random draws; skip the costly default init."""

    def shard_rows(self, shard: int) -> slice:
        start = sum(self.shard_sizes[:shard])
        return slice(start, start + self.shard_sizes[shard])
