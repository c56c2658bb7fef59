"""Quantization-aware training pieces: LSQ fake-quantizer, quantized Conv2d/Linear, attach-by-name,
enable/disable, quantization-noise statistics, integer export.

Self-contained: imports only torch, numpy and the standard library (nothing else of flatlens), so the
training engine and the measures can both depend on it.
"""

from __future__ import annotations

from .attach import (
    assert_all_trainable_in_optimizer,
    attach_quantizers,
    eligible_module_names,
    is_quantization_enabled,
    iter_quantizers,
    quantization_state,
    quantized_module_names,
    quantizer_parameter_names,
    set_quantization_enabled,
)
from .export import (
    dequantized_copy,
    dequantized_state_dict,
    export_integer,
    load_integer_export,
    save_integer_export,
    verify_export,
)
from .lsq import LSQQuantizer, grad_scale, gradient_scale_off, quant_range, round_pass
from .modules import QUANT_MODULE_TYPES, QuantConv2d, QuantLinear
from .noise import (
    QuantNoiseStats,
    kl_to_uniform,
    layer_noise_stats,
    quant_noise_stats,
    sample_matched_noise,
    sample_uniform_noise,
)

__all__ = [
    "LSQQuantizer", "grad_scale", "gradient_scale_off", "round_pass", "quant_range",
    "QuantConv2d", "QuantLinear", "QUANT_MODULE_TYPES",
    "attach_quantizers", "eligible_module_names", "iter_quantizers", "quantized_module_names",
    "quantizer_parameter_names", "set_quantization_enabled", "is_quantization_enabled",
    "quantization_state", "assert_all_trainable_in_optimizer",
    "QuantNoiseStats", "layer_noise_stats", "quant_noise_stats", "kl_to_uniform",
    "sample_matched_noise", "sample_uniform_noise",
    "export_integer", "save_integer_export", "load_integer_export", "dequantized_state_dict",
    "dequantized_copy", "verify_export",
]
