"""low-rank-split: the SVD algebra (exactness, Eckart–Young, whitening), rank selection, refusals, the pass."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir
import pytest
import torch
from torch import nn

import graphopt
from graphopt import registry
from graphopt.errors import PreconditionError, RecipeError
from graphopt.lowrank import (
    Factorization,
    LayerSpectrum,
    LowRankLinear,
    SpeedTable,
    allocate_budget,
    second_moment_sqrt,
)
from graphopt.recipe import Recipe
from graphopt.testing import assert_rewrite, op_types

LowRankSplitPass = registry.passes.get("low-rank-split")
FAST = {"calibration_sentences": 16, "compare": False, "unmeasured": "split"}


def _linear(m: int, n: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(n, m)


def _correlated_inputs(n: int, rows: int = 2048, seed: int = 0) -> torch.Tensor:
    """Inputs whose features are strongly correlated: a few directions carry most of the energy.

    The mixing is the same for every ``seed``; ``seed`` draws other samples of that distribution.
    """
    mixing = torch.randn(n, n, generator=torch.Generator().manual_seed(1234)) * torch.logspace(0, -3, n)[:, None]
    z = torch.randn(rows, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return z @ mixing.double()


def _output_error(linear: nn.Linear, low: LowRankLinear, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(((linear(x.float()) - low(x.float())) ** 2).sum())


class _Mlp(nn.Module):
    """Two Linears, 48 → 64 → 64 (weights 64×48 and 64×64); takes ``x=``."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleDict({"0": nn.Linear(48, 64), "2": nn.Linear(64, 64)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers["2"](torch.relu(self.layers["0"](x)))


def _split_program(eager: bool = False) -> graphopt.Program:
    """The MLP as a module program: an fx GraphModule, or (``eager``) the module itself."""
    torch.manual_seed(0)
    model = _Mlp().eval()
    program = graphopt.trace(model, {"x": torch.randn(2, 4, 48)})
    if eager:
        program.ir = model
    return program


# ----------------------------------------------------------------------------- the algebra

@pytest.mark.parametrize("aware", [False, True])
def test_full_rank_split_reproduces_the_layer(aware: bool) -> None:
    linear = _linear(32, 48)
    x = _correlated_inputs(48)
    sigma = x.T @ x / len(x) if aware else None
    low = LowRankLinear.from_factors(*Factorization.of(linear.weight, sigma, 0.01).factors(32), linear.bias)
    x = torch.randn(5, 7, 48)
    with torch.no_grad():
        torch.testing.assert_close(low(x), linear(x), rtol=0, atol=1e-5)


def test_weight_error_is_the_tail_of_the_spectrum() -> None:
    """Eckart–Young: ‖W − BA‖_F² at rank r is the sum of the squared singular values past r."""
    linear = _linear(40, 64)
    s = torch.linalg.svdvals(linear.weight.double())
    for rank in (1, 8, 16, 39):
        low = LowRankLinear.from_factors(*Factorization.of(linear.weight).factors(rank, torch.float64))
        with torch.no_grad():
            error = torch.linalg.norm(linear.weight.double() - low.weight_product())
        assert float(error) == pytest.approx(float(s[rank:].square().sum().sqrt()), rel=1e-9)


def test_activation_aware_beats_plain_on_correlated_inputs() -> None:
    linear = _linear(48, 64)
    x = _correlated_inputs(64)
    sigma = x.T @ x / len(x)
    held_out = _correlated_inputs(64, rows=1024, seed=1)
    for rank in (8, 16, 32):
        plain = LowRankLinear.from_factors(*Factorization.of(linear.weight).factors(rank), linear.bias)
        aware = LowRankLinear.from_factors(*Factorization.of(linear.weight, sigma, 1e-4).factors(rank), linear.bias)
        assert _output_error(linear, aware, held_out) < 0.5 * _output_error(linear, plain, held_out)


@pytest.mark.parametrize("damping", [0.0, 0.01])
def test_rank_deficient_second_moment_gives_finite_factors(damping: float) -> None:
    x = torch.zeros(100, 32, dtype=torch.float64)
    x[:, :3] = torch.randn(100, 3, dtype=torch.float64)  # rank 3, 29 dead features
    root, inverse_root = second_moment_sqrt(x.T @ x / 100, damping)
    assert torch.isfinite(root).all() and torch.isfinite(inverse_root).all()
    up, down = Factorization.of(_linear(24, 32).weight, x.T @ x / 100, damping).factors(16)
    assert torch.isfinite(up).all() and torch.isfinite(down).all()
    up, down = Factorization.of(_linear(24, 32).weight, torch.zeros(32, 32), damping).factors(16)
    assert torch.isfinite(up).all() and torch.isfinite(down).all()


def test_parameter_count_is_r_times_m_plus_n_plus_m() -> None:
    low = LowRankLinear(in_features=48, out_features=32, rank=16)
    assert sum(p.numel() for p in low.parameters()) == 16 * (32 + 48) + 32
    with pytest.raises(ValueError, match="rank 40"):
        LowRankLinear(48, 32, rank=40)


def test_budget_greedy_takes_rank_from_the_layer_that_compresses_well() -> None:
    fast = torch.tensor([0.5 ** i for i in range(64)])  # decays: little error past a few ranks
    flat = torch.ones(64)
    layers = [LayerSpectrum(64, 64, fast / fast.sum(), 16), LayerSpectrum(64, 64, flat / flat.sum(), 16)]
    # Both start at rank 16 (2·2048 weights of 8192); 2048 more fit in 0.75: the flat layer's
    # remaining 75% of error is bought back whole, the decaying one's 0.002% is not.
    assert allocate_budget(layers, 0.75, 16) == [16, 0]
    assert allocate_budget(layers, 0.5, 16) == [16, 16]
    wide = [LayerSpectrum(64, 256, fast / fast.sum(), 48), LayerSpectrum(64, 256, flat / flat.sum(), 48)]
    ranks = allocate_budget(wide, 0.5, 16)  # 16384 weights for ranks of 320 each: the flat one gets more
    assert ranks[1] > ranks[0] and sum(r * 320 for r in ranks) <= 0.5 * 2 * 64 * 256


# ----------------------------------------------------------------------------- the pass

def test_split_of_the_tiny_encoder_is_valid_close_and_annotated(tiny_program: graphopt.Program) -> None:
    after = assert_rewrite(LowRankSplitPass(select="rank", rank=16, **FAST), tiny_program, sqnr_floor=25.0)
    split = [n for n, m in after.ir.named_modules() if isinstance(m, LowRankLinear)]
    assert len(split) == 12
    # Each split layer's call_module node became two, <name>.down then <name>.up, each in its own scope.
    before, ops = op_types(tiny_program), op_types(after)
    assert all(ops[f"{name}.down"] == ops[f"{name}.up"] == before[name] == 1 and name not in ops for name in split)
    node = next(n for n in after.ir.graph.nodes if n.target == "layers.0.attention.query.down")
    assert list(node.meta["nn_module_stack"])[-2:] == ["layers.0.attention.query", "layers.0.attention.query.down"]
    query = after.annotations["layers.0.attention.query"]["low_rank"]
    assert query["rank"] == 16 and query["decision"] == "split" and query["weights"] == [4096, 2048]
    assert after.teacher is not None and not any(isinstance(m, LowRankLinear) for m in after.teacher.modules())


def test_budget_split_reports_plain_against_activation_aware(tiny_program: graphopt.Program) -> None:
    result = LowRankSplitPass(select="budget", budget=0.5, calibration_sentences=16, unmeasured="split")(tiny_program)
    notes = result.notes
    assert notes["kept_fraction"] <= 0.5 and notes["split"] >= 1
    compare = notes["plain_vs_activation_aware"]
    assert {"plain", "activation-aware"} <= set(compare) and compare["ranks"] == "the same for both"
    assert all(np.isfinite(v["mean_cosine"]) for k, v in compare.items() if isinstance(v, dict))


@pytest.mark.parametrize("eager", [False, True])
def test_module_without_tokenizer_calibrates_on_example_inputs(eager: bool) -> None:
    """8 example rows for 48 features: Σ is rank-deficient, damping keeps the split finite.

    On the fx GraphModule the call_module node now calls the LowRankLinear (the graph lints);
    on the eager module the attribute is simply replaced."""
    program, pass_ = _split_program(eager), LowRankSplitPass(select="rank", rank=16, compare=True, unmeasured="split")
    if not eager:  # assert_rewrite's structural checks need an fx graph
        assert_rewrite(pass_, program, sqnr_floor=3.0)
    result = pass_(program.clone())
    after, drift = result.program, result.notes["plain_vs_activation_aware"]
    assert all(np.isfinite(out).all() for out in after.run())
    assert drift["data"] == "example inputs" and np.isfinite(drift["activation-aware"]["mean_cosine"])
    assert isinstance(after.ir.get_submodule("layers.0"), LowRankLinear)
    assert isinstance(after.ir, torch.fx.GraphModule) != eager


def test_layer_that_would_not_pay_is_left_whole_with_the_reason(tmp_path) -> None:
    # Rank 32: 32·(64+48) = 3584 >= 3072 and 32·128 = 4096 >= 4096 weights: no saving.
    result = LowRankSplitPass(select="rank", rank=32, **{**FAST, "unmeasured": "keep"})(_split_program())
    layers = result.notes["layers"]
    assert layers["layers.0"]["decision"] == "whole" and "no saving" in layers["layers.0"]["reason"]
    assert layers["layers.2"]["decision"] == "whole" and "no saving" in layers["layers.2"]["reason"]
    result = LowRankSplitPass(select="rank", rank=16, **{**FAST, "unmeasured": "keep"})(_split_program())
    assert "no ORT timing for 64×48" in result.notes["layers"]["layers.0"]["reason"]
    assert not result.modified and result.program.teacher is None
    table = tmp_path / "times.json"
    table.write_text(json.dumps({"entries": [
        {"m": 64, "n": 48, "rows": 1024, "rank": 16, "dense_ms": 1.0, "split_ms": 1.3, "ratio": 1.3},
        {"m": 64, "n": 64, "rows": 1024, "rank": 16, "dense_ms": 1.0, "split_ms": 0.8, "ratio": 0.8}]}))
    result = LowRankSplitPass(select="rank", rank=16, times=str(table), **{**FAST, "unmeasured": "keep"})(
        _split_program())
    layers = result.notes["layers"]
    assert layers["layers.0"]["decision"] == "whole"
    assert "slower: ORT split/dense time 1.30 at 1024 rows" in layers["layers.0"]["reason"]
    assert layers["layers.2"]["decision"] == "split" and result.modified
    assert result.program.annotations["layers.0"]["low_rank"]["decision"] == "whole"


def test_speed_table_interpolates_in_rank_and_reads_the_nearest_rows() -> None:
    table = SpeedTable({"entries": [{"m": 8, "n": 8, "rows": r, "rank": k, "ratio": q}
                                    for r, k, q in [(8, 2, 0.5), (8, 4, 0.9), (1024, 2, 0.2), (1024, 4, 0.4)]]}, "t")
    assert table.ratio(8, 8, 1000, 3) == (pytest.approx(0.3), 1024)
    assert table.ratio(8, 8, 4, 1) == (0.5, 8)  # flat below the smallest rank measured
    assert table.ratio(8, 8, 8, 6) == (pytest.approx(1.3), 8)  # extrapolated above the largest
    assert table.ratio(16, 8, 8, 2) is None


def test_fixed_rank_is_rounded_up_to_the_multiple() -> None:
    result = LowRankSplitPass(select="rank", rank=5, **FAST)(_split_program())
    assert result.notes["layers"]["layers.2"]["rank"] == 16


def test_refusals_name_the_layer_and_the_bound() -> None:
    with pytest.raises(PreconditionError, match=r"rank 60 exceeds min\(m, n\) = 48 of layer 'layers.0' \(64×48\)"):
        LowRankSplitPass(select="rank", rank=60, **FAST)(_split_program())
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"budget must be in \(0, 1\]"):
            LowRankSplitPass(budget=bad)
    with pytest.raises(RecipeError, match=r"budget must be in \(0, 1\]"):
        Recipe.from_dict({"pipeline": [{"pass": "low-rank-split", "budget": 2}, {"pass": "export"}]})
    with pytest.raises(PreconditionError, match="no nn.Linear matches"):
        LowRankSplitPass(layers=("nothing.*",))(_split_program())


class _OpsBefore:
    """Instrument: the op types of the program entering each pass."""

    def __init__(self) -> None:
        self.ops: dict[str, dict[str, int]] = {}

    def before_pass(self, index: int, total: int, pass_, program: graphopt.Program) -> None:
        if program.kind == "onnx":
            self.ops[pass_.name] = dict(op_types(program))

    def after_pass(self, *args) -> None:
        pass


def test_split_exports_two_matmuls_per_layer_and_composes_with_int8() -> None:
    """low-rank → (calibrate dynamic int8) → export → (quantize) → stock ONNX Runtime.

    The export (seen entering 'quantize', or at the end) has two MatMuls per split Linear,
    where a whole one exports one; quantize makes both factors integer MatMuls."""
    int8 = {"calibrate", "quantize"} <= set(registry.passes.names())
    passes = [LowRankSplitPass(select="rank", rank=16, **FAST), registry.passes.get("export")()]
    if int8:
        passes[1:1] = [registry.passes.get("calibrate")(mode="dynamic")]
        passes.append(registry.passes.get("quantize")())
    seen = _OpsBefore()
    program = graphopt.Pipeline(passes, instruments=[seen]).run(_split_program())
    exported = seen.ops.get("quantize", dict(op_types(program)))
    assert exported["MatMul"] == 4, exported
    assert program.history[1 + int8].step_drift.max_abs < 1e-4  # ORT computes what the split module does
    from graphopt.onnx_runtime import create_session, run_session

    got = run_session(create_session(onnx_ir.to_proto(program.ir).SerializeToString()), program.example_inputs)[0]
    assert np.isfinite(got).all() and program.history[-1].total_drift.mean_cosine > 0.99
    if int8:
        ops = op_types(program)
        assert ops["MatMulInteger"] == 4 and "MatMul" not in ops, dict(ops)
