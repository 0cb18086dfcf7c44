"""Quantization data structures and algorithms shared by the passes (calibrate, quantize, QAT).

The module side decides, the ONNX side materialises: calibration writes a ``QuantSpec`` per
layer into ``program.annotations[name]["quant"]``; the ``quantize`` pass reads it after
export. Everything here is plain data and torch/numpy code; no pass is imported.
"""

from __future__ import annotations

from graphopt.quantization.calibration import (agreement, calibration_batches, capture_inputs, get_specs,
                                               run_outputs, select_layers, set_spec, smoothing_factors)
from graphopt.quantization.modules import QuantEmbedding, QuantLinear, fake_quantize_dynamic, swap_fake_quant
from graphopt.quantization.observers import (OBSERVERS, MinMaxObserver, MovingAverageMinMaxObserver,
                                             MseObserver, Observer, PercentileObserver, make_observer)
from graphopt.quantization.spec import (QUANT_KEY, SUPPORTED_BITS, Granularity, Mode, QuantSpec, Scheme,
                                        TensorQuant, dequantize, fake_quantize, qparams, quantize)
from graphopt.quantization.weights import block_params, calibrate_weight, gptq, weight_format

__all__ = [
    "QUANT_KEY", "SUPPORTED_BITS", "Granularity", "Mode", "QuantSpec", "Scheme", "TensorQuant", "dequantize",
    "fake_quantize", "qparams", "quantize", "OBSERVERS", "Observer", "MinMaxObserver",
    "MovingAverageMinMaxObserver", "PercentileObserver", "MseObserver", "make_observer", "QuantLinear",
    "QuantEmbedding", "swap_fake_quant", "fake_quantize_dynamic", "weight_format", "calibrate_weight",
    "block_params", "gptq", "select_layers", "calibration_batches", "capture_inputs", "run_outputs",
    "agreement", "get_specs", "set_spec", "smoothing_factors",
]
