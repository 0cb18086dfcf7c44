"""Low-rank splitting, measured: per-layer ONNX Runtime times, and MiniLM's trade-off curve.

``layers``: for each weight shape W (m×n, out×in: 384×384, 384×1536, 1536×384 and
4096×4096), each rank r (a fraction 1/8, 1/4, 1/2 and, where r(m+n) < mn still holds,
3/4 of min(m, n)) and each number of rows (1, 8, 128 and, for MiniLM's shapes, 1024 =
batch 8 × sequence 128), the time of one dense ``MatMul(x, Wᵀ) + b`` against two thin
``MatMul(MatMul(x, Aᵀ), Bᵀ) + b``. Both run in ONNX Runtime (graph optimizations on,
2 intra-op threads, spinning off), each in its own session, *interleaved* round by
round so that the load of a shared machine falls on both alike; figures are medians after
warm-up, and a sample repeats the run until it lasts about 2 ms. ``--write-table`` writes
the table that ``low-rank-split`` reads (``graphopt/data/low_rank_times.json``).

``curve``: all-MiniLM-L6-v2 at a fraction of its linear parameters kept (0.7, 0.5, 0.3),
plain and activation-aware, before and after recovery by distillation: held-out mean
cosine to the original model, and speed at batch 8 × sequence 128 against the fp32
artifact (both with ort-fusions when it is installed), measured interleaved.

Usage::

    python benchmarks/low_rank.py layers --write-table
    python benchmarks/low_rank.py curve --fractions 0.7 0.5 0.3 --steps 300
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TABLE = Path(__file__).resolve().parents[1] / "graphopt" / "data" / "low_rank_times.json"
SHAPES = ((384, 384), (384, 1536), (1536, 384), (4096, 4096))
FRACTIONS = (1 / 8, 1 / 4, 3 / 8, 1 / 2, 3 / 4)
ROWS = (1, 8, 128, 1024)


def _linear_model(n: int, factors: list[np.ndarray], bias: np.ndarray) -> bytes:
    """x [1, rows, n] -> x @ F0 @ F1 ... + bias, factors stored [in, out] as the exporter does."""
    nodes, inits, current = [], [], "x"
    for i, f in enumerate(factors):
        inits.append(numpy_helper.from_array(f.astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"h{i}"]))
        current = f"h{i}"
    inits.append(numpy_helper.from_array(bias.astype(np.float32), "b"))
    nodes.append(helper.make_node("Add", [current, "b"], ["y"]))
    graph = helper.make_graph(
        nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "rows", n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "rows", len(bias)])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString()


def _sample(session, feeds: dict, repeat: int) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        session.run(None, feeds)
    return (time.perf_counter() - start) / repeat


def time_pair(dense: bytes, split: bytes, rows: int, n: int, *, threads: int = 2, warmup: int = 5,
              rounds: int = 21, target_s: float = 0.002) -> tuple[float, float, float]:
    """Median ms of dense and split, and the median of the per-round ratio split/dense."""
    from graphopt.onnx_runtime import create_session, session_options

    options = session_options(threads=threads, optimization="all", spinning=False)
    sessions = [create_session(dense, options), create_session(split, options)]
    feeds = {"x": np.random.default_rng(0).standard_normal((1, rows, n)).astype(np.float32)}
    for s in sessions:
        for _ in range(warmup):
            s.run(None, feeds)
    one = min(_sample(s, feeds, 1) for s in sessions)
    repeat = max(1, int(target_s / max(one, 1e-6)))
    times: list[list[float]] = [[], []]
    for k in range(rounds):
        for i in ((0, 1) if k % 2 else (1, 0)):  # alternate which goes first
            times[i].append(_sample(sessions[i], feeds, repeat))
    ratio = statistics.median(b / a for a, b in zip(*times))  # per round: both saw the same load
    return statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3, ratio


def layers(args: argparse.Namespace) -> dict:
    from graphopt.bench import machine_info
    from graphopt.report import versions

    rng = np.random.default_rng(0)
    entries = []
    machine = machine_info()
    for m, n in SHAPES:
        w = rng.standard_normal((n, m)).astype(np.float32) * 0.02
        bias = np.zeros(m, np.float32)
        dense = _linear_model(n, [w], bias)
        # The fractions, and the largest multiple of 16 that still saves parameters, so that
        # the pass interpolates up to break-even rather than extrapolating.
        largest = (m * n // (m + n) - (1 if (m * n) % (m + n) == 0 else 0)) // 16 * 16
        ranks = sorted({int(min(m, n) * f) for f in FRACTIONS if int(min(m, n) * f) < largest} | {largest})
        for rank in ranks:
            fraction = rank / min(m, n)
            split = _linear_model(n, [w[:, :rank], rng.standard_normal((rank, m)).astype(np.float32)], bias)
            for rows in ROWS:
                if rows > 128 and max(m, n) > 1536:
                    continue  # 4096² at 1024 rows: 34 GFLOP a run, not worth the shared machine's time
                dense_ms, split_ms, ratio = time_pair(dense, split, rows, n, threads=args.threads, rounds=args.rounds)
                entries.append({"m": m, "n": n, "rows": rows, "rank": rank, "fraction": round(fraction, 4),
                                "dense_ms": round(dense_ms, 4), "split_ms": round(split_ms, 4),
                                "ratio": round(ratio, 3)})
                print(f"{m:>5}x{n:<5} r={rank:<5} rows={rows:<5} dense {dense_ms:8.3f} ms  split {split_ms:8.3f} ms"
                      f"  split/dense {ratio:5.2f}", flush=True)
    table = {"schema": 1, "what": "ONNX Runtime ms of one dense MatMul+Add against two thin MatMuls+Add; "
                                  "m = out_features, n = in_features, rows = batch × sequence",
             "command": "python benchmarks/low_rank.py layers --write-table",
             "settings": {"threads": args.threads, "spinning": False, "optimization": "all",
                          "statistic": f"median of {args.rounds} interleaved rounds after 5 warm-up runs"},
             "machine": machine, "load_average_1m_after": machine_info()["load_average_1m"],
             "versions": versions(), "entries": entries}
    if args.write_table:
        TABLE.parent.mkdir(parents=True, exist_ok=True)
        TABLE.write_text(json.dumps(table, indent=1) + "\n")
        print(f"wrote {TABLE}")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("layers", help="per-layer ORT times of two thin MatMuls against one dense")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=31)
    p.add_argument("--write-table", action="store_true", help=f"write {TABLE}")
    p.set_defaults(run=layers)
    c = sub.add_parser("curve", help="MiniLM: fraction of linear params kept vs held-out cosine and speed")
    c.add_argument("--fractions", type=float, nargs="+", default=[0.7, 0.5, 0.3])
    c.add_argument("--methods", nargs="+", default=["plain", "activation-aware"])
    c.add_argument("--steps", type=int, default=300, help="distillation steps for recovery (0: none)")
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--rounds", type=int, default=30)
    c.add_argument("--lr", type=float, default=2e-4, help="distillation learning rate")
    c.add_argument("--batch-size", type=int, default=16, help="distillation sentences per step")
    c.add_argument("--layers", nargs="+", default=["*"], help="nn.Linear globs to split")
    c.add_argument("--json", type=Path, help="also write the rows here")
    c.set_defaults(run=curve)
    args = parser.parse_args(argv)
    args.run(args)
    return 0


def _onnx_bytes(program) -> bytes:
    from graphopt.backend import compile

    return compile(program, backend="onnxruntime").model_bytes


def _heldout_cosine(run, bundle, reference: np.ndarray) -> float:
    from graphopt.data import load_sentences
    from graphopt.evaluate import embed, evaluate_embeddings

    return evaluate_embeddings(embed(run, bundle.tokenizer, load_sentences("heldout")), reference).mean_cosine


def _ort_embedder(data: bytes):
    from graphopt.onnx_runtime import create_session

    session = create_session(data)
    return lambda **kw: session.run(None, {k: v.numpy() for k, v in kw.items()})[0]


def _speedup(fp32: bytes, candidate: bytes, threads: int, rounds: int, batch: int = 8, sequence: int = 128) -> float:
    """Median over interleaved rounds of fp32 time / candidate time at batch × sequence."""
    import onnx_ir as ir

    from graphopt.onnx_runtime import create_session, session_options
    from graphopt.trace import synthesize_inputs

    options = session_options(threads=threads, optimization="all", spinning=False)
    sessions = [create_session(fp32, options), create_session(candidate, options)]
    model = ir.from_proto(onnx.load_from_string(fp32))
    feeds = {k: v.numpy() for k, v in synthesize_inputs(model, batch=batch, sequence=sequence).items()}
    for s in sessions:
        for _ in range(3):
            s.run(None, feeds)
    ratios = []
    for _ in range(rounds):
        a, b = (_sample(s, feeds, 1) for s in sessions)
        ratios.append(a / b)
    return statistics.median(ratios)


def _export(program):
    import graphopt
    from graphopt import registry

    steps = [registry.passes.get("export")()]
    if "ort-fusions" in registry.passes:
        steps.append(registry.passes.get("ort-fusions")())
    return graphopt.Pipeline(steps, measure=False).run(program)


def curve(args: argparse.Namespace) -> dict:
    import torch

    import graphopt
    from graphopt import registry

    torch.set_num_threads(args.threads)
    from graphopt.bench import machine_info
    from graphopt.data import load_sentences
    from graphopt.evaluate import embed

    bundle = registry.models.get("minilm")()
    original = bundle.module.eval()
    reference = embed(lambda **kw: original(**kw), bundle.tokenizer, load_sentences("heldout"))
    fp32 = _onnx_bytes(_export(graphopt.trace(bundle)))
    print(f"machine: {machine_info()}; fusions: {'ort-fusions' in registry.passes}", flush=True)
    print(f"{'method':<17} {'kept':>5} {'split':>5} {'cos before':>10} {'cos after':>10} {'ORT cos':>8} "
          f"{'speed b8':>8} {'MB':>6}", flush=True)
    rows = []
    split_pass, distill = registry.passes.get("low-rank-split"), registry.passes.get("distill")
    for method in args.methods:
        for fraction in args.fractions:
            program = graphopt.trace(bundle)
            result = split_pass(method=method, select="budget", budget=fraction, layers=tuple(args.layers),
                                compare=False)(program)
            program = result.program
            before = _heldout_cosine(program.ir, bundle, reference)
            after = float("nan")
            if args.steps:
                program = distill(steps=args.steps, warmup_steps=max(1, args.steps // 10), lr=args.lr,
                                  batch_size=args.batch_size, max_length=64, attention=0.0, soft_label=0.0,
                                  hidden=1.0, output=1.0, dropout=False, evaluate=False)(program).program
                after = _heldout_cosine(program.ir, bundle, reference)
            data = _onnx_bytes(_export(program))
            ort_cos = _heldout_cosine(_ort_embedder(data), bundle, reference)
            speed = _speedup(fp32, data, args.threads, args.rounds)
            row = {"method": method, "budget": fraction, "kept": result.notes["kept_fraction"],
                   "split_layers": result.notes["split"], "cos_before_recovery": before,
                   "cos_after_recovery": after, "ort_cos": ort_cos, "speedup_b8": speed, "mb": len(data) / 1e6,
                   "steps": args.steps}
            rows.append(row)
            print(f"{method:<17} {row['kept']:>5.2f} {row['split_layers']:>5} {before:>10.4f} {after:>10.4f} "
                  f"{ort_cos:>8.4f} {speed:>7.2f}x {row['mb']:>6.1f}", flush=True)
    out = {"rows": rows, "fp32_mb": len(fp32) / 1e6, "machine": machine_info(), "steps": args.steps}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    sys.exit(main())
