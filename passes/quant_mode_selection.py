"""Choose each layer's mode by sensitivity: QuantSpec(static) per layer -> static, dynamic or float per layer.

Before: a module program whose layers carry calibrated ``QuantSpec``s (``calibrate`` with
mode ``static``). After: the same module; each spec's ``mode`` is the first of
``candidates`` (fastest first) that keeps the whole model within the drift budget, and its
``notes`` say why: the layer's own sensitivity in every mode and the step that moved it.

Sensitivity of a layer in a mode is the drift (1 - mean row cosine of the model output,
and the worst cosine) when that layer alone is fake-quantized in that mode, on calibration
batches. The assignment starts with every layer in the first candidate and, while the
whole fake-quantized model misses ``min_mean_cosine`` or ``min_worst_cosine``, moves the
layer whose current mode is most sensitive to its next candidate. Greedy and explainable:
every move is listed in the notes.

Invariant: the module is not modified (exact, tolerance 0); only the specs' modes change.
Calibration data only (``assert_not_heldout``).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Literal

from torch import nn

from graphopt.errors import PreconditionError
from graphopt.pass_base import Pass, PassResult
from graphopt.program import Program
from graphopt.quantization import (QuantSpec, TensorQuant, agreement, block_params, calibration_batches, get_specs,
                                   run_outputs, set_spec, swap_fake_quant, weight_format)

__all__ = ["QuantModeSelectionPass"]

logger = logging.getLogger(__name__)

Candidate = Literal["static", "dynamic", "weight-only", "float"]


@dataclasses.dataclass(frozen=True)
class ModeSelectionOptions:
    """Args: candidates: modes to choose from, preferred (fastest) first; float last.
    min_mean_cosine, min_worst_cosine: the drift budget, on calibration outputs.
    weight_only_block_size: block of the 8-bit weight-only candidate. batches, batch_size,
    max_length: calibration data for the budget check (all 150 calibration sentences by
    default: the worst-case cosine needs the short ones); sensitivity_batches: the first few
    of those batches, for ranking layers one at a time."""

    candidates: tuple[Candidate, ...] = ("static", "dynamic", "float")
    min_mean_cosine: float = 0.995
    min_worst_cosine: float = 0.98
    weight_only_block_size: int = 32
    batches: int = 10
    sensitivity_batches: int = 2
    batch_size: int = 16
    max_length: int = 128

    def __post_init__(self) -> None:
        known = ("static", "dynamic", "weight-only", "float")
        for mode in self.candidates:
            if mode not in known:
                raise ValueError(f"unknown candidate mode {mode!r}; choose from {', '.join(known)}")
        if not self.candidates or self.candidates[-1] != "float" or len(set(self.candidates)) != len(self.candidates):
            raise ValueError(f"candidates must be distinct and end with 'float' (the fallback), got {self.candidates}")
        for what, value in (("min_mean_cosine", self.min_mean_cosine), ("min_worst_cosine", self.min_worst_cosine)):
            if not -1 <= value <= 1:
                raise ValueError(f"{what} must be a cosine in [-1, 1], got {value}")
        if min(self.batches, self.sensitivity_batches, self.batch_size, self.max_length) < 1:
            raise ValueError("batches, sensitivity_batches, batch_size and max_length must be at least 1")


class QuantModeSelectionPass(Pass):
    """Measures each layer's sensitivity and picks its mode to meet the drift budget."""

    name = "mixed-precision"
    kind_in = "module"
    kind_out = "module"
    exact = True
    tolerance = 0.0
    Options = ModeSelectionOptions

    def requires(self, program: Program) -> None:
        specs = {n: s for n, s in get_specs(program).items() if s.kind == "linear"}
        if not specs:
            raise PreconditionError(f"pass {self.name!r} needs calibrated layers: put 'calibrate' (mode = "
                                    "\"static\") before it")
        if "static" in self.options.candidates:
            uncalibrated = [n for n, s in specs.items() if s.input is None or not s.input.calibrated]
            if uncalibrated:
                raise PreconditionError(f"pass {self.name!r}: layer {uncalibrated[0]!r} has no calibrated input "
                                        "scale for the 'static' candidate; run 'calibrate' with mode = \"static\"")

    def call(self, program: Program) -> PassResult:
        o = self.options
        specs = {n: s for n, s in get_specs(program).items() if s.kind == "linear"}
        fixed = {n: s for n, s in get_specs(program).items() if s.kind != "linear"}
        batches = calibration_batches(program, o.batches, o.batch_size, o.max_length, where=self.name)
        options = {name: {mode: self._spec_for(program.ir, name, spec, mode) for mode in o.candidates}
                   for name, spec in specs.items()}
        probe = _Probe(program.ir, batches, o.sensitivity_batches, fixed, options)
        chosen, reasons, moves, current = self._assign(probe, list(specs))
        ranked = sorted(specs, key=lambda n: -self._cost(probe.layer(n, o.candidates[0])))
        layers = {}
        for name, index in chosen.items():
            mode = o.candidates[index]
            sens = {m: {"mean_cosine": round(v[0], 6), "worst_cosine": round(v[1], 6)}
                    for m, v in probe.measured[name].items()}
            why = f"{o.candidates[0]} sensitivity rank {ranked.index(name) + 1} of {len(ranked)}; {reasons[name]}"
            set_spec(program, name, options[name][mode].replace(notes={"sensitivity": sens, "reason": why}))
            layers[name] = {"mode": mode, "reason": why, "sensitivity": sens}
        notes = {"budget": {"min_mean_cosine": o.min_mean_cosine, "min_worst_cosine": o.min_worst_cosine},
                 "calibration_agreement": {"mean_cosine": current[0], "worst_cosine": current[1]},
                 "met": self._within(current), "moves": moves, "layers": layers,
                 "modes": {m: sum(1 for i in chosen.values() if o.candidates[i] == m) for m in o.candidates}}
        return PassResult(program, modified=bool(specs), notes=notes)

    def _assign(self, probe: _Probe, names: list[str],
                ) -> tuple[dict[str, int], dict[str, str], list[str], tuple[float, float]]:
        """Greedy: all in the first candidate; while over budget, move the costliest layer on."""
        o = self.options
        chosen = {name: 0 for name in names}
        reasons = {name: "within budget" for name in names}
        moves: list[str] = []
        last = len(o.candidates) - 1
        current = probe.model({n: o.candidates[0] for n in names})
        while not self._within(current) and any(i < last for i in chosen.values()):
            name = max((n for n, i in chosen.items() if i < last),
                       key=lambda n: self._cost(probe.layer(n, o.candidates[chosen[n]])))
            old = chosen[name]
            chosen[name], reasons[name] = self._next(name, old, probe.layer)
            current = probe.model({n: o.candidates[i] for n, i in chosen.items()})
            moves.append(f"{name}: {o.candidates[old]} -> {o.candidates[chosen[name]]} (model mean cosine "
                         f"{current[0]:.5f}, worst {current[1]:.5f})")
            logger.info("mixed-precision: %s", moves[-1])
        return chosen, reasons, moves, current

    def _next(self, name: str, index: int, sensitivity_of: Callable[[str, str], tuple[float, float]],
              ) -> tuple[int, str]:
        """The next candidate that measurably helps (a tenth less drift), else the last (float), and why."""
        o = self.options
        now = self._cost(sensitivity_of(name, o.candidates[index]))
        skipped = []
        for j in range(index + 1, len(o.candidates) - 1):
            cost = self._cost(sensitivity_of(name, o.candidates[j]))
            if cost < 0.9 * now:
                why = f"{o.candidates[j]}: {o.candidates[index]} was the most sensitive layer left over budget"
                return j, why + (f" ({', '.join(skipped)} measured no better)" if skipped else "")
            skipped.append(o.candidates[j])
        why = f"{o.candidates[-1]}: {o.candidates[index]} was the most sensitive layer left over budget"
        return len(o.candidates) - 1, why + (f" ({', '.join(skipped)} measured no better)" if skipped else "")

    def _within(self, measured: tuple[float, float]) -> bool:
        return measured[0] >= self.options.min_mean_cosine and measured[1] >= self.options.min_worst_cosine

    def _cost(self, measured: tuple[float, float]) -> float:
        """How much a layer hurts: drift of the mean plus drift of the worst cosine, each scaled to its budget."""
        o = self.options
        mean_drift = (1 - measured[0]) / max(1 - o.min_mean_cosine, 1e-9)
        return mean_drift + (1 - measured[1]) / max(1 - o.min_worst_cosine, 1e-9)

    def _spec_for(self, module: nn.Module, name: str, spec: QuantSpec, mode: str) -> QuantSpec:
        """The layer's spec in ``mode``: its calibrated weight, with the input the mode needs."""
        if mode in ("static", "float"):
            return spec.replace(mode=mode)
        if mode == "dynamic":
            fmt = TensorQuant(8, spec.input.signed if spec.input else False, "asymmetric", "per-tensor")
            return spec.replace(mode="dynamic", input=fmt)
        block = weight_format(8, "symmetric", "per-block", self.options.weight_only_block_size)
        return spec.replace(mode="weight-only", input=None, smoothing=None,
                            weight=block_params(module.get_submodule(name).weight, block))


class _Probe:
    """Runs the calibration batches with some layers fake-quantized; caches each layer's drift per mode."""

    def __init__(self, module: nn.Module, batches: list[dict], sensitivity_batches: int, fixed: dict[str, QuantSpec],
                 options: dict[str, dict[str, QuantSpec]]) -> None:
        self.module, self.batches, self.fixed, self.options = module, batches, fixed, options
        self.few = min(sensitivity_batches, len(batches))
        self.reference = run_outputs(module, batches)
        self.measured: dict[str, dict[str, tuple[float, float]]] = {name: {} for name in options}

    def model(self, modes: dict[str, str], batches: int | None = None) -> tuple[float, float]:
        """Mean and worst output cosine with every named layer in its mode (the rest float)."""
        assignment = {**self.fixed, **{name: self.options[name][mode] for name, mode in modes.items()}}
        count = batches or len(self.batches)
        with swap_fake_quant(self.module, assignment):
            return agreement(run_outputs(self.module, self.batches[:count]), self.reference[:count])

    def layer(self, name: str, mode: str) -> tuple[float, float]:
        """The drift of ``name`` alone in ``mode`` on the first few batches, measured once."""
        if mode not in self.measured[name]:
            self.measured[name][mode] = self.model({name: mode}, self.few)
        return self.measured[name][mode]
