"""Quantization-aware training modules: fake-quant Linears whose scales can be learned (LSQ).

``QatLinear`` runs an ``nn.Linear`` as its ``QuantSpec`` says, like ``QuantLinear``, but for
training: the rounding passes the gradient straight through (1 inside the quantization range,
0 outside, as ``torch.fake_quantize_*`` do), and with ``learn_scales`` the weight's and the
static input's scales are parameters that the optimizer moves (LSQ, Esser et al. 2020: the
gradient of ``s · (clamp(round(x/s) + z) − z)`` with respect to ``s`` is ``round(x/s) − x/s``
inside the range and the clamped bound outside). Scales are stored as their logarithm, so
they stay positive whatever the optimizer does and Adam's steps are relative. Zero points
stay the calibrated integers.

Static inputs can also keep observing (moving-average min–max of the batch, ``observing``)
for the first steps of training before their scale is frozen or learned: ``QatObserverHook``
flips that switch from the trainer.

``QatLinear.spec_after()`` is the spec with the trained scales written back; export and
materialisation read it unchanged, so a QAT model exports exactly as a PTQ one does.

Example::

    layers = swap_qat(model, specs, learn_scales=True)
    train(model, teacher, sentences, loss, config, hooks=[QatObserverHook(layers, 20)],
          lr_multipliers={"*.log_scale*": 10.0})
    specs = unswap_qat(model, layers)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from graphopt.quantization.modules import fake_quantize_dynamic
from graphopt.quantization.spec import (
    QuantSpec,
    TensorQuant,
    broadcast_params,
    qparams,
)

__all__ = ["QatLinear", "QatObserverHook", "lsq_fake_quantize", "swap_qat", "unswap_qat"]

logger = logging.getLogger(__name__)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even (as ONNX QuantizeLinear) with an identity gradient."""
    return x + (torch.round(x) - x).detach()


def lsq_fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """``s · (clamp(round(x / s) + z, qmin, qmax) − z)`` with LSQ gradients for ``x`` and ``s``.

    ``scale`` and ``zero`` broadcast against ``x``. Forward equals ``torch.fake_quantize_*``
    with the same parameters; backward: ``∂/∂x`` is 1 inside the range and 0 outside,
    ``∂/∂s`` is ``round(x/s) − x/s`` inside and ``q_bound − z`` outside.
    """
    q = torch.clamp(_round_ste(x / scale) + zero, qmin, qmax)
    return (q - zero) * scale


class _LearnedQuant(nn.Module):
    """One tensor's quantization with a learnable (log) scale, in the layout of its ``TensorQuant``."""

    def __init__(self, tq: TensorQuant, learn: bool) -> None:
        super().__init__()
        assert tq.scale is not None and tq.zero_point is not None
        self.tq = tq
        self.shape = tuple(tq.scale.shape)
        # Flat, so that the trainer's weight decay (matrices only) never touches a per-block scale table.
        self.log_scale = nn.Parameter(torch.from_numpy(tq.scale).double().log().float().reshape(-1),
                                      requires_grad=learn)
        self.register_buffer("zero", torch.from_numpy(tq.zero_point).float().reshape(-1))

    def scale(self) -> torch.Tensor:
        return self.log_scale.exp().reshape(self.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One path for fixed and learned scales: a fixed log-scale simply gets no gradient.
        scale, zero = broadcast_params(self.scale(), self.zero.reshape(self.shape), self.tq, x.shape)
        return lsq_fake_quantize(x, scale, zero, self.tq.qmin, self.tq.qmax)

    @torch.no_grad()
    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        scale, zero = qparams(lo, hi, self.tq)
        self.log_scale.copy_(scale.log().reshape(-1))
        self.zero.copy_(zero.float().reshape(-1))

    def current(self) -> TensorQuant:
        """The ``TensorQuant`` holding the present scale and zero point."""
        with torch.no_grad():
            return self.tq.with_params(self.scale(), self.zero.reshape(self.shape).round().to(torch.int32),
                                       observer=f"{self.tq.observer or 'calibrated'}+qat")


class QatLinear(nn.Module):
    """An ``nn.Linear`` trained under its ``QuantSpec`` (static, dynamic or weight-only); shares its parameters.

    Attributes:
        observing: while True in training, a static input's range follows a moving average of
            each batch's min and max (``momentum``) and its scale is recomputed from it.
    """

    def __init__(self, linear: nn.Linear, spec: QuantSpec, *, learn_scales: bool, momentum: float = 0.1,
                 input_quant: _LearnedQuant | None = None) -> None:
        """``input_quant``: a static input quantizer shared with the other layers that read the same tensor."""
        super().__init__()
        if spec.kind != "linear" or spec.mode == "float" or spec.weight is None:
            raise ValueError(f"QatLinear takes a quantized linear spec, got {spec.kind} {spec.mode}")
        self.linear, self.spec, self.momentum = linear, spec, momentum
        self.weight_quant = _LearnedQuant(spec.weight, learn_scales)
        if spec.mode == "static":
            input_quant = input_quant if input_quant is not None else _LearnedQuant(spec.input, learn_scales)
        self.input_quant = input_quant
        if spec.smoothed:
            self.register_buffer("smoothing", torch.from_numpy(spec.smoothing).float())
        else:
            self.smoothing = None
        self.observing = False
        self._range: tuple[torch.Tensor, torch.Tensor] | None = None
        self.train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.smoothing is not None:
            x = x / self.smoothing
        if self.input_quant is not None:
            if self.observing and self.training:
                self._observe(x)
            x = self.input_quant(x)
        elif self.spec.mode == "dynamic":
            x = fake_quantize_dynamic(x, self.spec.input)
        weight = self.linear.weight if self.smoothing is None else self.linear.weight * self.smoothing
        return F.linear(x, self.weight_quant(weight), self.linear.bias)

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        lo, hi = x.min().float(), x.max().float()
        if self._range is not None:
            m = self.momentum
            lo, hi = (1 - m) * self._range[0] + m * lo, (1 - m) * self._range[1] + m * hi
        self._range = (lo, hi)
        self.input_quant.set_range(lo, hi)

    def spec_after(self) -> QuantSpec:
        """The spec with the trained scales and zero points."""
        return self.spec.replace(weight=self.weight_quant.current(),
                                 input=self.input_quant.current() if self.input_quant is not None else self.spec.input)


class QatObserverHook:
    """A trainer hook: static inputs keep observing until step ``freeze_step``, then are frozen (or learned)."""

    def __init__(self, layers: Mapping[str, QatLinear], freeze_step: int) -> None:
        self.layers, self.freeze_step = layers, freeze_step

    def before_step(self, step: int, student: nn.Module) -> None:
        for layer in self.layers.values():
            layer.observing = step < self.freeze_step


def _input_key(spec: QuantSpec) -> tuple | None:
    """Static layers with the same calibrated input quantization and smoothing read the same tensor
    (Q, K and V after one LayerNorm): they keep one shared, jointly learned input scale, so that
    materialisation still writes one QuantizeLinear for them."""
    if spec.mode != "static" or spec.input is None or not spec.input.calibrated:
        return None
    smoothing = spec.smoothing.tobytes() if spec.smoothed else b""
    return spec.input.scale.tobytes(), spec.input.zero_point.tobytes(), spec.input.signed, smoothing


def swap_qat(model: nn.Module, specs: Mapping[str, QuantSpec], *, learn_scales: bool) -> dict[str, QatLinear]:
    """Puts a ``QatLinear`` in place of every named quantized ``nn.Linear``; returns them by name."""
    layers: dict[str, QatLinear] = {}
    shared: dict[tuple, _LearnedQuant] = {}
    for name, spec in specs.items():
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QAT: {name!r} is {type(linear).__name__}, not nn.Linear")
        key = _input_key(spec)
        if key is not None and key not in shared:
            shared[key] = _LearnedQuant(spec.input, learn_scales)
        layers[name] = QatLinear(linear, spec, learn_scales=learn_scales,
                                 input_quant=shared.get(key) if key is not None else None)
        model.set_submodule(name, layers[name])
    return layers


def unswap_qat(model: nn.Module, layers: Mapping[str, QatLinear]) -> dict[str, QuantSpec]:
    """Puts the (trained) ``nn.Linear``s back; returns each layer's spec with its trained scales."""
    specs = {}
    for name, layer in layers.items():
        specs[name] = layer.spec_after()
        model.set_submodule(name, layer.linear)
    return specs
