"""Helpers shared by the triton launchers: interpreter detection and argument checks."""

from __future__ import annotations

import os

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value


def interpreting() -> bool:
    """True when triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_in_fp32() -> bool:
    """Whether kernels should widen 16-bit dot operands to fp32.

    The triton interpreter (3.9, CPU) computes `tl.dot` on bf16 operands wrongly
    (numpy has no bf16), so under the interpreter kernels take their dots in fp32.
    On a GPU the dots run on bf16/fp8 tensor cores as written.
    """
    return interpreting()


def check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def check_tensor(
    t: torch.Tensor,
    name: str,
    ndim: int,
    dtypes: tuple[torch.dtype, ...],
    device: torch.device | None = None,
    last_contiguous: bool = True,
) -> None:
    """Raise ValueError unless `t` has `ndim` dims, a dtype in `dtypes`, sits on
    `device` and (by default) has a unit stride in its last dimension."""
    check(isinstance(t, torch.Tensor), f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check(t.dim() == ndim, f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    check(t.dtype in dtypes, f"{name} must have dtype in {dtypes}, got {t.dtype}")
    if device is not None:
        check(t.device == device, f"{name} is on {t.device}, expected {device}")
    if last_contiguous and t.numel() > 0:
        check(t.stride(-1) == 1, f"{name} must be contiguous in its last dim, strides {t.stride()}")
