"""Model config (read from a Hugging Face config.json) and engine options."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass as pydantic_dataclass

from sluice.engine.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where it is used: the gateway reads these options without it
    import torch

ARCHITECTURES = ("MixtralForCausalLM", "MistralForCausalLM", "LlamaForCausalLM")

ACTIVATION_DTYPES = ("float32", "bfloat16", "float16")  # torch.<name>


@dataclass(frozen=True)
class ModelConfig:
    """The decoder's hyper-parameters, normalised across config.json dialects."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # llama3 parameters, None: plain RoPE
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    num_experts: int = 0  # 0: dense MLP (Mistral, Llama)
    num_experts_per_tok: int = 0
    dtype: str = "bfloat16"
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    quant_method: str | None = None  # "fp8" / "compressed-tensors": the checkpoint holds e4m3 weights

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config.json not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> ModelConfig:
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            raise ConfigError(
                f"{source}: unsupported architecture {archs or raw.get('model_type')!r}; "
                f"supported: {', '.join(ARCHITECTURES)}"
            )
        try:
            heads = int(raw["num_attention_heads"])
            hidden = int(raw["hidden_size"])
            rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
            theta = raw.get("rope_theta", rope.get("rope_theta", 10000.0))
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if rope_type not in ("default", "llama3"):
                raise ConfigError(f"{source}: unsupported rope_type {rope_type!r}")
            eos = raw.get("eos_token_id", 2)
            experts = int(raw.get("num_local_experts", 0)) if arch == "MixtralForCausalLM" else 0
            return cls(
                architecture=arch,
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_layers=int(raw["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(raw.get("num_key_value_heads") or heads),
                head_dim=int(raw.get("head_dim") or hidden // heads),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
                rope_theta=float(theta),
                rope_scaling=dict(rope) if rope_type == "llama3" else None,
                max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                num_experts=experts,
                num_experts_per_tok=int(raw.get("num_experts_per_tok", 2)) if experts else 0,
                dtype=str(raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"),
                bos_token_id=raw.get("bos_token_id"),
                eos_token_ids=tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ()),
                quant_method=_quant_method(raw.get("quantization_config"), source),
            )
        except KeyError as exc:
            raise ConfigError(f"{source}: missing field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: bad value ({exc})") from None

    def with_experts_per_tok(self, k: int | None) -> ModelConfig:
        """Override top-k routing (e.g. 3 experts per token as a quality trade-off)."""
        if k is None:
            return self
        if not self.is_moe:
            raise ConfigError(f"num_experts_per_tok override needs a MoE model, not {self.architecture}")
        if not 1 <= k <= self.num_experts:
            raise ConfigError(f"num_experts_per_tok must be in 1..{self.num_experts}, got {k}")
        return replace(self, num_experts_per_tok=k)


def _quant_method(qc: dict[str, Any] | None, source: str) -> str | None:
    """The pre-quantized FP8 dialects we read (reference/mixtral.md); anything else is an error."""
    if not qc:
        return None
    method = qc.get("quant_method")
    if method == "fp8":
        return method
    if method == "compressed-tensors":
        if qc.get("format", "float-quantized") != "float-quantized":
            raise ConfigError(f"{source}: compressed-tensors format {qc.get('format')!r} is not supported "
                              "(only float-quantized FP8)")
        for group in (qc.get("config_groups") or {}).values():
            w = group.get("weights") or {}
            if w.get("num_bits", 8) != 8 or w.get("type", "float") != "float" or \
                    w.get("strategy", "tensor") not in ("tensor", "channel"):
                raise ConfigError(f"{source}: compressed-tensors weights {w} are not FP8 per-tensor/channel")
        return method
    raise ConfigError(f"{source}: quantization_config quant_method {method!r} is not supported "
                      "(fp8 or compressed-tensors)")


# Real shapes for benchmarks with random weights (no checkpoint needed).
PRESETS: dict[str, dict[str, Any]] = {
    "mixtral-8x7b": {
        "architectures": ["MixtralForCausalLM"], "vocab_size": 32000, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2,
        "rms_norm_eps": 1e-5, "rope_theta": 1e6, "max_position_embeddings": 32768,
        "dtype": "bfloat16",
    },
    # The default served model when no checkpoint is given: real tokenizer, noise weights.
    "tiny-mixtral": {
        "architectures": ["MixtralForCausalLM"], "vocab_size": 32000, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
        "rms_norm_eps": 1e-5, "rope_theta": 1e6, "max_position_embeddings": 4096,
        "dtype": "float32", "bos_token_id": 1, "eos_token_id": 2,
    },
}


# The one dtype vocabulary (engine options, the local plugin's options, SLUICE_DTYPE):
# auto = fp8 on Hopper, bf16 on other GPUs, float32 on the CPU; fp8 = FP8 weights,
# bf16 activations.
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16", "fp8")
DTypeName = Literal["auto", "float32", "bfloat16", "float16", "fp8"]
AttentionName = Literal["auto", "triton", "torch"]


@pydantic_dataclass(config=ConfigDict(extra="forbid"))
class EngineConfig:
    """How the engine runs a model (request-level knobs live in SamplingParams).
    Validated on construction; the local backend's options are these fields as they are."""

    model: str | None = None  # checkpoint directory
    dtype: DTypeName = "auto"
    device: str | None = None  # None: cuda when available, else cpu
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=1)  # token budget of one step (chunked prefill)
    max_model_len: int | None = Field(None, ge=1)  # None: min(model max positions, 8192)
    block_size: int = Field(16, ge=1)
    num_kv_blocks: int | None = Field(None, ge=1)  # None: from memory_fraction (GPU) or a CPU default
    memory_fraction: float = Field(0.9, gt=0, le=1)
    enable_prefix_caching: bool = True
    enforce_eager: bool = False  # True: no CUDA graphs
    # CUDA graphs and parking the weights in host memory happen while the engine is idle,
    # after its first token, so that a start serves before everything is warm. False:
    # all of it up front (benchmarks that must not measure a warming engine).
    warm_in_background: bool = True
    attention: AttentionName = "auto"  # auto: the triton kernels on CUDA, the torch reference elsewhere
    # Where compiled triton kernels persist across restarts (TRITON_CACHE_DIR); None:
    # $TRITON_CACHE_DIR when set, else ~/.cache/sluice/kernels.
    compile_cache_dir: str | None = None
    # Threads that compile a start's kernels while the weights load (engine/precompile.py);
    # None: 8 (at most one per CPU core but one); 0: none, each kernel compiles at its first launch.
    compile_threads: int | None = Field(None, ge=0)
    # The interpreter's GIL switch interval (sys.setswitchinterval) while an AsyncLLM runs
    # in the process: the step thread gets the GIL back from the event loop's token
    # delivery sooner (H200, 8 layers, 64 streams: median token gap 5.19 ms at 0.0005 s
    # against 5.74-6.46 ms at Python's default 0.005 s; engine alone 5.01 ms). None: leave it.
    gil_switch_interval_s: float | None = Field(0.0005, gt=0)
    # Launch a decode step before the previous step's tokens are read back (its inputs
    # taken from them on the device), so the host's work between steps (detokenizing,
    # stop checks, the next inputs) overlaps the device's forward (LLM.step).
    step_lookahead: bool = True
    num_experts_per_tok: int | None = Field(None, ge=1)
    seed: int = 0
    # Across world_size processes, one LLM per rank on the same requests (engine/parallel/):
    # "tp" splits attention heads and each expert, "ep" splits heads and places whole experts.
    parallel: Literal["none", "tp", "ep"] = "none"
    world_size: int = Field(1, ge=1)

    def resolve_device(self) -> torch.device:
        import torch

        if self.device:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def wants_fp8(self, model: ModelConfig, device: torch.device) -> bool:
        """fp8 weights: asked for, or auto on a Hopper GPU (and for FP8 checkpoints on any GPU)."""
        if self.dtype == "fp8":
            return True
        if self.dtype != "auto" or device.type != "cuda":
            return False
        import torch

        return model.quant_method is not None or torch.cuda.get_device_capability(device) >= (9, 0)

    def resolve_dtype(self, model: ModelConfig, device: torch.device) -> torch.dtype:
        """The dtype of activations and of the weights that stay high precision."""
        name: str = self.dtype
        if name == "auto" and model.quant_method is not None:
            name = "float32" if device.type == "cpu" else "bfloat16"
        if name == "auto":
            name = "float32" if device.type == "cpu" else ("bfloat16" if model.dtype == "float32" else model.dtype)
        if name == "fp8":
            name = "bfloat16"  # fp8 weights are swapped in by engine.quant; activations stay bf16
        if name not in ACTIVATION_DTYPES:
            raise ConfigError(f"the checkpoint's dtype {name!r} is not one of {', '.join(ACTIVATION_DTYPES)}")
        import torch

        return getattr(torch, name)

    def triton_attention(self, device: torch.device, model: ModelConfig) -> bool:
        """Whether attention runs the triton kernels (CUDA, power-of-two head and block
        sizes) rather than the torch reference."""
        d = model.head_dim
        fits = device.type == "cuda" and d >= 16 and d & (d - 1) == 0 and self.block_size & (self.block_size - 1) == 0
        if self.attention == "triton" and not fits:
            raise ConfigError("attention='triton' needs CUDA and power-of-two head_dim (>= 16) and block_size")
        return fits and self.attention != "torch"


ENGINE_FIELDS = tuple(EngineConfig.__pydantic_fields__)
