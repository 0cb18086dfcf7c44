"""Mask math, the cubic schedule, the pruning hook and the kernel-format table (graphopt.sparsity)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from graphopt.sparsity import (KernelTable, Pattern, PruningHook, activation_mask, allocate_sparsity, apply_masks,
                               cubic_sparsity,
                               global_magnitude_masks, magnitude_mask, mask_sparsity, prune_layerwise,
                               pruning_schedule, refit_kept_weights, stored_density)


def _weight(out: int = 96, inp: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 0.97, 1.0])
def test_unstructured_mask_has_exactly_the_requested_sparsity(sparsity: float) -> None:
    w = _weight()
    mask = magnitude_mask(w, sparsity)
    assert int((~mask).sum()) == round(sparsity * w.numel())
    if 0 < sparsity < 1:  # the smallest weights go: every removed |w| <= every kept |w|
        assert w.abs()[~mask].max() <= w.abs()[mask].min()


def test_ties_are_broken_deterministically() -> None:
    w = torch.ones(8, 8)
    mask = magnitude_mask(w, 0.5)
    assert int((~mask).sum()) == 32
    assert torch.equal(mask, magnitude_mask(w.clone(), 0.5))


@pytest.mark.parametrize("block", ["1x8", "4x4", "16x1", "2x3"])
def test_block_mask_removes_whole_blocks_exactly(block: str) -> None:
    w = _weight(96, 48)
    r, c = Pattern.parse(block).block
    mask = magnitude_mask(w, 0.75, block)
    blocks = mask.reshape(96 // r, r, 48 // c, c).permute(0, 2, 1, 3).reshape(-1, r * c)
    assert bool(((blocks.all(1)) | (~blocks.any(1))).all()), "a block is partly pruned"
    assert int((~blocks.any(1)).sum()) == round(0.75 * blocks.shape[0])
    assert mask_sparsity(mask) == pytest.approx(0.75)
    assert stored_density(mask, (r, c)) == pytest.approx(0.25)


def test_block_mask_on_a_shape_that_is_not_a_multiple() -> None:
    mask = magnitude_mask(_weight(10, 10), 0.5, "4x4")  # 3×3 blocks, edges partial
    assert mask.shape == (10, 10)
    assert int((stored_density(mask, (4, 4)) * 9)) in (4, 5)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_n_of_m_keeps_exactly_n_largest_in_every_group(n: int, m: int) -> None:
    w = _weight(32, 64)
    mask = magnitude_mask(w, 1 - n / m, f"{n}:{m}")
    groups, kept = mask.reshape(32, 64 // m, m), w.abs().reshape(32, 64 // m, m)
    assert bool((groups.sum(-1) == n).all())
    smallest_kept = torch.where(groups, kept, torch.inf).amin(-1)
    largest_removed = torch.where(groups, -torch.inf, kept).amax(-1)
    assert bool((largest_removed <= smallest_kept).all())


def test_n_of_m_refuses_a_mismatched_sparsity_and_width() -> None:
    with pytest.raises(ValueError, match="fixes the sparsity at 0.5"):
        magnitude_mask(_weight(), 0.9, "2:4")
    with pytest.raises(ValueError, match="divisible by 4"):
        magnitude_mask(_weight(8, 6), 0.5, "2:4")


def test_global_masks_use_one_threshold_and_hit_the_total_exactly() -> None:
    weights = {"a": _weight(32, 32, 1), "b": 3 * _weight(64, 32, 2)}
    masks = global_magnitude_masks(weights, 0.8)
    removed = sum(int((~m).sum()) for m in masks.values())
    assert removed == round(0.8 * (32 * 32 + 64 * 32))
    assert mask_sparsity(masks["a"]) > mask_sparsity(masks["b"])  # the larger layer keeps more
    threshold = max(float(weights[k].abs()[~masks[k]].max()) for k in masks)
    assert all(float(weights[k].abs()[masks[k]].min()) >= threshold for k in masks)


def test_global_block_masks_and_refusals() -> None:
    masks = global_magnitude_masks({"a": _weight(16, 16, 1), "b": _weight(32, 16, 2)}, 0.5, "4x4")
    assert sum(int((~m).sum()) // 16 for m in masks.values()) == round(0.5 * (16 + 32))
    with pytest.raises(ValueError, match="no global form"):
        global_magnitude_masks({"a": _weight()}, 0.5, "2:4")
    with pytest.raises(ValueError, match="unknown sparsity pattern"):
        Pattern.parse("diagonal")


def test_allocation_keeps_in_proportion_and_reaches_the_total() -> None:
    sizes = {"a": 100, "b": 300, "c": 600}
    assert allocate_sparsity(sizes, 0.9, {}) == pytest.approx({"a": 0.9, "b": 0.9, "c": 0.9})
    shares = allocate_sparsity(sizes, 0.9, {"a": 3.0, "c": 0.5})
    kept = {n: 1 - s for n, s in shares.items()}
    assert kept["a"] / 3.0 == pytest.approx(kept["b"]) == pytest.approx(kept["c"] / 0.5)
    assert sum(sizes[n] * s for n, s in shares.items()) == pytest.approx(0.9 * 1000)
    # A share beyond dense is capped: "a" stays dense, the others split what is left.
    capped = allocate_sparsity(sizes, 0.5, {"a": 100.0})
    assert capped["a"] == 0.0 and capped["b"] == pytest.approx(capped["c"])
    assert sum(sizes[n] * s for n, s in capped.items()) == pytest.approx(0.5 * 1000)
    assert allocate_sparsity(sizes, 0.0, {"a": 2.0}) == {"a": 0.0, "b": 0.0, "c": 0.0}
    with pytest.raises(ValueError, match="> 0"):
        allocate_sparsity(sizes, 0.5, {"a": -1.0})
    with pytest.raises(ValueError, match="sparsity"):
        allocate_sparsity(sizes, 1.0, {})


def test_cubic_schedule_starts_ends_and_is_monotone() -> None:
    values = [cubic_sparsity(t, 0.9, initial=0.1, start=10, end=110) for t in range(0, 130)]
    assert values[0] == 0.1 and values[10] == 0.1 and values[110] == pytest.approx(0.9) and values[-1] == 0.9
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert values[35] - values[10] > values[110] - values[85]  # fast first, slow at the end
    schedule = pruning_schedule(200, 0.9, every=25, until=0.75)
    assert max(schedule) == 150 and schedule[150] == pytest.approx(0.9)
    assert list(schedule) == sorted(schedule) and schedule[0] == 0.0
    assert pruning_schedule(0, 0.7) == {0: 0.7}
    assert pruning_schedule(300, 0.9, initial=0.9, every=10) == {0: 0.9}  # at once, then masks fixed


def test_hook_prunes_on_schedule_and_keeps_masked_weights_zero_through_training() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    hook = PruningHook(["0", "2"], schedule=pruning_schedule(30, 0.8, every=5, until=0.5))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(16, 32)
    for step in range(30):  # the shared trainer's order: before_step, backward, step, after_step
        hook.before_step(step, model)
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()
        hook.after_step(step, model)
        for name, mask in hook.masks.items():
            assert bool((model.get_submodule(name).weight[~mask] == 0).all()), f"step {step}: {name}"
    assert hook.history[-1] == (15, pytest.approx(0.8))
    assert all(mask_sparsity(m) == pytest.approx(0.8, abs=1e-3) for m in hook.masks.values())


def test_apply_masks_zeroes_only_removed_weights() -> None:
    layer = nn.Linear(8, 8)
    before = layer.weight.detach().clone()
    mask = magnitude_mask(before, 0.5)
    apply_masks(nn.Sequential(layer), {"0": mask})
    assert torch.equal(layer.weight[mask], before[mask]) and bool((layer.weight[~mask] == 0).all())


def _table() -> KernelTable:
    entries = [{"out": 64, "in": 32, "rows": r, "format": "dense", "block": None, "dtype": "fp32", "density": 1.0,
                "ms": 1.0} for r in (1, 16)]
    for density, ms in ((0.1, 0.2), (0.5, 1.5)):
        entries.append({"out": 64, "in": 32, "rows": 16, "format": "csr", "block": None, "dtype": "fp32",
                        "density": density, "ms": ms})
        entries.append({"out": 64, "in": 32, "rows": 16, "format": "bsr", "block": [4, 4], "dtype": "fp32",
                        "density": density, "ms": ms * 0.5})
    return KernelTable({"entries": entries}, "test")


def test_kernel_table_picks_the_fastest_format_or_dense() -> None:
    table = _table()
    w = _weight(64, 32)
    block = table.choose(magnitude_mask(w, 0.9, "4x4"), rows=20)
    assert (block.format, block.block) == ("bsr", (4, 4)) and block.ms == pytest.approx(0.1, rel=0.05)
    # Unstructured 90%: nearly every 4×4 block holds a weight, so BSR stores ~all: CSR wins.
    assert table.choose(magnitude_mask(w, 0.9), rows=16).format == "csr"
    assert table.choose(magnitude_mask(w, 0.4), rows=16).format == "dense"  # slower than dense
    assert table.choose(magnitude_mask(w, 0.9), rows=1).format == "dense"  # no sparse timing at 1 row
    unknown = table.choose(magnitude_mask(_weight(8, 8), 0.9), rows=16)
    assert unknown.format == "dense" and "no timing" in unknown.reason


def test_activation_mask_ranks_by_weight_times_input_scale() -> None:
    weight = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    # Input 3 is nearly silent: its large weight matters least.
    second_moment = torch.diag(torch.tensor([16.0, 4.0, 1.0, 1e-4], dtype=torch.float64))
    assert activation_mask(weight, second_moment, 0.5).tolist() == [[True, True, False, False]]
    with pytest.raises(ValueError, match=r"\[in, in\]"):
        activation_mask(weight, torch.eye(3), 0.5)


def test_masks_are_made_on_the_weights_device() -> None:
    # "meta" stands in for a GPU here: a mask built on the CPU for a weight elsewhere fails to index.
    weight = torch.randn(8, 16, device="meta")
    assert magnitude_mask(weight, 0.5).device == weight.device
    assert activation_mask(weight, torch.eye(16, device="meta"), 0.5).device == weight.device


def test_refit_solves_least_squares_on_the_kept_weights() -> None:
    gen = torch.Generator().manual_seed(0)
    # Correlated inputs (rank ~6 of 12): a kept weight can stand in for a removed one.
    x = torch.randn(2000, 6, generator=gen, dtype=torch.float64) @ torch.randn(6, 12, generator=gen, dtype=torch.float64)
    x += 0.05 * torch.randn(2000, 12, generator=gen, dtype=torch.float64)
    weight = torch.randn(5, 12, generator=gen)
    mask = magnitude_mask(weight, 0.5)
    sigma = x.T @ x / x.shape[0]
    fitted = refit_kept_weights(weight, sigma, mask, damping=0.0)
    assert bool((fitted[~mask] == 0).all())
    reference = x @ weight.double().T
    for row in range(5):  # the normal equations of each row's least-squares problem
        kept = mask[row].nonzero().squeeze(1)
        expected = torch.linalg.lstsq(x[:, kept], reference[:, row:row + 1]).solution.squeeze(1)
        torch.testing.assert_close(fitted[row, kept].double(), expected, rtol=1e-4, atol=1e-5)
    error = lambda w: float(((x @ w.double().T - reference) ** 2).mean())  # noqa: E731
    assert error(fitted) < 0.2 * error(weight * mask)
    # Nothing removed: the refit returns the weight.
    torch.testing.assert_close(refit_kept_weights(weight, sigma, torch.ones_like(mask), 0.0), weight,
                               rtol=1e-4, atol=1e-4)


class _KeywordMLP(nn.Module):
    """Called with keywords, as ``collect_second_moments`` calls a model."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def test_prune_layerwise_fits_each_layer_to_its_pruned_inputs() -> None:
    torch.manual_seed(0)
    dense = _KeywordMLP()
    layerwise, magnitude = copy.deepcopy(dense), copy.deepcopy(dense)
    mixing = torch.randn(6, 16)  # correlated inputs, as real activations are
    batches = [{"x": torch.randn(64, 6) @ mixing + 0.05 * torch.randn(64, 16)} for _ in range(4)]
    seen: list[tuple[int, int, str]] = []
    masks = prune_layerwise(layerwise, ["up", "down"], 0.75, batches, progress=lambda *a: seen.append(a))
    assert seen == [(1, 2, "up"), (2, 2, "down")]
    for name, mask in masks.items():
        assert int((~mask).sum()) == round(0.75 * mask.numel())
        assert bool((layerwise.get_submodule(name).weight[~mask] == 0).all())
    apply_masks(magnitude, {name: magnitude_mask(magnitude.get_submodule(name).weight, 0.75) for name in masks})
    x = torch.cat([b["x"] for b in batches])
    with torch.no_grad():
        error = {name: float(((model(x=x) - dense(x=x)) ** 2).mean())
                 for name, model in (("layerwise", layerwise), ("magnitude", magnitude))}
    assert error["layerwise"] < 0.5 * error["magnitude"], error
    with pytest.raises(ValueError, match="did not run"):
        prune_layerwise(_KeywordMLP(), ["up"], 0.5, [])


def test_second_moments_stop_early_once_every_input_is_seen() -> None:
    from graphopt.calibration import collect_second_moments

    torch.manual_seed(0)
    model = _KeywordMLP()
    calls: list[str] = []
    model.down.register_forward_pre_hook(lambda *_: calls.append("down"))
    batches = [{"x": torch.randn(8, 16)} for _ in range(3)]
    early = collect_second_moments(model, ["up"], batches, stop_early=True)
    assert calls == []  # the forward ended at "up": the layer after it never ran
    full = collect_second_moments(model, ["up"], batches)
    assert calls == ["down"] * 3
    x = torch.cat([b["x"] for b in batches]).double()
    torch.testing.assert_close(early["up"], full["up"])
    torch.testing.assert_close(early["up"], x.T @ x / x.shape[0], rtol=1e-5, atol=1e-6)
