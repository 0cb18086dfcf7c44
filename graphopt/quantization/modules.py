"""Fake-quantized stand-ins for ``nn.Linear`` and ``nn.Embedding``, and swapping them in by name.

``QuantLinear`` computes what the materialised ONNX layer computes, in float: the input
(divided by the smoothing factors, if any) quantized (static: with its calibrated scale;
dynamic: per call from the tensor's own range, as ONNX ``DynamicQuantizeLinear`` does: u8,
``scale = (max(0, max) - min(0, min)) / 255``), the weight (times the factors) quantized,
then ``F.linear``. Gradients pass straight through the
rounding (torch's fake-quant ops), so the same modules serve quantization-aware training.
Sensitivity analysis swaps one layer at a time with ``swap_fake_quant``.

Example::

    with swap_fake_quant(model, {"layers.0.ffn.output": spec}):
        drifted = model(**batch)
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from graphopt.quantization.spec import QuantSpec, TensorQuant, fake_quantize, qparams

__all__ = ["QuantLinear", "QuantEmbedding", "swap_fake_quant", "fake_quantize_dynamic"]

logger = logging.getLogger(__name__)


def fake_quantize_dynamic(x: torch.Tensor, tq: TensorQuant) -> torch.Tensor:
    """Quantizes ``x`` per tensor with parameters from its own range (``DynamicQuantizeLinear``)."""
    with torch.no_grad():
        scale, zero = qparams(x.min(), x.max(), tq)
    return torch.fake_quantize_per_tensor_affine(x, scale.reshape(()), zero.reshape(()), tq.qmin, tq.qmax)


class QuantLinear(nn.Module):
    """An ``nn.Linear`` run as its ``QuantSpec`` says; shares the original's parameters.

    The fake-quantized weight is cached in eval mode (the weight does not change there) and
    recomputed in training mode, where it does.
    """

    def __init__(self, linear: nn.Linear, spec: QuantSpec) -> None:
        super().__init__()
        self.linear, self.spec = linear, spec
        self._cached: torch.Tensor | None = None
        self.train(linear.training)

    def _weight(self) -> torch.Tensor:
        if self.spec.weight is None:
            return self.linear.weight
        if self.training or self._cached is None:
            weight = self.linear.weight
            if self.spec.smoothed:
                weight = weight * torch.from_numpy(self.spec.smoothing).to(weight.device)
            weight = fake_quantize(weight, self.spec.weight)
            if self.training:
                return weight
            self._cached = weight.detach()
        return self._cached

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if spec.mode == "float":
            return self.linear(x)
        if spec.smoothed:
            x = x / torch.from_numpy(spec.smoothing).to(x.device)
        if spec.mode == "static":
            assert spec.input is not None
            x = fake_quantize(x, spec.input)
        elif spec.mode == "dynamic":
            assert spec.input is not None
            x = fake_quantize_dynamic(x, spec.input)
        return F.linear(x, self._weight(), self.linear.bias)


class QuantEmbedding(nn.Module):
    """An ``nn.Embedding`` whose table is fake-quantized (weight-only)."""

    def __init__(self, embedding: nn.Embedding, spec: QuantSpec) -> None:
        super().__init__()
        self.embedding, self.spec = embedding, spec
        self.train(embedding.training)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        table = self.embedding.weight
        if self.spec.weight is not None and self.spec.mode != "float":
            table = fake_quantize(table, self.spec.weight)
        e = self.embedding
        return F.embedding(ids, table, e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq, e.sparse)


def _wrap(module: nn.Module, spec: QuantSpec) -> nn.Module:
    if isinstance(module, nn.Linear):
        return QuantLinear(module, spec)
    if isinstance(module, nn.Embedding):
        return QuantEmbedding(module, spec)
    raise TypeError(f"no fake-quant stand-in for {type(module).__name__}")


@contextlib.contextmanager
def swap_fake_quant(model: nn.Module, specs: Mapping[str, QuantSpec]) -> Iterator[nn.Module]:
    """Replaces each named submodule by its fake-quant stand-in, and puts the originals back on exit.

    Works on eager modules and on ``torch.fx`` GraphModules (their code looks submodules up
    by attribute at call time).

    Raises:
        KeyError: a name that is not a submodule of ``model``.
    """
    originals: dict[str, nn.Module] = {}
    try:
        for name, spec in specs.items():
            original = model.get_submodule(name)
            originals[name] = original
            model.set_submodule(name, _wrap(original, spec))
        yield model
    finally:
        for name, original in originals.items():
            model.set_submodule(name, original)
