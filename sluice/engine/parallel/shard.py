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
same logits and samples the same tokens. FP8 layers of a pre-quantized checkpoint are
cut with their per-output-channel scales (rows take theirs; columns keep them all).
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
from sluice.engine.quant.fp8 import Fp8FusedExperts, Fp8Linear

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
        raise ConfigError(f"parallel engines shard Linear, Fp8Linear and (FP8) experts; {name} is "
                          f"{type(module).__name__}")


def _rows(m: nn.Module, parts: list[slice], shard_sizes: tuple[int, ...], name: str) -> nn.Module:
    """``m``'s output rows ``parts``, in order (an FP8 layer's per-channel scales with them)."""
    if isinstance(m, Fp8Linear):
        return Fp8Linear(torch.cat([m.weight[p] for p in parts]), torch.cat([m.weight_scale[p] for p in parts]),
                         input_scale=m.input_scale, out_dtype=m.out_dtype)
    _plain(m, name)
    return _linear(torch.cat([m.weight[p] for p in parts]), shard_sizes)


def _cols(m: nn.Module, cols: slice, name: str) -> nn.Module:
    """``m``'s input columns ``cols`` (per-output-channel scales hold for any columns: the
    ranks' partial sums add up to one GPU's output, scale for scale)."""
    if isinstance(m, Fp8Linear):
        return Fp8Linear(m.weight[:, cols], m.weight_scale, input_scale=m.input_scale, out_dtype=m.out_dtype)
    _plain(m, name)
    return _linear(m.weight[:, cols])


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
        t, dh = self.group.world, attn.dh
        q, kv, _ = attn.split  # qkv_proj rows: q rows, k rows, v rows
        qs, kvs = self._span(q), self._span(kv)
        attn.hq, attn.hkv = attn.hq // t, attn.hkv // t
        attn.split = (attn.hq * dh, attn.hkv * dh, attn.hkv * dh)
        rows = [qs, slice(q + kvs.start, q + kvs.stop), slice(q + kv + kvs.start, q + kv + kvs.stop)]
        attn.qkv_proj = _rows(attn.qkv_proj, rows, attn.split, "qkv_proj")
        attn.o_proj = RowParallel(_cols(attn.o_proj, qs, "o_proj"), self.group)  # (D, Hq/t Dh)
        attn.attn.num_heads, attn.attn.num_kv_heads = attn.hq, attn.hkv

    def _experts(self, moe: MoE) -> None:
        full = moe.experts
        if not isinstance(full, Fp8FusedExperts):
            _plain(full, "experts")
        inter = full.w13.shape[1] // 2  # I
        w13, w2 = full.w13, full.w2  # (E, 2I, D), (E, D, I)
        s13, s2 = (full.w13_scale, full.w2_scale) if isinstance(full, Fp8FusedExperts) else (None, None)
        if self.mode == "ep":
            mine = slice(self.group.rank, None, self.group.world)
            w13, w2 = w13[mine], w2[mine]
            s13, s2 = (s13[mine], s2[mine]) if s13 is not None else (None, None)
        else:
            s = self._span(inter)
            rows = [s, slice(inter + s.start, inter + s.stop)]
            w13, w2 = torch.cat([w13[:, r] for r in rows], dim=1), w2[:, :, s]  # (E, 2I/t, D), (E, D, I/t)
            if s13 is not None:  # per-channel scales: w13's follow its rows, w2's hold for any columns
                s13 = torch.cat([s13[:, r] for r in rows], dim=1)
        if s13 is not None:
            local: nn.Module = Fp8FusedExperts(w13, s13, w2, s2)
        else:
            with torch.device("meta"):
                local = Experts(w13.shape[2], w2.shape[2], w13.shape[0], full.top_k)
            local.w13 = nn.Parameter(w13.contiguous(), requires_grad=False)
            local.w2 = nn.Parameter(w2.contiguous(), requires_grad=False)
        moe.experts = ParallelExperts(local, self.group, expert_parallel=self.mode == "ep")

    def _dense(self, mlp: DenseMLP) -> None:
        inter = mlp.gate_up_proj.weight.shape[0] // 2  # gate rows, then up rows
        s = self._span(inter)
        n = s.stop - s.start
        mlp.gate_up_proj = _rows(mlp.gate_up_proj, [s, slice(inter + s.start, inter + s.stop)], (n, n),
                                 "gate_up_proj")
        mlp.down_proj = RowParallel(_cols(mlp.down_proj, s, "down_proj"), self.group)
