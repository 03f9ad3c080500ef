"""Device-specific speed-ups applied to a finished model; the model itself stays plain PyTorch."""

from .cpu import cpu_has_bf16_arithmetic, keep_freed_memory, optimize_for_cpu
from .quantize import QuantizedLinear, QuantizedTrainingError, quantize_weights

__all__ = ["optimize_for_cpu", "cpu_has_bf16_arithmetic", "keep_freed_memory", "quantize_weights",
           "QuantizedLinear", "QuantizedTrainingError"]
