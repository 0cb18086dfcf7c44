"""The one evaluation: how well a candidate's sentence embeddings agree with a reference's.

Every compression result in graphopt is scored by `evaluate_embeddings` on the same
held-out sentences, so numbers from different passes and issues are comparable.

Four figures, each 1.0 when the candidate equals the reference:

- `mean_cosine` / `worst_cosine`: row-wise cosine between candidate and reference.
- `spearman`: rank correlation between the two pairwise-cosine matrices (upper
  triangles, diagonal excluded): does the candidate rank sentence similarities in the
  same order? This is what retrieval and clustering use, and it is blind to a global
  rotation of the space, which row-wise cosine is not.
- `top1_agreement`: the fraction of rows whose nearest neighbour (itself excluded) is the
  same under both.

Spearman is written here with numpy (average ranks for ties), so the core does not need
scipy at runtime; the tests check it against `scipy.stats.spearmanr`.

Example::

    reference = embed(original, tokenizer, load_sentences("heldout"))
    candidate = embed(compressed, tokenizer, load_sentences("heldout"))
    agreement = evaluate_embeddings(candidate, reference)
    assert agreement.spearman >= 0.98, agreement.as_dict()
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
import torch

__all__ = ["EmbeddingAgreement", "Tokenizer", "embed", "evaluate_embeddings"]

ArrayLike = np.ndarray | torch.Tensor

# A zero row has no direction; norms are clamped so that its cosine is 0, not NaN.
_NORM_EPS = 1e-12


class Tokenizer(Protocol):
    """What `embed` needs from a tokenizer (`graphopt.models.minilm.SentenceTokenizer` fits)."""

    def __call__(
        self, sentences: Sequence[str], max_length: int = ..., pad_to: int | None = ...
    ) -> Mapping[str, torch.Tensor]: ...


@dataclass(frozen=True)
class EmbeddingAgreement:
    """Agreement of candidate embeddings with reference embeddings.

    Attributes:
        mean_cosine: mean row-wise cosine.
        worst_cosine: minimum row-wise cosine.
        spearman: rank correlation of the pairwise-cosine upper triangles; NaN when there
            are fewer than 3 rows or either triangle is constant.
        top1_agreement: fraction of rows with the same nearest neighbour; NaN below 2 rows.
        n: number of rows (sentences).
    """

    mean_cosine: float
    worst_cosine: float
    spearman: float
    top1_agreement: float
    n: int

    def as_dict(self) -> dict[str, float | int]:
        """Plain dict, for report.json."""
        return asdict(self)


def _as_float64(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().to(torch.float64).numpy()
    array = np.asarray(x, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D [n, dim], got shape {array.shape}")
    return array


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, _NORM_EPS)


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of a 1-D array, ties sharing the mean of the ranks they span."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # Start index of each run of equal values in sorted order.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    # A run covering sorted positions [s, e) gets the average of ranks s+1 .. e.
    run_rank = (starts + 1 + ends) / 2.0
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of the average ranks of `a` and `b`."""
    if len(a) < 2:
        return math.nan
    ra = _average_ranks(a) - (len(a) + 1) / 2.0
    rb = _average_ranks(b) - (len(b) + 1) / 2.0
    denominator = math.sqrt(float(ra @ ra) * float(rb @ rb))
    return float(ra @ rb) / denominator if denominator > 0 else math.nan


def evaluate_embeddings(candidate: ArrayLike, reference: ArrayLike) -> EmbeddingAgreement:
    """Score a candidate's embeddings of n sentences against a reference's.

    Args:
        candidate: [n, dim] embeddings from the model under test.
        reference: [n, dim] embeddings of the same sentences from the reference model.
            Rows need not be normalised; all figures use cosines.

    Returns:
        the agreement figures; see `EmbeddingAgreement`.

    Raises:
        ValueError: shapes differ, are not 2-D, or there are no rows.
    """
    cand = _as_float64(candidate, "candidate")
    ref = _as_float64(reference, "reference")
    if cand.shape != ref.shape:
        raise ValueError(f"candidate {cand.shape} and reference {ref.shape} differ in shape")
    n = cand.shape[0]
    if n == 0:
        raise ValueError("evaluate_embeddings needs at least one row")
    cand, ref = _unit_rows(cand), _unit_rows(ref)
    row_cosine = np.sum(cand * ref, axis=1)

    cand_sim, ref_sim = cand @ cand.T, ref @ ref.T
    upper = np.triu_indices(n, k=1)
    spearman = _spearman(cand_sim[upper], ref_sim[upper]) if n >= 3 else math.nan

    top1 = math.nan
    if n >= 2:
        np.fill_diagonal(cand_sim, -np.inf)
        np.fill_diagonal(ref_sim, -np.inf)
        top1 = float(np.mean(cand_sim.argmax(axis=1) == ref_sim.argmax(axis=1)))

    return EmbeddingAgreement(
        mean_cosine=float(row_cosine.mean()),
        worst_cosine=float(row_cosine.min()),
        spearman=spearman,
        top1_agreement=top1,
        n=n,
    )


def embed(
    fn: Callable[..., Any],
    tokenizer: Tokenizer,
    sentences: Sequence[str],
    batch_size: int = 32,
    max_length: int = 128,
) -> np.ndarray:
    """Embed sentences with any callable, in batches, without gradients.

    Args:
        fn: called as `fn(input_ids=..., attention_mask=...)` with int64 tensors padded to
            the batch's longest sentence; returns a tensor or array [batch, dim]. An
            `nn.Module`, an fx GraphModule or a backend executable fits; a
            `torch.export` program's `.module()` fits only if it was exported with
            keyword inputs (one exported positionally refuses keywords).
        tokenizer: turns a batch of sentences into those two tensors.
        sentences: the sentences, embedded in order.
        batch_size: sentences per call.
        max_length: tokens per sentence after truncation.

    Returns:
        float32 [len(sentences), dim].
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(sentences) == 0:
        raise ValueError("embed needs at least one sentence")
    outputs = []
    with torch.no_grad():
        for start in range(0, len(sentences), batch_size):
            batch = tokenizer(list(sentences[start : start + batch_size]), max_length=max_length)
            out = fn(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            if isinstance(out, torch.Tensor):
                out = out.detach().cpu().numpy()
            outputs.append(np.asarray(out, dtype=np.float32))
    return np.concatenate(outputs, axis=0)


def module_embedder(module: torch.nn.Module) -> Callable[..., np.ndarray]:
    """A callable for `embed`: the module's first output, mean-pooled over real tokens when it is
    ``[B, S, D]`` (a ``[B, D]`` output is taken as it is)."""
    from graphopt.distill import sentence_embedding
    from graphopt.program import flatten_outputs

    def run(**inputs: torch.Tensor) -> np.ndarray:
        output = flatten_outputs(module(**inputs))[0]
        return sentence_embedding(output, inputs.get("attention_mask")).float().numpy()

    return run


def heldout_agreement(student: torch.nn.Module, teacher: torch.nn.Module | np.ndarray,
                      tokenizer: Tokenizer) -> dict[str, float | int]:
    """``student``'s agreement with ``teacher`` (a module, or its held-out embeddings) on the
    held-out sentences: evaluation only, never training. The student's train/eval mode is kept."""
    from graphopt.data import load_sentences

    sentences = load_sentences("heldout")
    was_training = student.training
    student.eval()
    try:
        reference = teacher if isinstance(teacher, np.ndarray) else embed(module_embedder(teacher), tokenizer,
                                                                          sentences)
        candidate = embed(module_embedder(student), tokenizer, sentences)
    finally:
        student.train(was_training)
    return evaluate_embeddings(candidate, reference).as_dict()
