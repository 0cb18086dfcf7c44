"""depth-shrink on fx and eager programs, our encoder and HF BERT; the teacher it keeps."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from graphopt.models.minilm import BertConfig, BertEncoder

import graphopt
from graphopt import registry
from graphopt.errors import PreconditionError
from graphopt.program import Program
from graphopt.testing import assert_rewrite


pytestmark = pytest.mark.usefixtures("one_thread")


def _shrink(**options: object) -> graphopt.Pass:
    return registry.passes.get("depth-shrink")(**options)


@pytest.fixture(scope="module")
def four_layers(tiny_bundle: graphopt.ModelBundle) -> graphopt.ModelBundle:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        module = BertEncoder(BertConfig(vocab_size=1000, hidden=64, layers=4, heads=4, intermediate=128)).eval()
    return dataclasses.replace(tiny_bundle, name="tiny-4-layers", module=module)


def _sliced(module: torch.nn.Module, keep: list[int]) -> torch.nn.Module:
    eager = copy.deepcopy(module)
    eager.layers = torch.nn.ModuleList(eager.layers[i] for i in keep)
    return eager


@pytest.mark.parametrize("options, keep", [({}, [1, 3]), ({"offset": 0}, [0, 2]), ({"keep": (0, 3)}, [0, 3])])
def test_fx_program_matches_the_sliced_eager_model(four_layers: graphopt.ModelBundle, options: dict,
                                                   keep: list[int]) -> None:
    program = graphopt.trace(four_layers)
    program.annotations = {"layers.1.ffn.output": {"rank": 8}, "layers.2.ffn.output": {"rank": 4},
                           "layers.3.attention.query": {"rank": 2}, "embeddings.LayerNorm": {}}
    after = assert_rewrite(_shrink(**options), program, expect_ops={"layers.0.attention.query": 1,
                                                                    "layers.1.ffn.output": 1},
                           absent_ops=["layers.2.attention.query"], sqnr_floor=-20.0)
    assert isinstance(after.ir, torch.fx.GraphModule)
    want = _sliced(four_layers.module, keep)(**program.example_inputs)
    torch.testing.assert_close(after.ir(**program.example_inputs), want, rtol=0, atol=0)
    assert sorted(after.ir.layers._modules) == ["0", "1"]
    assert after.history == [] and after.info["depth_shrink"]["kept"] == keep
    # Annotations follow their layers: renumbered if kept, gone if dropped.
    renamed = {f"layers.{new}.{rest}" for new, old in enumerate(keep)
               for name in program.annotations if name.startswith(f"layers.{old}.")
               for rest in [name.split(".", 2)[2]]}
    assert set(after.annotations) == renamed | {"embeddings.LayerNorm"}
    # The full model is kept as the teacher and still computes the original output.
    np.testing.assert_allclose(after.teacher(**program.example_inputs).detach().numpy(),
                               program.reference_output[0], atol=1e-6)


def test_eager_program_slices_the_module_list(four_layers: graphopt.ModelBundle) -> None:
    traced = graphopt.trace(four_layers)
    program = dataclasses.replace(traced, ir=copy.deepcopy(four_layers.module))
    after = _shrink()(program).program
    assert isinstance(after.ir.layers, torch.nn.ModuleList) and len(after.ir.layers) == 2
    torch.testing.assert_close(after.ir(**program.example_inputs),
                               _sliced(four_layers.module, [1, 3])(**program.example_inputs))


def test_hf_bert_from_a_tiny_config(tiny_bundle: graphopt.ModelBundle) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                     intermediate_size=128, attn_implementation="sdpa")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = transformers.BertModel(config).eval()
    program = graphopt.trace(model, dict(tiny_bundle.example_inputs))
    after = _shrink(keep=(0, 3))(program).program
    assert len(after.ir.encoder.layer) == 2
    assert after.run()[0].shape == program.reference_output[0].shape


def test_a_kept_teacher_is_not_replaced(tiny_program: Program) -> None:
    first = _shrink(keep=(0, 1))(tiny_program)  # keeps everything: a no-op
    assert not first.modified and first.program.teacher is None
    shrunk = _shrink()(tiny_program).program
    teacher = shrunk.teacher
    assert _shrink(keep=(0,))(shrunk).program.teacher is teacher


def test_refusals_name_the_layers(tiny_program: Program) -> None:
    with pytest.raises(PreconditionError, match=r"cannot keep layers \[0, 5\] of 2 \(layers.0"):
        _shrink(keep=(0, 5))(tiny_program)
    with pytest.raises(PreconditionError, match="no layer list 'blocks'"):
        _shrink(layers="blocks")(tiny_program)
    with pytest.raises(ValueError, match="offset"):
        _shrink(every=2, offset=2)
    with pytest.raises(ValueError, match="increasing"):
        _shrink(keep=(3, 1))


def test_the_shrunk_fx_program_exports(four_layers: graphopt.ModelBundle) -> None:
    program = _shrink()(graphopt.trace(four_layers)).program
    onnx_program = registry.passes.get("export")()(program).program
    np.testing.assert_allclose(onnx_program.run()[0], program.run()[0], atol=1e-4)
