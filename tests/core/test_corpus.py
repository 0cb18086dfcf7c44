"""The training corpus built from text shipped with Python: English only, no held-out text."""

from __future__ import annotations

import pytest

from graphopt.data import load_sentences
from graphopt.data import corpus
from graphopt.data.corpus import (_frame_sentences, _load_corpus, _suffix_class, corpus_digest, is_english_sentence,
                                  load_corpus, load_training_data, load_training_sentences, load_written_sentences,
                                  recombined_sentences, split_sentences, substituted_sentences,
                                  tokenizer_vocabulary, vocabulary_words)


def test_split_sentences_folds_whitespace_and_splits_on_full_stops() -> None:
    text = "The first one ends here. The second\n  one asks why? e.g. not this.\n\nA new paragraph."
    assert split_sentences(text) == ["The first one ends here.", "The second one asks why? e.g. not this.",
                                     "A new paragraph."]


@pytest.mark.parametrize("sentence, keep", [
    ("The file is closed when the block ends.", True),
    ("Return the value of os.path.join() for this.", False),       # code
    ("Call it with x = 3 and see what happens.", False),           # code character
    ("THE SOFTWARE IS PROVIDED AS IS, WITHOUT WARRANTY.", False),   # shouted
    ("Too short to count.", False),                                # 4 words
    ("this sentence starts with a lower-case letter.", False),
    ("In 1999, 2000 and 2001 the numbers 12345 grew.", False),     # digits
])
def test_english_filter(sentence: str, keep: bool) -> None:
    assert is_english_sentence(sentence) is keep


def test_pydoc_corpus_is_english_deduplicated_and_never_heldout() -> None:
    corpus = load_corpus(("pydoc",))
    assert corpus.split == "train" and len(corpus) > 500
    assert all(5 <= len(s.split()) <= 40 for s in corpus)
    assert len({s.lower() for s in corpus}) == len(corpus)
    assert not set(corpus) & set(load_sentences("heldout"))
    _load_corpus.cache_clear()
    again = load_corpus(["pydoc"])  # a list is fine; the order is stable across builds
    assert corpus_digest(again) == corpus_digest(corpus)
    with pytest.raises(ValueError, match="unknown corpus source 'wiki'"):
        load_corpus(("wiki",))  # type: ignore[arg-type]


def test_training_sentences_start_with_graphopts_own() -> None:
    sentences = load_training_sentences(("pydoc",))
    own = [*load_sentences("train"), *load_sentences("calibration")]
    assert list(sentences[:len(own)]) == own and len(set(sentences)) == len(sentences)


def test_written_sentences_are_english_training_text_apart_from_the_split() -> None:
    written = load_written_sentences()
    assert written.split == "train" and len(written) > 5000 and len(set(written)) == len(written)
    assert all(is_english_sentence(s) for s in written)
    split_text = {*load_sentences("train"), *load_sentences("calibration"), *load_sentences("heldout")}
    assert not set(written) & split_text
    data = load_training_data(["written"])
    assert list(data) == list(written)


def test_written_sentences_refuse_a_near_copy_of_a_heldout_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    heldout = sorted(load_sentences("heldout"))[0]
    words = heldout.split()
    near_copy = " ".join([*words[:-1], "today" if words[-1] != "today." else "now"]) + "."
    lines = [*load_written_sentences()[:10], near_copy]
    load_written_sentences.cache_clear()
    monkeypatch.setattr(corpus, "_data_lines", lambda name: lines)
    try:
        with pytest.raises(ValueError, match="too close to a held-out sentence"):
            load_written_sentences()
        monkeypatch.setattr(corpus, "_data_lines", lambda name: lines[:10] + lines[:1])
        with pytest.raises(ValueError, match="duplicate lines"):
            load_written_sentences()
        monkeypatch.setattr(corpus, "_data_lines", lambda name: [*lines[:10], heldout])
        with pytest.raises(ValueError, match="repeats sentences.txt"):
            load_written_sentences()
    finally:
        load_written_sentences.cache_clear()


def test_recombined_sentences_are_new_splices_of_graphopts_own() -> None:
    own = _frame_sentences()
    made = recombined_sentences(count=2000, seed=3)
    assert made.split == "train" and len(made) == 2000 and len(set(made)) == 2000
    assert not set(made) & set(own) and not set(made) & set(load_sentences("heldout"))
    starts = {" ".join(s.split()[:2]) for s in own}
    ends = {s.split()[-1] for s in own}
    # Each is the start of one of graphopt's sentences and the end of another.
    assert all(" ".join(s.split()[:2]) in starts and s.split()[-1] in ends for s in made)
    assert recombined_sentences(count=2000, seed=3) == made
    assert recombined_sentences(count=2000, seed=4) != made


def test_training_data_names_combine_without_duplicates() -> None:
    data = load_training_data(["sentences", "recombined"])
    own = [*load_sentences("train"), *load_sentences("calibration")]
    assert list(data[:len(own)]) == own and len(set(data)) == len(data) == len(own) + len(recombined_sentences())
    with pytest.raises(ValueError, match="training data must name some of"):
        load_training_data(["wiki"])


def test_vocabulary_words_are_whole_lower_case_words_in_id_order() -> None:
    vocab = {"[PAD]": 0, "the": 5, "##ing": 6, "cat": 9, "a": 7, "Paris": 8, "42": 10, "runs": 12, "!": 11}
    assert vocabulary_words(vocab) == ["the", "a", "cat", "runs"]
    assert vocabulary_words(vocab, limit=2) == ["the", "a"]


def _content_word(token: str) -> str:
    return "".join(c for c in token if c.isalnum()).lower()


def test_substituted_sentences_swap_content_words_for_vocabulary_words_of_the_same_ending() -> None:
    own = _frame_sentences()
    function_words = ["the", "a", "of", "and", "is", "in", "to", "it"]
    pool = [f"word{n}{suffix}" for n in range(80) for suffix in ("", "ing", "ed", "ly", "s")]
    words = [*function_words, *pool]
    made = substituted_sentences(words, count=500, seed=1, rate=0.3, keep=len(function_words))
    assert made.split == "train" and len(made) == len(set(made)) == 500
    assert not set(made) & set(own) and not set(made) & set(load_sentences("heldout"))
    frames = {}
    for sentence in own:
        frames.setdefault(len(sentence.split()), []).append(sentence.split())

    def explained_by(tokens: list[str], frame: list[str]) -> bool:
        for new, old in zip(tokens, frame):
            if new == old:
                continue
            core, was = _content_word(new), _content_word(old)
            if core not in pool or was in function_words or _suffix_class(core) != _suffix_class(was):
                return False
            if new[0].isupper() != old.lstrip("\"'(")[0].isupper():
                return False
        return True

    # Every sentence is one of graphopt's with some content words swapped, each for a word of
    # the same ending, capitals kept; function words are never swapped.
    assert all(any(explained_by(s.split(), f) for f in frames[len(s.split())]) for s in made)
    assert substituted_sentences(words, count=500, seed=1, rate=0.3, keep=len(function_words)) == made
    assert substituted_sentences(words, count=500, seed=2, rate=0.3, keep=len(function_words)) != made
    with pytest.raises(ValueError, match="needs at least"):
        substituted_sentences(words[:50], keep=len(function_words))


def test_substituted_data_needs_the_tokenizers_vocabulary(tiny_bundle) -> None:
    vocabulary = tokenizer_vocabulary(tiny_bundle.tokenizer)
    assert vocabulary is not None and vocabulary["the"] < vocabulary["piano"]
    data = load_training_data(["substituted"], tiny_bundle.tokenizer)
    assert len(data) == 30000 and not set(data) & set(load_sentences("heldout"))
    assert tokenizer_vocabulary(object()) is None
    with pytest.raises(ValueError, match="needs the tokenizer's vocabulary"):
        load_training_data(["sentences", "substituted"])
