"""Switch for the fused small triton kernels of the decode step (engine/kernels/fused_small.py).

On CUDA the norms, rotary + KV-cache store and router use one triton launch each; on
the CPU (and with ``SLUICE_FUSED=0`` or ``fusion.ENABLED = False``) the plain torch code.
"""

from __future__ import annotations

import os

import torch

ENABLED = os.environ.get("SLUICE_FUSED", "1") != "0"


def use_fused(x: torch.Tensor) -> bool:
    return ENABLED and x.is_cuda
