"""The pipeline: kind chain, records, and the guard that stops an exact pass that lies."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import graphopt
from graphopt import registry
from graphopt.errors import NumericsError, PreconditionError
from graphopt.pass_base import Pass, PassResult
from graphopt.program import Program


class ScaleLastLinearPass(Pass):
    """Test pass: multiplies the last Linear's weight by ``factor`` while claiming to be exact."""

    name = "scale-last-linear"
    kind_in = kind_out = "module"
    exact = True
    tolerance = 1e-5

    @dataclasses.dataclass(frozen=True)
    class Options:
        factor: float = 1.0

    def call(self, program: Program) -> PassResult:
        linear = [m for m in program.ir.modules() if isinstance(m, torch.nn.Linear)][-1]
        with torch.no_grad():
            linear.weight.mul_(self.options.factor)
        return PassResult(program, self.options.factor != 1.0)


def test_records_every_pass(tiny_program: Program) -> None:
    export = registry.passes.get("export")()
    program = graphopt.Pipeline([ScaleLastLinearPass(), export]).run(tiny_program)
    assert [r.name for r in program.history] == ["scale-last-linear", "export"]
    first, second = program.history
    assert not first.modified and first.step_drift.max_abs == 0.0
    assert second.kind_in == "module" and second.kind_out == "onnx"
    assert second.nodes[1] > 0 and second.param_bytes[1] > 0.9 * second.param_bytes[0]
    assert second.total_drift.max_abs <= export.tolerance
    assert second.total_drift.min_cosine > 0.99999
    assert second.wall_s > 0


def test_exact_pass_over_tolerance_stops_the_run_naming_it(tiny_program: Program) -> None:
    export = registry.passes.get("export")()
    with pytest.raises(NumericsError, match=r"'scale-last-linear'.*'embedding'.*over its declared tolerance"):
        graphopt.Pipeline([ScaleLastLinearPass(factor=1.01), export]).run(tiny_program)


def test_exact_pass_within_tolerance_passes(tiny_program: Program) -> None:
    program = graphopt.Pipeline([ScaleLastLinearPass(factor=1.0 + 1e-7)]).run(tiny_program)
    assert program.history[0].step_drift.max_abs <= 1e-5


def test_kind_chain_checked_before_any_work(tiny_program: Program) -> None:
    export = registry.passes.get("export")
    pipeline = graphopt.Pipeline([export(), ScaleLastLinearPass(factor=2.0)])
    weight = [m for m in tiny_program.ir.modules() if isinstance(m, torch.nn.Linear)][-1].weight.clone()
    with pytest.raises(PreconditionError, match=r"step 2 \('scale-last-linear'\) takes kind 'module'.*before 'export'"):
        pipeline.run(tiny_program)
    after = [m for m in tiny_program.ir.modules() if isinstance(m, torch.nn.Linear)][-1].weight
    assert torch.equal(weight, after), "no pass may run when the chain is wrong"
    assert tiny_program.history == []


def test_pass_options_are_typed(tiny_program: Program) -> None:
    with pytest.raises(ValueError, match="option 'factor' must be float"):
        ScaleLastLinearPass(factor="big")
    with pytest.raises(ValueError, match="did you mean 'factor'"):
        ScaleLastLinearPass(facter=2.0)


def test_last_by_kind_keeps_module_side(tiny_program: Program) -> None:
    pipeline = graphopt.Pipeline([registry.passes.get("export")()])
    final = pipeline.run(tiny_program)
    assert final.kind == "onnx"
    assert pipeline.last_by_kind["module"].kind == "module"
    np.testing.assert_allclose(pipeline.last_by_kind["module"].run()[0], final.run()[0], atol=1e-5)
