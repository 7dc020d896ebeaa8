"""Load Hugging Face checkpoints (config.json + safetensors, single or sharded).

Tensors are memory-mapped with ``safe_open`` and copied one at a time into the
model's parameters: q/k/v into qkv_proj, gate/up into gate_up_proj and each
expert's w1/w3/w2 into the stacked w13/w2. The model is built one decoder layer at
a time so FP8 quantization on load never holds the whole 16-bit model. Pre-quantized
FP8 checkpoints (e4m3 ``weight`` + ``weight_scale``, optional ``input_scale``) are
read as stored. Every problem is a one-line CheckpointError naming the file or tensor.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import re
import time
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm import tqdm

from sluice.engine.config import ModelConfig
from sluice.engine.errors import CheckpointError
from sluice.engine.layers.moe import MoE
from sluice.engine.models.mixtral import CausalLM
from sluice.engine.parallel.shard import Sharding
from sluice.engine.quant.fp8 import (
    Fp8FusedExperts,
    Fp8Linear,
    channel_scale,
    install_fp8_experts,
    quantize_fp8,
)
from sluice.engine.staging import LayerStager, read_header

IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
_PARTS: contextvars.ContextVar[Collection[str] | None] = contextvars.ContextVar("load_parts", default=None)


@contextlib.contextmanager
def reading_only(parts: Collection[str]) -> Iterator[None]:
    """``load_model`` calls inside the block load only ``parts`` (see its ``parts``): how a
    wake asks a reload callable that takes no arguments for part of the model."""
    token = _PARTS.set(parts)
    try:
        yield
    finally:
        _PARTS.reset(token)


def expected_tensors(cfg: ModelConfig, layers: list[int] | None = None) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, for every tensor a checkpoint of ``cfg`` must hold
    (of the given decoder layers only, plus the top-level tensors, when ``layers`` is set)."""
    D, I, Dh = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, D), "model.norm.weight": (D,)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, D)
    for n in range(cfg.num_layers) if layers is None else layers:
        p = f"model.layers.{n}."
        out[p + "input_layernorm.weight"] = (D,)
        out[p + "post_attention_layernorm.weight"] = (D,)
        out[p + "self_attn.q_proj.weight"] = (cfg.num_heads * Dh, D)
        out[p + "self_attn.k_proj.weight"] = (cfg.num_kv_heads * Dh, D)
        out[p + "self_attn.v_proj.weight"] = (cfg.num_kv_heads * Dh, D)
        out[p + "self_attn.o_proj.weight"] = (D, cfg.num_heads * Dh)
        if cfg.is_moe:
            out[p + "block_sparse_moe.gate.weight"] = (cfg.num_experts, D)
            for e in range(cfg.num_experts):
                q = f"{p}block_sparse_moe.experts.{e}."
                out[q + "w1.weight"], out[q + "w3.weight"], out[q + "w2.weight"] = (I, D), (I, D), (D, I)
        else:
            out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = (I, D), (I, D)
            out[p + "mlp.down_proj.weight"] = (D, I)
    return out


def destination(model: CausalLM, name: str) -> torch.Tensor:
    """The view of a model parameter that checkpoint tensor ``name`` fills."""
    cfg = model.config
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if m is None:
        key = {"model.embed_tokens.weight": "embed_tokens", "model.norm.weight": "norm",
               "lm_head.weight": "lm_head"}[name]
        return getattr(model, key).weight
    layer, rest = model.layers[int(m.group(1))], m.group(2)
    attn, mlp = layer.self_attn, layer.mlp
    if rest.startswith("self_attn.") and rest[10] in "qkv":
        return attn.qkv_proj.weight[attn.qkv_proj.shard_rows("qkv".index(rest[10]))]
    if rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
        return mlp.gate_up_proj.weight[mlp.gate_up_proj.shard_rows(int(rest.startswith("mlp.up")))]
    if m := re.fullmatch(r"block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight", rest):
        e, w, I = int(m.group(1)), m.group(2), cfg.intermediate_size
        return {"w1": mlp.experts.w13[e, :I], "w3": mlp.experts.w13[e, I:], "w2": mlp.experts.w2[e]}[w]
    path = rest.replace("block_sparse_moe.", "mlp.").removesuffix(".weight")
    return layer.get_submodule(path).weight


def checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index}: bad index file ({exc})") from None
        files = [path / f for f in sorted(set(weight_map.values()))]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files")
    for f in files:
        if not f.exists():
            raise CheckpointError(f"{f}: shard listed in the index is missing")
    return files


class Checkpoint:
    """The memory-mapped shards of one checkpoint: every tensor's file, shape and dtype."""

    def __init__(self, path: Path, stack: contextlib.ExitStack) -> None:
        self.path = path
        self.handles: dict[Path, Any] = {}
        self.location: dict[str, tuple[Path, tuple[int, ...], str]] = {}
        self.staged: dict[str, torch.Tensor] = {}  # page-locked copies of the layer being loaded
        for f in checkpoint_files(path):
            try:
                self.handles[f] = h = stack.enter_context(safe_open(str(f), framework="pt"))
                for name in h.keys():  # noqa: SIM118 (safe_open is not iterable)
                    sl = h.get_slice(name)
                    self.location[name] = (f, tuple(sl.get_shape()), sl.get_dtype())
            except (SafetensorError, OSError, ValueError) as exc:
                raise CheckpointError(f"{f}: corrupt safetensors file ({exc})") from None

    def validate(self, expected: dict[str, tuple[int, ...]], tied_head: bool) -> None:
        """Every expected tensor present with its shape; nothing else but FP8 scales
        (``X.weight_scale``, ``X.input_scale`` beside an expected ``X.weight``)."""
        for name, (f, shape, _) in self.location.items():
            base = name.rsplit(".", 1)[0]
            scale_of_expected = name.endswith((".weight_scale", ".input_scale")) and f"{base}.weight" in expected
            if name not in expected and not scale_of_expected and not IGNORED.match(name) \
                    and not (tied_head and name == "lm_head.weight"):
                raise CheckpointError(f"{f.name}: unexpected tensor {name} {list(shape)}")
        for name, shape in expected.items():
            if name not in self.location:
                raise CheckpointError(f"{self.path}: missing tensor {name} (expected shape {list(shape)})")
            f, got, _ = self.location[name]
            if got != shape:
                raise CheckpointError(f"{f.name}: tensor {name} has shape {list(got)}, expected {list(shape)}")
            if self.is_fp8(name) and f"{name}_scale" not in self.location:
                raise CheckpointError(f"{f.name}: FP8 tensor {name} has no {name}_scale")

    def get(self, name: str) -> torch.Tensor:
        if (staged := self.staged.get(name)) is not None:
            return staged
        f = self.location[name][0]
        try:
            return self.handles[f].get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{f.name}: cannot read tensor {name} ({exc})") from None

    def part(self, name: str, index: tuple[slice, ...] | None) -> torch.Tensor:
        """``name[index]`` read without the rest of the tensor (None: all of it; FP8
        tensors are read whole, to dequantize them)."""
        if index is None or self.is_fp8(name) or name in self.staged:
            t = self.dense(name)
            return t if index is None else t[index]
        f = self.location[name][0]
        try:
            return self.handles[f].get_slice(name)[index]
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{f.name}: cannot read tensor {name} ({exc})") from None

    def stager(self, groups: list[list[str]]) -> LayerStager:
        """Parallel page-locked reads of ``groups`` of tensors, one group ahead."""
        extents = {}
        for f in self.handles:
            extents.update(read_header(f))
        return LayerStager(extents, groups)

    def is_fp8(self, name: str) -> bool:
        return name in self.location and self.location[name][2] == "F8_E4M3"

    def weight_scale(self, name: str) -> torch.Tensor:
        """``name``'s per-channel float32 scale [out] (per-tensor scales broadcast)."""
        rows = self.location[name][1][0]
        try:
            return channel_scale(self.get(f"{name}_scale"), rows)
        except ValueError as exc:
            raise CheckpointError(f"{self.location[name][0].name}: {name}_scale: {exc}") from None

    def input_scale(self, names: list[str]) -> torch.Tensor | None:
        """One static activation scale for weights packed together: the largest of theirs."""
        keys = [n.removesuffix(".weight") + ".input_scale" for n in names]
        if not all(k in self.location for k in keys):
            return None
        return torch.stack([self.get(k).float().reshape(()) for k in keys]).max().reshape(1)

    def dense(self, name: str) -> torch.Tensor:
        """The tensor in high precision (FP8 weights dequantized with their scales)."""
        t = self.get(name)
        return t.float() * self.weight_scale(name)[:, None] if self.is_fp8(name) else t


_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
           "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
           "U8": torch.uint8, "BOOL": torch.bool}


class LayoutCheckpoint(Checkpoint):
    """A checkpoint's layout without its data: every tensor read as zeros of its stored
    shape and dtype, made on ``device``. A model built from it has the real one's
    modules, shapes, dtypes and quantization (engine/precompile.py's twin) and costs no
    read of the file beyond its header."""

    def __init__(self, path: Path, stack: contextlib.ExitStack, device: torch.device) -> None:
        super().__init__(path, stack)
        self.device = device

    def get(self, name: str) -> torch.Tensor:
        f, shape, dtype = self.location[name]
        if dtype not in _DTYPES:
            raise CheckpointError(f"{f.name}: tensor {name} has dtype {dtype}, which sluice does not read")
        return torch.zeros(shape, dtype=_DTYPES[dtype], device=self.device)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def load_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, path: str | Path | None = None, *,
               fp8: bool = False, seed: int = 0, max_positions: int | None = None,
               progress: bool = True, stage: bool | None = None, stats: dict | None = None,
               shard: Sharding | None = None, layout_only: bool = False,
               parts: Collection[str] | None = None) -> CausalLM:
    """Build the model on ``device`` one decoder layer at a time, each filled from the
    checkpoint at ``path`` (random weights when None) and, with ``fp8``, quantized
    before the next is built: peak memory is the FP8 model plus one 16-bit layer.
    Pre-quantized FP8 tensors are used as stored (dequantized when not ``fp8``).
    ``stage`` (default: on CUDA) reads each layer into page-locked memory with parallel
    reads while the previous one is copied to the device (engine/staging.py). ``stats``,
    when given, receives the seconds spent waiting for staged reads and the bytes staged.
    ``shard`` (tensor/expert parallel) cuts each layer to this rank's shapes before it is
    filled and reads only this rank's part of each tensor (no staging); random weights
    are drawn whole, alike on every rank, then cut. FP8 quantization comes after.
    ``layout_only``: the checkpoint's tensors as zeros of their stored shapes and dtypes
    (nothing read, nothing validated): a model laid out like the real one, for
    ``cfg.num_layers`` (fewer than the checkpoint's) layers; see LayoutCheckpoint.
    ``parts`` (default: all, or those of an enclosing ``reading_only``): the modules to
    load, by name (``embed_tokens``, ``layers.N``, ``norm``, ``lm_head``); the others are
    placeholders on the meta device and nothing of them is read (random weights are drawn
    all the same, so that the parts loaded equal a full load's)."""
    parts = _PARTS.get() if parts is None else parts
    wanted = (lambda part: True) if parts is None else (lambda part: part in parts)
    with _default_dtype(dtype), torch.device(device):
        model = CausalLM(cfg, max_positions, build_layers=False).eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    top = ["model.embed_tokens.weight", "model.norm.weight"] + ([] if cfg.tie_word_embeddings else ["lm_head.weight"])
    top_part = {"model.embed_tokens.weight": "embed_tokens", "model.norm.weight": "norm", "lm_head.weight": "lm_head"}
    with contextlib.ExitStack() as stack, torch.no_grad():
        ckpt = None
        if path is not None and layout_only:
            ckpt = LayoutCheckpoint(Path(path), stack, torch.device(device))
        elif path is not None:
            ckpt = Checkpoint(Path(path), stack)
            ckpt.validate(expected_tensors(cfg), cfg.tie_word_embeddings)
        fill = (lambda name: destination(model, name).copy_(ckpt.dense(name))) if ckpt else \
            (lambda name: _random_(destination(model, name), name, gen))
        if ckpt is None or wanted(top_part[top[0]]):
            fill(top[0])  # embeddings, layers, then the rest: the order of init_random_
        stager = None
        sharded = shard is not None and shard.active
        read = [n for n in range(cfg.num_layers) if ckpt is None or wanted(f"layers.{n}")]
        if ckpt is not None and not layout_only and \
                (stage if stage is not None else torch.device(device).type == "cuda" and not sharded):
            stager = ckpt.stager([[k for k in ckpt.location if k.startswith(f"model.layers.{n}.")] for n in read])
            stack.callback(stager.close)
        desc = "loading weights" + (" + fp8 quantization" if fp8 else "")
        for n in tqdm(range(cfg.num_layers), desc=desc, unit="layer", disable=not progress or None):
            if ckpt is not None and not wanted(f"layers.{n}"):
                model.layers.append(_placeholder(model, dtype))
                continue
            with _default_dtype(dtype), torch.device(device):
                model.layers.append(layer := model.new_layer())
            prefix = f"model.layers.{n}."
            if ckpt is None:
                for name, p in layer.named_parameters():
                    _random_(p, name, gen)
            else:
                if stager is not None:
                    waited = time.perf_counter()
                    ckpt.staged = stager.take(read.index(n))
                    if stats is not None:
                        stats["read_wait_s"] = stats.get("read_wait_s", 0.0) + time.perf_counter() - waited
                names = [k for k in expected_tensors(cfg, layers=[n]) if k.startswith(prefix)]
                if fp8:
                    used = _install_prequantized(layer, prefix, ckpt, device)
                    names = [k for k in names if k not in used]
                if sharded:  # this rank's shapes first, then only its part of each tensor
                    shard.layer(layer)
                    for name in names:
                        shard.read(layer, name[len(prefix):], lambda index, name=name: ckpt.part(name, index))
                else:
                    for name in names:
                        fill(name)
                if stager is not None:
                    stager.release(read.index(n))
                    ckpt.staged = {}
            if shard is not None and ckpt is None:
                shard.layer(layer)
            if fp8:
                quantize_fp8(layer)
            if not wanted(f"layers.{n}"):  # drawn, to keep the draws of the layers after it
                model.layers[n] = _placeholder(model, dtype)
        for name in top[1:]:
            if ckpt is None or wanted(top_part[name]):
                fill(name)
        for name in top:
            if not wanted(top_part[name]):
                module = getattr(model, top_part[name])
                module.weight = nn.Parameter(module.weight.to("meta"), requires_grad=False)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        if shard is not None:
            shard.finish(model)
        if stager is not None and stats is not None:
            stats["staged_GB"] = stager.bytes_read / 1e9
    return model


def _placeholder(model: CausalLM, dtype: torch.dtype) -> nn.Module:
    """A decoder layer that holds no memory, in place of one not loaded."""
    with _default_dtype(dtype), torch.device("meta"):
        return model.new_layer()


_PACKED = {  # our module -> the checkpoint linears packed into it, in row order
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}


def _install_prequantized(layer: nn.Module, prefix: str, ckpt: Checkpoint, device: torch.device) -> set[str]:
    """Swap in Fp8Linear / Fp8FusedExperts built from the checkpoint's own e4m3 weights
    and scales wherever every packed part is stored as FP8; returns the names used."""
    used: set[str] = set()
    for target, parts in _PACKED.items():
        names = [f"{prefix}{p}.weight" for p in parts]
        if not all(ckpt.is_fp8(n) for n in names):
            continue
        module = Fp8Linear(_rows([ckpt.get(n) for n in names], device), torch.cat([ckpt.weight_scale(n) for n in names]),
                           input_scale=ckpt.input_scale(names), out_dtype=layer.input_layernorm.weight.dtype)
        parent, child = target.rsplit(".", 1)
        setattr(layer.get_submodule(parent), child, module.to(device))
        used.update(names)
    moe = layer.mlp
    if isinstance(moe, MoE):
        w = {k: [f"{prefix}block_sparse_moe.experts.{e}.{k}.weight" for e in range(moe.num_experts)]
             for k in ("w1", "w3", "w2")}
        names = [n for group in w.values() for n in group]
        if all(ckpt.is_fp8(n) for n in names):
            experts = Fp8FusedExperts.from_prequantized(
                *[t for k in ("w1", "w3", "w2") for t in ([ckpt.get(n) for n in w[k]],
                                                          [ckpt.weight_scale(n) for n in w[k]])], device=device)
            install_fp8_experts(moe, experts.to(device))
            used.update(names)
    return used


def _rows(parts: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Concatenate 2-D tensors by rows straight into one ``device`` tensor (each part
    copied once, asynchronously from page-locked memory)."""
    out = torch.empty((sum(p.shape[0] for p in parts), parts[0].shape[1]), dtype=parts[0].dtype, device=device)
    row = 0
    for p in parts:
        out[row:row + p.shape[0]].copy_(p, non_blocking=True)
        row += p.shape[0]
    return out


def _random_(p: torch.Tensor, name: str, gen: torch.Generator, std: float = 0.02) -> None:
    if name.endswith("norm.weight"):
        p.fill_(1.0)
    else:
        p.normal_(0.0, std, generator=gen)
