"""Quantization, measured: graphopt's int8/int4 recipes against ONNX Runtime's own quantizer.

all-MiniLM-L6-v2 (graphopt's ``BertEncoder``; every candidate starts from the same
``torch.onnx.export(dynamo=True)`` file that graphopt's export pass writes):

* ``ort fp32``: that file in ORT (ORT's own graph optimizations on, as everywhere here)
* ``ort dynamic``: ``quantize_dynamic(per_channel=True)`` (s8 weights, u8 activations)
* ``ort-opt + dynamic``: ORT's transformer optimizer (``optimize_model``, bert, 12 heads,
  384 wide) then ``quantize_dynamic(per_channel=True)``: the best existing point
* ``ort static``: ``quantize_static`` with its defaults (QDQ, s8/s8, MinMax), calibrated on
  the same calibration sentences graphopt uses
* ``ort nbits4`` / ``ort nbits8``: ``MatMulNBitsQuantizer`` (block 32, asymmetric, its
  default accuracy level) on the MatMuls, round-to-nearest
* ``graphopt <recipe>``: the ``model.onnx`` of ``graphopt compress --model minilm --recipe <recipe>``
* ``graphopt <qat recipe> (PTQ)``: the same recipe without its ``qat`` pass, so PTQ and QAT are
  compared at the same spec; the ``build s`` column is the whole compress wall time (calibration,
  training, export), which for a QAT recipe is mostly training

Latency: batch 1 and 8, sequence 128, 2 intra-op threads, spinning off, one session alive
at a time; candidates interleaved round by round so the load of a shared machine falls on
all alike; the figure is the median over rounds of each round's median. CPU time per run
(process time, all threads) is printed beside it: it is far less sensitive to other
processes than wall time. Accuracy: ``graphopt.evaluate`` on the held-out sentences
against the fp32 module (mean and worst cosine, Spearman, top-1 agreement).

Usage::

    python benchmarks/quantization.py --work /tmp/graphopt-bench-quant           # build, then measure
    python benchmarks/quantization.py --work /tmp/graphopt-bench-quant --reuse --rounds 7 --json q.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BATCHES = (1, 8)
SEQUENCE = 128
BASELINE, BEST_EXISTING = "ort fp32", "ort-opt + dynamic"
RECIPES = ("fp32", "int8-dynamic", "int8-static", "int8-mixed", "int8-weight-only", "int4-weight-only", "int8-qat",
           "int4-qat")
#: A QAT recipe is also built without its ``qat`` pass ("<recipe> (PTQ)"): the same spec, calibrated only.
PTQ_TWIN = " (PTQ)"


def _calibration_reader(tokenizer: Any):
    from onnxruntime.quantization import CalibrationDataReader

    from graphopt.data import assert_not_heldout, load_sentences

    sentences = list(load_sentences("calibration"))[:128]
    assert_not_heldout(sentences, consumer="ort quantize_static calibration")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{k: v.numpy() for k, v in tokenizer(sentences[i:i + 16]).items()}
                                 for i in range(0, len(sentences), 16)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)
    return Reader()


def _recipes(names: tuple[str, ...]) -> dict[str, Any]:
    """Candidate name -> recipe (a name, or for a QAT recipe's PTQ twin the recipe without ``qat``)."""
    import tomllib

    from graphopt.recipe import Recipe, shipped_recipes

    recipes: dict[str, Any] = {}
    for name in names:
        recipes[f"graphopt {name}"] = name
        data = tomllib.loads(shipped_recipes()[name].read_text())
        if any(step.get("pass") == "qat" for step in data.get("pipeline", [])):
            data["pipeline"] = [step for step in data["pipeline"] if step.get("pass") != "qat"]
            recipes[f"graphopt {name}{PTQ_TWIN}"] = Recipe.from_dict(data, name=f"{name}{PTQ_TWIN}")
    return recipes


def build(work: Path, reuse: bool, recipes: tuple[str, ...]) -> tuple[dict[str, Path], dict[str, float]]:
    """Writes every candidate into ``work`` (with ``reuse``, keeps those already there); returns
    the files and each graphopt candidate's compress wall time (0 when reused)."""
    import onnx_ir
    from onnxruntime.quantization import QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from onnxruntime.transformers.optimizer import optimize_model

    import graphopt
    from graphopt import registry

    work.mkdir(parents=True, exist_ok=True)
    files = {"ort fp32": work / "dynamo.onnx", "ort dynamic": work / "ort_dynamic.onnx",
             "ort-opt + dynamic": work / "ort_opt_dynamic.onnx", "ort static": work / "ort_static.onnx",
             "ort nbits4": work / "ort_nbits4.onnx", "ort nbits8": work / "ort_nbits8.onnx",
             **{c: work / c.removeprefix("graphopt ").replace(" ", "_") / "model.onnx" for c in _recipes(recipes)}}
    todo = {k for k, p in files.items() if not (reuse and p.exists())}
    bundle = registry.models.get("minilm")()
    if "ort fp32" in todo:
        program = graphopt.Pipeline([registry.passes.get("export")()], measure=False).run(graphopt.trace(bundle))
        onnx_ir.save(program.ir, files["ort fp32"])
    source = str(files["ort fp32"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if "ort dynamic" in todo:
            quantize_dynamic(source, files["ort dynamic"], per_channel=True, weight_type=QuantType.QInt8)
        if "ort-opt + dynamic" in todo:
            optimized = optimize_model(source, model_type="bert", num_heads=12, hidden_size=384)
            print(f"  ORT optimizer: {optimized.get_fused_operator_statistics()}", file=sys.stderr)
            optimized.save_model_to_file(str(work / "ort_opt.onnx"))
            quantize_dynamic(work / "ort_opt.onnx", files["ort-opt + dynamic"], per_channel=True,
                             weight_type=QuantType.QInt8)
        if "ort static" in todo:
            quantize_static(source, files["ort static"], _calibration_reader(bundle.tokenizer))
        for bits in (4, 8):
            if f"ort nbits{bits}" in todo:
                quantizer = MatMulNBitsQuantizer(source, bits=bits, block_size=32, is_symmetric=False)
                quantizer.process()
                quantizer.model.save_model_to_file(str(files[f"ort nbits{bits}"]))
    build_s: dict[str, float] = {}
    for candidate, recipe in _recipes(recipes).items():
        if candidate in todo:
            start = time.perf_counter()
            graphopt.compress("minilm", recipe, out=files[candidate].parent, final_check=False)
            build_s[candidate] = time.perf_counter() - start
            print(f"  {candidate}: {build_s[candidate]:.0f} s", file=sys.stderr)
    return files, build_s


def _feeds(batch: int) -> dict[str, np.ndarray]:
    from graphopt import registry
    from graphopt.data import load_sentences

    tokenizer = registry.models.get("minilm")().tokenizer
    sentences = list(load_sentences("heldout"))[:batch]
    return {k: v.numpy() for k, v in tokenizer(sentences, max_length=SEQUENCE, pad_to=SEQUENCE).items()}


def _timed(session: Any, feeds: dict[str, np.ndarray], warmup: int, runs: int) -> tuple[float, float]:
    for _ in range(warmup):
        session.run(None, feeds)
    wall, cpu = [], []
    for _ in range(runs):
        w, c = time.perf_counter(), time.process_time()
        session.run(None, feeds)
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    return statistics.median(wall) * 1e3, statistics.median(cpu) * 1e3


def accuracy(files: dict[str, Path]) -> dict[str, dict[str, float]]:
    """Held-out agreement of each candidate with the fp32 module (graphopt.evaluate)."""
    from graphopt import registry
    from graphopt.data import load_sentences
    from graphopt.evaluate import embed, evaluate_embeddings
    from graphopt.onnx_runtime import create_session, session_options

    bundle = registry.models.get("minilm")()
    sentences = load_sentences("heldout")
    reference = embed(lambda **kw: bundle.module(**kw), bundle.tokenizer, sentences)
    scores = {}
    for name, path in files.items():
        session = create_session(str(path), session_options(threads=2))
        candidate = embed(lambda **kw: session.run(None, {k: v.numpy() for k, v in kw.items()})[0],
                          bundle.tokenizer, sentences)
        scores[name] = evaluate_embeddings(candidate, reference).as_dict()
        session = None  # one session alive at a time
    return scores


def measure(files: dict[str, Path], *, rounds: int, warmup: int, runs: int, threads: int) -> dict[str, Any]:
    from graphopt.onnx_runtime import create_session, session_options

    feeds = {b: _feeds(b) for b in BATCHES}
    samples: dict[tuple[str, int], list[tuple[float, float]]] = {(n, b): [] for n in files for b in BATCHES}
    for r in range(rounds):
        for name, path in files.items():
            session = create_session(str(path), session_options(threads=threads, spinning=False))
            for b in BATCHES:
                samples[(name, b)].append(_timed(session, feeds[b], warmup, runs if b == 1 else max(3, runs // 4)))
            del session
            gc.collect()
        print(f"  round {r + 1}/{rounds}, load average {os.getloadavg()[0]:.2f}", file=sys.stderr)
    return samples


def table(files: dict[str, Path], samples: dict, scores: dict, build_s: dict[str, float]) -> list[dict[str, Any]]:
    rows = []
    fp32_size = files[BASELINE].stat().st_size
    for b in BATCHES:
        med = {n: statistics.median(s[0] for s in samples[(n, b)]) for n in files}
        cpu = {n: statistics.median(s[1] for s in samples[(n, b)]) for n in files}
        for name in files:
            rows.append({"candidate": name, "batch": b, "p50_ms": med[name], "cpu_ms": cpu[name],
                         "rounds_ms": [round(s[0], 1) for s in samples[(name, b)]],
                         "vs_fp32": med[BASELINE] / med[name], "cpu_vs_fp32": cpu[BASELINE] / cpu[name],
                         "vs_best": med[name] / med[BEST_EXISTING], "cpu_vs_best": cpu[name] / cpu[BEST_EXISTING],
                         "build_s": build_s.get(name), "mb": files[name].stat().st_size / 1e6, "size_ratio": files[name].stat().st_size / fp32_size,
                         **scores[name]})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/graphopt-bench-quant"))
    parser.add_argument("--reuse", action="store_true", help="reuse candidates already built in --work")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=12, help="timed runs per round at batch 1 (a quarter at batch 8)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--build-threads", type=int, default=1,
                        help="torch threads while building (calibration batches are small; one thread is fastest "
                             "on a shared machine)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.build_threads)
    files, build_s = build(args.work, args.reuse, tuple(r for r in args.recipes.split(",") if r))
    scores = accuracy(files)
    load_before = os.getloadavg()[0]
    samples = measure(files, rounds=args.rounds, warmup=args.warmup, runs=args.runs, threads=args.threads)
    rows = table(files, samples, scores, build_s)
    from graphopt.bench import machine_info
    from graphopt.report import versions

    machine = machine_info()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores; load average {load_before:.2f} before, "
          f"{machine['load_average_1m']:.2f} after; {args.threads} threads, spinning off, sequence {SEQUENCE}, "
          f"{args.rounds} interleaved rounds")
    print(f"\n| candidate | batch | p50 ms | CPU ms | vs {BASELINE} (wall / CPU) | vs best existing (wall / CPU) "
          "| MB | size | mean cos | worst cos | Spearman | top-1 | build s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        built = "" if r["build_s"] is None else f"{r['build_s']:.0f}"
        print(f"| {r['candidate']} | {r['batch']} | {r['p50_ms']:.1f} | {r['cpu_ms']:.1f} | {r['vs_fp32']:.2f}× / "
              f"{r['cpu_vs_fp32']:.2f}× | {r['vs_best']:.2f} / {r['cpu_vs_best']:.2f} | {r['mb']:.1f} | "
              f"{r['size_ratio']:.3f} | {r['mean_cosine']:.4f} | {r['worst_cosine']:.4f} | {r['spearman']:.4f} | "
              f"{r['top1_agreement']:.3f} | {built} |")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "load_average_1m_before": load_before,
                                         "versions": versions(), "settings": vars(args) | {"work": str(args.work),
                                                                                            "json": str(args.json)},
                                         "rows": rows}, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
