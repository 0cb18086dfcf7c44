"""The long fuzz campaign: cases per category, graphopt errors, successes, failures.

Usage::

    python benchmarks/reliability.py                 # 10,000 cases per category
    python benchmarks/reliability.py --cases 500     # a shorter run
    python benchmarks/reliability.py --save-failures tests/fuzz/corpus

Prints one row per category (recipe, onnx-bytes, onnx-structure, pt2): cases run,
refused with a GraphoptError, succeeded, and failures by kind (foreign exception, crash,
hang, leftover file, payload run). Each failing case can be saved as a regression file.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from pathlib import Path

from graphopt.fuzzing import generate_cases, run_cases

CATEGORIES = ("recipe", "onnx-bytes", "onnx-structure", "pt2")
SUFFIX = {"recipe": ".toml", "onnx": ".onnx", "pt2": ".pt2"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000, help="cases per category")
    parser.add_argument("--categories", nargs="*", default=list(CATEGORIES), choices=CATEGORIES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per case before it counts as a hang")
    parser.add_argument("--save-failures", type=Path, help="folder to write failing cases into")
    args = parser.parse_args()
    marker = Path(tempfile.gettempdir()) / f"graphopt-reliability-marker-{os.getpid()}"
    os.environ["GRAPHOPT_FUZZ_MARKER"] = str(marker)
    tally: dict[str, collections.Counter[str]] = {c: collections.Counter() for c in args.categories}
    start = time.perf_counter()
    cases = generate_cases({c: args.cases for c in args.categories}, seed=args.seed)
    pending = []

    def feed():
        for category, target, data in cases:
            pending.append((category, target, data))
            yield target, data

    for index, outcome in enumerate(run_cases(feed(), timeout=args.timeout)):
        category, target, data = pending[index]
        pending[index] = (category, target, b"")  # keep memory flat
        tally[category][outcome.verdict] += 1
        if outcome.failed and args.save_failures:
            args.save_failures.mkdir(parents=True, exist_ok=True)
            name = f"fuzz_{category}_{args.seed}_{index}_{outcome.verdict}{SUFFIX[target]}"
            (args.save_failures / name).write_bytes(data)
        if (index + 1) % 500 == 0:  # with the running tally, so an interrupted campaign still reports
            running = "; ".join(f"{c} {sum(t.values())} ({t['refused']} refused, {t['ok']} ok, "
                                f"{sum(v for k, v in t.items() if k not in ('ok', 'refused'))} failed)"
                                for c, t in tally.items() if t)
            print(f"  {index + 1} cases, {time.perf_counter() - start:.0f} s: {running}", file=sys.stderr)
    print(f"{'category':16s} {'cases':>7s} {'refused':>8s} {'ok':>6s} {'failures':>9s}  failure kinds")
    failed_total = 0
    for category, counts in tally.items():
        failures = {k: v for k, v in counts.items() if k not in ("ok", "refused")}
        failed_total += sum(failures.values())
        print(f"{category:16s} {sum(counts.values()):7d} {counts['refused']:8d} {counts['ok']:6d} "
              f"{sum(failures.values()):9d}  {failures or '-'}")
    print(f"payload marker created: {marker.exists()}; wall {time.perf_counter() - start:.0f} s")
    return 1 if failed_total or marker.exists() else 0


if __name__ == "__main__":
    sys.exit(main())
