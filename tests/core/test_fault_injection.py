"""Numerics faults injected into an *exact* pass are caught by the pipeline's guard, every time.

Each fault is a bug a real rewrite could have (a dropped bias, a transposed weight, a
weight scaled by k ulp, a zero point off by one, two attention heads swapped, a silent
cast to fp16). The pass claims to be exact with the default tolerance; the guard must
stop the run with a ``NumericsError`` naming the pass and the worst output.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.bundle import ModelBundle
from graphopt.errors import NumericsError
from graphopt.pass_base import Pass, PassResult
from graphopt.program import Program

HEAD = 16  # tiny encoder: 64 wide, 4 heads


def drop_bias(m: torch.nn.Module) -> None:
    m.get_parameter("layers.1.ffn.output.bias").zero_()


def transpose_weight(m: torch.nn.Module) -> None:
    w = m.get_submodule("layers.0.attention.value").weight
    w.copy_(w.t().clone())


def scale_by_ulps(k: int) -> Callable[[torch.nn.Module], None]:
    def fault(m: torch.nn.Module) -> None:
        m.get_parameter("layers.1.ffn.output.weight").mul_(1 + k * torch.finfo(torch.float32).eps)
    return fault


def swap_heads(m: torch.nn.Module) -> None:
    for linear in (m.get_submodule("layers.0.attention.query"),):
        for tensor in (linear.weight, linear.bias):
            first = tensor[:HEAD].clone()
            tensor[:HEAD] = tensor[HEAD:2 * HEAD]
            tensor[HEAD:2 * HEAD] = first


def cast_fp16(m: torch.nn.Module) -> None:
    for p in m.parameters():
        p.copy_(p.half().float())


MODULE_FAULTS = {"drop-bias": drop_bias, "transpose-weight": transpose_weight, "scale-256-ulp": scale_by_ulps(256),
                 "scale-4096-ulp": scale_by_ulps(4096), "swap-heads": swap_heads, "cast-fp16": cast_fp16}


class FaultyModulePass(Pass):
    """Claims to be exact; applies the fault named in its options."""

    name = "faulty-module-rewrite"
    kind_in = kind_out = "module"

    @dataclasses.dataclass(frozen=True)
    class Options:
        fault: str = "drop-bias"

    def call(self, program: Program) -> PassResult:
        with torch.no_grad():
            MODULE_FAULTS[self.options.fault](program.ir)
        return PassResult(program, True)


@pytest.fixture(scope="module")
def realistic_tiny() -> ModelBundle:
    """The tiny encoder with non-zero biases and trained-like weight scales, so every fault shows."""
    from graphopt import registry

    bundle = registry.models.get("tiny")()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in bundle.module.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0, 0.15, generator=generator)
                module.bias.normal_(0, 0.1, generator=generator)
    return bundle


@pytest.mark.parametrize("fault", sorted(MODULE_FAULTS))
def test_module_fault_is_caught(realistic_tiny: ModelBundle, fault: str) -> None:
    program = graphopt.trace(realistic_tiny)
    with pytest.raises(NumericsError, match=r"exact pass 'faulty-module-rewrite' changed output 'embedding'"):
        graphopt.Pipeline([FaultyModulePass(fault=fault)]).run(program)


def quantized_matmul_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weight = rng.integers(-127, 128, size=(16, 8)).astype(np.int8)
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"], axis=1),
         helper.make_node("MatMul", ["x", "w"], ["y"])], "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        [numpy_helper.from_array(weight, "w_q"), numpy_helper.from_array(np.full(8, 0.02, np.float32), "w_scale"),
         numpy_helper.from_array(np.zeros(8, np.int8), "w_zero")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


class ZeroPointShiftPass(Pass):
    """Claims to be exact; shifts one channel's zero point by one."""

    name = "faulty-onnx-rewrite"
    kind_in = kind_out = "onnx"

    def call(self, program: Program) -> PassResult:
        zero = program.ir.graph.initializers["w_zero"]
        shifted = zero.const_value.numpy().copy()
        shifted[3] += 1
        zero.const_value = ir.tensor(shifted, name="w_zero")
        return PassResult(program, True)


def test_zero_point_shift_is_caught(tmp_path: Path) -> None:
    path = tmp_path / "qdq.onnx"
    onnx.save_model(quantized_matmul_model(), str(path))
    program = graphopt.load(path)
    with pytest.raises(NumericsError, match=r"exact pass 'faulty-onnx-rewrite' changed output 'y'"):
        graphopt.Pipeline([ZeroPointShiftPass()]).run(program)
