"""The registry: graphopt's passes and a plugin's register through the same entry-point group.

A small distribution (a ``.dist-info`` with ``entry_points.txt``) is put on ``sys.path``:
no pip install, no network. It registers an existing torch.fx pass and an existing
onnx_ir pass *as they are*, plus broken entries that must be listed, not fatal.
"""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import graphopt
from graphopt import registry
from graphopt.cli import main
from graphopt.errors import PluginError
from graphopt.program import Program
from graphopt.testing import assert_rewrite, op_types

PLUGIN_MODULE = '''
import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult


class ReluToGeluPass(PassBase):
    """Replaces F.gelu calls by F.relu (a deliberately visible rewrite)."""

    def call(self, graph_module):
        modified = False
        for node in graph_module.graph.nodes:
            if node.op == "call_function" and node.target is torch.nn.functional.gelu:
                node.target = torch.nn.functional.relu
                node.kwargs = {}
                modified = True
        graph_module.recompile()
        return PassResult(graph_module, modified)


class NotAPass:
    pass
'''

ENTRY_POINTS = '''
[graphopt.passes]
gelu-to-relu = graphopt_test_plugin:ReluToGeluPass
cse = onnx_ir.passes.common:CommonSubexpressionEliminationPass
missing-attr = graphopt_test_plugin:DoesNotExist
not-a-pass = graphopt_test_plugin:NotAPass
export = graphopt_test_plugin:ReluToGeluPass
raises-on-import = graphopt_test_plugin_crash:X
'''


@pytest.fixture
def plugin(tmp_path: Path):
    (tmp_path / "graphopt_test_plugin.py").write_text(PLUGIN_MODULE)
    (tmp_path / "graphopt_test_plugin_crash.py").write_text("raise SystemExit('plugin exits on import')\n")
    dist = tmp_path / "graphopt_test_plugin-1.2.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: graphopt-test-plugin\nVersion: 1.2.3\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent(ENTRY_POINTS))
    sys.path.insert(0, str(tmp_path))
    importlib.invalidate_caches()
    registry.reload()
    yield
    sys.path.remove(str(tmp_path))
    for name in ("graphopt_test_plugin", "graphopt_test_plugin_crash"):
        sys.modules.pop(name, None)
    importlib.invalidate_caches()
    registry.reload()


def test_builtin_passes_come_through_the_entry_point_group() -> None:
    assert "export" in registry.passes.names()
    assert registry.passes.get("export").__module__ == "graphopt.passes.onnx_export"


def test_fx_pass_registers_as_it_is(plugin: None, tiny_program: Program) -> None:
    gelu_to_relu = registry.passes.get("gelu-to-relu")
    assert gelu_to_relu.kind_in == gelu_to_relu.kind_out == "module"
    before = op_types(tiny_program)
    assert before["<built-in function gelu>"] == 2
    program = gelu_to_relu()(tiny_program.clone()).program
    after = op_types(program)
    assert after["<built-in function gelu>"] == 0 and after[str(torch.nn.functional.relu)] == 2


def test_onnx_ir_pass_registers_as_it_is(plugin: None, tiny_onnx_program: Program) -> None:
    cse = registry.passes.get("cse")
    assert cse.kind_in == cse.kind_out == "onnx"
    nodes_before = len(tiny_onnx_program.ir.graph)
    program = assert_rewrite(cse(), tiny_onnx_program, atol=1e-6, expect_modified=cse()(tiny_onnx_program.clone()).modified)
    assert len(program.ir.graph) <= nodes_before


def test_broken_plugins_are_listed_not_fatal(plugin: None, capsys: pytest.CaptureFixture[str]) -> None:
    names = registry.passes.names()
    assert "gelu-to-relu" in names and "cse" in names
    broken = registry.passes.broken
    assert set(broken) >= {"missing-attr", "not-a-pass", "raises-on-import"}
    assert broken["raises-on-import"].error == "SystemExit: plugin exits on import"
    assert broken["missing-attr"].distribution == "graphopt-test-plugin" and broken["missing-attr"].version == "1.2.3"
    # a plugin that claims a built-in's name is the broken one; the built-in keeps working
    assert broken["export"].distribution == "graphopt-test-plugin"
    assert registry.passes.get("export").__module__ == "graphopt.passes.onnx_export"
    with pytest.raises(PluginError, match=r"'raises-on-import' from graphopt-test-plugin 1.2.3.*SystemExit"):
        registry.passes.get("raises-on-import")
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "broken" in out and "raises-on-import" in out and "gelu-to-relu" in out


def test_unknown_pass_names_the_nearest() -> None:
    with pytest.raises(PluginError, match="did you mean 'export'"):
        registry.passes.get("exprot")


def test_compile_refuses_wrong_kind(tiny_program: Program) -> None:
    with pytest.raises(graphopt.errors.BackendError, match="add the 'export' pass"):
        graphopt.compile(tiny_program, backend="onnxruntime")
