"""Test helpers for pass authors: one ``assert_rewrite`` for every pass test.

It makes the three kinds of assertion a pass test needs (STYLE.md §14): structure (the
op types after the pass), validity (fx lint or the ONNX checker), and numerics (against
the program before the pass: a tight max-abs tolerance for exact passes, a floor on the
signal-to-quantization-noise ratio for lossy ones).
"""

from __future__ import annotations

import collections
from typing import Iterable

import numpy as np

from graphopt.pass_base import Pass
from graphopt.pipeline import verify_program
from graphopt.program import Program

__all__ = ["assert_rewrite", "op_types", "sqnr_db"]


def op_types(program: Program) -> collections.Counter[str]:
    """Counter of ``domain::op_type`` (or ``op_type`` in the default domain) for ONNX, fx targets for modules."""
    if program.kind == "onnx":
        return collections.Counter(f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
                                   for n in program.ir.graph)
    return collections.Counter(str(n.target) for n in program.ir.graph.nodes if n.op.startswith("call_"))


def sqnr_db(candidate: np.ndarray, reference: np.ndarray) -> float:
    """Signal-to-noise ratio in dB of ``candidate`` against ``reference`` (torchao's compute_error)."""
    noise = np.linalg.norm(np.asarray(reference, np.float64) - np.asarray(candidate, np.float64))
    signal = np.linalg.norm(np.asarray(reference, np.float64))
    return float("inf") if noise == 0 else float(20 * np.log10(signal / noise))


def assert_rewrite(pass_: Pass, program: Program, *, expect_ops: dict[str, int] | None = None,
                   absent_ops: Iterable[str] = (), atol: float | None = None, sqnr_floor: float | None = None,
                   expect_modified: bool = True) -> Program:
    """Runs ``pass_`` on a copy of ``program`` and asserts structure, validity and numerics.

    Args:
        expect_ops: op type → exact count after the pass (``"com.microsoft::Attention": 2``).
        absent_ops: op types that must not remain.
        atol: max-abs tolerance against the program before (default: the pass's own, if exact).
        sqnr_floor: for lossy passes, the lowest acceptable SQNR in dB per output.
    Returns:
        The program after the pass, for further assertions.
    """
    before = program.run()
    result = pass_(program.clone())
    after_program = result.program
    assert result.modified == expect_modified, f"{pass_.name}: modified={result.modified}, expected {expect_modified}"
    verify_program(after_program)
    ops = op_types(after_program)
    for op, count in (expect_ops or {}).items():
        assert ops.get(op, 0) == count, f"{pass_.name}: expected {count} × {op}, got {ops.get(op, 0)}; ops: {dict(ops)}"
    for op in absent_ops:
        assert op not in ops, f"{pass_.name}: {op} should be gone, {ops[op]} remain"
    after = after_program.run()
    assert len(after) == len(before)
    tolerance = atol if atol is not None else (pass_.tolerance if pass_.exact else None)
    for got, want in zip(after, before):
        if tolerance is not None:
            np.testing.assert_allclose(got, want, rtol=0, atol=tolerance, err_msg=f"{pass_.name}: outputs moved")
        if sqnr_floor is not None:
            assert sqnr_db(got, want) >= sqnr_floor, f"{pass_.name}: SQNR {sqnr_db(got, want):.1f} dB < {sqnr_floor}"
    return after_program
