"""Replays the fixed corpus of hostile files: each must be refused or handled, never crash or run a payload.

Files are named for what they reproduce; a case the fuzzer finds becomes a file here.
"""

from __future__ import annotations

from pathlib import Path


from graphopt.fuzzing import run_cases

CORPUS = Path(__file__).with_name("corpus")
TARGET_BY_SUFFIX = {".onnx": "onnx", ".pt2": "pt2", ".toml": "recipe"}
PAYLOAD_MARKER = Path("/tmp/graphopt-fuzz-payload-ran")  # baked into pickled_weight_payload.pt2


def test_corpus_is_refused_cleanly() -> None:
    PAYLOAD_MARKER.unlink(missing_ok=True)
    files = sorted(CORPUS.iterdir())
    assert len(files) >= 6
    outcomes = list(run_cases([(TARGET_BY_SUFFIX[f.suffix], f.read_bytes()) for f in files], timeout=120))
    bad = [(f.name, o.verdict, o.detail) for f, o in zip(files, outcomes) if o.failed]
    assert not bad, bad
    assert not PAYLOAD_MARKER.exists(), "a payload ran"
    by_name = {f.name: o for f, o in zip(files, outcomes)}
    assert by_name["pickled_weight_payload.pt2"].verdict == "refused"
    assert "posix.system" in by_name["pickled_weight_payload.pt2"].detail
    assert by_name["huge_input_dim.onnx"].verdict == "refused"
    assert by_name["zero_dim_between_huge_dims.onnx"].verdict == "refused"  # fuzz campaign, seed 3, case 2524
