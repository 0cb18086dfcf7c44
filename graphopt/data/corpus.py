"""A larger English training corpus that needs no download: text that ships with Python and the OS.

Sources (each optional, in this order):

- ``"pydoc"``: the Python Language Reference topics that ship in the standard library as
  ``pydoc_data.topics`` (the text ``help("FOR")`` shows), about 0.5 MB of English prose.
- ``"docstrings"``: docstrings of the standard library's own modules, classes and functions,
  read with ``ast`` from the ``.py`` sources (never imported: ``antigravity`` would open a
  browser), tests excluded, about 1.8 MB.
  Both are © Python Software Foundation, under the PSF License Agreement (and the Zero-Clause
  BSD licence for the documentation), which allows use and redistribution.
- ``"licenses"``: the licence texts the OS ships in ``/usr/share/common-licenses`` (Debian and
  Ubuntu), whose own terms allow verbatim copying. Absent elsewhere: then this source is empty.

Text is split into sentences (a full stop, question or exclamation mark followed by a space
and a capital), and a sentence is kept only if it reads as plain English: 5 to 40 words,
starting with a capital and ending with ``.``, ``?`` or ``!``, no code characters
(``()[]{}<>=_*#@$%|\\/`` and backticks), few digits, not shouted in capitals, and mostly
lower-case alphabetic words. Sentences are de-duplicated (case and spacing folded), kept in
source order (stable for a given Python and OS), and graphopt's held-out sentences are
removed, then refused by ``assert_not_heldout``. The text is stable for one Python version
and OS image; across versions it differs, so record the corpus size and digest
(`corpus_digest`) with any result.

Beside the corpus, training text of graphopt's own (`load_training_data` names them all):
the train and calibration splits of ``sentences.txt``, the training-only sentences of
``written.txt`` (`load_written_sentences`), and sentences made from both
(`recombined_sentences`, `substituted_sentences`). For plain-English targets these matter
more than the corpus, which is mostly Python documentation (see recipes/distill-3layer.toml).

Example::

    sentences = load_corpus()            # tens of thousands of sentences, split "train"
    sentences = load_corpus(("pydoc",))  # fast: one import, no file walk
"""

from __future__ import annotations

import ast
import functools
import hashlib
import logging
import random
import re
import sysconfig
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Literal

from graphopt.data import SentenceSplit, _all_sentences, _data_lines, _heldout_set, assert_not_heldout, load_sentences

__all__ = [
    "SOURCES",
    "Source",
    "corpus_digest",
    "is_english_sentence",
    "load_corpus",
    "load_training_data",
    "load_training_sentences",
    "load_written_sentences",
    "recombined_sentences",
    "split_sentences",
    "substituted_sentences",
    "tokenizer_vocabulary",
    "vocabulary_words",
]

logger = logging.getLogger(__name__)

Source = Literal["pydoc", "docstrings", "licenses"]
SOURCES: tuple[Source, ...] = ("pydoc", "docstrings", "licenses")

_LICENSES = Path("/usr/share/common-licenses")
# Sentence end: . ? or ! (optionally closed by a quote or bracket), space, then a capital.
_SPLIT = re.compile(r"(?<=[.?!])[\"')\]]?\s+(?=[\"']?[A-Z])")
_CODE = re.compile(r"[()\[\]{}<>=_*#@$%|\\/`~^]|\.\w|\w\.\w|::|>>>|\.\.\.")
_WORD = re.compile(r"^[\"'“‘]?[A-Za-z][a-z]*(?:['’-][a-z]+)*[\"'”’]?[,;:.?!]?[\"'”’)]?$")
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3", "turtledemo"}


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` with whitespace folded, one paragraph at a time."""
    sentences = []
    for paragraph in re.split(r"\n\s*\n", text):
        flat = " ".join(paragraph.split())
        sentences += [s.strip() for s in _SPLIT.split(flat) if s.strip()]
    return sentences


def is_english_sentence(sentence: str, min_words: int = 5, max_words: int = 40) -> bool:
    """Whether ``sentence`` reads as a plain English sentence (see the module docstring)."""
    words = sentence.split()
    if not min_words <= len(words) <= max_words:
        return False
    if not (sentence[0].isupper() and sentence[-1] in ".?!") or _CODE.search(sentence):
        return False
    letters = [c for c in sentence if c.isalpha()]
    if sum(c.isupper() for c in letters) > 0.15 * len(letters) or sum(c.isdigit() for c in sentence) > 4:
        return False
    plain = sum(1 for w in words if _WORD.match(w))
    return plain >= 0.9 * len(words)


def _pydoc_texts() -> Iterator[str]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]


def _docstring_texts() -> Iterator[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if _SKIP_DIRS.intersection(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    yield doc


def _license_texts() -> Iterator[str]:
    if not _LICENSES.is_dir():
        logger.info("no %s on this system: the 'licenses' source is empty", _LICENSES)
        return
    for path in sorted(_LICENSES.iterdir()):
        if path.is_file() and not path.is_symlink():
            yield path.read_text(encoding="utf-8", errors="replace")


_READERS = {"pydoc": _pydoc_texts, "docstrings": _docstring_texts, "licenses": _license_texts}


def _unique_english(texts: Iterable[str], min_words: int, max_words: int, seen: set[str]) -> Iterator[str]:
    heldout = _heldout_set()
    for text in texts:
        for sentence in split_sentences(text):
            key = " ".join(sentence.lower().split())
            if key in seen or sentence in heldout or not is_english_sentence(sentence, min_words, max_words):
                continue
            seen.add(key)
            yield sentence


def load_corpus(sources: Sequence[Source] = SOURCES, min_words: int = 5, max_words: int = 40) -> SentenceSplit:
    """English sentences from text shipped with Python and the OS, never held-out ones.

    Args:
        sources: which of `SOURCES` to read, in order.
        min_words, max_words: sentence length bounds, in words.

    Returns:
        a ``SentenceSplit`` of split ``"train"``, in source order, de-duplicated.

    Raises:
        ValueError: an unknown source.
    """
    for source in sources:
        if source not in _READERS:
            raise ValueError(f"unknown corpus source {source!r}; choose from {SOURCES}")
    return _load_corpus(tuple(sources), min_words, max_words)


@functools.lru_cache(maxsize=8)
def _load_corpus(sources: tuple[Source, ...], min_words: int, max_words: int) -> SentenceSplit:
    """`load_corpus`, cached per process (reading the docstrings parses the whole stdlib)."""
    seen: set[str] = set()
    sentences = [s for source in sources for s in _unique_english(_READERS[source](), min_words, max_words, seen)]
    assert_not_heldout(sentences, consumer="load_corpus")
    logger.info("corpus: %d sentences from %s", len(sentences), ", ".join(sources))
    return SentenceSplit(sentences, "train")


def _own_sentences() -> list[str]:
    """graphopt's train and calibration sentences, in file order."""
    return [*load_sentences("train"), *load_sentences("calibration")]


#: A written sentence may share less than this fraction of its words (Jaccard, lower case)
#: with any held-out sentence: a near-paraphrase of one would leak it into training.
_MAX_HELDOUT_OVERLAP = 0.4
_WORDS = re.compile(r"[a-z']+")


def _word_set(sentence: str) -> frozenset[str]:
    return frozenset(_WORDS.findall(sentence.lower()))


@functools.lru_cache(maxsize=1)
def load_written_sentences() -> SentenceSplit:
    """About 9,000 plain-English sentences written for graphopt as training text only
    (``graphopt/data/written.txt``), in file order.

    Everyday, science, history, work, health and hobby topics in many sentence shapes
    (statements, questions, instructions, first-person narratives): the register of graphopt's
    held-out sentences, which the shipped corpus (mostly Python documentation) lacks. They are
    not part of the calibration/train/held-out split of ``sentences.txt``: none is a line of
    it, and none shares 40% or more of its words with a held-out sentence (checked here on
    every load, so an edit to either file cannot leak held-out text into training).

    Raises:
        ValueError: a duplicate line, a line of ``sentences.txt``, or a near-copy of a held-out
            sentence.
    """
    written = [line.strip() for line in _data_lines("written.txt")]
    if len(set(written)) != len(written):
        raise ValueError("graphopt/data/written.txt has duplicate lines; remove them")
    shared = set(written) & set(_all_sentences())
    if shared:
        raise ValueError(f"graphopt/data/written.txt repeats sentences.txt: {sorted(shared)[:3]}")
    heldout = [_word_set(h) for h in _heldout_set()]
    for sentence in written:
        words = _word_set(sentence)
        if any(len(words & h) >= _MAX_HELDOUT_OVERLAP * len(words | h) for h in heldout):
            raise ValueError(f"graphopt/data/written.txt: {sentence!r} is too close to a held-out sentence")
    return SentenceSplit(written, "train")


def _frame_sentences() -> list[str]:
    """The sentences new ones are made from: graphopt's own (`_own_sentences`), then the written ones."""
    return [*_own_sentences(), *load_written_sentences()]


def load_training_sentences(sources: Sequence[Source] = SOURCES) -> SentenceSplit:
    """graphopt's own train and calibration sentences, then `load_corpus` (duplicates dropped)."""
    own = _own_sentences()
    seen = set(own)
    return SentenceSplit([*own, *(s for s in load_corpus(tuple(sources)) if s not in seen)], "train")


def corpus_digest(sentences: Sequence[str]) -> str:
    """sha256 (first 16 hex digits) of the sentences, one per line: records which text was used."""
    return hashlib.sha256("\n".join(sentences).encode("utf-8")).hexdigest()[:16]


def recombined_sentences(count: int = 30000, seed: int = 0) -> SentenceSplit:
    """New sentences spliced from graphopt's train, calibration and written sentences
    (`load_written_sentences`).

    Each one is the start of one sentence (2 or more words) followed by the end of another
    (1 or more words), cut at word boundaries with a seeded generator: the same everyday and
    science vocabulary and sentence shapes as graphopt's own text, in combinations the
    ~9,350 originals do not have. Distillation needs that text: trained on the shipped corpus
    (mostly Python documentation) a student matches its teacher there and less well on
    plain English. Duplicates, originals and held-out sentences are never returned.
    """
    own = _frame_sentences()
    words = [s.split() for s in own if len(s.split()) >= 4]

    def splice(rng: random.Random) -> str:
        a, b = rng.sample(words, 2)
        return " ".join([*a[: rng.randint(2, len(a) - 2)], *b[rng.randint(1, len(b) - 2):]])

    return _new_sentences(splice, own, count, seed, "recombined_sentences")


def _new_sentences(make: Callable[[random.Random], str], own: Sequence[str], count: int, seed: int,
                   consumer: str) -> SentenceSplit:
    """Up to ``count`` distinct sentences from ``make(rng)`` (seeded), none of them in ``own``
    and none held-out (refused again by `assert_not_heldout`)."""
    heldout, seen = _heldout_set(), set(own)
    rng = random.Random(seed)
    out: list[str] = []
    for _ in range(count * 20):
        if len(out) == count:
            break
        sentence = make(rng)
        if sentence not in seen and sentence not in heldout:
            seen.add(sentence)
            out.append(sentence)
    assert_not_heldout(out, consumer=consumer)
    return SentenceSplit(out, "train")


#: Word endings that mark a word's likely role (verb forms, adverbs, plurals); a word is
#: replaced only by one with the same ending, which keeps most sentences grammatical.
_SUFFIXES = ("ing", "ed", "ly", "s")
# A word with its quotes and punctuation; only punctuation may follow it ("café" is no "caf").
_WORD_IN_TEXT = re.compile(r"^([\"'(]*)([A-Za-z]+)(\W*)$")


def _suffix_class(word: str) -> str:
    return next((suffix for suffix in _SUFFIXES if word.endswith(suffix)), "")


def vocabulary_words(vocabulary: Mapping[str, int], limit: int = 10000) -> list[str]:
    """The first ``limit`` whole lower-case words of a tokenizer's vocabulary, in id order.

    WordPiece and BPE vocabularies list their tokens roughly by corpus frequency, so these are
    the tokenizer's most common English words; sub-word pieces (``##ing``), punctuation and
    numbers are left out.
    """
    ordered = sorted(vocabulary.items(), key=lambda item: item[1])
    return [token for token, _ in ordered if re.fullmatch(r"[a-z]{2,}|a|i", token)][:limit]


def substituted_sentences(words: Sequence[str], count: int = 30000, seed: int = 0, rate: float = 0.3,
                          keep: int = 200) -> SentenceSplit:
    """New sentences made from graphopt's train, calibration and written sentences by swapping words.

    Each content word (one not among the ``keep`` most common of ``words``, which are the
    function words) is replaced with probability ``rate`` by a random word of ``words`` with
    the same ending (``-ing``, ``-ed``, ``-ly``, ``-s`` or none), keeping its capital and
    punctuation. The sentence frames stay graphopt's plain English; the vocabulary becomes the
    tokenizer's (`vocabulary_words`). Distillation on it measured 0.9088 held-out mean cosine
    (500 steps) against 0.9015 on graphopt's sentences and `recombined_sentences` alone (swapping
    at rate 0.15: 0.9070; swapping in spliced sentences too: 0.9086).
    Originals, duplicates and held-out sentences are never returned.

    Raises:
        ValueError: fewer than ``keep`` + 100 words, or a rate outside (0, 1].
    """
    if len(words) < keep + 100 or not 0 < rate <= 1:
        raise ValueError(f"substituted_sentences needs at least {keep + 100} words (got {len(words)}) "
                         f"and a rate in (0, 1] (got {rate})")
    own = _frame_sentences()
    function_words = set(words[:keep])
    pools: dict[str, list[str]] = {suffix: [] for suffix in (*_SUFFIXES, "")}
    for word in words[keep:]:
        pools[_suffix_class(word)].append(word)

    def swap(rng: random.Random) -> str:
        swapped = []
        for text in rng.choice(own).split():
            match = _WORD_IN_TEXT.match(text)
            if match and match[2].lower() not in function_words and rng.random() < rate:
                word = rng.choice(pools[_suffix_class(match[2].lower())] or pools[""])
                text = match[1] + (word.capitalize() if match[2][0].isupper() else word) + match[3]
            swapped.append(text)
        return " ".join(swapped)

    return _new_sentences(swap, own, count, seed, "substituted_sentences")


#: Training-data names beside the corpus sources.
OWN_DATA = ("sentences", "written", "recombined", "substituted")


def tokenizer_vocabulary(tokenizer: object) -> Mapping[str, int] | None:
    """A tokenizer's token → id map: graphopt's ``vocabulary()`` or HF's ``get_vocab()``; else None."""
    for name in ("vocabulary", "get_vocab"):
        method = getattr(tokenizer, name, None)
        if callable(method):
            return method()
    return None


def load_training_data(names: Sequence[str], tokenizer: object = None) -> SentenceSplit:
    """The training text a recipe names: ``"sentences"`` (graphopt's train and calibration splits),
    ``"written"`` (`load_written_sentences`), corpus sources, ``"recombined"`` (`recombined_sentences`) and ``"substituted"``
    (`substituted_sentences` over the words of the ``tokenizer``'s vocabulary), in that order,
    duplicates dropped; never held-out sentences.

    Raises:
        ValueError: an unknown name, no name, or ``"substituted"`` without a tokenizer vocabulary.
    """
    unknown = [n for n in names if n not in OWN_DATA and n not in SOURCES]
    if unknown or not names:
        raise ValueError(f"training data must name some of {[*OWN_DATA, *SOURCES]}, got {list(names)}")
    words: list[str] = []
    if "substituted" in names:
        vocabulary = tokenizer_vocabulary(tokenizer)
        if not vocabulary:
            raise ValueError("training data 'substituted' swaps in the tokenizer's words: it needs the "
                             "tokenizer's vocabulary (a model whose tokenizer has none cannot use it)")
        words = vocabulary_words(vocabulary)
    sources = tuple(n for n in names if n not in OWN_DATA)
    parts: list[Sequence[str]] = []
    if "sentences" in names:
        parts.append(load_training_sentences(sources))  # type: ignore[arg-type]
    elif sources:
        parts.append(load_corpus(sources))  # type: ignore[arg-type]
    if "written" in names:
        parts.append(load_written_sentences())
    if "recombined" in names:
        parts.append(recombined_sentences())
    if words:
        parts.append(substituted_sentences(words))
    seen: set[str] = set()
    merged = [s for part in parts for s in part if not (s in seen or seen.add(s))]
    return SentenceSplit(merged, "train")
