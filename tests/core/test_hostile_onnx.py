"""Hostile and unusual ONNX files: refused with a FormatError naming the file, never a crash.

External data is checked before any byte is read (relative, inside the folder, no
symlink, no hard link, offset and length within the file, size matching the tensor);
subgraph nesting is capped; the first ORT session on a user's file runs in a child
process; the writer never emits a trailing empty optional input.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.errors import ExternalDataError, FormatError
from graphopt.onnx_io import MAX_SUBGRAPH_DEPTH, serialize_model

WEIGHT = np.arange(12, dtype=np.float32).reshape(3, 4)


def matmul_model() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(WEIGHT, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def with_external(folder: Path, location: str, *, offset: int = 0, length: int | None = None) -> Path:
    model = matmul_model()
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entries = {"location": location, "offset": str(offset), "length": str(WEIGHT.nbytes if length is None else length)}
    for key, value in entries.items():
        tensor.external_data.add(key=key, value=value)
    path = folder / "model.onnx"
    onnx.save_model(model, str(path))
    return path


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    model_dir, outside = tmp_path / "model", tmp_path / "outside"
    model_dir.mkdir()
    outside.mkdir()
    (outside / "secret.bin").write_bytes(WEIGHT.tobytes())
    return model_dir, outside


def test_external_data_inside_the_folder_loads(folders: tuple[Path, Path]) -> None:
    model_dir, _ = folders
    (model_dir / "weights.bin").write_bytes(WEIGHT.tobytes())
    program = graphopt.load(with_external(model_dir, "weights.bin"))
    x = program.example_inputs["x"].numpy()
    np.testing.assert_allclose(program.reference_output[0], x @ WEIGHT, rtol=1e-6)


@pytest.mark.parametrize("location", ["../outside/secret.bin", "sub/../../outside/secret.bin"])
def test_dotdot_refused(folders: tuple[Path, Path], location: str) -> None:
    with pytest.raises(ExternalDataError, match="relative paths inside the model's folder"):
        graphopt.load(with_external(folders[0], location))


def test_absolute_refused(folders: tuple[Path, Path]) -> None:
    model_dir, outside = folders
    with pytest.raises(ExternalDataError, match="relative paths inside"):
        graphopt.load(with_external(model_dir, str(outside / "secret.bin")))


def test_symlink_refused(folders: tuple[Path, Path]) -> None:
    model_dir, outside = folders
    os.symlink(outside / "secret.bin", model_dir / "weights.bin")
    with pytest.raises(ExternalDataError, match="symlink"):
        graphopt.load(with_external(model_dir, "weights.bin"))


def test_hard_link_refused(folders: tuple[Path, Path]) -> None:
    model_dir, outside = folders
    os.link(outside / "secret.bin", model_dir / "weights.bin")
    with pytest.raises(ExternalDataError, match="hard link"):
        graphopt.load(with_external(model_dir, "weights.bin"))


@pytest.mark.parametrize("offset, length, message", [
    (40, 48, "exceeds the file"), (0, 1 << 40, "exceeds the file"), (0, 16, "need 48"), (-1, 48, "exceeds")])
def test_offsets_and_sizes_checked(folders: tuple[Path, Path], offset: int, length: int, message: str) -> None:
    model_dir, _ = folders
    (model_dir / "weights.bin").write_bytes(WEIGHT.tobytes())
    with pytest.raises(ExternalDataError, match=message):
        graphopt.load(with_external(model_dir, "weights.bin", offset=offset, length=length))


def deeply_nested(depth: int) -> onnx.ModelProto:
    """If nodes nested ``depth`` deep, built in place (helper.make_node would copy and re-parse)."""
    model = matmul_model()
    current = model.graph
    for _ in range(depth):
        node = current.node.add(op_type="If", input=["c"], output=["y"])
        current = node.attribute.add(name="then_branch", type=onnx.AttributeProto.GRAPH).g
    return model


def test_deep_subgraph_nesting_refused(tmp_path: Path) -> None:
    from graphopt.onnx_io import _subgraph_depth

    assert _subgraph_depth(deeply_nested(MAX_SUBGRAPH_DEPTH + 5).graph) > MAX_SUBGRAPH_DEPTH
    assert _subgraph_depth(deeply_nested(3).graph) == 3  # the innermost body is empty, so unset
    path = tmp_path / "deep.onnx"
    path.write_bytes(deeply_nested(MAX_SUBGRAPH_DEPTH + 5).SerializeToString())
    # protobuf's own parser stops near 33 levels; either refusal is a FormatError naming the file
    with pytest.raises(FormatError, match="deep.onnx"):
        graphopt.load(path)


def layer_norm_with_empty_bias() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("LayerNormalization", ["x", "scale", ""], ["y"], axis=-1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(np.ones(4, np.float32), "scale")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_crashing_model_is_an_error_not_a_crash(tmp_path: Path) -> None:
    """The measured ORT crash: a LayerNormalization with an explicit empty bias."""
    path = tmp_path / "ln.onnx"
    onnx.save_model(layer_norm_with_empty_bias(), str(path))
    try:
        program = graphopt.load(path)
    except FormatError as error:
        assert "ln.onnx" in str(error)
    else:
        assert program.reference_output[0].shape == (2, 4)


def test_model_that_needs_gigabytes_is_refused_not_run(tmp_path: Path) -> None:
    """ConstantOfShape to 2**32 floats (16 GiB), added to the input: the probe child's address-space
    cap makes ONNX Runtime fail to allocate, and graphopt reports it, instead of filling the machine."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [1], [2**32])
    graph = helper.make_graph(
        [helper.make_node("ConstantOfShape", ["shape"], ["big"]), helper.make_node("Add", ["x", "big"], ["y"])],
        "bomb", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2**32])], initializer=[shape])
    path = tmp_path / "bomb.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)
    with pytest.raises(FormatError, match="bomb.onnx: ONNX Runtime cannot run this model"):
        graphopt.load(path)


def test_writer_drops_trailing_empty_inputs() -> None:
    import onnx_ir as ir

    data = serialize_model(ir.from_proto(layer_norm_with_empty_bias()))
    node = onnx.load_from_string(data).graph.node[0]
    assert list(node.input) == ["x", "scale"]


def test_missing_and_truncated_files(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="no such file"):
        graphopt.load(tmp_path / "absent.onnx")
    full = matmul_model().SerializeToString()
    (tmp_path / "cut.onnx").write_bytes(full[: len(full) // 2])
    with pytest.raises(FormatError, match="cut.onnx"):
        graphopt.load(tmp_path / "cut.onnx")
    with pytest.raises(FormatError, match="not a regular file"):
        graphopt.load(tmp_path)


def test_large_models_are_written_with_external_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     tiny_onnx_program) -> None:
    """Over the 2 GiB protobuf limit the writer uses external data (threshold lowered to test it)."""
    monkeypatch.setattr("graphopt.onnx_io.EXTERNAL_DATA_THRESHOLD", 1000)
    executable = graphopt.compile(tiny_onnx_program, backend="onnxruntime")
    path = executable.save(tmp_path / "out")
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert path.stat().st_size < 200_000 < (path.parent / "model.onnx.data").stat().st_size
    got = executable(**tiny_onnx_program.example_inputs)[0]
    np.testing.assert_allclose(got, tiny_onnx_program.reference_output[0], atol=1e-5)
    reloaded = graphopt.load(path)
    assert len(reloaded.ir.graph.initializers) == len(tiny_onnx_program.ir.graph.initializers)


HUGE = 2**28  # 1 GiB of float32 if folded


def _huge_constant_model(op: str) -> onnx.ModelProto:
    """y = x + sum(big), where ``big`` is computed by ``op`` from tiny constants only."""
    init = [numpy_helper.from_array(np.ones(1, np.float32), "one")]
    if op == "Expand":
        init.append(numpy_helper.from_array(np.array([HUGE], np.int64), "dims"))
        make = helper.make_node("Expand", ["one", "dims"], ["big"])
    elif op == "Tile":
        init.append(numpy_helper.from_array(np.array([HUGE], np.int64), "dims"))
        make = helper.make_node("Tile", ["one", "dims"], ["big"])
    elif op == "ConstantOfShape":
        init.append(numpy_helper.from_array(np.array([HUGE], np.int64), "dims"))
        make = helper.make_node("ConstantOfShape", ["dims"], ["big"],
                                value=helper.make_tensor("value", TensorProto.FLOAT, [1], [1.0]))
    elif op == "Range":
        init += [numpy_helper.from_array(np.array(0, np.float32), "start"),
                 numpy_helper.from_array(np.array(HUGE, np.float32), "limit"),
                 numpy_helper.from_array(np.array(1, np.float32), "delta")]
        make = helper.make_node("Range", ["start", "limit", "delta"], ["big"])
    else:  # a broadcast of two inputs under the input-size cap: 8192 x 8192
        init += [numpy_helper.from_array(np.ones((8192, 1), np.float32), "column"),
                 numpy_helper.from_array(np.ones((1, 8192), np.float32), "row")]
        make = helper.make_node(op, ["column", "row"], ["big"])
    graph = helper.make_graph(
        [make, helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0),
         helper.make_node("Add", ["x", "total"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], init)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


@pytest.mark.parametrize("op", ["Expand", "Tile", "ConstantOfShape", "Range", "Mul"])
def test_constant_folding_is_capped(op: str) -> None:
    """The fusions pass's constant folding leaves a node whose result would be huge unfolded,
    without evaluating it: the run stays small and fast (the model is never run here)."""
    import time
    import tracemalloc

    import onnx_ir as ir
    import torch
    from graphopt.passes.ort_fusions import FOLD_OUTPUT_LIMIT

    from graphopt import registry
    from graphopt.program import Program

    program = Program(kind="onnx", ir=ir.from_proto(_huge_constant_model(op)),
                      example_inputs={"x": torch.zeros(2, 4)}, reference_output=(np.zeros((2, 4), np.float32),),
                      output_names=("y",))
    fusions = registry.passes.get("ort-fusions")()
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        result = fusions(program)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 30
    assert peak < 64 << 20, f"constant folding allocated {peak >> 20} MiB"
    graph = result.program.ir.graph
    assert op in [node.op_type for node in graph], "the huge node must stay in the graph, unfolded"
    assert all(v.const_value is None or v.const_value.size <= FOLD_OUTPUT_LIMIT
               for v in graph.initializers.values())
