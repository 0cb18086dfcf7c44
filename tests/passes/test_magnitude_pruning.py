"""The prune pass on the tiny encoder: exact sparsity per layer, annotations, gradual training with distillation."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import graphopt
from graphopt import registry
from graphopt.errors import PreconditionError
from graphopt.program import Program
from graphopt.sparsity import SPARSITY_KEY, pruning_schedule
from graphopt.testing import assert_rewrite
from graphopt.train import TrainProgress

Prune = registry.passes.get("prune")


def _linears(program: Program) -> dict[str, nn.Linear]:
    return {n: m for n, m in program.ir.named_modules() if isinstance(m, nn.Linear)}


def test_one_shot_prunes_every_linear_to_the_exact_sparsity(tiny_program: Program) -> None:
    after = assert_rewrite(Prune(sparsity=0.7, evaluate=False), tiny_program, sqnr_floor=-20.0)
    linears = _linears(after)
    assert len(linears) == 12  # 2 layers × (q, k, v, o, intermediate, output); embeddings untouched
    for name, linear in linears.items():
        zeros = int((linear.weight == 0).sum())
        assert zeros == round(0.7 * linear.weight.numel()), name
        note = after.annotations[name][SPARSITY_KEY]
        assert note["pattern"] == "unstructured" and note["sparsity"] == pytest.approx(0.7, abs=1e-3)
        assert torch.equal(note["mask"], linear.weight != 0)
    assert not (after.ir.embeddings.word_embeddings.weight == 0).any()


def test_block_and_n_of_m_patterns_and_the_notes(tiny_program: Program) -> None:
    result = Prune(sparsity=0.5, pattern="4x4", layers=("layers.0.*",), evaluate=False)(tiny_program.clone())
    rows = result.notes["layers"]
    assert sorted(rows) == sorted(n for n in _linears(tiny_program) if n.startswith("layers.0."))
    for name, row in rows.items():
        w = result.program.ir.get_submodule(name).weight
        blocks = (w != 0).reshape(w.shape[0] // 4, 4, w.shape[1] // 4, 4).any(3).any(1)
        assert int((~blocks).sum()) == blocks.numel() // 2 and row["pattern"] == "4x4"
    result = Prune(sparsity=0.5, pattern="2:4", evaluate=False)(tiny_program.clone())
    w = result.program.ir.get_submodule("layers.1.ffn.output").weight
    assert bool(((w != 0).reshape(w.shape[0], -1, 4).sum(-1) == 2).all())
    assert result.notes["overall_sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_global_scope_hits_the_total(tiny_program: Program) -> None:
    result = Prune(sparsity=0.8, scope="global", evaluate=False)(tiny_program.clone())
    total = sum(r["shape"][0] * r["shape"][1] for r in result.notes["layers"].values())
    masked = sum(round(r["sparsity"] * r["shape"][0] * r["shape"][1]) for r in result.notes["layers"].values())
    assert masked == pytest.approx(round(0.8 * total), abs=2)
    assert len({r["sparsity"] for r in result.notes["layers"].values()}) > 1  # per-layer share differs


@pytest.mark.parametrize("criterion", ["magnitude", "activation"])
def test_density_shares_the_sparsity_between_layers(tiny_program: Program, criterion: str) -> None:
    """density: layers keep in proportion to their factors (product over matching globs), and
    all together reach the asked sparsity; the notes give the factors."""
    density = {"*.attention.query": 0.5, "*.attention.key": 0.5, "layers.1.*": 2.0}
    result = Prune(sparsity=0.8, density=density, criterion=criterion, calibration_sentences=16,
                   data=("sentences",), max_length=16, evaluate=False)(tiny_program.clone())
    rows = result.notes["layers"]
    kept = {name: 1 - row["sparsity"] for name, row in rows.items()}
    factors = result.notes["density"]
    assert factors["layers.1.attention.query"] == 1.0 and factors["layers.0.attention.key"] == 0.5
    assert factors["layers.1.ffn.output"] == 2.0 and factors["layers.0.ffn.output"] == 1.0
    for name in rows:  # kept fraction / factor is one constant (up to rounding to whole weights)
        assert kept[name] / factors[name] == pytest.approx(kept["layers.0.ffn.output"], rel=0.02), name
    assert result.notes["overall_sparsity"] == pytest.approx(0.8, abs=1e-3)


def test_density_is_checked(tiny_program: Program) -> None:
    with pytest.raises(ValueError, match="scope"):
        Prune(density={"*": 2.0}, scope="global")
    with pytest.raises(ValueError, match="> 0"):
        Prune(density={"*.query": 0.0})
    with pytest.raises(ValueError, match="no density"):
        Prune(sparsity=0.5, pattern="2:4", density={"*": 2.0})
    with pytest.raises(PreconditionError, match="match no pruned layer"):
        Prune(density={"*.querry": 0.5})(tiny_program)


def test_options_are_validated_with_clear_messages(tiny_program: Program) -> None:
    with pytest.raises(ValueError, match="fixes the sparsity at 0.5"):
        Prune(pattern="2:4")
    with pytest.raises(ValueError, match="unknown sparsity pattern"):
        Prune(pattern="3-by-3")
    with pytest.raises(ValueError, match="sparsity must be in"):
        Prune(sparsity=1.5)
    with pytest.raises(PreconditionError, match="no nn.Linear matches"):
        Prune(layers=("nothing.*",))(tiny_program)


def test_gradual_pruning_with_distillation_keeps_masked_weights_zero(tiny_program: Program) -> None:
    """A few steps through the shared trainer: cubic schedule, masks re-applied after every step."""
    schedule = pruning_schedule(6, 0.8, every=2, until=0.7)  # {0: 0.0, 2: ~0.58, 4: 0.8}
    reached = {step: max(s for t, s in schedule.items() if t <= step) for step in range(6)}
    program, seen = tiny_program, []

    def check(progress: TrainProgress) -> None:  # runs after every step, after the hooks
        seen.append(progress.step)
        for name, linear in _linears(program).items():
            zeros = float((linear.weight == 0).float().mean())
            assert zeros >= reached[progress.step - 1] - 1e-3, (progress.step, name, zeros)

    before = {n: m.weight.detach().clone() for n, m in _linears(program).items()}
    pass_ = Prune(sparsity=0.8, steps=6, prune_every=2, prune_until=0.7, batch_size=4, lr=1e-3,
                  max_length=16, data=("sentences",), evaluate=True)
    pass_.train_progress = check
    result = pass_(program)
    assert seen == [1, 2, 3, 4, 5, 6]
    notes = result.notes
    assert notes["schedule"] == [[t, round(s, 4)] for t, s in schedule.items()] and notes["train"]["steps"] == 6
    assert {"heldout_vs_dense", "heldout_vs_dense_one_shot"} <= set(notes)
    assert result.program.teacher is not None  # the dense model, for distillation
    for name, linear in _linears(result.program).items():
        mask = result.program.annotations[name][SPARSITY_KEY]["mask"]
        assert int((~mask).sum()) == round(0.8 * mask.numel())
        assert bool((linear.weight[~mask] == 0).all())
        assert not torch.equal(linear.weight[mask], before[name][mask])  # the kept weights trained
    assert not result.program.ir.training


def test_registered_and_usable_in_a_pipeline(tiny_bundle) -> None:
    program = graphopt.Pipeline([Prune(sparsity=0.5, evaluate=False)]).run(graphopt.trace(tiny_bundle))
    record = program.history[-1]
    assert record.name == "prune" and not record.exact and record.notes["overall_sparsity"] == pytest.approx(0.5)


def test_activation_criterion_prunes_on_its_schedule_and_beats_magnitude_at_once(tiny_program: Program) -> None:
    """criterion="activation": layer-wise masks with refit; at once, closer to the dense model than
    magnitude; on a schedule, pruned at each point and trained with the masks re-applied."""
    before = {n: m.weight.detach().clone() for n, m in _linears(tiny_program).items()}
    common = dict(sparsity=0.8, data=("sentences",), max_length=16)
    magnitude = Prune(**common)(tiny_program.clone())
    one_shot = Prune(criterion="activation", calibration_sentences=64, **common)(tiny_program.clone())
    assert one_shot.notes["calibration"] == {"sentences": 64, "refit": True}
    assert one_shot.notes["heldout_vs_dense"]["mean_cosine"] > magnitude.notes["heldout_vs_dense"]["mean_cosine"]
    result = Prune(criterion="activation", calibration_sentences=16, steps=4, initial_sparsity=0.5, prune_every=2,
                   prune_until=0.5, batch_size=4, lr=1e-3, **common)(tiny_program.clone())
    notes = result.notes
    assert notes["criterion"] == "activation" and notes["schedule"] == [[0, 0.5], [2, 0.8]]
    for name, linear in _linears(result.program).items():
        mask = result.program.annotations[name][SPARSITY_KEY]["mask"]
        assert int((~mask).sum()) == round(0.8 * mask.numel())
        assert bool((linear.weight[~mask] == 0).all())
        assert not torch.equal(linear.weight[mask], before[name][mask])


def test_block_wise_reconstruction_after_the_first_pruning(tiny_program: Program) -> None:
    """reconstruct_steps: pruned once (to initial_sparsity), each layer reconstructed, masks kept;
    closer to the dense model than the same one-shot pruning without it; training then
    continues on the schedule without pruning at step 0 again."""
    common = dict(sparsity=0.8, criterion="activation", calibration_sentences=32, data=("sentences",),
                  max_length=16, batch_size=8)
    one_shot = Prune(**common)(tiny_program.clone())
    # The tiny random model wants a smaller step than MiniLM (the default, 6e-3, was tuned there).
    pass_, messages = Prune(reconstruct_steps=30, reconstruct_sentences=64, reconstruct_lr=1e-3, **common), []
    pass_.progress_message = messages.append  # the CLI's status line
    rebuilt = pass_(tiny_program.clone())
    assert messages[0] == "reconstructing layer by layer, 30 steps each"
    assert [m.split(" reconstructed")[0] for m in messages[1:]] == ["layer 1/2 (layers.0)", "layer 2/2 (layers.1)"]
    notes = rebuilt.notes["reconstruct"]
    assert notes["sparsity"] == 0.8 and notes["sentences"] == 64 and notes["steps_per_block"] == 30
    assert [layer["layer"] for layer in notes["layers"]] == ["layers.0", "layers.1"]
    assert all(layer["loss_after"] < layer["loss_before"] for layer in notes["layers"])
    assert (rebuilt.notes["heldout_vs_dense"]["mean_cosine"]
            > one_shot.notes["heldout_vs_dense"]["mean_cosine"])
    for name, linear in _linears(rebuilt.program).items():
        mask = rebuilt.program.annotations[name][SPARSITY_KEY]["mask"]
        assert int((~mask).sum()) == round(0.8 * mask.numel()) and bool((linear.weight[~mask] == 0).all())
    gradual = Prune(reconstruct_steps=5, reconstruct_sentences=16, steps=4, initial_sparsity=0.5, prune_every=2,
                    prune_until=0.5, lr=1e-3, **common)(tiny_program.clone())
    assert gradual.notes["reconstruct"]["sparsity"] == 0.5
    assert gradual.notes["schedule"] == [[0, 0.5], [2, 0.8]] and gradual.notes["overall_sparsity"] == pytest.approx(0.8, abs=1e-3)


@pytest.mark.parametrize("criterion", ["magnitude", "activation"])
def test_reconstruction_rounds_prune_each_block_further_while_it_trains(tiny_program: Program, criterion: str) -> None:
    """reconstruct_rounds = 3: every layer pruned first to the cubic's first point (0.9·(1 − (2/3)³));
    each block then reaches 0.867 and 0.9 at its steps 2 and 4 (prune_until 0.5 of 8) and ends
    at exactly 0.9 with its masks held, while the layers after it still wait at the first point."""
    rounds = [0.9 * (1 - (1 - r / 3) ** 3) for r in (1, 2, 3)]
    pass_ = Prune(sparsity=0.9, criterion=criterion, calibration_sentences=32, data=("sentences",), max_length=16,
                  batch_size=8, reconstruct_steps=8, reconstruct_sentences=32, reconstruct_lr=1e-3,
                  reconstruct_rounds=3, prune_until=0.5)
    seen: dict[str, list[float]] = {}

    def sparsity_by_layer(message: str) -> None:
        if "reconstructed" in message:
            for layer in ("layers.0", "layers.1"):
                weights = [m.weight for n, m in _linears(program).items() if n.startswith(layer + ".")]
                zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
                seen.setdefault(layer, []).append(zeros)

    pass_.progress_message = sparsity_by_layer
    program = tiny_program.clone()
    result = pass_(program)
    program = result.program
    assert seen["layers.0"] == [pytest.approx(0.9, abs=2e-3)] * 2
    assert seen["layers.1"] == [pytest.approx(rounds[0], abs=2e-3), pytest.approx(0.9, abs=2e-3)]
    assert result.notes["reconstruct"]["sparsity"] == pytest.approx(rounds)
    for name, linear in _linears(program).items():
        mask = program.annotations[name][SPARSITY_KEY]["mask"]
        assert int((~mask).sum()) == round(0.9 * mask.numel()) and bool((linear.weight[~mask] == 0).all()), name


def test_end_to_end_fine_tuning_after_reconstruction_rounds_keeps_the_final_masks(tiny_program: Program) -> None:
    """reconstruct_rounds > 1 with steps > 0: the reconstruction reaches the final sparsity and the
    trainer then trains the whole model at those masks (no pruning on its schedule), the pruned
    weights staying zero; the kept weights move."""
    common = {"sparsity": 0.9, "initial_sparsity": 0.9, "criterion": "magnitude", "data": ("sentences",),
              "max_length": 16, "batch_size": 8, "reconstruct_steps": 8, "reconstruct_sentences": 32,
              "reconstruct_lr": 1e-3, "reconstruct_rounds": 3, "prune_until": 0.5, "evaluate": False}
    reconstructed = Prune(**common)(tiny_program.clone())
    tuned = Prune(steps=6, lr=1e-3, warmup_steps=0, soft_label=0.0, hidden=0.0, output=1.0, **common)(
        tiny_program.clone())
    # Pruned at step 0 only: to the first round's sparsity, and to 0.9 by the reconstruction's end.
    assert tuned.notes["schedule"] == [[0, pytest.approx(0.9 * (1 - (2 / 3) ** 3), abs=1e-4)], [0, 0.9]]
    assert tuned.notes["train"]["steps"] == 6
    moved, before = 0, _linears(reconstructed.program)
    for name, linear in _linears(tuned.program).items():
        mask = tuned.program.annotations[name][SPARSITY_KEY]["mask"]
        # Same masks as the reconstruction alone (same seed): the trainer did not prune.
        assert torch.equal(mask, reconstructed.program.annotations[name][SPARSITY_KEY]["mask"]), name
        assert int((~mask).sum()) == round(0.9 * mask.numel()) and bool((linear.weight[~mask] == 0).all()), name
        moved += int((linear.weight != before[name].weight).sum())
    assert moved > 0


def test_block_wise_reconstruction_is_checked(tiny_program: Program) -> None:
    with pytest.raises(ValueError, match="reconstruct_steps"):
        Prune(reconstruct_steps=-1)
    with pytest.raises(ValueError, match="reconstruct_lr"):
        Prune(reconstruct_lr=0.0)
    with pytest.raises(ValueError, match="reconstruct_rounds must be >= 1"):
        Prune(reconstruct_steps=10, reconstruct_rounds=0)
    with pytest.raises(ValueError, match="reconstruct_rounds > 1 prunes block by block"):
        Prune(reconstruct_steps=10, reconstruct_rounds=3, scope="global")
    with pytest.raises(ValueError, match="reconstruct_rounds > 1 .* needs reconstruct_steps > 0"):
        Prune(reconstruct_rounds=3, reconstruct_steps=0)
    with pytest.raises(ValueError, match="steps > 0 then fine-tunes end to end at those masks: set initial_sparsity"):
        Prune(reconstruct_rounds=3, reconstruct_steps=10, steps=5)  # initial_sparsity 0 would prune again
    program = tiny_program.clone()
    program.tokenizer = None
    with pytest.raises(PreconditionError, match="reconstruct_steps"):
        Prune(reconstruct_steps=10)(program)


def test_training_text_defaults_to_the_distill_passs() -> None:
    # Reconstruction overfits the trainer's default ("sentences" + "pydoc", ~1.2k sentences for MiniLM).
    assert Prune().options.data == registry.passes.get("distill")().options.data
    assert "written" in Prune().options.data


def test_activation_criterion_needs_layer_scope_and_a_tokenizer(tiny_program: Program) -> None:
    with pytest.raises(ValueError, match="scope"):
        Prune(criterion="activation", scope="global")
    with pytest.raises(ValueError, match="calibration_sentences"):
        Prune(criterion="activation", calibration_sentences=0)
    program = tiny_program.clone()
    program.tokenizer = None
    with pytest.raises(PreconditionError, match="activation"):
        Prune(criterion="activation")(program)


def test_an_activation_schedule_of_many_points_is_warned_about(tiny_program: Program, caplog) -> None:
    """Each point of an activation schedule calibrates every layer again: more than 5 points
    gets a warning that says how to prune fewer times; 5 or fewer get none."""
    common = dict(criterion="activation", calibration_sentences=4, sparsity=0.8, data=("sentences",),
                  max_length=8, batch_size=2, initial_sparsity=0.3, prune_until=1.0, evaluate=False)
    with caplog.at_level(logging.WARNING, logger="graphopt.passes.magnitude_pruning"):
        many = Prune(steps=6, prune_every=1, **common)(tiny_program.clone())
    assert len(many.notes["schedule"]) == 6
    assert "schedule's 6 pruning points" in caplog.text and "raise prune_every" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="graphopt.passes.magnitude_pruning"):
        few = Prune(steps=6, prune_every=2, **common)(tiny_program.clone())
    assert len(few.notes["schedule"]) == 4 and "pruning points" not in caplog.text
