"""distill after depth-shrink on the tiny encoder: it trains, reports, and needs a teacher."""

from __future__ import annotations

import pytest

import graphopt
from graphopt import registry
from graphopt.errors import PreconditionError
from graphopt.program import Program


pytestmark = pytest.mark.usefixtures("one_thread")


def test_distill_after_depth_shrink_moves_towards_the_teacher(tiny_program: Program) -> None:
    shrink = registry.passes.get("depth-shrink")()
    distill = registry.passes.get("distill")(steps=12, batch_size=8, lr=1e-3, warmup_steps=1, max_length=32,
                                             data=("sentences",), soft_label=0.0, output=1.0, dropout=False)
    seen = []
    distill.train_progress = seen.append
    pipeline = graphopt.Pipeline([shrink, distill])
    program = pipeline.run(tiny_program)
    shrunk, distilled = program.history
    assert distilled.notes["train"]["steps"] == 12 and len(seen) == 12
    held = distilled.notes["heldout_vs_teacher"]
    assert held["before"]["n"] == held["after"]["n"] == 116
    # Closer to the teacher (which is the original model) on held-out sentences, and in the drift.
    assert held["after"]["mean_cosine"] > held["before"]["mean_cosine"]
    assert distilled.total_drift.max_abs < shrunk.total_drift.max_abs
    assert distilled.notes["data"]["sentences"] > 250 and not program.ir.training
    assert len(list(program.ir.layers.children())) == 1


def test_distill_without_a_teacher_says_what_to_do(tiny_program: Program) -> None:
    with pytest.raises(PreconditionError, match="put 'depth-shrink'"):
        registry.passes.get("distill")(steps=1)(tiny_program)


def test_options_are_checked() -> None:
    distill = registry.passes.get("distill")
    with pytest.raises(ValueError, match="data must name"):
        distill(data=("wikipedia",))
    with pytest.raises(ValueError, match="at least one of"):
        distill(soft_label=0.0, hidden=0.0, attention=0.0)
    with pytest.raises(ValueError, match="lr must be positive"):
        distill(lr=0.0)
