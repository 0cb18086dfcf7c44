"""``graphopt.compress(model, recipe)``: the main job, the same as ``graphopt compress``.

Loads or traces the model, runs the recipe's pipeline, compiles every backend the recipe
names, checks each artifact against the original model (on held-out sentences for text
models, else on the example inputs), and writes the artifacts with ``report.json`` and
``report.md`` into ``out`` atomically.

Example::

    result = graphopt.compress("minilm", "fp32", out="out")
    print(result.report["final_check"]["onnxruntime"]["mean_cosine"])
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from torch import nn

from graphopt import registry
from graphopt.backend import Executable, compile
from graphopt.bundle import ModelBundle
from graphopt.errors import ModelError
from graphopt.pipeline import Instrument
from graphopt.program import Drift, Program
from graphopt.recipe import Recipe, load_recipe
from graphopt.report import build_report, render_markdown
from graphopt.trace import load, trace
from graphopt.writer import atomic_output_dir, check_output_target

__all__ = ["compress", "CompressResult", "resolve_model"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class CompressResult:
    """What ``compress`` produced: the final program, executables per backend, the report."""

    program: Program
    executables: dict[str, Executable]
    report: dict[str, Any]
    out: Path | None


def resolve_model(model: str | os.PathLike[str] | nn.Module | ModelBundle) -> ModelBundle | Path:
    """A registered model name, ``NAME:ARGUMENT``, an ``.onnx`` path, a module or a bundle → a bundle or a path.

    ``NAME:ARGUMENT`` calls the model entry point ``NAME`` with ``ARGUMENT`` (``hf:./bert``
    calls the ``hf`` loader with ``"./bert"``), so a plugin adds a model source the same way
    it adds a model, through the ``graphopt.models`` group; a plain ``NAME`` calls it with none.
    """
    if isinstance(model, (ModelBundle, nn.Module)):
        return model if isinstance(model, ModelBundle) else ModelBundle(type(model).__name__, model, {})
    text = str(model)
    scheme, colon, argument = text.partition(":")
    known = set(registry.models.names()) | set(registry.models.broken)
    if colon and scheme in known and not isinstance(model, Path):
        return _bundle_from(text, registry.models.get(scheme)(argument))
    if text.endswith(".onnx") or Path(text).suffix == ".onnx" or os.sep in text:
        return Path(text)
    loader = registry.models.get(text) if text in known else None
    if loader is None:
        import difflib

        near = difflib.get_close_matches(text, registry.models.names(), n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise ModelError(f"unknown model {text!r}: {hint}give a registered model "
                         f"({', '.join(registry.models.names())}), NAME:ARGUMENT (hf:FOLDER for a saved "
                         "Hugging Face model) or the path of an .onnx file")
    return _bundle_from(text, loader())


def _bundle_from(text: str, bundle: object) -> ModelBundle:
    if not isinstance(bundle, ModelBundle):
        raise ModelError(f"model entry point {text!r} returned {type(bundle).__name__}, not a ModelBundle")
    return bundle


def compress(model: str | os.PathLike[str] | nn.Module | ModelBundle | None, recipe: str | os.PathLike[str] | Recipe,
             *, out: str | os.PathLike[str] | None = None, instruments: Sequence[Instrument] = (),
             progress: Callable[[str], None] | None = None, final_check: bool = True,
             baseline: str | os.PathLike[str] | Recipe | None = None) -> CompressResult:
    """Compresses ``model`` with ``recipe`` and, if ``out`` is given, writes the artifacts there.

    Args:
        model: A registered model name (``"minilm"``), an ``.onnx`` path, an ``nn.Module``
            or a ``ModelBundle``; ``None`` takes the recipe's ``model``.
        recipe: A shipped recipe's name, a TOML path, or a ``Recipe``.
        out: Output folder; written atomically, nothing is left on failure.
        instruments: Pipeline observers (progress display, dumps).
        progress: Called with a short message as each phase starts.
        final_check: Compare every artifact against the original model.
        baseline: A recipe (``"fp32"``) to build from the same model and compare against:
            sizes, ONNX Runtime latency at batch 1 and 8, held-out accuracy side by side
            (``report["baseline"]``, `graphopt.baseline`).

    Raises:
        GraphoptError: any refusal, naming what is at fault.
    """
    say = progress or (lambda message: logger.info("%s", message))
    timings: dict[str, float] = {}
    recipe = load_recipe(recipe)
    if out is not None:
        check_output_target(out)
    model = model if model is not None else recipe.model
    if model is None:
        raise ModelError(f"recipe {recipe.name!r} names no model: give one (--model)")
    start = time.perf_counter()
    say(f"loading model {model if isinstance(model, (str, os.PathLike)) else type(model).__name__}")
    source = resolve_model(model)
    program = load(source) if isinstance(source, Path) else trace(source)
    program.info["recipe"] = recipe.name
    pipeline = recipe.build_pipeline(program.kind, instruments=instruments)
    timings["load"] = time.perf_counter() - start

    start = time.perf_counter()
    final = pipeline.run(program)
    timings["pipeline"] = time.perf_counter() - start

    executables = {spec.name: compile(pipeline.last_by_kind.get(registry.backends.get(spec.name).kind, final),
                                      backend=spec.name, **spec.options) for spec in recipe.backends}
    checks: dict[str, Any] = {}
    if final_check:
        start = time.perf_counter()
        say("final check against the original model")
        checks = _final_check(source, program, executables)
        timings["final_check"] = time.perf_counter() - start
    recipe_info = {"name": recipe.name, "description": recipe.description, "source": recipe.source,
                   "sha256": recipe.sha256, "pipeline": [dataclasses.asdict(p) for p in recipe.pipeline],
                   "backends": [dataclasses.asdict(b) for b in recipe.backends]}
    report = build_report(recipe=recipe_info, program=final, checks=checks, artifacts={}, timings=timings)
    if baseline is not None:
        from graphopt.baseline import compare_to_baseline

        start = time.perf_counter()
        say(f"building the {baseline} baseline")
        base = compress(source, baseline, final_check=final_check)
        report["baseline"] = compare_to_baseline(base.report["recipe"]["name"], executables, base.executables,
                                                 checks, base.report["final_check"], progress=say)
        timings["baseline"] = time.perf_counter() - start
    notes = {name: dict(e.notes) for name, e in executables.items() if getattr(e, "notes", None)}
    if notes:  # what a backend did beyond lowering (sparse initializers, kernel formats)
        report["backend_notes"] = notes
    target = None
    if out is not None:
        say(f"writing {out}")
        sizes = [size for e in executables.values() if (size := e.artifact_bytes()) is not None]
        expected = sum(sizes) if len(sizes) == len(executables) else None  # the reports are small beside them
        with atomic_output_dir(out, expected_bytes=expected) as staging:
            for executable in executables.values():
                executable.write_into(staging)
            report["artifacts"] = {p.name: p.stat().st_size for p in sorted(staging.iterdir())}
            (staging / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
            (staging / "report.md").write_text(render_markdown(report))
        target = Path(out)
    return CompressResult(final, executables, report, target)


def _final_check(source: ModelBundle | Path, program: Program, executables: Mapping[str, Executable]) -> dict[str, Any]:
    """Each executable against the original model: held-out sentences, or the example inputs."""
    checks: dict[str, Any] = {}
    if isinstance(source, ModelBundle) and source.tokenizer is not None:
        from graphopt.data import load_sentences
        from graphopt.evaluate import embed, evaluate_embeddings

        sentences = load_sentences("heldout")
        original = source.module.eval()
        reference = embed(lambda **kw: original(**kw), source.tokenizer, sentences)
        for name, executable in executables.items():
            candidate = embed(lambda **kw: executable(**kw)[0], source.tokenizer, sentences)
            agreement = evaluate_embeddings(candidate, reference).as_dict()
            agreement["max_abs"] = float(np.max(np.abs(candidate - reference)))
            checks[name] = {"data": f"{len(sentences)} held-out sentences", **agreement}
        return checks
    for name, executable in executables.items():
        got = executable(**program.example_inputs)
        drift = Drift.between(got, program.reference_output, program.output_names)
        checks[name] = {"data": "example inputs", **drift.as_dict()}
    return checks
