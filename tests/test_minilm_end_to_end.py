"""The real all-MiniLM-L6-v2, exported once: parity with torch eager in ONNX Runtime.

One file with dynamic axes must match torch at batch 1 and 8, sequence 16 and 128:
max abs diff ≤ 1e-4 and cosine ≥ 0.99999 for every embedding; it passes the ONNX
checker's full check.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import graphopt
from graphopt.bundle import ModelBundle
from graphopt.data import load_sentences
from graphopt.program import Program

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm_executable(minilm_onnx: Program):
    return graphopt.compile(minilm_onnx, backend="onnxruntime", threads=2)


def test_dynamic_axes_named(minilm_executable) -> None:
    proto = onnx.load_from_string(minilm_executable.model_bytes)
    onnx.checker.check_model(proto, full_check=True)
    for value in proto.graph.input:
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        assert dims == ["batch", "sequence"], (value.name, dims)
    assert [d.dim_param or d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim] == ["batch", 384]


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("sequence", [16, 128])
def test_parity_with_torch(minilm_bundle: ModelBundle, minilm_executable, batch: int, sequence: int) -> None:
    sentences = list(load_sentences("heldout")[:batch])
    inputs = minilm_bundle.tokenizer(sentences, max_length=sequence, pad_to=sequence)
    with torch.inference_mode():
        want = minilm_bundle.module(**inputs).numpy()
    got = minilm_executable(**inputs)[0]
    assert got.shape == (batch, 384)
    max_abs = float(np.max(np.abs(got - want)))
    cosine = np.sum(got * want, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert max_abs <= 1e-4, f"max abs diff {max_abs:.2e} > 1e-4"
    assert cosine.min() >= 0.99999, f"worst cosine {cosine.min():.7f} < 0.99999"
