"""Triton kernels for decode on Hopper, each beside a plain torch reference."""

from sluice.engine.kernels.fp8_linear import fp8_linear_reference, fp8_linear_small_m
from sluice.engine.kernels.fused_moe import fused_moe, fused_moe_reference, moe_align_block_size
from sluice.engine.kernels.paged_attention import paged_decode_attention, paged_decode_attention_reference

__all__ = [
    "fp8_linear_reference",
    "fp8_linear_small_m",
    "fused_moe",
    "fused_moe_reference",
    "moe_align_block_size",
    "paged_decode_attention",
    "paged_decode_attention_reference",
]
