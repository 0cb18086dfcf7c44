"""Fuzz smoke run (CI): mutated recipes, ONNX bytes, ONNX structures and .pt2 archives.

Every case must end in success or a GraphoptError, with nothing written and no payload
run; a crash, hang, foreign exception or leftover file fails the test and names the
case. ``benchmarks/reliability.py`` runs the long campaign (≥ 10,000 cases per category).
"""

from __future__ import annotations

import collections

import pytest

from graphopt.fuzzing import generate_cases, run_cases

SMOKE = {"recipe": 150, "onnx-bytes": 25, "onnx-structure": 25, "pt2": 25}


@pytest.mark.timeout(300) if hasattr(pytest.mark, "timeout") else (lambda f: f)
def test_fuzz_smoke(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("GRAPHOPT_FUZZ_MARKER", str(tmp_path / "payload-ran"))
    cases = list(generate_cases(SMOKE, seed=1234))
    outcomes = list(run_cases(((target, data) for _, target, data in cases), timeout=120))
    failures = [(category, o.verdict, o.detail) for (category, _, _), o in zip(cases, outcomes) if o.failed]
    tally = collections.Counter((category, o.verdict) for (category, _, _), o in zip(cases, outcomes))
    assert not failures, f"fuzz failures: {failures[:5]} (tally {dict(tally)})"
    assert len(outcomes) == sum(SMOKE.values())
    assert any(o.verdict == "refused" for o in outcomes) and any(o.verdict == "ok" for o in outcomes)
