"""graphopt's own English sentences and paraphrase pairs, with frozen splits.

Both files were written for graphopt and ship with it (Apache-2.0), so calibration,
training and evaluation never need a download.

- `sentences.txt`: one sentence per line, split three ways by a hash of the text.
  `sha256(sentence) mod 100` puts a sentence in *calibration* (< 30), *train* (< 70) or
  *heldout* (the rest). The split depends only on the sentence itself, so it is stable
  across runs, machines and Python versions (unlike `hash()`), and adding or removing
  a line never moves any other line to another split.
- `pairs.tsv`: `label<TAB>sentence_a<TAB>sentence_b`, label 1 for a paraphrase, 0 for a
  non-paraphrase (many of them on the same topic, so the task is not trivial).

Calibration and training code should call `assert_not_heldout` on what it is given, so
that held-out text can never leak into a compression decision.

Example::

    calibration = load_sentences("calibration")
    assert_not_heldout(calibration, consumer="calibrate")
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
from collections.abc import Iterable
from typing import Literal, get_args

__all__ = [
    "Split",
    "SentenceSplit",
    "assert_not_heldout",
    "load_pairs",
    "load_sentences",
    "split_of",
]

Split = Literal["calibration", "train", "heldout"]

# Bucket bounds (exclusive) of each split in [0, 100): 30% / 40% / 30%.
_CALIBRATION_END = 30
_TRAIN_END = 70


class SentenceSplit(tuple):  # type: ignore[type-arg]
    """A tuple of sentences that remembers which split it is.

    Attributes:
        split: the split's name, so a consumer can check what it was handed.
    """

    split: Split

    def __new__(cls, sentences: Iterable[str], split: Split) -> SentenceSplit:
        self = super().__new__(cls, sentences)
        self.split = split
        return self

    def __getnewargs__(self) -> tuple[tuple[str, ...], Split]:  # type: ignore[override]
        # pickle and copy rebuild through __new__, which needs the split too.
        return (tuple(self), self.split)

    def __repr__(self) -> str:
        return f"SentenceSplit(split={self.split!r}, n={len(self)})"


def split_of(sentence: str) -> Split:
    """The split a sentence belongs to, from the sha256 of its UTF-8 text.

    Args:
        sentence: the sentence, exactly as stored (no stripping is done here).
    """
    bucket = int(hashlib.sha256(sentence.encode("utf-8")).hexdigest(), 16) % 100
    if bucket < _CALIBRATION_END:
        return "calibration"
    if bucket < _TRAIN_END:
        return "train"
    return "heldout"


def _data_lines(name: str) -> list[str]:
    """Non-empty lines of a shipped data file, without '#' comment lines."""
    text = importlib.resources.files(__name__).joinpath(name).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


@functools.lru_cache(maxsize=1)
def _all_sentences() -> tuple[str, ...]:
    sentences = tuple(line.strip() for line in _data_lines("sentences.txt"))
    if len(set(sentences)) != len(sentences):
        raise ValueError("graphopt/data/sentences.txt has duplicate lines; remove them")
    return sentences


def load_sentences(split: Split) -> SentenceSplit:
    """The sentences of one split, in file order.

    Args:
        split: "calibration", "train" or "heldout".

    Raises:
        ValueError: unknown split name.
    """
    if split not in get_args(Split):
        raise ValueError(f"unknown split {split!r}; choose one of {get_args(Split)}")
    return SentenceSplit((s for s in _all_sentences() if split_of(s) == split), split)


def load_pairs() -> list[tuple[int, str, str]]:
    """The labelled pairs, as `(label, sentence_a, sentence_b)`; label 1 = paraphrase."""
    pairs = []
    for number, line in enumerate(_data_lines("pairs.tsv"), start=1):
        fields = line.split("\t")
        if len(fields) != 3 or fields[0] not in ("0", "1"):
            raise ValueError(f"graphopt/data/pairs.tsv: malformed data line {number}: {line!r}")
        pairs.append((int(fields[0]), fields[1].strip(), fields[2].strip()))
    return pairs


def assert_not_heldout(sentences: Iterable[str], consumer: str) -> None:
    """Refuse held-out text: guard for calibration and training data paths.

    A sentence is refused if it is one of graphopt's heldout sentences (a line of
    `sentences.txt` whose hash bucket is heldout). The check is membership, not the bare
    hash bucket, because about 30% of *any* text hashes into the heldout range: a user's
    own calibration sentences would otherwise be refused at random.

    Args:
        sentences: what the consumer is about to use.
        consumer: who is asking (a pass or step name), for the error message.

    Raises:
        ValueError: `sentences` is the heldout split, or contains a heldout sentence.
    """
    if isinstance(sentences, SentenceSplit) and sentences.split == "heldout":
        raise ValueError(f"{consumer} was given the heldout split; use calibration or train")
    heldout = _heldout_set()
    for sentence in sentences:
        if sentence.strip() in heldout:
            raise ValueError(
                f"{consumer} was given a heldout sentence: {sentence[:60]!r}; "
                "use load_sentences('calibration') or load_sentences('train')"
            )


@functools.lru_cache(maxsize=1)
def _heldout_set() -> frozenset[str]:
    return frozenset(load_sentences("heldout"))
