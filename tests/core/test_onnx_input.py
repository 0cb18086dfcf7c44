"""ONNX files graphopt did not export go through ``compress``: the onnx-kind passes run on them."""

from __future__ import annotations

import importlib
import json
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import graphopt
from graphopt import registry
from graphopt.bundle import ModelBundle
from graphopt.cli import main
from graphopt.errors import ExternalDataError, PreconditionError, RecipeError
from graphopt.onnx_runtime import run_onnx_model
from graphopt.recipe import Recipe
from graphopt.testing import op_types
from graphopt.trace import synthesize_inputs

MS = "com.microsoft::"


@pytest.fixture(scope="module")
def torchscript_file(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: ModelBundle) -> Path:
    """The tiny encoder from the TorchScript exporter (``dynamo=False``), dynamic axes named."""
    path = tmp_path_factory.mktemp("torchscript") / "encoder.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(tiny_bundle.module.eval(), (), str(path), kwargs=dict(tiny_bundle.example_inputs),
                          dynamo=False, opset_version=17, input_names=list(tiny_bundle.example_inputs),
                          output_names=["embedding"],
                          dynamic_axes={k: {0: "batch", 1: "sequence"} for k in tiny_bundle.example_inputs})
    return path


def _check_against_file(result: graphopt.CompressResult, source: Path) -> None:
    """The artifact computes what the input file computes, at a batch and length not seen before."""
    program = graphopt.load(source)
    inputs = synthesize_inputs(program.ir, batch=3, sequence=24)
    inputs["attention_mask"][0, 10:] = 0
    got = result.executables["onnxruntime"](**inputs)[0]
    np.testing.assert_allclose(got, run_onnx_model(program.ir, inputs)[0], rtol=0, atol=1e-5)


def test_torchscript_export_through_compress(torchscript_file: Path, tmp_path: Path) -> None:
    original = torchscript_file.read_bytes()
    result = graphopt.compress(torchscript_file, "fp32", out=tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [p["name"] for p in report["passes"]] == ["ort-fusions"]  # the leading export is skipped
    assert report["trace"]["path"] == "onnx" and report["source"] == str(torchscript_file)
    ops = op_types(result.program)
    assert ops[f"{MS}SkipLayerNormalization"] >= 3 and ops[f"{MS}BiasGelu"] == 2
    assert report["passes"][0]["nodes_after"] < report["passes"][0]["nodes_before"]
    assert report["final_check"]["onnxruntime"]["max_abs"] < 1e-5
    _check_against_file(result, torchscript_file)
    assert torchscript_file.read_bytes() == original  # input files are never modified


def test_file_fused_by_ort_transformer_optimizer(torchscript_file: Path, tmp_path: Path) -> None:
    from onnxruntime.transformers.optimizer import optimize_model

    fused = tmp_path / "ort_fused.onnx"
    optimize_model(str(torchscript_file), model_type="bert", num_heads=4, hidden_size=64).save_model_to_file(str(fused))
    assert any(n.domain == "com.microsoft" for n in onnx.load(str(fused)).graph.node)
    result = graphopt.compress(fused, "fp32", out=tmp_path / "out")
    assert op_types(result.program)[f"{MS}BiasGelu"] == 2  # ORT's fusions survive ours
    assert result.report["final_check"]["onnxruntime"]["max_abs"] < 1e-5
    _check_against_file(result, fused)


def test_cli_compress_on_an_onnx_file(torchscript_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["compress", "--model", str(torchscript_file), "--recipe", "fp32", "-o", str(tmp_path / "o"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["passes"][0]["name"] == "ort-fusions"


MODULE_PASS_PLUGIN = '''
import dataclasses
from graphopt.pass_base import Pass, PassResult


class NoOpModulePass(Pass):
    """A module-side pass (as a pruning or QAT pass would be)."""

    name = "test-module-noop"
    kind_in = kind_out = "module"

    def call(self, program):
        return PassResult(program, False)
'''


@pytest.fixture
def module_pass(tmp_path: Path):
    """Registers a module-side pass through the entry-point group, as a plugin would."""
    (tmp_path / "graphopt_test_module_pass.py").write_text(MODULE_PASS_PLUGIN)
    dist = tmp_path / "graphopt_test_module_pass-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: graphopt-test-module-pass\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent(
        "[graphopt.passes]\ntest-module-noop = graphopt_test_module_pass:NoOpModulePass\n"))
    sys.path.insert(0, str(tmp_path))
    importlib.invalidate_caches()
    registry.reload()
    yield
    sys.path.remove(str(tmp_path))
    sys.modules.pop("graphopt_test_module_pass", None)
    importlib.invalidate_caches()
    registry.reload()


def test_module_side_pass_on_an_onnx_file_is_refused(module_pass: None, torchscript_file: Path, tmp_path: Path) -> None:
    recipe = Recipe.from_dict({"model": "tiny", "pipeline": [
        {"pass": "test-module-noop"}, {"pass": "export"}, {"pass": "ort-fusions"}]})
    with pytest.raises(PreconditionError, match=r"cannot run on an ONNX file.*'test-module-noop'.*needs the module side"):
        graphopt.compress(torchscript_file, recipe, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(RecipeError, match="needs the module side"):  # caught at load when the recipe names the file
        Recipe.from_dict({"model": str(torchscript_file), "pipeline": [{"pass": "test-module-noop"}]})


def _with_external_data(source: Path, folder: Path, location: str = "weights.bin") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(source))
    onnx.external_data_helper.convert_model_to_external_data(model, all_tensors_to_one_file=True, location=location,
                                                             size_threshold=1024)
    target = folder / "model.onnx"
    onnx.save_model(model, str(target))
    return target


def test_external_data_loads_through_compress(torchscript_file: Path, tmp_path: Path) -> None:
    path = _with_external_data(torchscript_file, tmp_path / "model")
    assert (tmp_path / "model" / "weights.bin").stat().st_size > 100_000
    result = graphopt.compress(path, "fp32", out=tmp_path / "out")
    assert result.report["final_check"]["onnxruntime"]["max_abs"] < 1e-5


def test_external_data_leaving_the_folder_is_refused(torchscript_file: Path, tmp_path: Path) -> None:
    path = _with_external_data(torchscript_file, tmp_path / "outside")  # writes outside/weights.bin
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../outside/weights.bin"
    (tmp_path / "model").mkdir()
    onnx.save_model(model, str(tmp_path / "model" / "model.onnx"))
    with pytest.raises(ExternalDataError, match=r"'\.\./outside/weights\.bin'.*inside the model's folder"):
        graphopt.compress(tmp_path / "model" / "model.onnx", "fp32", out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
