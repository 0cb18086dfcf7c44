"""The shipped sentences and pairs, and their frozen splits."""

from __future__ import annotations

import hashlib
import importlib.resources
import pickle

import pytest

from graphopt.data import (
    SentenceSplit,
    _all_sentences,
    assert_not_heldout,
    load_pairs,
    load_sentences,
    split_of,
)

SPLITS = ("calibration", "train", "heldout")


def _file_sentences() -> list[str]:
    text = importlib.resources.files("graphopt.data").joinpath("sentences.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]


def test_splits_are_disjoint_and_cover_the_file() -> None:
    splits = {name: load_sentences(name) for name in SPLITS}
    everything = _file_sentences()
    assert len(everything) >= 400
    assert len(set(everything)) == len(everything), "sentences.txt has duplicates"
    seen: set[str] = set()
    for name, split in splits.items():
        assert isinstance(split, SentenceSplit) and split.split == name
        assert not seen & set(split), f"{name} overlaps another split"
        seen |= set(split)
    assert seen == set(everything)


def test_split_sizes_are_reasonable() -> None:
    total = len(_file_sentences())
    for name, share in zip(SPLITS, (0.30, 0.40, 0.30)):
        fraction = len(load_sentences(name)) / total
        assert abs(fraction - share) < 0.08, f"{name} holds {fraction:.2f} of the file"


def test_split_is_the_documented_hash_rule() -> None:
    # A frozen rule, not Python's salted hash(): recompute it independently.
    for sentence in load_sentences("train")[:20]:
        bucket = int(hashlib.sha256(sentence.encode()).hexdigest(), 16) % 100
        assert 30 <= bucket < 70
    assert split_of("Stop.") == split_of("Stop.")


def test_splits_are_stable_across_calls() -> None:
    first = load_sentences("calibration")
    _all_sentences.cache_clear()  # re-read the file
    assert tuple(load_sentences("calibration")) == tuple(first)
    copy = pickle.loads(pickle.dumps(first))
    assert copy == first and copy.split == "calibration"


def test_unknown_split_is_refused() -> None:
    with pytest.raises(ValueError, match="validation"):
        load_sentences("validation")  # type: ignore[arg-type]


def test_heldout_guard() -> None:
    heldout = load_sentences("heldout")
    with pytest.raises(ValueError, match="calibrate-pass"):
        assert_not_heldout(heldout, consumer="calibrate-pass")
    mixed = list(load_sentences("train")[:5]) + [heldout[3]]
    with pytest.raises(ValueError, match="distill"):
        assert_not_heldout(mixed, consumer="distill")
    assert_not_heldout(load_sentences("calibration"), consumer="calibrate-pass")
    assert_not_heldout(load_sentences("train"), consumer="distill")
    # Foreign text is not ours to refuse, whatever its hash bucket.
    assert_not_heldout([f"user sentence {i}" for i in range(50)], consumer="calibrate-pass")


def test_pairs() -> None:
    pairs = load_pairs()
    assert len(pairs) >= 60
    positives = sum(label for label, _, _ in pairs)
    assert 0.4 <= positives / len(pairs) <= 0.6
    assert len(set(pairs)) == len(pairs)
    for label, a, b in pairs:
        assert label in (0, 1) and a and b and a != b
