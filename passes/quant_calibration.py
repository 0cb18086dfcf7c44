"""Calibrate quantization: nn.Linear layers (+ embedding tables) -> the same module, plus a QuantSpec per layer.

Before: a module program. After: the same module, unchanged, and
``program.annotations[name]["quant"]`` holding each selected layer's ``QuantSpec``: its
mode, the weight's format and scales (per output channel, or per block of inputs), and for
static layers the input activation's calibrated scale and zero point.

Invariant: the module is not modified (exact, tolerance 0). Calibration data is the
*calibration* split of graphopt's sentences (``assert_not_heldout`` refuses held-out text),
``batches`` × ``batch_size`` sentences; only real tokens are observed, padding is not.

Preconditions: kind ``module``; every include/exclude glob matches at least one layer.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Literal

import torch
from torch import nn

from graphopt.pass_base import Pass, PassResult
from graphopt.program import Program
from graphopt.quantization import (OBSERVERS, SUPPORTED_BITS, QuantSpec, TensorQuant, calibrate_weight,
                                   calibration_batches, capture_inputs, make_observer, select_layers, set_spec,
                                   weight_format)

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
    embeddings: nn.Embedding
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
        inputs = self._observe_inputs(program, layers) if o.mode == "static" else {}
        notes = {"mode": o.mode, "layers": len(layers), "embeddings": tables}
        for name in layers:
            linear = module.get_submodule(name)
            wtq = weight_format(o.weight_bits, o.weight_scheme, "per-block" if o.block_size else "per-channel",
                                o.block_size or None, reduce_range=o.reduce_range and o.mode != "weight-only")
            act = TensorQuant(8, o.activation_signed, "asymmetric", "per-tensor")
            spec = QuantSpec(o.mode, "linear", tuple(linear.weight.shape),
                             weight=calibrate_weight(linear.weight, wtq, o.weight_observer),
                             input=inputs[name] if o.mode == "static" else (act if o.mode == "dynamic" else None))
            set_spec(program, name, spec)
        for name in tables:
            table = module.get_submodule(name).weight
            tq = weight_format(o.embedding_bits, "asymmetric", "per-block", o.embedding_block_size)
            set_spec(program, name, QuantSpec("weight-only", "embedding", tuple(table.shape),
                                              weight=calibrate_weight(table, tq, "minmax")))
        if inputs:
            notes["data"] = program.info.get("calibration_data", "")
        logger.info("calibrate: %d layers (%s), %d embedding tables", len(layers), o.mode, len(tables))
        return PassResult(program, modified=bool(layers or tables), notes=notes)

    def _observe_inputs(self, program: Program, layers: list[str]) -> dict[str, TensorQuant]:
        """Runs the calibration batches with one input observer per layer."""
        o = self.options
        batches = calibration_batches(program, o.batches, o.batch_size, o.max_length, where=self.name)
        program.info["calibration_data"] = (f"{sum(len(next(iter(b.values()))) for b in batches)} sentences of the "
                                            "calibration split" if program.tokenizer else "the example inputs")
        fmt = TensorQuant(8, o.activation_signed, "asymmetric", "per-tensor")
        extra = {"percentile": o.percentile} if o.activation_observer == "percentile" else {}
        observers = {name: make_observer(o.activation_observer, fmt, **extra) for name in layers}
        with capture_inputs(program.ir, layers, lambda name, x: observers[name].update(x)) as set_mask:
            for index, batch in enumerate(batches):
                set_mask(batch.get("attention_mask"))
                with torch.no_grad():
                    program.ir(**batch)
                self._report(index + 1, len(batches))
        return {name: observers[name].compute() for name in layers}

    def _report(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(done, total)
        logger.info("calibrate: batch %d/%d", done, total)
