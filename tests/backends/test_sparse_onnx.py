"""Sparse initializers in the onnxruntime writer: smaller file, checker-valid, stock ORT output unchanged, load densifies."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import graphopt
from graphopt.errors import FormatError
from graphopt.onnx_io import sparsify_initializers
from graphopt.program import Program
from graphopt.recipe import Recipe


@pytest.fixture(scope="module")
def compressed(tiny_bundle, tmp_path_factory) -> graphopt.CompressResult:
    """The tiny encoder pruned to 90% (once, no training), exported and written with sparse
    initializers by ``compress``: the one export of this file."""
    recipe = Recipe.from_dict({"pipeline": [{"pass": "prune", "sparsity": 0.9, "evaluate": False}, {"pass": "export"}],
                               "backend": [{"name": "onnxruntime", "sparse_initializers": True}]})
    return graphopt.compress(tiny_bundle, recipe, out=tmp_path_factory.mktemp("sparse") / "out")


@pytest.fixture
def pruned_onnx(compressed: graphopt.CompressResult) -> Program:
    return compressed.program


def test_compress_writes_the_sparse_file_and_says_ort_densifies_it(compressed: graphopt.CompressResult) -> None:
    notes = compressed.report["backend_notes"]["onnxruntime"]["sparse_initializers"]
    assert notes["count"] == 12 and "densifies" in notes["note"]
    assert "densifies" in (compressed.out / "report.md").read_text()
    assert compressed.report["final_check"]["onnxruntime"]["mean_cosine"] > 0.5
    pruned = compressed.program.history[0]
    assert pruned.name == "prune" and pruned.notes["overall_sparsity"] == pytest.approx(0.9, abs=1e-3)
    written = onnx.load(str(compressed.out / "model.onnx"))
    assert len(_sparse_tensors(written)) == 12


def _stock_session(model_bytes: bytes) -> ort.InferenceSession:
    return ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])


def _sparse_tensors(proto: onnx.ModelProto) -> list[onnx.SparseTensorProto]:
    constants = [a.sparse_tensor for n in proto.graph.node if n.op_type == "Constant"
                 for a in n.attribute if a.name == "sparse_value"]
    return [*proto.graph.sparse_initializer, *constants]


def _check(proto: onnx.ModelProto, form: str) -> None:
    """The structural checker always (it rejects int32 indices, unsorted or out-of-range ones).
    The full check (strict shape inference) passes for Constant nodes; ONNX types a
    sparse_initializer as sparse_tensor, which MatMul refuses, so that form cannot pass it."""
    onnx.checker.check_model(proto)
    if form == "constant":
        onnx.checker.check_model(proto, full_check=True)


@pytest.mark.parametrize("form", ["constant", "initializer"])
def test_pruned_weights_become_int64_sparse_tensors_and_the_file_shrinks(pruned_onnx: Program, form: str) -> None:
    dense = graphopt.compile(pruned_onnx, backend="onnxruntime")
    sparse = graphopt.compile(pruned_onnx, backend="onnxruntime", sparse_initializers=True, sparse_form=form)
    tensors = _sparse_tensors(sparse.proto)
    # 12 Linear weights (64×64 and 64×128, transposed and renamed by the exporter); nothing else
    # is 90% zeros with >= 4096 elements (embeddings, biases, norms stay dense).
    assert len(tensors) == 12 and (len(sparse.proto.graph.sparse_initializer) == 12) == (form == "initializer")
    shapes = sorted(tuple(s.dims) for s in tensors)
    assert shapes == sorted([(64, 64)] * 8 + [(64, 128)] * 2 + [(128, 64)] * 2)
    for s in tensors:
        assert s.indices.data_type == onnx.TensorProto.INT64 and list(s.indices.dims) == list(s.values.dims)
        assert s.values.dims[0] == round(0.1 * np.prod(s.dims))
    names = {t.name for t in sparse.proto.graph.initializer}
    assert not names & {s.values.name for s in tensors}
    _check(sparse.proto, form)
    meta = {p.key: p.value for p in sparse.proto.metadata_props}
    assert "densifies" in meta["graphopt.sparse_initializers"]
    notes = sparse.notes["sparse_initializers"]
    assert notes["count"] == 12 and notes["sparse_bytes"] < 0.31 * notes["dense_bytes"] and "densifies" in notes["note"]
    # The file shrinks by what the weights saved (the tiny model is mostly embeddings, kept dense).
    saved = notes["dense_bytes"] - notes["sparse_bytes"]
    assert len(dense.model_bytes) - len(sparse.model_bytes) >= saved - 2000
    assert not _sparse_tensors(dense.proto) and not dense.notes


@pytest.mark.parametrize("form", ["constant", "initializer"])
def test_stock_onnxruntime_loads_it_and_matches_the_dense_model(pruned_onnx: Program, form: str) -> None:
    dense = graphopt.compile(pruned_onnx, backend="onnxruntime")
    sparse = graphopt.compile(pruned_onnx, backend="onnxruntime", sparse_initializers=True, sparse_form=form)
    feeds = {k: v.numpy() for k, v in pruned_onnx.example_inputs.items()}
    got = _stock_session(sparse.model_bytes).run(None, feeds)
    want = _stock_session(dense.model_bytes).run(None, feeds)
    np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(sparse(**pruned_onnx.example_inputs)[0], pruned_onnx.run()[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("form", ["constant", "initializer"])
def test_graphopt_load_densifies_without_losing_weights(pruned_onnx: Program, tmp_path, form: str) -> None:
    dense = graphopt.compile(pruned_onnx, backend="onnxruntime")
    executable = graphopt.compile(pruned_onnx, backend="onnxruntime", sparse_initializers=True, sparse_form=form)
    loaded = graphopt.load(executable.save(tmp_path / "out"))
    weights = {name: v.const_value.numpy() for name, v in loaded.ir.graph.initializers.items()}
    weights.update({n.outputs[0].name: n.attributes["value"].value.numpy() for n in loaded.ir.graph
                    if n.op_type == "Constant" and "value" in n.attributes})
    for tensor in dense.proto.graph.initializer:
        np.testing.assert_array_equal(weights[tensor.name], numpy_helper.to_array(tensor), err_msg=tensor.name)
    assert sum(w.size >= 4096 and float((w == 0).mean()) >= 0.89 for w in weights.values()) == 12
    np.testing.assert_allclose(loaded.reference_output[0], dense(**loaded.example_inputs)[0], rtol=0, atol=1e-6)


def test_load_refuses_sparse_indices_out_of_range(tmp_path) -> None:
    proto = _model(_pruned((128, 64), 0.9))
    sparsify_initializers(proto, form="initializer")
    proto.graph.sparse_initializer[0].indices.CopyFrom(numpy_helper.from_array(
        np.full(819, 10**9, np.int64), "W.indices"))
    onnx.save(proto, tmp_path / "bad.onnx")
    with pytest.raises(FormatError, match="do not fit"):
        graphopt.load(tmp_path / "bad.onnx")


def _model(weight: np.ndarray, *, int8: bool = False) -> onnx.ModelProto:
    """x [2, in] @ W [in, out], with W float, or int8 behind a DequantizeLinear."""
    nodes, inits = [], [numpy_helper.from_array(weight, "W")]
    if int8:
        inits.append(numpy_helper.from_array(np.float32(0.01), "scale"))
        nodes.append(helper.make_node("DequantizeLinear", ["W", "scale"], ["Wf"]))
    nodes.append(helper.make_node("MatMul", ["x", "Wf" if int8 else "W"], ["y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, weight.shape[0]])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, weight.shape[1]])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _pruned(shape: tuple[int, int], zero_fraction: float, dtype=np.float32) -> np.ndarray:
    rng = np.random.default_rng(0)
    w = rng.integers(1, 100, size=shape).astype(dtype) if dtype == np.int8 else rng.standard_normal(shape).astype(dtype)
    w.reshape(-1)[rng.permutation(w.size)[: round(zero_fraction * w.size)]] = 0
    return w


@pytest.mark.parametrize("zero_fraction,size,sparse", [(0.9, (128, 64), True), (0.5, (128, 64), False),
                                                       (0.9, (32, 64), False), (0.0, (128, 64), False)])
def test_the_rule_sparse_only_where_mostly_zero_large_and_smaller(zero_fraction, size, sparse) -> None:
    proto = _model(_pruned(size, zero_fraction))
    rows = sparsify_initializers(proto)
    assert bool(rows) == sparse and len(_sparse_tensors(proto)) == int(sparse)
    assert len(proto.graph.initializer) == int(not sparse)


@pytest.mark.parametrize("form", ["constant", "initializer"])
def test_int8_weights_are_encoded_too_and_run_in_stock_ort(form: str) -> None:
    weight = _pruned((256, 64), 0.95, np.int8)
    dense, sparse = _model(weight, int8=True), _model(weight, int8=True)
    assert [r["name"] for r in sparsify_initializers(sparse, form=form)] == ["W"]
    _check(sparse, form)
    x = {"x": np.random.default_rng(1).standard_normal((2, 256)).astype(np.float32)}
    got = _stock_session(sparse.SerializeToString()).run(None, x)[0]
    np.testing.assert_array_equal(got, _stock_session(dense.SerializeToString()).run(None, x)[0])
