"""``graphopt inspect`` on a known file, and ``graphopt bench --json``'s schema and habits."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import bench
from graphopt.bench import BenchSettings, bench_files
from graphopt.cli import main
from graphopt.inspect import inspect_onnx

PASSES = [{"name": "export", "options": {"opset": 21}}, {"name": "ort-fusions", "options": {"attention": True}}]


@pytest.fixture(scope="module")
def known_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Embedding lookup, MatMul + bias, Gelu (com.microsoft): ops, weights and axes known exactly."""
    inits = [numpy_helper.from_array(np.ones((100, 8), np.float32), "table"),       # 3200 bytes
             numpy_helper.from_array(np.ones((8, 4), np.float32), "weight"),        # 128 bytes
             numpy_helper.from_array(np.zeros(4, np.float16), "bias")]              # 8 bytes
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["embedded"]),
             helper.make_node("MatMul", ["embedded", "weight"], ["projected"]),
             helper.make_node("Cast", ["bias"], ["bias32"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["projected", "bias32"], ["biased"]),
             helper.make_node("Gelu", ["biased"], ["output"], domain="com.microsoft")]
    graph = helper.make_graph(nodes, "known", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", "sequence", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                              producer_name="graphopt", producer_version="0.1.0")
    for key, value in {"graphopt.version": "0.1.0", "graphopt.recipe": "fp32", "graphopt.passes": json.dumps(PASSES),
                       "graphopt.drift": json.dumps({"max_abs": 1e-6}), "author": "tests"}.items():
        model.metadata_props.add(key=key, value=value)
    path = tmp_path_factory.mktemp("known") / "model.onnx"
    onnx.save(model, str(path))
    return path


def test_inspect_a_known_file(known_file: Path) -> None:
    info = inspect_onnx(known_file)
    assert info["ops"] == {"Gather": 1, "MatMul": 1, "Cast": 1, "Add": 1, "com.microsoft::Gelu": 1}
    assert info["nodes"] == 5 and info["opsets"] == {"ai.onnx": 21, "com.microsoft": 1}
    assert info["parameters"] == {"tensors": 3, "bytes": 3336, "by_dtype": {
        "float": {"tensors": 2, "elements": 832, "bytes": 3328}, "float16": {"tensors": 1, "elements": 4, "bytes": 8}}}
    assert info["inputs"] == [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"],
                               "dynamic_axes": {"0": "batch", "1": "sequence"}}]
    assert info["outputs"][0]["shape"] == ["batch", "sequence", 4]
    assert info["graphopt"] == {"version": "0.1.0", "recipe": "fp32", "passes": PASSES, "drift": {"max_abs": 1e-6}}
    assert info["metadata"] == {"author": "tests"} and info["producer"] == "graphopt 0.1.0"
    assert info["file_bytes"] == known_file.stat().st_size


def test_inspect_cli(known_file: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", str(known_file), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(inspect_onnx(known_file)))
    assert main(["inspect", str(known_file)]) == 0
    text = capsys.readouterr().out
    assert "com.microsoft::Gelu" in text and "dynamic: 0=batch, 1=sequence" in text and "ort-fusions" in text
    assert main(["inspect", str(known_file.parent / "missing.onnx")]) == 2


def test_bench_json_schema(known_file: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", str(known_file), str(known_file), "--batch", "1", "2", "--sequence", "8",
                 "--threads", "1", "--warmup", "1", "--rounds", "5", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["graphopt_bench"] == bench.BENCH_SCHEMA
    assert result["settings"] == {"batch_sizes": [1, 2], "sequence_lengths": [8], "threads": 1, "warmup": 1,
                                  "rounds": 5, "spinning": False, "optimization": "all"}
    assert {"cpu", "cores", "platform", "load_average_1m"} <= set(result["machine"])
    assert {"graphopt", "onnxruntime", "torch", "onnxscript"} <= set(result["versions"])
    assert [(r["batch"], r["sequence"]) for r in result["results"]] == [(1, 8), (2, 8)] * 2
    for row in result["results"]:
        assert set(row) == {"file", "batch", "sequence", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "samples",
                            "sequences_per_s", "tokens_per_s", "session_load_s"}
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"] and row["samples"] == 5
        assert row["sequences_per_s"] == pytest.approx(row["batch"] / row["p50_ms"] * 1e3)
    assert main(["bench", str(known_file), "--batch", "0"]) == 2  # a bad setting is a user error


def test_bench_prints_machine_versions_and_settings(known_file: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", str(known_file), "-b", "1", "-s", "4", "-t", "1", "--warmup", "0", "--rounds", "2"]) == 0
    text = capsys.readouterr().out
    assert "machine:" in text and "onnxruntime" in text and "threads 1, spinning off" in text and "p50 ms" in text


def test_bench_holds_one_session_at_a_time(known_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    live: list[weakref.ref] = []
    peak = []
    real = bench.create_session

    def counting(*args, **kwargs):  # an InferenceSession is freed by refcount when dropped
        peak.append(sum(1 for ref in live if ref() is not None))
        session = real(*args, **kwargs)
        live.append(weakref.ref(session))
        return session

    monkeypatch.setattr(bench, "create_session", counting)
    bench_files([known_file] * 3, BenchSettings(batch_sizes=(1,), sequence_lengths=(4,), threads=1, warmup=0, rounds=1))
    assert peak == [0, 0, 0]


def test_bench_settings_are_checked() -> None:
    for bad in ({"batch_sizes": ()}, {"sequence_lengths": (0,)}, {"threads": 0}, {"rounds": 0}):
        with pytest.raises(ValueError):
            BenchSettings(**bad)
