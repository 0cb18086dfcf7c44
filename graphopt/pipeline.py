"""The pipeline: runs passes in order and instruments every one.

Before any work it checks the chain of kinds (each pass takes what the one before it
returns) and names the step out of place. After every pass it records wall time,
parameter bytes, node count, drift against the program before the pass and cumulative
drift against the original model. An exact pass whose drift exceeds its declared
tolerance stops the run with a ``NumericsError`` that names the pass, the worst output and
every pass before it. Progress displays and IR dumps are ``Instrument``s; the pipeline
itself never prints.

Example::

    pipeline = Pipeline([registry.passes.get("export")()])
    program = pipeline.run(graphopt.trace(model, example_inputs))
    print(program.history[-1].total_drift)
"""

from __future__ import annotations

import logging
import time
from typing import Protocol, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import torch

from graphopt.errors import GraphoptError, NumericsError, PassError, PreconditionError
from graphopt.pass_base import Pass
from graphopt.program import Drift, Kind, PassRecord, Program

__all__ = ["Pipeline", "Instrument", "verify_program"]

logger = logging.getLogger(__name__)


class Instrument(Protocol):
    """Observes a pipeline run; every hook is optional in spirit (implement them as no-ops)."""

    def before_pass(self, index: int, total: int, pass_: Pass, program: Program) -> None: ...

    def after_pass(self, index: int, total: int, pass_: Pass, record: PassRecord) -> None: ...


def verify_program(program: Program) -> None:
    """Structural check: fx ``graph.lint()`` or the ONNX checker. Raises ``PassError``."""
    try:
        if program.kind == "onnx":
            onnx.checker.check_model(ir.to_proto(program.ir))
        elif isinstance(program.ir, torch.fx.GraphModule):
            program.ir.graph.lint()
    except Exception as error:
        raise PassError(f"the program no longer verifies: {type(error).__name__}: {error}") from error


class Pipeline:
    """An ordered list of passes, run with instrumentation and a numerics guard.

    Args:
        passes: Pass instances, in order.
        instruments: Observers called before and after each pass.
        measure: Run the program after every pass to record drift (and guard exact passes).
        verify: Run ``verify_program`` after every pass that modified the program.
    """

    def __init__(self, passes: Sequence[Pass], *, instruments: Sequence[Instrument] = (),
                 measure: bool = True, verify: bool = True) -> None:
        self.passes = list(passes)
        self.instruments = list(instruments)
        self.measure, self.verify = measure, verify
        #: After ``run``: the last program of each kind, so a module backend can compile the
        #: module side of a pipeline that went on to export.
        self.last_by_kind: dict[Kind, Program] = {}

    def __repr__(self) -> str:
        return f"Pipeline([{', '.join(p.name for p in self.passes)}])"

    def check_kinds(self, start: Kind) -> None:
        """Raises ``PreconditionError`` naming the first pass that cannot take what it is given."""
        kind = start
        for index, pass_ in enumerate(self.passes):
            if pass_.kind_in != kind:
                where = "the input model" if index == 0 else f"step {index} ({self.passes[index - 1].name!r})"
                fix = ("it needs the module side: put it before 'export' (an ONNX file has no module side)"
                       if pass_.kind_in == "module" else "put it after 'export'")
                raise PreconditionError(f"step {index + 1} ({pass_.name!r}) takes kind {pass_.kind_in!r} "
                                        f"but {where} gives kind {kind!r}: {fix}")
            kind = pass_.kind_out

    def run(self, program: Program) -> Program:
        """Runs every pass on ``program`` and returns the final program (history appended)."""
        self.check_kinds(program.kind)
        self.last_by_kind = {program.kind: program}
        before = program.run() if self.measure else None
        total = len(self.passes)
        for index, pass_ in enumerate(self.passes):
            for instrument in self.instruments:
                instrument.before_pass(index, total, pass_, program)
            params_before, nodes_before = program.parameter_bytes(), program.node_count()
            start = time.perf_counter()
            try:
                result = pass_(program)
            except GraphoptError as error:
                raise type(error)(f"{error}{self._after(index)}") from error
            wall = time.perf_counter() - start
            program = result.program
            if self.verify and result.modified:
                try:
                    verify_program(program)
                except PassError as error:
                    raise PassError(f"after pass {pass_.name!r}: {error}{self._after(index)}") from error
            step = total_drift = None
            if self.measure:
                after = program.run()
                names = program.output_names
                step = Drift.between(after, before, names) if before is not None else None
                total_drift = Drift.between(after, program.reference_output, names)
                before = after
                self._guard(index, pass_, step)
            record = PassRecord(
                name=pass_.name, options=pass_.options_dict(), kind_in=pass_.kind_in,
                kind_out=pass_.kind_out, exact=pass_.exact, tolerance=pass_.tolerance if pass_.exact else None,
                modified=result.modified, wall_s=wall, param_bytes=(params_before, program.parameter_bytes()),
                nodes=(nodes_before, program.node_count()), step_drift=step, total_drift=total_drift,
                notes=dict(result.notes))
            program.history.append(record)
            self.last_by_kind[program.kind] = program
            logger.info("pass %s: %.2fs, %d -> %d nodes", pass_.name, wall, *record.nodes)
            for instrument in self.instruments:
                instrument.after_pass(index, total, pass_, record)
        return program

    def _after(self, index: int) -> str:
        done = [p.name for p in self.passes[:index]]
        return f" (after {', '.join(repr(n) for n in done)})" if done else " (the first pass)"

    def _guard(self, index: int, pass_: Pass, step: Drift | None) -> None:
        if step is None or not pass_.exact or pass_.tolerance is None:
            return
        if not np.isfinite(step.max_abs) or step.max_abs > pass_.tolerance:
            raise NumericsError(
                f"exact pass {pass_.name!r} changed output {step.worst_output!r} by {step.max_abs:.3g} "
                f"(max abs), over its declared tolerance {pass_.tolerance:.3g}; worst cosine "
                f"{step.min_cosine:.6f}{self._after(index)}. This is a bug in the pass: report it, "
                f"or remove it from the recipe")
