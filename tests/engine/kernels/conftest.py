"""Run the triton kernels in triton's CPU interpreter when no GPU is present.

TRITON_INTERPRET must be set before triton is first imported, hence at conftest import.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
