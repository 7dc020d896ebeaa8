"""Weight quantization as module swaps (the model files stay untouched)."""

from sluice.engine.quant.fp8 import Fp8FusedExperts, Fp8Linear, quantize_fp8

__all__ = ["Fp8FusedExperts", "Fp8Linear", "quantize_fp8"]
