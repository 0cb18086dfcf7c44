"""Distillation losses against hand-computed values; attention and hidden-state capture on our
encoder (eager and fx) and on HF BERT from a tiny config."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import graphopt
from graphopt.distill import (
    AttentionCapture,
    AttentionLoss,
    Captured,
    DistillationLoss,
    HiddenStateLoss,
    OutputLoss,
    SoftLabelLoss,
    attention_kl,
    attention_log_probs,
    capture_outputs,
    find_layers,
    hidden_state_loss,
    keep_teacher,
    similarity_logits,
    soft_label_kl,
    uniform_layer_map,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


# ----------------------------------------------------------------------------- pure losses

def test_soft_label_kl_by_hand_with_temperature_squared() -> None:
    student, teacher = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])
    assert soft_label_kl(student, teacher, 1.0).item() == pytest.approx(_kl([0.75, 0.25], [0.5, 0.5]), rel=1e-6)
    # T = 2: the teacher's logits are halved (p = √3/(1+√3), 1/(1+√3)) and the KL is multiplied by T² = 4.
    r3 = math.sqrt(3.0)
    expected = 4.0 * _kl([r3 / (1 + r3), 1 / (1 + r3)], [0.5, 0.5])
    assert soft_label_kl(student, teacher, 2.0).item() == pytest.approx(expected, rel=1e-6)


def test_soft_label_kl_leaves_masked_rows_out() -> None:
    student = torch.tensor([[[0.0, 0.0], [5.0, -5.0]]])  # [B=1, S=2, C=2]; position 1 is padding
    teacher = torch.tensor([[[math.log(3.0), 0.0], [-9.0, 9.0]]])
    got = soft_label_kl(student, teacher, 1.0, mask=torch.tensor([[1, 0]]))
    assert got.item() == pytest.approx(_kl([0.75, 0.25], [0.5, 0.5]), rel=1e-6)


def test_similarity_logits_drop_the_diagonal_and_scale_by_tau() -> None:
    embeddings = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    s = 1 / math.sqrt(2.0)
    expected = torch.tensor([[0.0, s], [0.0, s], [s, s]]) / 0.5
    torch.testing.assert_close(similarity_logits(embeddings, 0.5), expected)


def test_hidden_state_mse_and_cosine_mask_padded_positions() -> None:
    student = torch.tensor([[[1.0, 3.0], [100.0, 100.0]]])  # position 1 is padding
    teacher = torch.zeros(1, 2, 2)
    mask = torch.tensor([[1, 0]])
    assert hidden_state_loss(student, teacher, mask, "mse").item() == pytest.approx((1 + 9) / 2)
    s, t = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]]), torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    assert hidden_state_loss(s, t, torch.tensor([[1, 1]]), "cosine").item() == pytest.approx(0.5)
    assert hidden_state_loss(s, t, torch.tensor([[1, 0]]), "cosine").item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="equal widths"):
        hidden_state_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4))


def test_attention_kl_by_hand_masks_padded_queries() -> None:
    teacher = torch.tensor([[0.75, 0.25], [0.5, 0.5]]).log()[None, None]  # [B=1, H=1, Q=2, K=2]
    student = torch.tensor([[0.5, 0.5], [0.01, 0.99]]).log()[None, None]
    both = (_kl([0.75, 0.25], [0.5, 0.5]) + _kl([0.5, 0.5], [0.01, 0.99])) / 2
    assert attention_kl(student, teacher).item() == pytest.approx(both, rel=1e-6)
    first = attention_kl(student, teacher, query_mask=torch.tensor([[1, 0]]))
    assert first.item() == pytest.approx(_kl([0.75, 0.25], [0.5, 0.5]), rel=1e-6)


def test_distillation_loss_is_the_weighted_sum_of_its_terms() -> None:
    s = Captured((torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]),))
    t = Captured((torch.tensor([[1.0, 0.2], [0.1, 1.0], [1.0, 0.9]]),))
    loss = DistillationLoss([SoftLabelLoss(weight=2.0, temperature=3.0), OutputLoss(weight=0.5),
                             HiddenStateLoss(weight=0.0)])
    value = loss(s, t, {})
    assert set(value.parts) == {"soft_label", "output"}  # weight 0 drops a term
    soft = soft_label_kl(similarity_logits(s.outputs[0], 0.05), similarity_logits(t.outputs[0], 0.05), 3.0)
    cosine = 1 - F.cosine_similarity(s.outputs[0], t.outputs[0]).mean()
    torch.testing.assert_close(value.parts["soft_label"], soft)
    torch.testing.assert_close(value.total, 2.0 * soft + 0.5 * cosine)
    with pytest.raises(ValueError, match="positive weight"):
        DistillationLoss([HiddenStateLoss(weight=0.0)])


def test_uniform_layer_map() -> None:
    assert uniform_layer_map(3, 6) == (1, 3, 5)
    assert uniform_layer_map(4, 6) == (1, 2, 4, 5)  # 1.5, 3, 4.5, 6 rounded half up
    assert uniform_layer_map(2, 2) == (0, 1)
    with pytest.raises(ValueError):
        uniform_layer_map(4, 2)


# ----------------------------------------------------------------------------- captures

@pytest.mark.parametrize("causal, mask_kind, gqa", [(False, None, False), (True, None, False),
                                                   (False, "bool", False), (False, "float", True)])
def test_attention_log_probs_reproduce_sdpa(causal: bool, mask_kind: str | None, gqa: bool) -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=g)
    k, v = (torch.randn(2, 2 if gqa else 4, 5, 8, generator=g) for _ in range(2))
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(2, 1, 5, 5, generator=g) > 0.3
        mask[..., 0] = True  # every query sees a key
    elif mask_kind == "float":
        mask = torch.randn(2, 1, 1, 5, generator=g)
    kwargs = {"attn_mask": mask, "is_causal": causal, "scale": 0.3, "enable_gqa": gqa}
    probs = attention_log_probs(q, k, v, **kwargs).exp()
    v_full = v.repeat_interleave(2, dim=-3) if gqa else v
    torch.testing.assert_close(probs @ v_full, F.scaled_dot_product_attention(q, k, v, **kwargs))
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))


@pytest.mark.parametrize("fx", [True, False])
def test_attention_capture_on_our_encoder(tiny_bundle: graphopt.ModelBundle, fx: bool) -> None:
    module = graphopt.trace(tiny_bundle).ir if fx else tiny_bundle.module
    assert isinstance(module, torch.fx.GraphModule) == fx
    batch = tiny_bundle.tokenizer(["A cat sat.", "The quick brown fox jumps over the dog."])
    names = ["layers.1.attention.query", "layers.1.attention.key"]
    with capture_outputs(module, names) as qk, AttentionCapture() as capture:
        out = module(**batch)
    torch.testing.assert_close(out, tiny_bundle.module(**batch))  # the capture does not change the output
    b, s = batch["input_ids"].shape
    assert capture.calls == 2 and [m.shape for m in capture.maps.values()] == [(b, 4, s, s)] * 2
    # Layer 1 by hand: softmax(QKᵀ/√16) with padded keys masked.
    q, k = (x.unflatten(-1, (4, 16)).transpose(1, 2) for x in (qk[names[0]], qk[names[1]]))
    scores = q @ k.transpose(-2, -1) / 4.0
    scores = scores.masked_fill(batch["attention_mask"][:, None, None, :] == 0, float("-inf"))
    torch.testing.assert_close(capture.maps[1].exp(), scores.softmax(-1), atol=1e-6, rtol=1e-5)


def _hf_bert(implementation: str, layers: int = 2) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=layers,
                                     num_attention_heads=4, intermediate_size=128,
                                     attn_implementation=implementation)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return transformers.BertModel(config).eval()


def test_attention_and_hidden_capture_on_hf_bert() -> None:
    sdpa, eager = _hf_bert("sdpa"), _hf_bert("eager")
    eager.load_state_dict(sdpa.state_dict())
    ids = torch.randint(1, 1000, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:], mask[2, 2:] = 0, 0
    layers = find_layers(sdpa)
    assert layers.prefix == "encoder.layer" and layers.count == 2
    with capture_outputs(sdpa, [layers.name(0), layers.name(1)]) as hidden, AttentionCapture() as capture:
        out = sdpa(input_ids=ids, attention_mask=mask)
    reference = eager(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert capture.calls == 2 and all(m.shape == (3, 4, 7, 7) for m in capture.maps.values())
    for index, probs in enumerate(reference.attentions):
        torch.testing.assert_close(capture.maps[index].exp(), probs, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(hidden[layers.name(1)], out.last_hidden_state)


def test_fx_taps_are_removed_after_capture(tiny_program: graphopt.Program) -> None:
    gm = tiny_program.ir
    code, modules = gm.code, dict(gm.named_modules())
    with capture_outputs(gm, ["layers.0", "layers.1"]) as hidden:
        out = gm(**tiny_program.example_inputs)
    assert gm.code == code and dict(gm.named_modules()).keys() == modules.keys()
    assert hidden["layers.0"].shape == (2, 16, 64)
    with capture_outputs(gm, ["layers.1.ffn_norm"]) as last:  # a called submodule: a plain hook
        gm(**tiny_program.example_inputs)
    torch.testing.assert_close(hidden["layers.1"], last["layers.1.ffn_norm"])
    assert out.shape == (2, 64)


def test_distillation_loss_runs_on_student_and_teacher(tiny_program: graphopt.Program) -> None:
    teacher = keep_teacher(tiny_program)
    student = copy.deepcopy(tiny_program.ir)
    loss = DistillationLoss([SoftLabelLoss(), HiddenStateLoss(), AttentionLoss()]).bind(student, teacher)
    batch = tiny_program.example_inputs
    value = loss(loss.run(student, batch, "student"), loss.run(teacher, batch, "teacher"), batch)
    assert loss.pairs == (0, 1)
    assert value.total.item() == pytest.approx(0.0, abs=1e-6)  # a copy matches its teacher exactly


def test_find_layers_names_what_it_found(tiny_bundle: graphopt.ModelBundle) -> None:
    with pytest.raises(ValueError, match="no layer list 'blocks'.*layers"):
        find_layers(tiny_bundle.module, "blocks")
    with pytest.raises(ValueError, match="no list of Transformer layers"):
        find_layers(torch.nn.Linear(2, 2))


def test_soft_labels_recover_neighbours_not_coordinates() -> None:
    """Optimising the soft-label loss alone matches the teacher's in-batch similarity ranking
    (top-1 neighbours) but not its coordinates: it is blind to a rotation of the space."""
    from graphopt.evaluate import evaluate_embeddings

    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(32, 16, generator=g)
    student = torch.randn(32, 16, generator=g).requires_grad_()
    optimizer = torch.optim.Adam([student], lr=0.05)
    for _ in range(200):
        loss = soft_label_kl(similarity_logits(student, 0.05), similarity_logits(teacher, 0.05))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    agreement = evaluate_embeddings(student.detach(), teacher)
    assert loss.item() < 0.05 and agreement.top1_agreement > 0.9
    assert abs(agreement.mean_cosine) < 0.3
