"""Test helpers for pass authors: one ``assert_rewrite`` for every pass test.

It makes the three kinds of assertion a pass test needs (STYLE.md §14): structure (the
op types after the pass), validity (fx lint or the ONNX checker), and numerics (against
the program before the pass: a tight max-abs tolerance for exact passes, a floor on the
signal-to-quantization-noise ratio for lossy ones). ``assert_backends_agree`` compares the
outputs of several lowered artifacts (ONNX Runtime, cpp) with the torch reference.
"""

from __future__ import annotations

import collections
from typing import Iterable, Mapping, Sequence

import numpy as np

from graphopt.pass_base import Pass
from graphopt.pipeline import verify_program
from graphopt.program import Program

__all__ = ["assert_backends_agree", "assert_rewrite", "op_types", "sqnr_db"]


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


def assert_backends_agree(reference: np.ndarray | Sequence[np.ndarray],
                          candidates: Mapping[str, np.ndarray | Sequence[np.ndarray]], *, atol: float) -> None:
    """Asserts that every backend's outputs match the reference and each other, max abs ≤ ``atol``.

    Args:
        reference: the torch module's output(s) on the inputs the candidates ran on.
        candidates: backend name → its output(s) on the same inputs (``{"onnxruntime": ..., "cpp": ...}``).
        atol: the largest absolute difference allowed between any two of them.
    """
    def outputs(value: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
        return [np.asarray(value)] if isinstance(value, np.ndarray) else [np.asarray(v) for v in value]

    named = {"torch": outputs(reference), **{name: outputs(value) for name, value in candidates.items()}}
    names = list(named)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            a, b = named[first], named[second]
            assert len(a) == len(b), f"{first} gave {len(a)} outputs, {second} {len(b)}"
            for k, (x, y) in enumerate(zip(a, b)):
                assert x.shape == y.shape, f"output {k}: {first} {x.shape} vs {second} {y.shape}"
                diff = float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) if x.size else 0.0
                assert diff <= atol, f"output {k}: {first} and {second} differ by {diff:.3g} > {atol:g}"
