"""A checkpoint of random weights in Hugging Face's layout (the tiny default model, tests,
benchmarks with real shapes)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from sluice.engine.config import ModelConfig
from sluice.engine.loader import expected_tensors


def write_random_checkpoint(path: str | Path, raw_config: dict, seed: int = 0, std: float = 0.02,
                            dtype: torch.dtype = torch.float32, device: str = "cpu") -> Path:
    """Write a HF-format checkpoint (config.json + model.safetensors) with random weights
    (drawn on ``device``: a GPU makes large ones quickly)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig.from_dict(raw_config)
    gen = torch.Generator(device=device).manual_seed(seed)
    tensors = {
        name: (torch.ones(shape, device=device) if name.endswith("norm.weight")
               else torch.randn(shape, generator=gen, device=device) * std).to(dtype).cpu()
        for name, shape in expected_tensors(cfg).items()
    }
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(raw_config, indent=2))
    return path
