"""Pruning, measured: the kernel timing table the cpp backend chooses formats from, and MiniLM pruned.

``table``: for each of MiniLM's Linear shapes (out×in 384×384, 1536×384, 384×1536) and rows
(batch × sequence: 1, 16, 128), the time of dense ``F.linear`` (fp32) and of graphopt's
``csr_linear`` / ``sell_linear`` / ``sellp_linear`` / ``bsr_linear`` (blocks 1×4, 1×8, 4×4, 16×1), fp32 and
int8 values, at densities 0.05 … 0.5 (the fraction of nonzero entries, of nonzero blocks for BSR; CSR, SELL
and SELL-P store some zeros beside them as padding). All candidates of one shape and
rows are timed *interleaved*, round by round, so the load of a shared machine falls on all
alike; figures are medians over rounds of samples that last about 1 ms. ``--write`` writes the
table ``graphopt.sparsity.KernelTable`` reads (``graphopt/data/sparse_kernel_times.json``).

``run``: all-MiniLM-L6-v2 pruned gradually with distillation (``prune`` pass, short schedules
on this shared machine: say so when quoting), at 50/70/80/90% unstructured and one block
pattern: held-out mean cosine, Spearman and top-1 against the dense model; latency of the
``cpp`` artifact (``model.pt2``) at batch 1 and 8 against the fp32 ONNX artifact in ORT
(export + ort-fusions) and torch eager; file sizes (model.pt2, model.onnx dense and with
sparse initializers); training wall time.

Usage::

    python benchmarks/prune.py table --write
    python benchmarks/prune.py run --steps 150 --cache /tmp/pruned --int8 --json out.json
    python benchmarks/prune.py run --recipe sparse-90-int8 --int8 --threads 1 --rounds 30 --cache /tmp/pruned
    python benchmarks/prune.py run --configs 0.9 --steps 1500 --int8 --criterion activation \
        --initial-sparsity 0.6 --prune-every 300 --prune-until 0.4 --lr 1e-3 \
        --density '*.attention.query=0.5' '*.attention.key=0.5' ...   # sparse-90: its density table too

Latency is the calling thread's CPU time: right at ``--threads 1`` only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from graphopt.bench import interleaved_ms

TABLE = Path(__file__).resolve().parents[1] / "graphopt" / "data" / "sparse_kernel_times.json"
SHAPES = ((384, 384), (1536, 384), (384, 1536))
ROWS = (1, 16, 128)
DENSITIES = (0.05, 0.1, 0.2, 0.3, 0.5)
BLOCKS = ((1, 4), (1, 8), (4, 4), (16, 1))


def _weight(out: int, inp: int, block: tuple[int, int], density: float, gen: torch.Generator) -> torch.Tensor:
    r, c = block
    keep = torch.rand(-(-out // r), -(-inp // c), generator=gen) < density
    mask = keep.repeat_interleave(r, 0).repeat_interleave(c, 1)[:out, :inp]
    return torch.randn(out, inp, generator=gen) / inp ** 0.5 * mask


def table(args: argparse.Namespace) -> dict:
    from graphopt.backends.cpp.build import load_extension
    from graphopt.backends.cpp.ops import pack_weight, sparse_linear
    from graphopt.bench import machine_info
    from graphopt.report import versions

    load_extension()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    entries, machine = [], machine_info()
    for out, inp in SHAPES:
        dense_w, bias = torch.randn(out, inp, generator=gen), torch.randn(out, generator=gen)
        packed = {}
        for density in DENSITIES:
            for block in ((1, 1), *BLOCKS):
                w = _weight(out, inp, block, density, gen)
                layouts = (("csr", None), ("sell", None), ("sellp", None)) if block == (1, 1) else (("bsr", block),)
                for dtype in (torch.float32, torch.int8):
                    for fmt, blk in layouts:
                        dname = "int8" if dtype == torch.int8 else "fp32"
                        packed[(fmt, blk, dname, density)] = pack_weight(w, fmt, blk, dtype)
        for rows in ROWS:
            x = torch.randn(rows, inp, generator=gen)
            fns: dict = {("dense", None, "fp32", 1.0): lambda x=x: F.linear(x, dense_w, bias)}
            for key, p in packed.items():
                fns[key] = lambda x=x, p=p: sparse_linear(x, p, bias)
            with torch.inference_mode():
                ms = interleaved_ms(fns, args.rounds)
            for (fmt, block, dtype, density), value in ms.items():
                entries.append({"out": out, "in": inp, "rows": rows, "format": fmt,
                                "block": list(block) if block else None, "dtype": dtype, "density": density,
                                "ms": round(value, 5)})
            best = min((v, k) for k, v in ms.items() if k[0] != "dense")
            print(f"{out:>5}x{inp:<5} rows={rows:<4} dense {ms[('dense', None, 'fp32', 1.0)]:.4f} ms; fastest "
                  f"sparse {best[1]} {best[0]:.4f} ms", flush=True)
    result = {"schema": 1,
              "what": "ms of y = x @ W.T + b: dense F.linear (fp32) and graphopt's csr_linear / sell_linear / "
                      "sellp_linear / bsr_linear (fp32 and int8 values), out×in, rows = batch × sequence, density = "
                      "nonzero fraction (of entries for CSR, SELL and SELL-P, whose padding is not counted; of "
                      "blocks for BSR)",
              "command": "python benchmarks/prune.py table --write",
              "settings": {"threads": args.threads, "rounds": args.rounds,
                           "statistic": f"median of {args.rounds} interleaved rounds of ~1 ms samples of the "
                                        "calling thread's CPU time (time.thread_time), inference_mode"},
              "machine": machine, "load_average_1m_after": machine_info()["load_average_1m"],
              "versions": versions(), "entries": entries}
    if args.write:
        TABLE.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {TABLE}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    t = sub.add_parser("table", help="time the kernels per shape, rows, format and density")
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--rounds", type=int, default=15)
    t.add_argument("--write", action="store_true", help=f"write {TABLE}")
    r = sub.add_parser("run", help="MiniLM pruned gradually at several sparsities")
    r.add_argument("--steps", type=int, default=150, help="training steps per configuration")
    r.add_argument("--configs", nargs="+", default=["0.5", "0.7", "0.8", "0.9", "0.7@1x8"],
                   help="sparsity, or sparsity@pattern")
    r.add_argument("--recipe", help="a shipped recipe's name or a recipe file: its prune step's options "
                                    "instead of --configs and the training options below")
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--rounds", type=int, default=15)
    r.add_argument("--prune-every", type=int, default=10)
    r.add_argument("--prune-until", type=float, default=0.6)
    r.add_argument("--initial-sparsity", type=float, default=0.0)
    r.add_argument("--batch-size", type=int, default=16)
    r.add_argument("--lr", type=float, default=5e-4)
    r.add_argument("--max-length", type=int, default=32)
    r.add_argument("--output-weight", type=float, default=5.0)
    r.add_argument("--hidden-weight", type=float, default=0.2)
    r.add_argument("--soft-label-weight", type=float, default=1.0)
    r.add_argument("--warmup-steps", type=int, default=100)
    r.add_argument("--criterion", choices=["magnitude", "activation"], default="magnitude",
                   help="magnitude: gradual schedule; activation: pruned once on activations with refit, then trained")
    r.add_argument("--density", nargs="+", default=[], metavar="GLOB=FACTOR",
                   help="relative kept fraction of layers (the prune pass's density), e.g. '*.attention.query=0.5'")
    r.add_argument("--reconstruct-steps", type=int, default=0,
                   help="block-wise reconstruction steps per block (a layer by default) after the first pruning (the prune pass's reconstruct_steps)")
    r.add_argument("--reconstruct-lr", type=float, default=6e-3)
    r.add_argument("--reconstruct-sentences", type=int, default=2048)
    r.add_argument("--reconstruct-block", type=int, default=1, help="Transformer layers reconstructed together")
    r.add_argument("--reconstruct-rounds", type=int, default=1,
                   help="prunings on a cubic schedule, the first before reconstruction and the rest during each "
                        "block's, the last at --prune-until of its steps (the prune pass's reconstruct_rounds)")
    r.add_argument("--cache", type=Path, help="keep pruned weights here; a later run with the same pruning "
                                              "options reuses them (no training)")
    r.add_argument("--data", nargs="+", default=["sentences", "written", "recombined", "substituted"])
    r.add_argument("--int8", action="store_true", help="also lower to cpp with int8 values")
    r.add_argument("--accuracy-only", action="store_true",
                   help="only the eager model's agreement: no ONNX export, lowering, file sizes or latency")
    r.add_argument("--device", default="cpu",
                   help="torch device the prune pass trains on (cuda: a GPU; the targets are for this CPU); "
                        "the pruned model is evaluated, lowered and timed on CPU")
    r.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.what == "table":
        table(args)
    else:
        run(args)
    return 0


def _agreement(fn: Callable, tokenizer, sentences, reference: np.ndarray) -> dict:
    from graphopt.evaluate import embed, evaluate_embeddings

    got = evaluate_embeddings(embed(fn, tokenizer, sentences), reference).as_dict()
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in got.items()}


def _size(executable, folder: Path) -> int:
    return sum(p.stat().st_size for p in executable.write_into(folder))


class _TokenizerOn:
    """The tokenizer with its tensors put on ``device``: the prune pass tokenizes its own calibration and training text."""

    def __init__(self, tokenizer, device: str) -> None:
        self.tokenizer, self.device = tokenizer, device

    def __getattr__(self, name: str):
        return getattr(self.tokenizer, name)

    def __call__(self, *args, **kwargs) -> dict:
        return {k: v.to(self.device) for k, v in self.tokenizer(*args, **kwargs).items()}


def _cache_key(spec: str, options: dict) -> str:
    """The configuration's name and a digest of its pruning options: a cached model is reused only for
    the options it was trained with."""
    digest = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{spec.replace('@', '-')}-{digest}"


def _pruned(bundle, pass_, cache: Path | None, key: str, device: str = "cpu"):
    """The pruned program (on CPU) and the pass's notes; trained once (on ``device``), then read from ``cache`` if given."""
    import graphopt
    from safetensors.torch import load_file, save_file

    from graphopt.sparsity import SPARSITY_KEY

    program = graphopt.trace(bundle)
    files = None if cache is None else {ext: cache / f"pruned-{key}.{ext}" for ext in ("json", "st")}
    if files is not None and files["json"].exists():
        program.ir.load_state_dict(load_file(str(files["st"])))
        notes = json.loads(files["json"].read_text())
        for name, layer in notes["layers"].items():
            mask = program.ir.get_submodule(name).weight != 0
            program.annotations.setdefault(name, {})[SPARSITY_KEY] = {
                "mask": mask, "pattern": layer["pattern"], "sparsity": layer["sparsity"], "shape": layer["shape"]}
        return program, notes
    if device != "cpu":
        program.ir.to(device)
        program.tokenizer = _TokenizerOn(program.tokenizer, device)
    program = graphopt.Pipeline([pass_], measure=False).run(program)
    if device != "cpu":
        program.ir.to("cpu")
        program.tokenizer = program.tokenizer.tokenizer
        for annotation in program.annotations.values():
            if SPARSITY_KEY in annotation:
                annotation[SPARSITY_KEY]["mask"] = annotation[SPARSITY_KEY]["mask"].cpu()
    notes = program.history[-1].notes
    if files is not None:
        cache.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in program.ir.state_dict().items()}, str(files["st"]))
        files["json"].write_text(json.dumps(notes, default=str))
    return program, notes


class _Lowering:
    """Lowers pruned programs to ONNX Runtime (sparse initializers) and cpp, and times them against fp32 ORT."""

    def __init__(self, bundle, args: argparse.Namespace) -> None:
        import graphopt
        from graphopt import registry
        from graphopt.data import load_sentences

        self.args, self.bundle = args, bundle
        self.export = registry.passes.get("export")
        self.fusions = [registry.passes.get("ort-fusions")()] if "ort-fusions" in registry.passes else []
        fp32_program = graphopt.Pipeline([self.export(), *self.fusions], measure=False).run(graphopt.trace(bundle))
        self.fp32 = graphopt.compile(fp32_program, "onnxruntime", threads=args.threads, spinning=False)
        self.heldout = load_sentences("heldout")
        self.batches = {1: bundle.tokenizer(self.heldout[:1]), 8: bundle.tokenizer(self.heldout[8:16])}
        self.have_cpp = "cpp" in registry.backends
        self.folder = Path(tempfile.mkdtemp(prefix="graphopt-prune-bench-"))
        (self.folder / "fp32").mkdir()
        self.fp32_bytes = _size(self.fp32, self.folder / "fp32")

    def measure(self, program, spec: str, row: dict, reference: np.ndarray) -> None:
        """Adds each backend's agreement, file sizes and batch-1/8 latencies to ``row``."""
        import graphopt

        args, tokenizer, heldout = self.args, self.bundle.tokenizer, self.heldout
        onnx_program = graphopt.Pipeline([self.export(), *self.fusions], measure=False).run(program.clone())
        ort_sparse = graphopt.compile(onnx_program, "onnxruntime", threads=args.threads, sparse_initializers=True)
        ort_dense = graphopt.compile(onnx_program, "onnxruntime", threads=args.threads)
        row["onnxruntime"] = _agreement(lambda **kw: ort_sparse(**kw)[0], tokenizer, heldout, reference)
        sub = self.folder / spec.replace("@", "_")
        (sub / "sparse").mkdir(parents=True)
        (sub / "dense").mkdir()
        row["bytes"] = {"onnx_fp32": self.fp32_bytes, "onnx_pruned_dense": _size(ort_dense, sub / "dense"),
                        "onnx_sparse": _size(ort_sparse, sub / "sparse")}
        runners = {"ort_fp32": lambda b: self.fp32(**b), "ort_sparse": lambda b: ort_sparse(**b),
                   "torch_eager": lambda b: self.bundle.module(**b)}
        if self.have_cpp:
            for int8 in (False, True) if args.int8 else (False,):
                key = "cpp_int8" if int8 else "cpp"
                cpp = graphopt.compile(program, "cpp", **({"int8": True} if int8 else {}))
                (sub / key).mkdir()
                row["bytes"][key] = _size(cpp, sub / key)
                with torch.inference_mode():
                    row[key] = _agreement(lambda cpp=cpp, **kw: cpp(**kw)[0], tokenizer, heldout, reference)
                runners[key] = lambda b, cpp=cpp: cpp(**b)
        row["latency_ms"] = {}
        for batch, inputs in self.batches.items():
            with torch.inference_mode():
                ms = interleaved_ms({k: (lambda f=f: f(inputs)) for k, f in runners.items()}, args.rounds)
            row["latency_ms"][batch] = {k: round(v, 3) for k, v in ms.items()}


def _configs(args: argparse.Namespace) -> list[tuple[str, dict]]:
    """(name, prune pass options) of each configuration: --recipe's prune step, or --configs with the
    training options of the command line."""
    if args.recipe:
        from graphopt.errors import RecipeError
        from graphopt.recipe import load_recipe

        try:
            recipe = load_recipe(args.recipe)
        except RecipeError as e:
            raise SystemExit(f"--recipe: {e}") from None
        steps = [step for step in recipe.pipeline if step.name == "prune"]
        if len(steps) != 1:
            raise SystemExit(f"recipe {recipe.name!r} has {len(steps)} prune steps; --recipe needs exactly one")
        # The pass's own held-out evaluation is skipped as for --configs: the rows measure agreement.
        return [(recipe.name, {"evaluate": False, **steps[0].options})]
    configs = []
    for spec in args.configs:
        sparsity, _, pattern = spec.partition("@")
        configs.append((spec, {
            "sparsity": float(sparsity), "pattern": pattern or "unstructured", "steps": args.steps,
            "initial_sparsity": min(args.initial_sparsity, float(sparsity)),
            "prune_every": args.prune_every, "prune_until": args.prune_until, "batch_size": args.batch_size,
            "lr": args.lr, "max_length": args.max_length, "data": tuple(args.data), "output": args.output_weight,
            "hidden": args.hidden_weight, "soft_label": args.soft_label_weight,
            "warmup_steps": args.warmup_steps, "criterion": args.criterion, "evaluate": False,
            "reconstruct_steps": args.reconstruct_steps, "reconstruct_lr": args.reconstruct_lr,
            "reconstruct_sentences": args.reconstruct_sentences, "reconstruct_block": args.reconstruct_block,
            "reconstruct_rounds": args.reconstruct_rounds,
            "density": {glob: float(f) for glob, _, f in (d.rpartition("=") for d in args.density)}}))
    return configs


def run(args: argparse.Namespace) -> list[dict]:
    from graphopt import registry
    from graphopt.bench import machine_info
    from graphopt.data import load_sentences

    configs = _configs(args)  # first: a bad --recipe fails before the model loads
    torch.set_num_threads(args.threads)
    bundle = registry.models.get("minilm")()
    tokenizer, heldout = bundle.tokenizer, load_sentences("heldout")
    module = bundle.module.eval()
    with torch.inference_mode():
        from graphopt.evaluate import embed

        reference = embed(module, tokenizer, heldout)
    prune = registry.passes.get("prune")
    lowering = None if args.accuracy_only else _Lowering(bundle, args)
    rows: list[dict] = []
    trained_by = f"recipe {args.recipe}'s prune step" if args.recipe else f"{args.steps} training steps per configuration"
    print(f"# MiniLM, {trained_by}, {args.threads} thread(s)"
          + ("; eager accuracy only" if lowering is None else
             f"; fp32 ONNX {lowering.fp32_bytes / 1e6:.2f} MB; latency = median thread CPU ms over "
             f"{args.rounds} interleaved rounds"
             + ("" if args.threads == 1 else " (the calling thread's alone: the other threads' work is not "
                "counted, so compare latencies at --threads 1 only)")), flush=True)
    for spec, options in configs:
        program, notes = _pruned(bundle, prune(**options), args.cache, _cache_key(spec, options), args.device)
        # Training time: block-wise reconstruction (if any) and end-to-end distillation.
        wall_s = notes.get("train", {}).get("wall_s", 0.0) + notes.get("reconstruct", {}).get("wall_s", 0.0)
        row: dict = {"config": spec, "options": options, "train_wall_s": wall_s,
                     "sparsity": notes["overall_sparsity"]}
        with torch.inference_mode():
            row["eager"] = _agreement(program.ir, tokenizer, heldout, reference)
        if lowering is not None:
            lowering.measure(program, spec, row, reference)
        rows.append(row)
        print(json.dumps(row), flush=True)
    _print_table(rows)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_info(), "rows": rows}, indent=1) + "\n")
    return rows


def _print_table(rows: list[dict]) -> None:
    print("\n| config | sparsity | train s | backend | mean cos | spearman | top-1 | MB | b1 ms | b8 ms | "
          "b1 vs ORT fp32 | b8 vs ORT fp32 |")
    print("|" + "---|" * 12)
    for row in rows:
        lat = row.get("latency_ms")
        for key in ("eager", "onnxruntime", "cpp", "cpp_int8"):
            if key not in row:
                continue
            runner = {"eager": "torch_eager", "onnxruntime": "ort_sparse"}.get(key, key)
            size = row.get("bytes", {}).get({"onnxruntime": "onnx_sparse"}.get(key, key))
            a = row[key]
            cells = [row["config"], f"{row['sparsity']:.3f}", f"{row['train_wall_s']:.0f}", key,
                     f"{a['mean_cosine']:.4f}", f"{a['spearman']:.4f}", f"{a['top1_agreement']:.3f}",
                     "" if size is None else f"{size / 1e6:.2f}"]
            if lat is None:  # --accuracy-only
                cells += [""] * 4
            else:
                cells += [f"{lat[b][runner]:.3f}" for b in (1, 8)]
                cells += [f"{lat[b]['ort_fp32'] / lat[b][runner]:.2f}x" for b in (1, 8)]
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
