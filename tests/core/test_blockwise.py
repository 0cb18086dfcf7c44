"""Block-wise reconstruction: the split at layer scopes, and each layer trained alone towards the teacher's."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from graphopt.blockwise import reconstruct_layers, split_at_layers
from graphopt.data import load_sentences
from graphopt.distill import find_layers
from graphopt.program import Program
from graphopt.sparsity import apply_masks, magnitude_mask


def _batches(program: Program, count: int = 4, size: int = 8) -> list[dict[str, torch.Tensor]]:
    sentences = load_sentences("train")[:count * size]
    return [program.tokenizer(sentences[i:i + size], max_length=16) for i in range(0, len(sentences), size)]


def test_split_at_layers_is_the_same_function_on_the_same_parameters(tiny_program: Program) -> None:
    gm = tiny_program.ir.eval()
    layers = find_layers(gm)
    split = split_at_layers(gm)
    parts = [name for name, _ in split.named_children() if name.startswith("submod_")]
    assert parts == [f"submod_{i}" for i in range(layers.count + 2)]
    batch = _batches(tiny_program, 1)[0]
    with torch.no_grad():
        assert torch.equal(split(**batch), gm(**batch))
    # Layer i's partition calls the model's own Linears: training it trains the model.
    query = gm.get_submodule(f"{layers.name(0)}.attention.query")
    assert any(m is query for m in split.get_submodule("submod_1").modules())
    assert not any(m is query for m in split.get_submodule("submod_2").modules())


def test_split_at_layers_puts_consecutive_layers_in_one_block(tiny_program: Program) -> None:
    gm = tiny_program.ir.eval()
    layers = find_layers(gm)
    assert layers.count == 2
    split = split_at_layers(gm, layers_per_block=2)
    assert [name for name, _ in split.named_children() if name.startswith("submod_")] == ["submod_0", "submod_1",
                                                                                             "submod_2"]
    block = list(split.get_submodule("submod_1").modules())
    for i in range(layers.count):
        query = gm.get_submodule(f"{layers.name(i)}.attention.query")
        assert any(m is query for m in block)
    batch = _batches(tiny_program, 1)[0]
    with torch.no_grad():
        assert torch.equal(split(**batch), gm(**batch))
    with pytest.raises(ValueError, match="layers_per_block must be >= 1"):
        split_at_layers(gm, layers_per_block=0)


def _pruned_copy(program: Program, sparsity: float) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    student = copy.deepcopy(program.ir)
    masks = {name: magnitude_mask(m.weight, sparsity) for name, m in student.named_modules()
             if isinstance(m, nn.Linear)}
    apply_masks(student, masks)
    return student, masks


def test_reconstruction_brings_each_layer_and_the_output_back_towards_the_teacher(tiny_program: Program) -> None:
    teacher = tiny_program.ir.eval()
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    student, masks = _pruned_copy(tiny_program, 0.8)
    batches = _batches(tiny_program)
    held_out = tiny_program.tokenizer(load_sentences("heldout")[:32], max_length=16)

    def output_error() -> float:
        student.eval()
        with torch.no_grad():
            return float((student(**held_out) - teacher(**held_out)).square().mean())

    before = output_error()
    student.train()
    seen = []
    results = reconstruct_layers(student, teacher, batches, steps=40, lr=3e-3, after_step=lambda layer: apply_masks(student, masks),
                                 progress=lambda done, total, r: seen.append((done, total, r.layer)))
    assert student.training  # put back as it was
    layers = find_layers(teacher)
    assert seen == [(i + 1, layers.count, layers.name(i)) for i in range(layers.count)]
    for r in results:
        assert r.steps == 40 and r.loss_after < 0.7 * r.loss_before, r
    assert output_error() < 0.5 * before  # on sentences it never saw
    for name, mask in masks.items():
        assert bool((student.get_submodule(name).weight[~mask] == 0).all()), name
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())


def test_reconstruction_of_two_layers_as_one_block(tiny_program: Program) -> None:
    teacher = tiny_program.ir.eval()
    student, masks = _pruned_copy(tiny_program, 0.8)
    layers = find_layers(teacher)
    held_out = tiny_program.tokenizer(load_sentences("heldout")[:32], max_length=16)

    def output_error() -> float:
        with torch.no_grad():
            return float((student(**held_out) - teacher(**held_out)).square().mean())

    before = output_error()
    reapplied: list[str] = []

    def reapply(layer: str) -> None:
        reapplied.append(layer)
        apply_masks(student, {n: m for n, m in masks.items() if n.startswith(layer + ".")})

    seen = []
    results = reconstruct_layers(student, teacher, _batches(tiny_program), steps=40, lr=3e-3, layers_per_block=2,
                                 after_step=reapply, progress=lambda done, total, r: seen.append((done, total, r.layer)))
    assert seen == [(1, 1, f"{layers.name(0)}-1")]
    assert reapplied == [layers.name(0), layers.name(1)] * 40  # every trained layer's masks, after every step
    assert results[0].loss_after < 0.7 * results[0].loss_before
    assert output_error() < 0.5 * before
    for name, mask in masks.items():
        if name.startswith(layers.prefix):
            assert bool((student.get_submodule(name).weight[~mask] == 0).all()), name


def test_a_block_that_training_makes_worse_is_put_back(tiny_program: Program) -> None:
    teacher = tiny_program.ir.eval()
    student, masks = _pruned_copy(tiny_program, 0.8)
    pruned = {k: v.clone() for k, v in student.state_dict().items()}
    # Adam at lr 1 throws the weights far off: every block ends worse than it began.
    results = reconstruct_layers(student, teacher, _batches(tiny_program), steps=5, lr=1.0,
                                 after_step=lambda layer: apply_masks(student, masks))
    assert results and all(r.reverted and r.loss_after == r.loss_before for r in results)
    assert all(torch.equal(v, pruned[k]) for k, v in student.state_dict().items())


def test_pruning_during_reconstruction_cuts_it_into_phases_each_put_back_if_worse(tiny_program: Program) -> None:
    """prune_at = [3]: prune(names, 0) before step 3 of each block; at lr 1 both phases of every
    block end worse, so each is put back: the weights end as pruned further from the start's."""
    teacher = tiny_program.ir.eval()
    student, masks = _pruned_copy(tiny_program, 0.8)
    expected = copy.deepcopy(student)
    further = {name: magnitude_mask(m.weight, 0.9) for name, m in expected.named_modules() if isinstance(m, nn.Linear)}
    apply_masks(expected, further)
    layers = find_layers(teacher)
    calls: list[tuple[list[str], int]] = []

    def prune(block: list[str], point: int) -> None:
        calls.append((list(block), point))
        chosen = {n: m for n, m in further.items() if any(n.startswith(layer + ".") for layer in block)}
        masks.update(chosen)
        apply_masks(student, chosen)

    results = reconstruct_layers(student, teacher, _batches(tiny_program), steps=6, lr=1.0, prune_at=[3],
                                 prune=prune, after_step=lambda layer: apply_masks(student, masks))
    assert calls == [([layers.name(i)], 0) for i in range(layers.count)]
    assert [r.reverted for r in results] == [2] * layers.count
    assert all(r.loss_after > r.loss_before for r in results)  # sparser than it began, training undone
    for name, value in student.state_dict().items():
        assert torch.equal(value, expected.state_dict()[name]), name


def test_reconstruction_checks_its_arguments(tiny_program: Program) -> None:
    student = copy.deepcopy(tiny_program.ir)
    with pytest.raises(ValueError, match="at least one batch"):
        reconstruct_layers(student, tiny_program.ir, [], steps=1)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        reconstruct_layers(student, tiny_program.ir, _batches(tiny_program, 1), steps=0)
    with pytest.raises(ValueError, match="layers_per_block must be >= 1"):
        reconstruct_layers(student, tiny_program.ir, _batches(tiny_program, 1), steps=1, layers_per_block=0)
    batches = _batches(tiny_program, 1)
    for prune_at in ([0], [3, 2], [5], [2, 2]):
        with pytest.raises(ValueError, match="prune_at must be increasing steps in 1 … 4"):
            reconstruct_layers(student, tiny_program.ir, batches, steps=5, prune_at=prune_at, prune=lambda b, i: None)
    with pytest.raises(ValueError, match="with a prune function"):
        reconstruct_layers(student, tiny_program.ir, batches, steps=5, prune_at=[2])
