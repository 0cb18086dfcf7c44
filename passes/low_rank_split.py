"""Split Linear layers into two thin ones: Linear(n→m) -> LowRankLinear(n→r→m), W ≈ (U_r√S_r)(√S_r V_rᵀ).

Invariant: lossy. Each split layer is the truncated SVD of its weight (plain) or of
``W Σ^{1/2}`` mapped back with ``Σ^{-1/2}`` (activation-aware, Σ the damped second moment
of the layer's input over calibration sentences, never held-out ones); the bias stays on
the second factor; ranks are multiples of ``rank_multiple``. A layer is split only where it
saves parameters, ``r(m+n) < mn``, and where a table of ONNX Runtime times (written by
``benchmarks/low_rank.py layers --write-table``) says two thin MatMuls beat one dense one at
``rows`` = batch × sequence; any other layer stays whole, its reason recorded. Module
names, output names and dtypes are unchanged; the module stays trainable, and the program
before the pass is kept as ``program.teacher`` for a later ``distill``. Per-layer rank,
decision and reason go to ``program.annotations[name]["low_rank"]`` and the notes, with the
drift of the plain and the activation-aware split at the same ranks.

Ranks, from ``select``: ``"rank"`` (one rank for all), ``"energy"`` (the least rank keeping
that share of the squared singular values), or ``"budget"`` (a fraction of the selected
layers' parameters, shared by one greedy over every layer's normalised spectrum: each
step buys the 16 ranks, or the whole layer, that remove the most error per parameter).

Preconditions: kind ``module``; ``rank`` at most min(m, n) of every selected layer.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from graphopt.calibration import collect_second_moments
from graphopt.data import assert_not_heldout, load_sentences
from graphopt.distill import keep_teacher, sentence_embedding
from graphopt.errors import PreconditionError
from graphopt.evaluate import embed, evaluate_embeddings
from graphopt.lowrank import (
    Factorization,
    LayerSpectrum,
    LowRankLinear,
    SpeedTable,
    allocate_budget,
    round_rank,
)
from graphopt.pass_base import Pass, PassResult
from graphopt.program import Drift, Program, flatten_outputs

__all__ = ["LowRankSplitPass"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LowRankOptions:
    """Args: layers, exclude: fnmatch globs over nn.Linear module names. method: "plain" or
    "activation-aware". select: how ranks are chosen ("rank", "energy", "budget"), with rank (a
    fixed rank), energy (share of spectral energy kept, in (0, 1]) or budget (share of the
    selected layers' parameters kept, in (0, 1]). rank_multiple: ranks round up to it. rows:
    batch × sequence the speed table is read at. times: a timing table (JSON; "" = the shipped
    one). max_time_ratio: split only where split/dense time is below it. unmeasured: "keep" or
    "split" a layer whose shape the table lacks. damping: λ of Σ + λ·mean(diag Σ)·I.
    calibration_sentences: how many calibration sentences Σ is taken over (0: all).
    compare: also build the other method at the same ranks and report both drifts."""

    layers: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    method: Literal["plain", "activation-aware"] = "activation-aware"
    select: Literal["rank", "energy", "budget"] = "budget"
    rank: int = 64
    energy: float = 0.9
    budget: float = 0.5
    rank_multiple: int = 16
    rows: int = 1024
    times: str = ""
    max_time_ratio: float = 1.0
    unmeasured: Literal["keep", "split"] = "keep"
    damping: float = 0.01
    calibration_sentences: int = 0
    max_length: int = 128
    compare: bool = True

    def __post_init__(self) -> None:
        checks = [(self.rank >= 1, f"rank must be >= 1, got {self.rank}"),
                  (0 < self.energy <= 1, f"energy must be in (0, 1], got {self.energy}"),
                  (0 < self.budget <= 1, (f"budget must be in (0, 1] (the share of the selected layers' "
                                          f"parameters kept), got {self.budget}")),
                  (self.rank_multiple >= 1, f"rank_multiple must be >= 1, got {self.rank_multiple}"),
                  (self.rows >= 1, f"rows must be >= 1, got {self.rows}"),
                  (self.max_time_ratio > 0, f"max_time_ratio must be > 0, got {self.max_time_ratio}"),
                  (self.damping >= 0, f"damping must be >= 0, got {self.damping}"),
                  (self.calibration_sentences >= 0, "calibration_sentences must be >= 0"),
                  (bool(self.layers), 'layers needs at least one glob ("*" for every nn.Linear)')]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


class LowRankSplitPass(Pass):
    """Replaces selected ``nn.Linear`` layers by ``LowRankLinear`` where it saves size and time."""

    name = "low-rank-split"
    kind_in = "module"
    kind_out = "module"
    exact = False
    tolerance = None
    Options = LowRankOptions

    def _select(self, module: nn.Module) -> dict[str, nn.Linear]:
        o = self.options
        factors = {f"{name}.{part}" for name, m in module.named_modules() if isinstance(m, LowRankLinear)
                   for part in ("down", "up")}  # an earlier split's factors are not split again
        chosen = {name: m for name, m in module.named_modules() if isinstance(m, nn.Linear) and name not in factors
                  and any(fnmatch.fnmatchcase(name, g) for g in o.layers)
                  and not any(fnmatch.fnmatchcase(name, g) for g in o.exclude)}
        if o.select == "rank":
            for name, m in chosen.items():
                if o.rank > min(m.weight.shape):
                    raise PreconditionError(
                        f"low-rank-split: rank {o.rank} exceeds min(m, n) = {min(m.weight.shape)} of layer "
                        f"{name!r} ({m.out_features}×{m.in_features}); lower rank or exclude the layer")
        return chosen

    def requires(self, program: Program) -> None:
        if not self._select(program.ir):
            raise PreconditionError(f"low-rank-split: no nn.Linear matches layers={list(self.options.layers)} "
                                    f"exclude={list(self.options.exclude)}")

    def call(self, program: Program) -> PassResult:
        o = self.options
        linears = self._select(program.ir)
        moments: dict[str, torch.Tensor] = {}
        calibration: dict[str, Any] = {}
        if o.method == "activation-aware" or o.compare:
            batches, calibration = self._calibration(program)
            moments = collect_second_moments(program.ir, list(linears), batches)
        table = SpeedTable.load(Path(o.times)) if o.times else SpeedTable.shipped()
        factorizations = {name: _factorization(lin, o.method, moments.get(name), o.damping)
                          for name, lin in linears.items()}
        verdicts = {name: self._verdicts(lin, table) for name, lin in linears.items()}
        ranks, asked = self._ranks(linears, factorizations, verdicts)
        split = {name: r for name, r in ranks.items() if r}
        before = program.clone() if (o.compare and split and moments) else None
        if split:
            keep_teacher(program)
        _swap(program.ir, {name: _low_rank(linears[name], factorizations[name], r) for name, r in split.items()})
        notes = self._notes(linears, factorizations, verdicts, ranks, asked, table)
        notes["calibration"] = calibration
        if before is not None:
            other = "plain" if o.method == "activation-aware" else "activation-aware"
            alt = before.clone()
            _swap(alt.ir, {name: _low_rank(linears[name], _factorization(linears[name], other, moments[name],
                                                                         o.damping), r) for name, r in split.items()})
            notes["plain_vs_activation_aware"] = {"ranks": "the same for both", "data": _drift_data(before),
                                                  **_drift(before, {o.method: program, other: alt})}
        for name, row in notes["layers"].items():
            program.annotations.setdefault(name, {})["low_rank"] = row
        return PassResult(program, bool(split), notes)

    def _calibration(self, program: Program) -> tuple[list[dict[str, torch.Tensor]], dict[str, Any]]:
        if program.tokenizer is None:
            logger.warning("low-rank-split: the program has no tokenizer; Σ is taken over its example inputs")
            return [dict(program.example_inputs)], {"data": "example inputs"}
        sentences = load_sentences("calibration")
        if self.options.calibration_sentences:
            sentences = sentences[: self.options.calibration_sentences]
        assert_not_heldout(sentences, consumer="low-rank-split")
        batches = [program.tokenizer(list(sentences[i:i + 32]), max_length=self.options.max_length)
                   for i in range(0, len(sentences), 32)]
        return batches, {"data": "calibration sentences", "sentences": len(sentences)}

    def _verdicts(self, linear: nn.Linear, table: SpeedTable) -> dict[int, tuple[bool, str]]:
        """(split?, why) at every candidate rank of one layer."""
        o, (m, n) = self.options, linear.weight.shape
        verdicts = {}
        for r in sorted({*range(o.rank_multiple, min(m, n) + 1, o.rank_multiple), min(m, n)}):
            if r * (m + n) >= m * n:
                verdicts[r] = (False, f"no saving: rank {r} needs r(m+n) = {r * (m + n)} >= mn = {m * n}")
            else:
                verdicts[r] = table.verdict(m, n, o.rows, r, o.max_time_ratio, o.unmeasured)
        return verdicts

    def _ranks(self, linears: dict[str, nn.Linear], factorizations: dict[str, Factorization],
               verdicts: dict[str, dict[int, tuple[bool, str]]]) -> tuple[dict[str, int], dict[str, int]]:
        """The rank of each layer (0: whole), and the rank each was asked at (fixed rank or energy)."""
        o = self.options
        if o.select == "budget":
            spectra = []
            for name, lin in linears.items():
                allowed = 0
                for r, (ok, _) in sorted(verdicts[name].items()):
                    if not ok or r % o.rank_multiple:
                        break
                    allowed = r
                spectra.append(LayerSpectrum(lin.out_features, lin.in_features,
                                             factorizations[name].energy(), allowed))
            return dict(zip(linears, allocate_budget(spectra, o.budget, o.rank_multiple))), {}
        asked = {name: round_rank(o.rank if o.select == "rank" else factorizations[name].rank_for_energy(o.energy),
                                  o.rank_multiple, min(lin.weight.shape)) for name, lin in linears.items()}
        return {name: r if verdicts[name][r][0] else 0 for name, r in asked.items()}, asked

    def _notes(self, linears: dict[str, nn.Linear], factorizations: dict[str, Factorization],
               verdicts: dict[str, dict[int, tuple[bool, str]]], ranks: dict[str, int],
               asked: dict[str, int], table: SpeedTable) -> dict[str, Any]:
        rows: dict[str, Any] = {}
        for name, lin in linears.items():
            (m, n), r = lin.weight.shape, ranks[name]
            if r:
                reason = f"split: {r * (m + n)} weights for {m * n}; {verdicts[name][r][1]}"
            elif name in asked:
                reason = f"whole at rank {asked[name]}: {verdicts[name][asked[name]][1]}"
            elif not verdicts[name][min(verdicts[name])][0]:
                reason = f"whole: cannot split even at rank {min(verdicts[name])}: {verdicts[name][min(verdicts[name])][1]}"
            else:
                reason = "whole: the budget greedy bought the whole layer back (its remaining error per weight was the best buy)"
            row = {"rank": r, "decision": "split" if r else "whole", "reason": reason,
                   "shape": [m, n], "weights": [m * n, r * (m + n) if r else m * n]}
            if r:
                row["energy_kept"] = round(float(factorizations[name].energy()[:r].sum()), 5)
            rows[name] = row
        before = sum(row["weights"][0] for row in rows.values())
        after = sum(row["weights"][1] for row in rows.values())
        return {"method": self.options.method, "select": self.options.select,
                "split": sum(1 for row in rows.values() if row["rank"]),
                "whole": sum(1 for row in rows.values() if not row["rank"]),
                "linear_weights": [before, after], "kept_fraction": round(after / before, 4),
                "table": table.describe(self.options.rows), "layers": rows}


def _factorization(linear: nn.Linear, method: str, moment: torch.Tensor | None, damping: float) -> Factorization:
    return Factorization.of(linear.weight, moment if method == "activation-aware" else None, damping)


def _low_rank(linear: nn.Linear, factorization: Factorization, rank: int) -> LowRankLinear:
    up, down = factorization.factors(rank, linear.weight.dtype)
    bias = None if linear.bias is None else linear.bias.detach()
    return LowRankLinear.from_factors(up, down, bias).train(linear.training)


def _swap(root: nn.Module, replacements: dict[str, LowRankLinear]) -> None:
    """Sets each named submodule; in an fx GraphModule, its call_module node becomes two.

    Calling the LowRankLinear through the old node would compute the same, but ``torch.export``
    keeps a GraphModule's ``nn_module_stack`` metadata as it is, so ``down`` and ``up`` would
    share the old layer's scope in the ONNX ``name_scopes`` and a later ONNX pass (``quantize``)
    could not tell them apart (measured). So the node is replaced by ``<name>.down`` then
    ``<name>.up``, each with its own scope; the graph is linted by the pipeline.
    """
    for name, module in replacements.items():
        parent, _, child = name.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, child, module)
    if not isinstance(root, torch.fx.GraphModule):
        return
    graph = root.graph
    for node in list(graph.nodes):
        if node.op != "call_module" or node.target not in replacements:
            continue
        name, stack = node.target, dict(node.meta.get("nn_module_stack") or {})
        stack[name] = (name, LowRankLinear)
        with graph.inserting_after(node):
            down = graph.call_module(f"{name}.down", node.args, node.kwargs)
        with graph.inserting_after(down):
            up = graph.call_module(f"{name}.up", (down,))
        for new, part in ((down, "down"), (up, "up")):
            new.meta = {**node.meta, "nn_module_stack": {**stack, f"{name}.{part}": (f"{name}.{part}", nn.Linear)}}
        node.replace_all_uses_with(up)
        graph.erase_node(node)
    root.recompile()


def _drift_data(program: Program) -> str:
    return "held-out sentences (evaluation only)" if program.tokenizer is not None else "example inputs"


def _drift(reference: Program, candidates: dict[str, Program]) -> dict[str, dict[str, float]]:
    """Agreement of each candidate with ``reference``: held-out sentence embeddings, or the example inputs."""
    if reference.tokenizer is None:
        want = reference.run()
        drifts = {k: Drift.between(c.run(), want, reference.output_names) for k, c in candidates.items()}
        return {k: {"mean_cosine": d.mean_cosine, "min_cosine": d.min_cosine, "max_abs": d.max_abs}
                for k, d in drifts.items()}

    def embedder(module: nn.Module):
        def run(**inputs: torch.Tensor) -> Any:
            return sentence_embedding(flatten_outputs(module(**inputs))[0], inputs.get("attention_mask"))
        return run

    sentences = load_sentences("heldout")
    want = embed(embedder(reference.ir), reference.tokenizer, sentences)
    results = {}
    for key, candidate in candidates.items():
        agreement = evaluate_embeddings(embed(embedder(candidate.ir), reference.tokenizer, sentences), want)
        results[key] = {"mean_cosine": agreement.mean_cosine, "worst_cosine": agreement.worst_cosine,
                        "spearman": agreement.spearman}
    return results
