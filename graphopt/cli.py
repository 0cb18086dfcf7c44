"""The ``graphopt`` command line: ``compress``, ``passes``, ``inspect``, ``bench``.

A user error (any ``GraphoptError``) prints one message and exits 2, without a
traceback unless ``--debug``; Ctrl-C exits 130 and SIGTERM 143, both saying nothing was written.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["main"]

logger = logging.getLogger(__name__)

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graphopt", description=__doc__.splitlines()[0] + "\n\n"
                                     "Compress Transformer models and lower them to ONNX Runtime or C++ kernels.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("--strict-plugins", action="store_true",
                        help="fail at once if any installed plugin (pass, backend, model) is broken")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    comp = sub.add_parser("compress", help="run a recipe on a model and write the artifacts and report",
                          description="Run a recipe's pipeline on a model, check the result against the "
                          "original, and write OUT/model.onnx (or model.pt2), OUT/report.json and OUT/report.md. "
                          "OUT is written atomically: a failed run leaves nothing behind.")
    comp.add_argument("--model", "-m", help="registered model name (see `graphopt models`), hf:FOLDER (a saved "
                      "Hugging Face model, read offline; needs graphopt[hf]) or an .onnx path; "
                      "default: the recipe's model")
    comp.add_argument("--recipe", "-r", required=True, help="shipped recipe name (e.g. fp32) or a .toml path")
    comp.add_argument("--out", "-o", required=True, help="output folder")
    comp.add_argument("--json", action="store_true", help="print the report as JSON instead of tables")
    comp.add_argument("--baseline", metavar="RECIPE", help="also build this recipe (e.g. fp32) from the same model "
                      "and print size, ONNX Runtime speed and held-out accuracy against it")

    lst = sub.add_parser("passes", help="list registered passes with their kinds and options",
                         description="Every pass registered in the graphopt.passes entry-point group "
                         "(graphopt's own and plugins'), with the kinds it takes and returns, whether it is "
                         "exact (and its tolerance) or lossy, and its options with types and defaults.")
    lst.add_argument("--json", action="store_true", help="print as JSON")

    sub.add_parser("recipes", help="list the shipped recipes")
    sub.add_parser("models", help="list the registered models")

    ins = sub.add_parser("inspect", help="what is in an ONNX file: ops, weights, opsets, dynamic axes, provenance",
                         description="Op histogram (with domains), parameter bytes by dtype, opset imports, "
                         "inputs and outputs with their dynamic axes, and the graphopt provenance in the "
                         "file's metadata. Nothing is run; external data is read only from the model's folder.")
    ins.add_argument("file", help="an .onnx file")
    ins.add_argument("--json", action="store_true", help="print as JSON")

    ben = sub.add_parser("bench", help="latency percentiles and throughput of ONNX files in ONNX Runtime",
                         description="Times each file at every batch size and sequence length, one ONNX Runtime "
                         "session at a time, after warm-up; prints the machine, versions and settings beside "
                         "p50/p90/p99 latency and throughput. Inputs are synthesized from the graph inputs.")
    ben.add_argument("files", nargs="+", metavar="FILE", help=".onnx files")
    ben.add_argument("--batch", "-b", type=int, nargs="+", default=[1], help="batch sizes (default 1)")
    ben.add_argument("--sequence", "-s", type=int, nargs="+", default=[128], help="sequence lengths (default 128)")
    ben.add_argument("--threads", "-t", type=int, default=None, help="ONNX Runtime intra-op threads (default: one per core)")
    ben.add_argument("--warmup", type=int, default=10, help="untimed runs first (default 10)")
    ben.add_argument("--rounds", type=int, default=50, help="timed runs; percentiles are over these (default 50)")
    ben.add_argument("--spinning", action="store_true", help="let idle ORT threads spin (ORT's own default; "
                     "off here because spinning threads steal cores from anything else running)")
    ben.add_argument("--json", action="store_true", help="print as JSON")
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

    signal.signal(signal.SIGTERM, _raise_terminated)
    # A shell that starts us in the background sets SIGINT to "ignore", and Python then
    # installs no handler: restore Ctrl-C so an interrupt still cleans up and exits 130.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if args.strict_plugins:
            _check_plugins()
        return {"compress": _compress, "passes": _passes, "recipes": _recipes, "models": _models,
                "inspect": _inspect, "bench": _bench}[args.command](
            args, console)
    except KeyboardInterrupt as interrupt:
        return _report_interrupt(interrupt, console)
    except Exception as error:
        # A signal that lands inside a library call can surface as another error: torch's
        # cleanup code, running while the KeyboardInterrupt unwinds a half-done import, raises
        # AttributeError, and our pass wraps that in a ModelError. The interrupt is in its chain.
        interrupt = _interrupt_in_chain(error)
        if interrupt is not None:
            return _report_interrupt(interrupt, console)
        if not isinstance(error, GraphoptError):
            raise
        if args.debug:
            console.print_exception()
        console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        return EXIT_USER_ERROR


def _interrupt_in_chain(error: BaseException) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt (Ctrl-C or SIGTERM) among the causes and contexts of ``error``, if any."""
    pending, seen = [error], set()
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, KeyboardInterrupt):
            return current
        pending += [e for e in (current.__cause__, current.__context__) if e is not None]
    return None


def _report_interrupt(interrupt: KeyboardInterrupt, console: Console) -> int:
    if isinstance(interrupt, _Terminated):
        console.print("[bold red]terminated:[/] nothing was written")
        return EXIT_TERMINATED
    console.print("[bold red]interrupted:[/] nothing was written")
    return EXIT_INTERRUPTED


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the atomic writer removes its temporary folder."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated()


def _check_plugins() -> None:
    from graphopt import registry
    from graphopt.errors import PluginError

    for reg in (registry.passes, registry.backends, registry.models):
        reg.names()
        for b in reg.broken.values():
            raise PluginError(f"--strict-plugins: {reg.what} {b.name!r} from {b.distribution} {b.version} "
                              f"({b.value}) is broken: {b.error}")


class _RichProgress:
    """A pipeline instrument that shows which pass runs and logs each as it ends.

    On a terminal the current step is a live status line. Off a terminal (a log file, CI) that
    line is never drawn, and a recipe that trains for minutes would print nothing until its first
    pass ends; there the messages become printed lines instead: each pass's start at once, then
    the latest message at most every ``line_interval_s`` seconds.
    """

    def __init__(self, console: Console, *, line_interval_s: float = 30.0,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.console = console
        self.status = console.status("starting")
        self.clock = clock
        self.started = clock()
        self.print_lines = not console.is_terminal
        self.line_interval_s = line_interval_s
        self._last_line_s = -float("inf")

    def message(self, text: str, *, print_now: bool = False) -> None:
        elapsed = self.clock() - self.started
        line = f"{text} ({elapsed:.0f} s)"
        self.status.update(line)
        if self.print_lines and (print_now or elapsed - self._last_line_s >= self.line_interval_s):
            self.console.print(line, highlight=False, soft_wrap=True)
            self._last_line_s = elapsed

    def before_pass(self, index: int, total: int, pass_: Any, program: Any) -> None:
        self.message(f"pass {index + 1}/{total}: {pass_.name}", print_now=True)
        if hasattr(pass_, "train_progress"):  # passes that train (distill) report each step
            pass_.train_progress = lambda p: self.message(
                f"pass {index + 1}/{total}: {pass_.name} step {p.step}/{p.steps}, loss {p.loss:.4g} "
                f"({', '.join(f'{k} {v:.3g}' for k, v in p.parts.items())})")
        if hasattr(pass_, "progress_message"):  # and what they do between steps (prune's reconstruction)
            pass_.progress_message = lambda text: self.message(f"pass {index + 1}/{total}: {pass_.name} {text}")

    def after_pass(self, index: int, total: int, pass_: Any, record: Any) -> None:
        drift = record.total_drift
        self.console.print(f"  [green]✓[/] {pass_.name} {record.wall_s:.1f} s"
                           + (f", max |Δ| {drift.max_abs:.2e}" if drift else ""), highlight=False)


def _compress(args: argparse.Namespace, console: Console) -> int:
    from graphopt.compress import compress
    from graphopt.report import pass_table_rows

    progress = _RichProgress(console)
    with progress.status:
        result = compress(args.model, args.recipe, out=args.out, instruments=[progress], progress=progress.message,
                          baseline=args.baseline)
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
    if "baseline" in report:
        from graphopt.baseline import summary_rows

        comparison = report["baseline"]
        _print_table(f"against the {comparison['recipe']} artifact ({comparison['noise']})", *summary_rows(comparison))
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

    for name, loader in registry.models.items():
        doc = ((loader.__doc__ or "").strip().splitlines() or [""])[0]
        print(f"{name:10s} {doc}" if doc else name)
    for b in registry.models.broken.values():
        print(f"{b.name} (broken: {b.error})")
    return 0


def _print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    out = Console(width=None if sys.stdout.isatty() else 160)
    table = Table(title=title)
    for column in header:
        table.add_column(column, justify="left" if column in header[:1] else "right")
    for row in rows:
        table.add_row(*row)
    out.print(table)


def _inspect(args: argparse.Namespace, console: Console) -> int:
    from graphopt.inspect import inspect_onnx

    info = inspect_onnx(args.file)
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return 0
    params = info["parameters"]
    print(f"{info['file']}: {info['file_bytes'] / 1e6:.2f} MB, {info['nodes']} nodes, producer {info['producer'] or '?'}, "
          f"opsets {', '.join(f'{d} {v}' for d, v in info['opsets'].items())}")
    for kind in ("inputs", "outputs"):
        for v in info[kind]:
            axes = ", ".join(f"{i}={n}" for i, n in v["dynamic_axes"].items()) or "none"
            print(f"  {kind[:-1]} {v['name']}: {v['dtype']}{v['shape']} (dynamic: {axes})")
    _print_table("ops", ["op", "count"], [[op, str(n)] for op, n in info["ops"].items()])
    _print_table(f"parameters: {params['tensors']} tensors, {params['bytes'] / 1e6:.2f} MB", ["dtype", "tensors", "elements", "MB"],
                 [[d, str(r["tensors"]), str(r["elements"]), f"{r['bytes'] / 1e6:.3f}"] for d, r in params["by_dtype"].items()])
    if info["graphopt"]:
        print("graphopt provenance:")
        for key, value in info["graphopt"].items():
            print(f"  {key}: {json.dumps(value, default=str)}")
    return 0


def _bench(args: argparse.Namespace, console: Console) -> int:
    from graphopt.bench import BenchSettings, bench_files, format_table

    try:
        settings = BenchSettings(tuple(args.batch), tuple(args.sequence), args.threads, args.warmup, args.rounds,
                                 args.spinning)
    except ValueError as error:
        from graphopt.errors import GraphoptError

        raise GraphoptError(f"bench: {error}") from error
    with console.status("benchmarking") as status:
        result = bench_files(args.files, settings, progress=status.update)
    if args.json:
        print(json.dumps(result, indent=1, default=str))
        return 0
    machine, s = result["machine"], result["settings"]
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['platform']}, load average "
          f"{machine['load_average_1m']} before / {result['load_average_1m_after']} after")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()))
    print(f"settings: threads {s['threads'] or 'ORT default'}, spinning {'on' if s['spinning'] else 'off'}, "
          f"optimization {s['optimization']}, warm-up {s['warmup']}, {s['rounds']} timed runs, one session at a time")
    _print_table("latency and throughput", *format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
