"""Distillation, measured: all-MiniLM-L6-v2 shrunk to 3 layers, then distilled with each loss.

For each variant (soft labels only, hidden states only, attention maps only, and the
combined losses of the ``distill-3layer`` recipe) the student starts from the same
``depth-shrink`` (teacher layers 1, 3, 5) and trains with the recipe's settings, changing
only the loss weights. Reported for each: held-out mean cosine to the teacher, Spearman of
the pairwise similarities and top-1 neighbour agreement (`graphopt.evaluate`), before and
after training, and the training wall time. Then the speed of the student (combined)
against the teacher in ONNX Runtime: both exported and lowered the same way
(``export`` and ``ort-fusions`` when registered), graph optimizations on, spinning off,
sessions timed *interleaved* round by round so the load of a shared machine falls on
both alike; medians over rounds at batch 1 and batch 8, sequence 128.

Usage::

    python benchmarks/distill.py                          # the recipe's steps for every variant
    python benchmarks/distill.py --steps 300 --variants combined soft
    python benchmarks/distill.py --json distill.json --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import graphopt
from graphopt import registry
from graphopt.bench import machine_info
from graphopt.onnx_runtime import create_session, run_session, session_options
from graphopt.recipe import load_recipe
from graphopt.report import versions

#: Loss weights of each variant; everything else comes from the recipe.
VARIANTS: dict[str, dict[str, float]] = {
    "soft": {"soft_label": 1.0, "hidden": 0.0, "attention": 0.0, "output": 0.0},
    "hidden": {"soft_label": 0.0, "hidden": 1.0, "attention": 0.0, "output": 0.0},
    "attention": {"soft_label": 0.0, "hidden": 0.0, "attention": 1.0, "output": 0.0},
    "combined": {},
}
METRICS = ("mean_cosine", "spearman", "top1_agreement")


def _options(recipe_name: str) -> dict[str, dict[str, Any]]:
    recipe = load_recipe(recipe_name)
    specs = {spec.name: dict(spec.options) for spec in recipe.pipeline}
    return {"depth-shrink": specs["depth-shrink"], "distill": specs["distill"]}


def _distil(shrunk: graphopt.Program, options: dict[str, Any], say: Any) -> tuple[graphopt.Program, dict[str, Any]]:
    distill = registry.passes.get("distill")(**options)
    distill.train_progress = lambda p: say(f"  step {p.step}/{p.steps} loss {p.loss:.4f} "
                                          f"({', '.join(f'{k} {v:.4f}' for k, v in p.parts.items())}) "
                                          f"{p.elapsed_s:.0f} s") if p.step % 50 == 0 else None
    result = distill(shrunk.clone())
    return result.program, dict(result.notes)


def _onnx_bytes(program: graphopt.Program) -> bytes:
    import onnx_ir as ir

    passes = [registry.passes.get("export")()]
    if "ort-fusions" in registry.passes:
        passes.append(registry.passes.get("ort-fusions")())
    onnx_program = graphopt.Pipeline(passes, measure=False).run(program.clone())
    return ir.to_proto(onnx_program.ir).SerializeToString()


def _speed(teacher: bytes, student: bytes, threads: int, rounds: int) -> list[dict[str, Any]]:
    """Interleaved medians (ms) of the two models at batch 1 and 8, sequence 128."""
    options = session_options(threads=threads, optimization="all", spinning=False)
    sessions = {"teacher": create_session(teacher, options), "student": create_session(student, options)}
    rows = []
    for batch in (1, 8):
        generator = torch.Generator().manual_seed(0)
        feeds = {"input_ids": torch.randint(1, 1000, (batch, 128), generator=generator),
                 "attention_mask": torch.ones(batch, 128, dtype=torch.int64)}
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for round_ in range(rounds + 3):
            for name, session in sessions.items():
                start = time.perf_counter()
                run_session(session, feeds)
                if round_ >= 3:  # the first rounds warm up
                    times[name].append(time.perf_counter() - start)
        medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        rows.append({"batch": batch, "sequence": 128, "teacher_ms": medians["teacher"],
                     "student_ms": medians["student"], "speedup": medians["teacher"] / medians["student"]})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="distill-3layer")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--steps", type=int, help="training steps per variant (default: the recipe's)")
    parser.add_argument("--threads", type=int, default=1, help="torch and ORT intra-op threads")
    parser.add_argument("--rounds", type=int, default=30, help="timed ONNX Runtime rounds per model")
    parser.add_argument("--no-speed", action="store_true", help="skip the ONNX Runtime speed comparison")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a distill option of the recipe, value in TOML syntax "
                             "(e.g. --set 'data=[\"sentences\", \"pydoc\", \"docstrings\"]' --set lr=5e-4)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    options = _options(args.recipe)
    distill_options = dict(options["distill"])
    if args.steps is not None:
        distill_options.update(steps=args.steps, warmup_steps=min(distill_options.get("warmup_steps", 100),
                                                                  args.steps // 10))
    distill_options.update(_overrides(args.set))
    program = graphopt.trace(registry.models.get("minilm")())
    shrunk = registry.passes.get("depth-shrink")(**options["depth-shrink"])(program.clone()).program
    rows, students = [], {}
    for variant in args.variants:
        say(f"{variant}: {distill_options.get('steps')} steps")
        student, notes = _distil(shrunk, {**distill_options, **VARIANTS[variant]}, say)
        students[variant] = student
        held = notes["heldout_vs_teacher"]
        rows.append({"variant": variant, "steps": notes["train"]["steps"], "train_s": notes["train"]["wall_s"],
                     "before": held["before"], "after": held["after"], "final_parts": notes["train"]["final_parts"],
                     "data": notes["data"]})
        say(f"{variant}: mean cosine {held['before']['mean_cosine']:.4f} -> {held['after']['mean_cosine']:.4f}")
    speed = []
    if not args.no_speed:  # every variant has the same architecture: time one of them
        say("speed: exporting the teacher and the student")
        student = students.get("combined") or next(iter(students.values()))
        speed = _speed(_onnx_bytes(program), _onnx_bytes(student), args.threads, args.rounds)
    _print(rows, speed)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"recipe": args.recipe, "distill_options": distill_options, "variants": rows, "speed": speed,
                       "machine": machine_info(), "threads": args.threads, "versions": versions()},
                      handle, indent=1)
    return 0


def _overrides(assignments: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings (VALUE in TOML syntax, as in a recipe) as a dict."""
    import tomllib

    overrides: dict[str, Any] = {}
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {assignment!r}")
        overrides.update(tomllib.loads(f"{key.strip()} = {value}"))
    return overrides


def _print(rows: list[dict[str, Any]], speed: list[dict[str, Any]]) -> None:
    print("| loss | steps | train s | mean cos before → after | Spearman before → after | top-1 before → after |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        cells = [f"{r['before'][m]:.4f} → {r['after'][m]:.4f}" for m in METRICS]
        print(f"| {r['variant']} | {r['steps']} | {r['train_s']:.0f} | " + " | ".join(cells) + " |")
    if not speed:
        return
    print()
    print("| ONNX Runtime | teacher ms | student ms | speed-up |")
    print("|---|---|---|---|")
    for s in speed:
        print(f"| batch {s['batch']} × seq {s['sequence']} | {s['teacher_ms']:.2f} | {s['student_ms']:.2f} | "
              f"{s['speedup']:.2f}× |")


if __name__ == "__main__":
    sys.exit(main())
