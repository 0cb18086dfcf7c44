"""The report: what each pass did to size, speed and accuracy, as JSON and Markdown.

``report.json`` holds everything, timings included; ``report.md`` is the same for
people. The artifact itself carries provenance but no timings (see ``backend.provenance``).
"""

from __future__ import annotations

import json
import platform
from typing import Any, Mapping

__all__ = ["build_report", "render_markdown", "pass_table_rows", "versions"]


def versions() -> dict[str, str]:
    """Versions of graphopt and what it builds on, for reports and benchmarks."""
    import numpy
    import onnx
    import onnx_ir
    import onnxruntime
    import onnxscript
    import torch

    from graphopt import __version__

    return {"graphopt": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnx_ir": onnx_ir.__version__, "onnxscript": onnxscript.__version__,
            "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__,
            "python": platform.python_version()}


def build_report(*, recipe: Mapping[str, Any], program: Any, checks: Mapping[str, Any],
                 artifacts: Mapping[str, int], timings: Mapping[str, float]) -> dict[str, Any]:
    """Assembles the report dict (JSON-serialisable)."""
    trace = program.info.get("trace", {})
    return {
        "graphopt_report": 1,
        "model": program.info.get("model"),
        "source": program.info.get("source"),
        "trace": trace,
        "recipe": dict(recipe),
        "passes": [r.as_dict() for r in program.history],
        "final_check": dict(checks),
        "artifacts": dict(artifacts),
        "timings_s": dict(timings),
        "versions": versions(),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine()},
    }


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f}"


def pass_table_rows(report: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-pass table, shared by the CLI's rich table and Markdown."""
    header = ["pass", "kind", "exact", "time s", "params MB", "nodes", "step max|Δ|", "total max|Δ|", "total min cos"]
    rows = []
    for r in report["passes"]:
        step, total = r.get("step_drift") or {}, r.get("total_drift") or {}
        exact = f"≤{r['tolerance']:.0e}" if r["exact"] and r.get("tolerance") is not None else ("yes" if r["exact"] else "lossy")
        rows.append([
            r["name"], f"{r['kind_in']}→{r['kind_out']}", exact, f"{r['wall_s']:.2f}",
            f"{_mb(r['param_bytes_before'])}→{_mb(r['param_bytes_after'])}", f"{r['nodes_before']}→{r['nodes_after']}",
            f"{step.get('max_abs', float('nan')):.2e}", f"{total.get('max_abs', float('nan')):.2e}",
            f"{total.get('min_cosine', float('nan')):.6f}"])
    return header, rows


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def render_markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown: model and recipe, the per-pass table, the final check."""
    lines = [f"# graphopt report: {report['model']} with recipe {report['recipe'].get('name')}", ""]
    trace = report.get("trace") or {}
    lines += [f"- source: `{report.get('source')}`", f"- trace path: {trace.get('path')} ({trace.get('reason')})",
              f"- recipe: {report['recipe'].get('description', '')} (sha256 {report['recipe'].get('sha256', '')[:12]})",
              "", "## Passes", ""]
    lines += _md_table(*pass_table_rows(report))
    noted = [r for r in report["passes"] if r.get("notes")]
    if noted:  # what a pass reports beyond the table (distill: held-out agreement before and after)
        lines += ["", "## Pass notes", ""]
        for r in noted:
            lines += [f"### {r['name']}", "", "```json", json.dumps(r["notes"], indent=1, default=str), "```", ""]
    lines += ["", "## Final check", ""]
    for backend, check in report["final_check"].items():
        lines.append(f"### {backend}: {check.get('data', '')}")
        lines.append("")
        metrics = {k: v for k, v in check.items() if k != "data"}
        lines += _md_table(list(metrics), [[f"{v:.6f}" if isinstance(v, float) else str(v) for v in metrics.values()]])
        lines.append("")
    for backend, notes in report.get("backend_notes", {}).items():
        lines += [f"## Backend notes: {backend}", "", "```json", json.dumps(notes, indent=1, default=str), "```", ""]
    if "baseline" in report:
        from graphopt.baseline import summary_rows

        comparison = report["baseline"]
        lines += [f"## Against the {comparison['recipe']} artifact", "", f"({comparison['noise']}; "
                  "figures in parentheses are the baseline's)", ""]
        lines += _md_table(*summary_rows(comparison))
        lines.append("")
    lines += ["## Artifacts", ""]
    lines += [f"- `{name}`: {size / 1e6:.2f} MB" for name, size in report["artifacts"].items()]
    lines += ["", "## Versions", "", "```", json.dumps(report["versions"], indent=1), "```", ""]
    return "\n".join(lines)
