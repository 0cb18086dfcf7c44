"""The ``graphopt`` command line: ``compress`` and ``passes``.

A user error (any ``GraphoptError``) prints one message and exits 2, without a
traceback unless ``--debug``; Ctrl-C exits 130 and says nothing was written.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any, Sequence

from rich.console import Console
from rich.table import Table

__all__ = ["main"]

logger = logging.getLogger(__name__)

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graphopt", description=__doc__.splitlines()[0] + "\n\n"
                                     "Compress Transformer models and lower them to ONNX Runtime or C++ kernels.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    comp = sub.add_parser("compress", help="run a recipe on a model and write the artifacts and report",
                          description="Run a recipe's pipeline on a model, check the result against the "
                          "original, and write OUT/model.onnx (or model.pt2), OUT/report.json and OUT/report.md. "
                          "OUT is written atomically: a failed run leaves nothing behind.")
    comp.add_argument("--model", "-m", help="registered model name (see `graphopt models`) or an .onnx path; "
                      "default: the recipe's model")
    comp.add_argument("--recipe", "-r", required=True, help="shipped recipe name (e.g. fp32) or a .toml path")
    comp.add_argument("--out", "-o", required=True, help="output folder")
    comp.add_argument("--json", action="store_true", help="print the report as JSON instead of tables")

    lst = sub.add_parser("passes", help="list registered passes with their kinds and options",
                         description="Every pass registered in the graphopt.passes entry-point group "
                         "(graphopt's own and plugins'), with the kinds it takes and returns, whether it is "
                         "exact (and its tolerance) or lossy, and its options with types and defaults.")
    lst.add_argument("--json", action="store_true", help="print as JSON")

    sub.add_parser("recipes", help="list the shipped recipes")
    sub.add_parser("models", help="list the registered models")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``graphopt`` script; returns the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.debug:  # the exporter logs a warning per missing optional package
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    console = Console(stderr=True)
    if args.version:
        from graphopt import __version__

        print(__version__)
        return 0
    if args.command is None:
        _parser().print_help()
        return EXIT_USER_ERROR
    from graphopt.errors import GraphoptError

    try:
        return {"compress": _compress, "passes": _passes, "recipes": _recipes, "models": _models}[args.command](
            args, console)
    except GraphoptError as error:
        if args.debug:
            console.print_exception()
        console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        console.print("[bold red]interrupted:[/] nothing was written")
        return EXIT_INTERRUPTED


class _RichProgress:
    """A pipeline instrument that shows which pass runs and logs each as it ends."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.status = console.status("starting")
        self.started = time.perf_counter()

    def message(self, text: str) -> None:
        self.status.update(f"{text} ({time.perf_counter() - self.started:.0f} s)")

    def before_pass(self, index: int, total: int, pass_: Any, program: Any) -> None:
        self.message(f"pass {index + 1}/{total}: {pass_.name}")

    def after_pass(self, index: int, total: int, pass_: Any, record: Any) -> None:
        drift = record.total_drift
        self.console.print(f"  [green]✓[/] {pass_.name} {record.wall_s:.1f} s"
                           + (f", max |Δ| {drift.max_abs:.2e}" if drift else ""), highlight=False)


def _compress(args: argparse.Namespace, console: Console) -> int:
    from graphopt.compress import compress
    from graphopt.report import pass_table_rows

    progress = _RichProgress(console)
    with progress.status:
        result = compress(args.model, args.recipe, out=args.out, instruments=[progress], progress=progress.message)
    report = result.report
    if args.json:
        print(json.dumps(report, indent=1, default=str))
        return 0
    out = Console(width=None if sys.stdout.isatty() else 160)
    header, rows = pass_table_rows(report)
    table = Table(title=f"{report['model']} · recipe {report['recipe']['name']}")
    for column in header:
        table.add_column(column, justify="left" if column in ("pass", "kind") else "right")
    for row in rows:
        table.add_row(*row)
    out.print(table)
    for backend, check in report["final_check"].items():
        figures = ", ".join(f"{k} {v:.3g}" if k == "max_abs" else (f"{k} {v:.6f}" if isinstance(v, float) else f"{k} {v}")
                            for k, v in check.items() if k != "data")
        out.print(f"[bold]{backend}[/] on {check['data']}: {figures}", highlight=False)
    for name, size in report["artifacts"].items():
        out.print(f"  {result.out}/{name}: {size / 1e6:.2f} MB", highlight=False)
    return 0


def _passes(args: argparse.Namespace, console: Console) -> int:
    from graphopt import registry
    from graphopt.pass_base import describe_options

    rows = []
    for name, cls in registry.passes.items():
        rows.append({"name": name, "kind_in": cls.kind_in, "kind_out": cls.kind_out, "exact": cls.exact,
                     "tolerance": cls.tolerance if cls.exact else None,
                     "doc": ((cls.__doc__ or "").strip().splitlines() or [""])[0],
                     "options": [{"name": n, "type": t, "default": d} for n, t, d in describe_options(cls.Options)]})
    broken = [vars(b) for b in registry.passes.broken.values()]
    if args.json:
        print(json.dumps({"passes": rows, "broken": broken}, indent=1, default=str))
        return 0
    out = Console(width=None if sys.stdout.isatty() else 160)
    table = Table(title="registered passes")
    for column in ("name", "kinds", "exact", "options", "what it does"):
        table.add_column(column)
    for row in rows:
        options = "\n".join(f"{o['name']}: {o['type']} = {o['default']!r}" for o in row["options"]) or "-"
        exact = f"exact ≤ {row['tolerance']:.0e}" if row["exact"] and row["tolerance"] is not None else (
            "exact" if row["exact"] else "lossy")
        table.add_row(row["name"], f"{row['kind_in']} → {row['kind_out']}", exact, options, row["doc"])
    out.print(table)
    for b in broken:
        out.print(f"[red]broken[/] {b['name']} from {b['distribution']} {b['version']} ({b['value']}): {b['error']}",
                  highlight=False)
    return 0


def _recipes(args: argparse.Namespace, console: Console) -> int:
    from graphopt.recipe import load_recipe, shipped_recipes

    for name in sorted(shipped_recipes()):
        print(f"{name:20s} {load_recipe(name).description}")
    return 0


def _models(args: argparse.Namespace, console: Console) -> int:
    from graphopt import registry

    for name in registry.models.names():
        print(name)
    for b in registry.models.broken.values():
        print(f"{b.name} (broken: {b.error})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
