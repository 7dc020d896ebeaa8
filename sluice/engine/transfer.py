"""Small host tensors to the device without waiting for it.

A copy from pageable memory first waits for everything queued on the stream before it
(a step's forward); staged through page-locked memory it is enqueued like a kernel. The
step loop relies on this to prepare a step while the previous one runs (LLM.step).
"""

from __future__ import annotations

import torch


def upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` (host) on ``device``: pinned and copied asynchronously on CUDA, else as it is."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t
