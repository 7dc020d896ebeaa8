"""Shard a model across ranks by swapping modules (the model file stays untouched, as
with quantization), one decoder layer at a time as the loader builds them.

Legend: t ranks, r this rank, D hidden, Hq/Hkv query/KV heads, Dh head dim, I
intermediate, E experts.

- Attention (both modes): rank r keeps query heads [r Hq/t, (r+1) Hq/t) and the KV
  heads they read, so its qkv_proj is a column slice and its KV cache holds Hkv/t
  heads; o_proj keeps the matching input columns and sums its partial output over
  ranks (RowParallel).
- "tp": every expert's w1/w3 keep rows [r I/t, (r+1) I/t) and w2 the same columns;
  the experts' partial outputs are summed over ranks. Dense MLPs split the same way.
- "ep": rank r keeps whole experts e with e % t == r. Routing stays global (the
  router is replicated); a token's slots that chose another rank's expert get weight
  zero here, and the sum over ranks adds each expert's share once. Dense models have
  no experts: their MLP is split as under "tp".

Embeddings, norms, the router and lm_head are replicated, so every rank computes the
same logits and samples the same tokens.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from sluice.engine.config import ModelConfig
from sluice.engine.errors import ConfigError
from sluice.engine.layers.linear import Linear
from sluice.engine.layers.moe import Experts, MoE
from sluice.engine.models.mixtral import CausalLM, DecoderLayer, DenseMLP, SelfAttention
from sluice.engine.parallel.group import Group, join as join_group

MODES = ("none", "tp", "ep")
Index = tuple[slice, ...]  # a part of a checkpoint tensor


class RowParallel(nn.Module):
    """A linear layer whose input features are split across ranks: this rank's partial
    product, summed over ranks. Holds a plain ``linear`` that a quantizer may swap."""

    def __init__(self, linear: nn.Module, group: Group) -> None:
        super().__init__()
        self.linear, self.group = linear, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce(self.linear(x))


class ParallelExperts(nn.Module):
    """This rank's ``experts`` (an ``Experts`` a quantizer may swap), summed over ranks.
    With ``expert_parallel`` they are whole experts e % t == r, renumbered e // t."""

    def __init__(self, experts: nn.Module, group: Group, expert_parallel: bool) -> None:
        super().__init__()
        self.experts, self.group, self.expert_parallel = experts, group, expert_parallel

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """x (N, D), topk_weights (N, K) fp32, topk_ids (N, K) global ids -> (N, D)."""
        if self.expert_parallel:  # tensor ops only: no host sync, graph-capturable
            mine = topk_ids % self.group.world == self.group.rank  # (N, K)
            topk_weights = torch.where(mine, topk_weights, 0.0)
            # another rank's slot runs local expert 0 at weight 0: correct, not free (see docs/parallel.md)
            topk_ids = torch.where(mine, topk_ids // self.group.world, 0)
        return self.group.all_reduce(self.experts(x, topk_weights, topk_ids))


def _linear(weight: torch.Tensor, shard_sizes: tuple[int, ...] | None = None) -> Linear:
    """A Linear holding ``weight`` (out, in) as its own contiguous tensor."""
    with torch.device("meta"):
        lin = Linear(weight.shape[1], weight.shape[0], shard_sizes)
    lin.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    return lin


def _plain(module: nn.Module, name: str) -> None:
    if type(module) not in (Linear, Experts):
        raise ConfigError(f"parallel engines shard 16-bit weights; {name} is {type(module).__name__} "
                          "(pre-quantized FP8 checkpoints are not sharded yet: load in 16 bits with dtype='fp8')")


@dataclass(frozen=True)
class Sharding:
    """How this rank cuts each decoder layer; ``mode`` "none" (or world 1) leaves them whole."""

    mode: str = "none"
    group: Group = Group()

    @classmethod
    def join(cls, mode: str, world_size: int, device: torch.device, model: ModelConfig) -> Sharding:
        """This process's sharding of ``model`` (joining the process group when world_size > 1)."""
        if mode not in MODES:
            raise ConfigError(f"parallel must be one of {', '.join(MODES)}, got {mode!r}")
        if (mode == "none") != (world_size == 1):
            raise ConfigError(f"parallel={mode!r} with world_size={world_size}: "
                              "'tp'/'ep' need world_size >= 2, 'none' needs 1")
        sharding = cls(mode, Group(0, world_size))
        sharding.check(model)  # before any rank waits for the others
        return cls(mode, join_group(world_size, device))

    @property
    def active(self) -> bool:
        return self.group.world > 1

    def layer(self, layer: DecoderLayer) -> None:
        """Cut ``layer`` down to this rank's shard, in place: a loaded layer's weights, or
        an empty layer's shapes before ``read`` fills it."""
        if not self.active:
            return
        self._attention(layer.self_attn)
        if isinstance(layer.mlp, MoE):
            self._experts(layer.mlp)
        elif isinstance(layer.mlp, DenseMLP):
            self._dense(layer.mlp)

    def finish(self, model: CausalLM) -> None:
        """The model's config as this rank sees it: Hq/t query and Hkv/t KV heads (what
        the KV cache is sized by)."""
        if self.active:
            c, t = model.config, self.group.world
            model.config = replace(c, num_heads=c.num_heads // t, num_kv_heads=c.num_kv_heads // t)

    def check(self, model: ModelConfig) -> None:
        """Fail before loading when the model does not divide across the ranks."""
        t = self.group.world
        if not self.active:
            return
        num_heads, num_kv_heads = model.num_heads, model.num_kv_heads
        intermediate_size, num_experts = model.intermediate_size, model.num_experts
        if num_kv_heads % t or num_heads % t:
            raise ConfigError(f"{num_heads} query / {num_kv_heads} KV heads do not split across {t} ranks")
        if (self.mode == "tp" or not num_experts) and intermediate_size % t:
            raise ConfigError(f"intermediate_size {intermediate_size} does not split across {t} ranks")
        if self.mode == "ep" and num_experts and num_experts < t:
            raise ConfigError(f"{num_experts} experts cannot be placed on {t} ranks")

    def read(self, layer: DecoderLayer, rest: str, get: Callable[[Index | None], torch.Tensor]) -> None:
        """Fill ``layer``, already cut to this rank's shapes, from checkpoint tensor ``rest``
        (its name inside the layer) reading only this rank's part: ``get(index)`` reads
        that part of it (None: all of it). Another rank's expert is not read at all."""
        r, t, attn, mlp = self.group.rank, self.group.world, layer.self_attn, layer.mlp

        def span(n: int) -> slice:  # this rank's n of the checkpoint's t * n
            return slice(r * n, (r + 1) * n)

        if rest[:10] == "self_attn." and rest[10] in "qkv":
            rows = attn.qkv_proj.shard_rows("qkv".index(rest[10]))
            attn.qkv_proj.weight[rows].copy_(get((span(rows.stop - rows.start),)))
        elif rest == "self_attn.o_proj.weight":
            w = attn.o_proj.linear.weight  # (D, Hq/t Dh)
            w.copy_(get((slice(None), span(w.shape[1]))))
        elif m := re.fullmatch(r"block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight", rest):
            e, experts = int(m.group(1)), mlp.experts.experts
            inter = experts.w2.shape[2]  # this rank's I
            part = span(inter)
            if self.mode == "ep":
                if e % t != r:
                    return
                e, part = e // t, slice(None)
            if m.group(2) == "w2":
                experts.w2[e].copy_(get((slice(None), part)))
            else:  # w13: w1 rows, then w3 rows
                dest = experts.w13[e, :inter] if m.group(2) == "w1" else experts.w13[e, inter:]
                dest.copy_(get((part,)))
        elif rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
            rows = mlp.gate_up_proj.shard_rows(int(rest == "mlp.up_proj.weight"))
            mlp.gate_up_proj.weight[rows].copy_(get((span(rows.stop - rows.start),)))
        elif rest == "mlp.down_proj.weight":
            w = mlp.down_proj.linear.weight  # (D, I/t)
            w.copy_(get((slice(None), span(w.shape[1]))))
        else:  # norms and the router: every rank holds them whole
            path = rest.replace("block_sparse_moe.", "mlp.").removesuffix(".weight")
            layer.get_submodule(path).weight.copy_(get(None))

    def _span(self, total: int) -> slice:
        n = total // self.group.world
        return slice(self.group.rank * n, (self.group.rank + 1) * n)

    def _attention(self, attn: SelfAttention) -> None:
        _plain(attn.qkv_proj, "qkv_proj")
        _plain(attn.o_proj, "o_proj")
        t, dh = self.group.world, attn.dh
        q, kv, _ = attn.split
        w = attn.qkv_proj.weight  # (q + 2 kv, D): q rows, k rows, v rows
        qs, kvs = self._span(q), self._span(kv)
        parts = (w[qs], w[q + kvs.start:q + kvs.stop], w[q + kv + kvs.start:q + kv + kvs.stop])
        attn.hq, attn.hkv = attn.hq // t, attn.hkv // t
        attn.split = (attn.hq * dh, attn.hkv * dh, attn.hkv * dh)
        attn.qkv_proj = _linear(torch.cat(parts), attn.split)
        attn.o_proj = RowParallel(_linear(attn.o_proj.weight[:, qs]), self.group)  # (D, Hq/t Dh)
        attn.attn.num_heads, attn.attn.num_kv_heads = attn.hq, attn.hkv

    def _experts(self, moe: MoE) -> None:
        full = moe.experts
        _plain(full, "experts")
        assert isinstance(full, Experts)
        _, two_i, D = full.w13.shape
        inter = two_i // 2  # I
        if self.mode == "ep":
            w13, w2 = full.w13[self.group.rank::self.group.world], full.w2[self.group.rank::self.group.world]
            inter_local = inter
        else:
            s = self._span(inter)
            w13 = torch.cat([full.w13[:, s], full.w13[:, inter + s.start:inter + s.stop]], dim=1)  # (E, 2I/t, D)
            w2, inter_local = full.w2[:, :, s], s.stop - s.start  # (E, D, I/t)
        with torch.device("meta"):
            local = Experts(D, inter_local, w13.shape[0], full.top_k)
        local.w13 = nn.Parameter(w13.contiguous(), requires_grad=False)
        local.w2 = nn.Parameter(w2.contiguous(), requires_grad=False)
        moe.experts = ParallelExperts(local, self.group, expert_parallel=self.mode == "ep")

    def _dense(self, mlp: DenseMLP) -> None:
        _plain(mlp.gate_up_proj, "gate_up_proj")
        _plain(mlp.down_proj, "down_proj")
        w = mlp.gate_up_proj.weight  # (2I, D): gate rows, then up rows
        inter = w.shape[0] // 2
        s = self._span(inter)
        n = s.stop - s.start
        mlp.gate_up_proj = _linear(torch.cat([w[s], w[inter + s.start:inter + s.stop]]), (n, n))
        mlp.down_proj = RowParallel(_linear(mlp.down_proj.weight[:, s]), self.group)
