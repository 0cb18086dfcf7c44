"""Calibrate quantization: nn.Linear layers (+ embedding tables) -> the same module, plus a QuantSpec per layer.

Before: a module program. After: the same module, unchanged, and
``program.annotations[name]["quant"]`` holding each selected layer's ``QuantSpec``: its
mode, the weight's format and scales (per output channel, or per block of inputs), for
static layers the input activation's calibrated scale and zero point, and with
``smoothing`` SmoothQuant's per-input-channel factors (layers reading one tensor share them).

Invariant: the module is not modified (exact, tolerance 0). Calibration data is the
*calibration* split of graphopt's sentences (``assert_not_heldout`` refuses held-out text),
``batches`` × ``batch_size`` sentences; only real tokens are observed, padding is not.

Preconditions: kind ``module``; every include/exclude glob matches at least one layer.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
from typing import Callable, Literal

import torch
from torch import nn

from graphopt.pass_base import Pass, PassResult
from graphopt.program import Program
from graphopt.quantization import (OBSERVERS, SUPPORTED_BITS, QuantSpec, TensorQuant, calibrate_weight,
                                   calibration_batches, capture_inputs, get_specs, make_observer, select_layers,
                                   set_spec, smoothing_factors, weight_format)

__all__ = ["QuantCalibrationPass"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CalibrateOptions:
    """Args: mode: how the selected layers run (static, dynamic, weight-only).
    include, exclude: nn.Linear module-name globs. weight_bits: 8, or 4 (weight-only).
    weight_scheme: symmetric (s8/s4) or asymmetric (u8/u4). reduce_range: 7-bit range for
    8-bit static/dynamic weights (no int16 overflow in ORT's u8×s8 kernels without VNNI).
    block_size: 0 for one scale per output channel, else inputs per block (a power of two >= 16; weight-only).
    weight_observer / activation_observer: minmax, moving-average, percentile, mse.
    percentile: for the percentile observer. activation_signed: s8 instead of u8 inputs.
    smoothing: SmoothQuant migration strength α in [0, 1) (0: off): input channel j is divided
    by ``max|x_j|^α / max|W_:j|^(1-α)`` and the weight column multiplied by it. smooth: globs of
    the layers to smooth (among the selected). embeddings: nn.Embedding
    globs stored weight-only; embedding_bits, embedding_block_size: their format.
    batches, batch_size, max_length: calibration data."""

    mode: Literal["static", "dynamic", "weight-only"] = "static"
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    weight_bits: int = 8
    weight_scheme: Literal["symmetric", "asymmetric"] = "symmetric"
    reduce_range: bool = True
    block_size: int = 0
    weight_observer: str = "minmax"
    activation_observer: str = "minmax"
    percentile: float = 99.99
    activation_signed: bool = False
    smoothing: float = 0.0
    smooth: tuple[str, ...] = ("*",)
    embeddings: tuple[str, ...] = ()
    embedding_bits: int = 8
    embedding_block_size: int = 32
    batches: int = 8
    batch_size: int = 16
    max_length: int = 128

    def __post_init__(self) -> None:
        for what, bits in (("weight_bits", self.weight_bits), ("embedding_bits", self.embedding_bits)):
            if bits not in SUPPORTED_BITS:
                raise ValueError(f"{what}={bits} is not supported; use one of {SUPPORTED_BITS}")
        if self.weight_bits == 4 and self.mode != "weight-only":
            raise ValueError(f"4-bit weights run only weight-only (MatMulNBits); mode {self.mode!r} needs "
                             "weight_bits = 8")
        for what, name in (("weight_observer", self.weight_observer),
                           ("activation_observer", self.activation_observer)):
            if name not in OBSERVERS:
                raise ValueError(f"{what}: unknown observer {name!r}; choose one of {', '.join(OBSERVERS)}")
        if self.block_size and self.weight_observer not in ("minmax", "mse"):
            raise ValueError(f"per-block weights are calibrated with 'minmax' or 'mse', not {self.weight_observer!r}")
        for what, size in (("block_size", self.block_size), ("embedding_block_size", self.embedding_block_size)):
            if size and (size < 16 or size & (size - 1)):
                raise ValueError(f"{what}={size}: use a power of two >= 16 (0 for per-channel weights)")
        if self.block_size and self.mode != "weight-only":
            raise ValueError("block_size applies to weight-only layers; static and dynamic weights are per channel")
        if self.mode == "weight-only" and not self.block_size:
            raise ValueError("weight-only layers run as MatMulNBits, which needs blocks: set block_size (e.g. 32)")
        if not self.embedding_block_size:
            raise ValueError("embedding_block_size must be a power of two >= 16")
        if min(self.batches, self.batch_size, self.max_length) < 1:
            raise ValueError("batches, batch_size and max_length must be at least 1")
        if not 0 <= self.smoothing < 1:
            raise ValueError(f"smoothing is a migration strength in [0, 1), got {self.smoothing}")
        if self.smoothing and self.mode == "weight-only":
            raise ValueError("smoothing moves activation outliers into the weights; it applies to static and "
                             "dynamic layers, not weight-only ones")
        if not 50 < self.percentile <= 100:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")


class QuantCalibrationPass(Pass):
    """Observes weights and activations and writes each selected layer's ``QuantSpec``."""

    name = "calibrate"
    kind_in = "module"
    kind_out = "module"
    exact = True
    tolerance = 0.0
    Options = CalibrateOptions
    #: Called with (batches done, total) while calibration data runs; logging is the default.
    progress: Callable[[int, int], None] | None = None

    def call(self, program: Program) -> PassResult:
        o = self.options
        module = program.ir
        layers = select_layers(module, o.include, o.exclude, where=self.name)
        tables = select_layers(module, o.embeddings, (), (nn.Embedding,), where=self.name) if o.embeddings else []
        smoothed = ([n for n in select_layers(module, o.smooth, (), where=f"{self.name}: smooth") if n in layers]
                    if o.smoothing else [])
        batches = self._batches(program) if o.mode == "static" or smoothed else []
        factors = self._smoothing_factors(program, smoothed, batches) if smoothed else {}
        inputs = self._observe_inputs(program, layers, batches, factors) if o.mode == "static" else {}
        for name in layers:
            weight = module.get_submodule(name).weight.detach()
            if name in factors:
                weight = weight * factors[name]
            wtq = weight_format(o.weight_bits, o.weight_scheme, "per-block" if o.block_size else "per-channel",
                                o.block_size or None, reduce_range=o.reduce_range and o.mode != "weight-only")
            act = TensorQuant(8, o.activation_signed, "asymmetric", "per-tensor")
            set_spec(program, name, QuantSpec(
                o.mode, "linear", tuple(weight.shape), weight=calibrate_weight(weight, wtq, o.weight_observer),
                input=inputs[name] if o.mode == "static" else (act if o.mode == "dynamic" else None),
                smoothing=factors[name].numpy().astype(np.float32) if name in factors else None))
        for name in tables:
            table = module.get_submodule(name).weight
            tq = weight_format(o.embedding_bits, "asymmetric", "per-block", o.embedding_block_size)
            set_spec(program, name, QuantSpec("weight-only", "embedding", tuple(table.shape),
                                              weight=calibrate_weight(table, tq, "minmax")))
        notes = {"mode": o.mode, "layers": len(layers), "smoothed": smoothed, "embeddings": tables,
                 "data": program.info.get("calibration_data") if batches else None,
                 "specs": {n: s.as_dict() for n, s in get_specs(program).items() if n in layers + tables}}
        logger.info("calibrate: %d layers (%s), %d smoothed, %d embedding tables", len(layers), o.mode,
                    len(smoothed), len(tables))
        return PassResult(program, modified=bool(layers or tables), notes=notes)

    def _batches(self, program: Program) -> list[dict[str, torch.Tensor]]:
        o = self.options
        batches = calibration_batches(program, o.batches, o.batch_size, o.max_length, where=self.name)
        program.info["calibration_data"] = (f"{sum(len(next(iter(b.values()))) for b in batches)} sentences of the "
                                            "calibration split" if program.tokenizer else "the example inputs")
        return batches

    def _run(self, program: Program, layers: list[str], batches: list[dict],
             callback: Callable[[str, torch.Tensor], None]) -> None:
        with capture_inputs(program.ir, layers, callback) as set_mask:
            for index, batch in enumerate(batches):
                set_mask(batch.get("attention_mask"))
                with torch.no_grad():
                    program.ir(**batch)
                self._report(index + 1, len(batches))

    def _smoothing_factors(self, program: Program, layers: list[str], batches: list[dict]) -> dict[str, torch.Tensor]:
        """SmoothQuant factors; layers reading the same tensor (equal statistics) share theirs."""
        absmax: dict[str, torch.Tensor] = {}

        def collect(name: str, x: torch.Tensor) -> None:
            seen = x.reshape(-1, x.shape[-1]).abs().amax(0)
            absmax[name] = torch.maximum(absmax[name], seen) if name in absmax else seen

        self._run(program, layers, batches, collect)
        groups: list[list[str]] = []
        for name in layers:
            group = next((g for g in groups if torch.equal(absmax[g[0]], absmax[name])), None)
            if group is None:
                groups.append([name])
            else:
                group.append(name)
        factors = {}
        for group in groups:
            weights = [program.ir.get_submodule(n).weight.detach() for n in group]
            shared = smoothing_factors(absmax[group[0]], weights, self.options.smoothing)
            factors.update({n: shared for n in group})
        return factors

    def _observe_inputs(self, program: Program, layers: list[str], batches: list[dict],
                        factors: dict[str, torch.Tensor]) -> dict[str, TensorQuant]:
        """Runs the calibration batches with one input observer per layer (on ``x / s`` where smoothed)."""
        o = self.options
        fmt = TensorQuant(8, o.activation_signed, "asymmetric", "per-tensor")
        extra = {"percentile": o.percentile} if o.activation_observer == "percentile" else {}
        observers = {name: make_observer(o.activation_observer, fmt, **extra) for name in layers}

        def observe(name: str, x: torch.Tensor) -> None:
            observers[name].update(x / factors[name] if name in factors else x)

        self._run(program, layers, batches, observe)
        return {name: observers[name].compute() for name in layers}

    def _report(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(done, total)
        logger.info("calibrate: batch %d/%d", done, total)
