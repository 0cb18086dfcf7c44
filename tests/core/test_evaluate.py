"""evaluate_embeddings against hand-computed and scipy values; embed over batches."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from graphopt.evaluate import _average_ranks, _spearman, embed, evaluate_embeddings


def _random(n: int, dim: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim))


def test_identical_inputs_score_one() -> None:
    x = _random(12, 8)
    result = evaluate_embeddings(x, x.copy())
    assert result.n == 12
    for value in (result.mean_cosine, result.worst_cosine, result.spearman,
                  result.top1_agreement):
        assert value == pytest.approx(1.0, abs=1e-12)
    # Scale does not matter (cosines), and torch tensors are accepted.
    scaled = evaluate_embeddings(torch.tensor(3.0 * x), torch.tensor(x, dtype=torch.float32))
    assert scaled.worst_cosine == pytest.approx(1.0, abs=1e-6)
    assert set(result.as_dict()) == {"mean_cosine", "worst_cosine", "spearman",
                                     "top1_agreement", "n"}


def test_perturbation_lowers_cosine_as_computed_by_hand() -> None:
    reference = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    candidate = np.array([[1.0, 1.0], [0.0, 2.0], [1.0, 1.0]])  # row 0 rotated by 45 degrees
    result = evaluate_embeddings(candidate, reference)
    assert result.worst_cosine == pytest.approx(1 / math.sqrt(2), abs=1e-12)
    assert result.mean_cosine == pytest.approx((1 / math.sqrt(2) + 2) / 3, abs=1e-12)
    # Pairwise cosines (0,1), (0,2), (1,2): reference 0, .707, .707; candidate .707, 1, .707.
    expected = spearmanr([0.0, 0.5**0.5, 0.5**0.5], [0.5**0.5, 1.0, 0.5**0.5]).statistic
    assert result.spearman == pytest.approx(expected, abs=1e-12)
    # Nearest neighbours: reference 0->2, 1->2, 2->0 (tie with 1, first wins); candidate
    # 0->2 (identical rows), 1->0 (tie, first wins), 2->0. Agreement on rows 0 and 2.
    assert result.top1_agreement == pytest.approx(2 / 3)


def test_known_permutation_gives_known_spearman() -> None:
    # 1-D ranks: reversing five distinct values gives -1; swapping one adjacent pair of
    # five gives 1 - 6 * 2 / (5 * 24) = 0.9 (the no-ties formula).
    a = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    assert _spearman(a, a[::-1].copy()) == pytest.approx(-1.0)
    assert _spearman(a, np.array([0.2, 0.1, 0.3, 0.4, 0.5])) == pytest.approx(0.9)


def test_average_ranks_with_ties_match_scipy() -> None:
    values = np.array([3.0, 1.0, 3.0, 2.0, 3.0, 1.0])
    np.testing.assert_array_equal(_average_ranks(values), [5.0, 1.5, 5.0, 3.0, 5.0, 1.5])
    rng = np.random.default_rng(1)
    for _ in range(5):
        a = rng.integers(0, 6, 40).astype(float)  # many ties
        b = rng.integers(0, 6, 40).astype(float)
        assert _spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)


def test_matrix_spearman_matches_scipy_on_noisy_embeddings() -> None:
    reference = _random(30, 16, seed=2)
    candidate = reference + 0.3 * _random(30, 16, seed=3)
    result = evaluate_embeddings(candidate, reference)

    def upper(x: np.ndarray) -> np.ndarray:
        unit = x / np.linalg.norm(x, axis=1, keepdims=True)
        return (unit @ unit.T)[np.triu_indices(len(x), k=1)]

    expected = spearmanr(upper(candidate), upper(reference)).statistic
    assert result.spearman == pytest.approx(expected, abs=1e-12)
    assert 0.0 < result.spearman < 1.0
    assert 0.0 < result.worst_cosine < result.mean_cosine < 1.0


def test_small_and_malformed_inputs() -> None:
    two = evaluate_embeddings(_random(2, 4), _random(2, 4))
    assert math.isnan(two.spearman) and not math.isnan(two.top1_agreement)
    with pytest.raises(ValueError, match="shape"):
        evaluate_embeddings(_random(3, 4), _random(3, 5))
    with pytest.raises(ValueError, match="2-D"):
        evaluate_embeddings(np.zeros(4), np.zeros(4))


class _FakeTokenizer:
    """Token id = word length; pads to the batch's longest sentence."""

    def __call__(self, sentences, max_length=128, pad_to=None):
        rows = [[len(w) for w in s.split()][:max_length] for s in sentences]
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.int64)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def test_embed_batches_in_order() -> None:
    calls = []

    def fn(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        calls.append(input_ids.shape[0])
        total = (input_ids * attention_mask).sum(dim=1, keepdim=True).float()
        return torch.cat([total, attention_mask.sum(dim=1, keepdim=True).float()], dim=1)

    sentences = ["a bb", "ccc", "dddd e", "ff", "g hh iii"]
    out = embed(fn, _FakeTokenizer(), sentences, batch_size=2)
    assert calls == [2, 2, 1]
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [[3, 2], [3, 1], [5, 2], [2, 1], [6, 3]])
    numpy_out = embed(lambda **kw: fn(**kw).numpy(), _FakeTokenizer(), sentences)
    np.testing.assert_array_equal(numpy_out, out)
