"""What a compressed artifact gained over a baseline recipe's: size, ONNX Runtime speed, held-out accuracy.

``graphopt compress --baseline fp32`` (``compress(..., baseline="fp32")``) builds the
baseline recipe's artifacts from the same model, then, for each backend both produced as
ONNX files, measures both files with `graphopt.bench.bench_files` (one session at a time,
spinning off, batch 1 and 8 at sequence 128) and sets the sizes and the final checks side
by side. The figures are in ``report["baseline"]``; latency on a shared machine is only
meaningful beyond about ±10% (±20% at batch 1), which the report says beside them.

Example::

    result = graphopt.compress("minilm", "int8-static", baseline="fp32")
    row = result.report["baseline"]["onnxruntime"]
    print(row["size_ratio"], row["latency"]["8"]["speedup"])
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from graphopt.backend import Executable
from graphopt.bench import BenchSettings, bench_files

__all__ = ["compare_to_baseline", "BASELINE_BENCH"]

logger = logging.getLogger(__name__)

#: How the artifact and the baseline are timed: enough runs for a stable median on a quiet machine.
BASELINE_BENCH = BenchSettings(batch_sizes=(1, 8), sequence_lengths=(128,), threads=None, warmup=5, rounds=20)


def compare_to_baseline(recipe: str, ours: Mapping[str, Executable], theirs: Mapping[str, Executable],
                        our_checks: Mapping[str, Any], their_checks: Mapping[str, Any], *,
                        settings: BenchSettings = BASELINE_BENCH,
                        progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Size, latency and accuracy of each of ``ours`` against the baseline's executable of the same backend.

    Only backends that write an ``.onnx`` artifact in both are timed (``bench_files`` runs ONNX
    Runtime); the others get size and accuracy only.
    """
    result: dict[str, Any] = {"recipe": recipe, "noise": "a speed-up counts beyond ±10% (±20% at batch 1)"}
    for name, executable in ours.items():
        base = theirs.get(name)
        if base is None:
            continue
        row: dict[str, Any] = {}
        with tempfile.TemporaryDirectory(prefix="graphopt-baseline-") as tmp:
            ours_path = executable.save(Path(tmp) / "ours")
            base_path = base.save(Path(tmp) / "baseline")
            row["bytes"] = _size(ours_path.parent)
            row["baseline_bytes"] = _size(base_path.parent)
            row["size_ratio"] = row["bytes"] / row["baseline_bytes"]
            if ours_path.suffix == base_path.suffix == ".onnx":
                if progress:
                    progress(f"timing {name} against the {recipe} baseline")
                timed = bench_files([ours_path, base_path], settings)["results"]
                row["latency"] = {}
                for batch in settings.batch_sizes:
                    mine = next(r for r in timed if r["file"] == str(ours_path) and r["batch"] == batch)
                    other = next(r for r in timed if r["file"] == str(base_path) and r["batch"] == batch)
                    row["latency"][str(batch)] = {"p50_ms": mine["p50_ms"], "baseline_p50_ms": other["p50_ms"],
                                                  "speedup": other["p50_ms"] / mine["p50_ms"]}
        if name in our_checks and name in their_checks:
            row["accuracy"] = {"ours": dict(our_checks[name]), "baseline": dict(their_checks[name])}
        result[name] = row
    return result


def _size(folder: Path) -> int:
    """Bytes of the artifact files (external data included)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def summary_rows(comparison: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows for printing a comparison: one row per backend."""
    header = ["backend", "size MB (baseline)", "size ratio", "b1 p50 ms (baseline)", "b1 speed-up",
              "b8 p50 ms (baseline)", "b8 speed-up", "mean cos (baseline)", "worst cos (baseline)"]
    rows = []
    for name, row in comparison.items():
        if not isinstance(row, dict):
            continue
        latency = row.get("latency", {})
        cells = [name, f"{row['bytes'] / 1e6:.1f} ({row['baseline_bytes'] / 1e6:.1f})", f"{row['size_ratio']:.2f}×"]
        for batch in ("1", "8"):
            t = latency.get(batch)
            cells += ([f"{t['p50_ms']:.1f} ({t['baseline_p50_ms']:.1f})", f"{t['speedup']:.2f}×"] if t else ["-", "-"])
        accuracy = row.get("accuracy")
        for key in ("mean_cosine", "worst_cosine"):
            cells.append(f"{accuracy['ours'][key]:.4f} ({accuracy['baseline'][key]:.4f})"
                         if accuracy and key in accuracy["ours"] else "-")
        rows.append(cells)
    return header, rows
