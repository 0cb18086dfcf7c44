"""Round weights with error correction: W -> dequantize(quantize(W')), W' chosen by GPTQ (or MSE-clipped RTN).

Before: a module program whose layers carry a ``QuantSpec`` (``calibrate`` ran). After: each
selected layer's weight is replaced by its quantized-and-dequantized value, chosen to
minimise the error of the layer's *output* on calibration inputs (GPTQ: each input column's
rounding error is spread over the columns not yet rounded, through the inverse Hessian
``H = 2·XᵀX``); the spec holds the scales that make those values exact. The ONNX side's
round-to-nearest with the same scales then gives back exactly these codes, so nothing
changes downstream: ``quantize`` materialises them as usual.

Invariant: every selected weight is exactly representable under its spec's format
(``quantize`` then ``dequantize`` returns it); lossy, and the notes give each layer's
output error (``tr(ΔW·H·ΔWᵀ)``) against plain round-to-nearest. Calibration data only.

Preconditions: kind ``module``; ``calibrate`` ran (the specs say each layer's format).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from typing import Literal

import torch

from graphopt.errors import PreconditionError
from graphopt.pass_base import Pass, PassResult
from graphopt.program import Program
from graphopt.quantization import (QuantSpec, block_params, calibrate_weight, calibration_batches, capture_inputs,
                                   fake_quantize, get_specs, gptq, set_spec)

__all__ = ["WeightRoundingPass"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RoundingOptions:
    """Args: method: gptq (error feedback through the Hessian) or mse (round-to-nearest with
    per-block clipping searched for the least weight error). search: how GPTQ sets block
    scales (minmax or mse). act_order: GPTQ columns by decreasing Hessian diagonal.
    damp: Hessian dampening, a fraction of its mean diagonal. modes: which specs' layers to
    round (smoothed layers are left to round-to-nearest). include: module-name globs among
    those. batches, batch_size, max_length: data."""

    method: Literal["gptq", "mse"] = "gptq"
    search: Literal["minmax", "mse"] = "mse"
    act_order: bool = False
    damp: float = 0.01
    modes: tuple[str, ...] = ("weight-only",)
    include: tuple[str, ...] = ("*",)
    batches: int = 8
    batch_size: int = 16
    max_length: int = 128

    def __post_init__(self) -> None:
        if not 0 < self.damp < 1:
            raise ValueError(f"damp must be in (0, 1), got {self.damp}")
        unknown = set(self.modes) - {"static", "dynamic", "weight-only"}
        if unknown:
            raise ValueError(f"modes: unknown {sorted(unknown)}; choose from static, dynamic, weight-only")
        if min(self.batches, self.batch_size, self.max_length) < 1:
            raise ValueError("batches, batch_size and max_length must be at least 1")


class WeightRoundingPass(Pass):
    """Replaces the weights of quantized layers by GPTQ-rounded (or MSE-clipped) values and their scales."""

    name = "round-weights"
    kind_in = "module"
    kind_out = "module"
    exact = False
    tolerance = None
    Options = RoundingOptions

    def _selected(self, program: Program) -> dict[str, QuantSpec]:
        o = self.options
        return {n: s for n, s in get_specs(program).items() if s.kind == "linear" and s.mode in o.modes
                and s.weight is not None and not s.smoothed and any(fnmatch.fnmatchcase(n, g) for g in o.include)}

    def requires(self, program: Program) -> None:
        if not self._selected(program):
            raise PreconditionError(f"pass {self.name!r}: no layer has a spec in modes {list(self.options.modes)} "
                                    f"matching {list(self.options.include)}; put 'calibrate' before it")

    def call(self, program: Program) -> PassResult:
        o = self.options
        specs = self._selected(program)
        hessians = self._hessians(program, list(specs)) if o.method == "gptq" else {}
        layers = {}
        for name, spec in specs.items():
            linear = program.ir.get_submodule(name)
            weight = linear.weight.detach().clone()
            fmt = dataclasses.replace(spec.weight, scale=None, zero_point=None)
            rtn = fake_quantize(weight, spec.weight)
            if o.method == "gptq":
                new, tq = gptq(weight, hessians[name], fmt, damp=o.damp, search=o.search, act_order=o.act_order)
            else:
                per_block = fmt.granularity == "per-block"
                tq = block_params(weight, fmt, "mse") if per_block else calibrate_weight(weight, fmt, "mse")
                new = fake_quantize(weight, tq)
            with torch.no_grad():
                linear.weight.copy_(new)
            set_spec(program, name, spec.replace(weight=tq))
            layers[name] = self._errors(weight, rtn, new, hessians.get(name))
        notes = {"method": o.method, "layers": layers}
        logger.info("round-weights: %d layers by %s", len(layers), o.method)
        return PassResult(program, modified=bool(layers), notes=notes)

    def _hessians(self, program: Program, names: list[str]) -> dict[str, torch.Tensor]:
        """``2·XᵀX / n`` of each layer's real-token inputs over the calibration batches."""
        o = self.options
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {n: 0 for n in names}

        def collect(name: str, x: torch.Tensor) -> None:
            rows = x.reshape(-1, x.shape[-1]).double()
            sums[name] = sums.get(name, 0) + rows.T @ rows
            counts[name] += rows.shape[0]

        batches = calibration_batches(program, o.batches, o.batch_size, o.max_length, where=self.name)
        with capture_inputs(program.ir, names, collect) as set_mask, torch.no_grad():
            for batch in batches:
                set_mask(batch.get("attention_mask"))
                program.ir(**batch)
        return {n: 2 * sums[n] / max(counts[n], 1) for n in names}

    @staticmethod
    def _errors(weight: torch.Tensor, rtn: torch.Tensor, new: torch.Tensor, hessian: torch.Tensor | None) -> dict:
        """Output error of round-to-nearest and of the chosen weights (weight error without a Hessian)."""
        def error(candidate: torch.Tensor) -> float:
            delta = (candidate - weight).double()
            return float(torch.sum((delta @ hessian) * delta)) if hessian is not None else float(torch.sum(delta ** 2))
        rtn_err, new_err = error(rtn), error(new)
        return {"rtn_error": rtn_err, "error": new_err, "ratio": new_err / rtn_err if rtn_err else 1.0}
