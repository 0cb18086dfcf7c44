"""fp32, measured: graphopt's ``fp32`` artifact against what users get without graphopt.

all-MiniLM-L6-v2 (graphopt's ``BertEncoder``, the same function everywhere: token ids and
mask in, normalised sentence embedding out) at batch 1 and 8, sequence 128, 2 threads:

* ``torch eager``: the module under ``torch.inference_mode`` (``torch.set_num_threads(2)``)
* ``ort dynamo``: ORT on a plain ``torch.onnx.export(dynamo=True)`` (graphopt's export pass alone)
* ``ort torchscript``: ORT on ``torch.onnx.export(dynamo=False)``
* ``ort-opt torchscript`` / ``ort-opt dynamo``: ORT's own transformer optimizer
  (``onnxruntime.transformers.optimizer.optimize_model``, model type bert, 12 heads, 384
  wide) on each export
* ``graphopt fp32``: the artifact of ``graphopt compress --model minilm --recipe fp32``

Every ORT candidate runs with graph optimizations on (ORT's default), 2 intra-op threads,
spinning off unless ``--spinning``, one session at a time. Candidates are *interleaved*
round by round (each round creates, warms up, times and drops each candidate's session in
turn) so that the load of a shared machine falls on all alike. The figure is the median
over rounds of each round's median latency; the CPU time per run (process time, all
threads) is printed beside it because it is much less sensitive to other processes than
wall time. Ratios are against ``ort dynamo``, what a user gets from a plain export.

Usage::

    python benchmarks/fp32.py                      # build the candidates, then measure
    python benchmarks/fp32.py --rounds 9 --json results.json
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BATCHES = (1, 8)
SEQUENCE = 128
BASELINE = "ort dynamo"


def _build(work: Path, reuse: bool) -> dict[str, Path]:
    """Writes every ONNX candidate into ``work`` (kept between runs with ``--reuse``)."""
    import onnx_ir
    import torch

    import graphopt
    from graphopt import registry

    files = {"ort dynamo": work / "dynamo.onnx", "ort torchscript": work / "torchscript.onnx",
             "ort-opt torchscript": work / "ort_opt_torchscript.onnx", "ort-opt dynamo": work / "ort_opt_dynamo.onnx",
             "graphopt fp32": work / "graphopt_fp32" / "model.onnx"}
    if reuse and all(p.exists() for p in files.values()):
        return files
    work.mkdir(parents=True, exist_ok=True)
    bundle = registry.models.get("minilm")()
    program = graphopt.Pipeline([registry.passes.get("export")()], measure=False).run(graphopt.trace(bundle))
    onnx_ir.save(program.ir, files["ort dynamo"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(bundle.module.eval(), (), str(files["ort torchscript"]), kwargs=dict(bundle.example_inputs),
                          dynamo=False, opset_version=17, input_names=list(bundle.example_inputs),
                          output_names=["embedding"],
                          dynamic_axes={k: {0: "batch", 1: "sequence"} for k in bundle.example_inputs})
    from onnxruntime.transformers.optimizer import optimize_model

    for source, target in (("ort torchscript", "ort-opt torchscript"), ("ort dynamo", "ort-opt dynamo")):
        optimized = optimize_model(str(files[source]), model_type="bert", num_heads=12, hidden_size=384)
        print(f"  ORT optimizer on {source}: {optimized.get_fused_operator_statistics()}", file=sys.stderr)
        optimized.save_model_to_file(str(files[target]))
    graphopt.compress("minilm", "fp32", out=files["graphopt fp32"].parent)
    return files


@functools.lru_cache(maxsize=1)
def _minilm() -> Any:
    from graphopt import registry

    return registry.models.get("minilm")()


def _inputs(batch: int) -> dict[str, np.ndarray]:
    from graphopt.data import load_sentences

    tokenizer = _minilm().tokenizer
    sentences = list(load_sentences("heldout"))[:batch]
    return {k: v.numpy() for k, v in tokenizer(sentences, max_length=SEQUENCE, pad_to=SEQUENCE).items()}


def _timed(run: Callable[[], Any], warmup: int, runs: int) -> tuple[float, float]:
    """Median wall ms and median CPU ms (process time, every thread) of ``runs`` calls."""
    for _ in range(warmup):
        run()
    wall, cpu = [], []
    for _ in range(runs):
        w, c = time.perf_counter(), time.process_time()
        run()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    return statistics.median(wall) * 1e3, statistics.median(cpu) * 1e3


def _candidate(name: str, files: dict[str, Path], threads: int, spinning: bool):
    """A callable on numpy feeds, and what to drop after; one session alive at a time."""
    if name == "torch eager":
        import torch

        torch.set_num_threads(threads)
        module = _minilm().module.eval()

        def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
            with torch.inference_mode():
                return module(**{k: torch.from_numpy(v) for k, v in feeds.items()}).numpy()
        return run
    from graphopt.onnx_runtime import create_session, session_options

    session = create_session(str(files[name]), session_options(threads=threads, spinning=spinning))
    return lambda feeds: session.run(None, feeds)[0]


def measure(files: dict[str, Path], *, rounds: int, warmup: int, runs: int, threads: int,
            spinning: bool) -> dict[str, Any]:
    names = ["torch eager", *files]
    feeds = {b: _inputs(b) for b in BATCHES}
    samples: dict[tuple[str, int], list[tuple[float, float]]] = {(n, b): [] for n in names for b in BATCHES}
    diffs: dict[str, float] = {}
    reference = {b: _candidate("torch eager", files, threads, spinning)(feeds[b]) for b in BATCHES}
    load_before = os.getloadavg()[0]
    for r in range(rounds):
        for name in names:
            run = _candidate(name, files, threads, spinning)
            for b in BATCHES:
                out = run(feeds[b])
                diffs[name] = max(diffs.get(name, 0.0), float(np.max(np.abs(out - reference[b]))))
                samples[(name, b)].append(_timed(lambda: run(feeds[b]), warmup, runs if b == 1 else max(3, runs // 4)))
            del run
            gc.collect()
        print(f"  round {r + 1}/{rounds} done, load average {os.getloadavg()[0]:.2f}", file=sys.stderr)
    rows = []
    for b in BATCHES:
        base = statistics.median(s[0] for s in samples[(BASELINE, b)])
        base_cpu = statistics.median(s[1] for s in samples[(BASELINE, b)])
        for name in names:
            wall = [s[0] for s in samples[(name, b)]]
            cpu = [s[1] for s in samples[(name, b)]]
            rows.append({"candidate": name, "batch": b, "sequence": SEQUENCE, "p50_ms": statistics.median(wall),
                         "min_round_ms": min(wall), "cpu_ms": statistics.median(cpu),
                         "speedup": base / statistics.median(wall), "cpu_speedup": base_cpu / statistics.median(cpu),
                         "rounds_ms": [round(w, 2) for w in wall], "max_abs_vs_torch": diffs[name]})
    from graphopt.bench import machine_info
    from graphopt.report import versions

    return {"machine": machine_info(), "load_average_1m_before": load_before, "versions": versions(),
            "settings": {"threads": threads, "spinning": spinning, "rounds": rounds, "warmup": warmup,
                         "runs_batch1": runs, "runs_batch8": max(3, runs // 4), "ort_optimization": "all"},
            "rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/graphopt-bench-fp32"), help="where candidates are built")
    parser.add_argument("--reuse", action="store_true", help="reuse candidates already built in --work")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--runs", type=int, default=20, help="timed runs per round at batch 1 (a quarter at batch 8)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--spinning", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    print("building candidates", file=sys.stderr)
    files = _build(args.work, args.reuse)
    result = measure(files, rounds=args.rounds, warmup=args.warmup, runs=args.runs, threads=args.threads,
                     spinning=args.spinning)
    m, s = result["machine"], result["settings"]
    print(f"machine: {m['cpu']}, {m['cores']} cores; load average {result['load_average_1m_before']:.2f} before, "
          f"{m['load_average_1m']:.2f} after")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()))
    print(f"settings: {s}")
    print(f"\n| candidate | batch | p50 ms (median of {s['rounds']} rounds) | best round ms | CPU ms/run | "
          f"speed-up vs {BASELINE} | CPU-time ratio | max abs vs torch |")
    print("|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['candidate']} | {r['batch']} | {r['p50_ms']:.2f} | {r['min_round_ms']:.2f} | {r['cpu_ms']:.2f} | "
              f"{r['speedup']:.2f}× | {r['cpu_speedup']:.2f}× | {r['max_abs_vs_torch']:.1e} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
