"""The shared trainer: schedule, determinism, hooks, early stopping, and the held-out guard."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import graphopt
from graphopt.data import load_sentences
from graphopt.distill import DistillationLoss, HiddenStateLoss, OutputLoss, SoftLabelLoss
from graphopt.train import TrainConfig, TrainProgress, lr_factor, train


pytestmark = pytest.mark.usefixtures("one_thread")


SMALL = TrainConfig(steps=4, batch_size=4, lr=1e-3, warmup_steps=1, max_length=16)


def _sentences() -> list[str]:
    return list(load_sentences("train"))[:40]


def _pair(program: graphopt.Program) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A teacher and a student made from it by perturbing every weight."""
    teacher = copy.deepcopy(program.ir).eval()
    student = copy.deepcopy(program.ir)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return student, teacher


def _loss() -> DistillationLoss:
    return DistillationLoss([SoftLabelLoss(temperature=2.0), HiddenStateLoss(), OutputLoss()])


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainConfig(steps=10, warmup_steps=20)
    with pytest.raises(ValueError, match="early_stopping_patience"):
        TrainConfig(early_stopping_patience=2)  # needs eval_every
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=0.0)


def test_schedule_warms_up_linearly_then_decays_by_cosine() -> None:
    config = TrainConfig(steps=10, warmup_steps=4, min_lr_ratio=0.1)
    assert [lr_factor(s, config) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, config) == pytest.approx(1.0)
    assert lr_factor(7, config) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert lr_factor(10, config) == pytest.approx(0.1)


def test_same_seed_same_weights(tiny_program: graphopt.Program) -> None:
    student, teacher = _pair(tiny_program)
    runs = []
    for seed in (0, 0, 1):
        trained = copy.deepcopy(student)
        train(trained, teacher, _sentences(), _loss(), dataclasses.replace(SMALL, seed=seed),
              tokenizer=tiny_program.tokenizer)
        runs.append(trained.state_dict())
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key
    assert any(not torch.equal(runs[0][k], runs[2][k]) for k in runs[0])
    assert not trained.training  # returned in eval mode


def test_a_few_steps_reduce_the_gap(tiny_program: graphopt.Program) -> None:
    student, teacher = _pair(tiny_program)
    loss = _loss().bind(student, teacher)
    batch = tiny_program.tokenizer(list(load_sentences("calibration"))[:16], max_length=16)

    def gap() -> float:
        with torch.no_grad():
            return loss(loss.run(student, batch, "student"), loss.run(teacher, batch, "teacher"), batch).total.item()

    before = gap()
    result = train(student, teacher, _sentences(), loss, dataclasses.replace(SMALL, steps=25, warmup_steps=2),
                   tokenizer=tiny_program.tokenizer)
    assert result.steps == 25 and len(result.losses) == 25
    assert gap() < 0.7 * before
    assert all(p.grad is None or not p.requires_grad for p in teacher.parameters())


def test_heldout_never_reaches_the_trainer(tiny_program: graphopt.Program) -> None:
    student, teacher = _pair(tiny_program)
    steps: list[int] = []

    class Count:
        def before_step(self, step: int, module: torch.nn.Module) -> None:
            steps.append(step)

    with pytest.raises(ValueError, match="heldout split"):
        train(student, teacher, load_sentences("heldout"), _loss(), SMALL, tokenizer=tiny_program.tokenizer,
              hooks=[Count()])
    mixed = _sentences() + [load_sentences("heldout")[3]]
    with pytest.raises(ValueError, match="heldout sentence"):
        train(student, teacher, mixed, _loss(), SMALL, tokenizer=tiny_program.tokenizer, hooks=[Count()])
    assert steps == []


def test_hooks_run_around_each_step_and_can_hold_weights(tiny_program: graphopt.Program) -> None:
    student, teacher = _pair(tiny_program)
    calls: list[tuple[str, int]] = []
    weight = student.get_submodule("layers.0.ffn.intermediate").weight
    mask = torch.rand(weight.shape, generator=torch.Generator().manual_seed(0)) > 0.5

    class Masks:  # what pruning does: re-apply its masks after each update
        def before_step(self, step: int, module: torch.nn.Module) -> None:
            calls.append(("before", step))

        def after_step(self, step: int, module: torch.nn.Module) -> None:
            calls.append(("after", step))
            with torch.no_grad():
                weight.mul_(mask)

    seen: list[TrainProgress] = []
    train(student, teacher, _sentences(), _loss(), SMALL, tokenizer=tiny_program.tokenizer, hooks=[Masks()],
          progress=seen.append)
    assert calls == [(w, s) for s in range(4) for w in ("before", "after")]
    assert torch.all(weight[~mask] == 0)
    assert [p.step for p in seen] == [1, 2, 3, 4] and set(seen[-1].parts) == {"soft_label", "hidden", "output"}
    assert seen[0].lr == pytest.approx(1e-3)  # after the one warm-up step


def test_early_stopping_on_a_validation_slice(tiny_program: graphopt.Program) -> None:
    student, teacher = _pair(tiny_program)
    config = dataclasses.replace(SMALL, steps=50, lr=1e-12, warmup_steps=0, eval_every=2,
                                 early_stopping_patience=2, validation_fraction=0.2)
    result = train(student, teacher, _sentences(), _loss(), config, tokenizer=tiny_program.tokenizer)
    # The loss cannot improve at lr 1e-12: the first validation stays best, two more stop it.
    assert result.stopped_early and result.steps == 6 and result.best_step == 2
    assert [s for s, _ in result.val_losses] == [2, 4, 6]


def test_ready_batches_for_models_without_a_tokenizer(tiny_program: graphopt.Program) -> None:
    student, teacher = _pair(tiny_program)
    batches = [tiny_program.example_inputs] * 3
    result = train(student, teacher, batches, DistillationLoss([OutputLoss()]), dataclasses.replace(SMALL, steps=3))
    assert result.steps == 3 and result.losses[-1] < result.losses[0]
