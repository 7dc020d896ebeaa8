"""Load Hugging Face checkpoints (config.json + safetensors, single or sharded).

Tensors are memory-mapped with ``safe_open`` and copied one at a time into the
model's parameters: q/k/v into qkv_proj, gate/up into gate_up_proj and each
expert's w1/w3/w2 into the stacked w13/w2. Every problem is a one-line
CheckpointError naming the file or tensor.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from engine.config import ModelConfig
from engine.errors import CheckpointError
from engine.models.mixtral import CausalLM

IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, for every tensor a checkpoint of ``cfg`` must hold."""
    D, I, Dh = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, D), "model.norm.weight": (D,)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, D)
    for n in range(cfg.num_layers):
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
        return {"w1": mlp.w13[e, :I], "w3": mlp.w13[e, I:], "w2": mlp.w2[e]}[w]
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


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype,
                max_positions: int | None = None) -> CausalLM:
    """An uninitialised model, allocated directly on ``device``."""
    with _default_dtype(dtype), torch.device(device):
        return CausalLM(cfg, max_positions).eval()


def load_weights(model: CausalLM, path: str | Path, progress: bool = True) -> None:
    path = Path(path)
    expected = expected_tensors(model.config)
    files = checkpoint_files(path)
    location: dict[str, tuple[Path, tuple[int, ...]]] = {}
    with contextlib.ExitStack() as stack:
        handles = {}
        for f in files:
            try:
                handles[f] = h = stack.enter_context(safe_open(str(f), framework="pt"))
                for name in h.keys():
                    location[name] = (f, tuple(h.get_slice(name).get_shape()))
            except (SafetensorError, OSError, ValueError) as exc:
                raise CheckpointError(f"{f}: corrupt safetensors file ({exc})") from None
        tied_head = model.config.tie_word_embeddings and "lm_head.weight" in location
        for name, (f, shape) in location.items():
            if name not in expected and not IGNORED.match(name) and not (tied_head and name == "lm_head.weight"):
                raise CheckpointError(f"{f.name}: unexpected tensor {name} {list(shape)}")
        for name, shape in expected.items():
            if name not in location:
                raise CheckpointError(f"{path}: missing tensor {name} (expected shape {list(shape)})")
            if location[name][1] != shape:
                raise CheckpointError(
                    f"{location[name][0].name}: tensor {name} has shape {list(location[name][1])}, expected {list(shape)}")
        with torch.no_grad():
            for name in tqdm(expected, desc="loading weights", unit="tensor", disable=not progress or None):
                f = location[name][0]
                try:
                    tensor = handles[f].get_tensor(name)
                except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
                    raise CheckpointError(f"{f.name}: cannot read tensor {name} ({exc})") from None
                destination(model, name).copy_(tensor)


def init_random_(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Random weights in place (benchmarks with real shapes, no checkpoint)."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=gen)


def write_random_checkpoint(path: str | Path, raw_config: dict, seed: int = 0, std: float = 0.02) -> Path:
    """Write a HF-format checkpoint (config.json + model.safetensors) with random weights."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig.from_dict(raw_config)
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        name: torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=gen) * std
        for name, shape in expected_tensors(cfg).items()
    }
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(raw_config, indent=2))
    return path
