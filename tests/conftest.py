"""Shared fixtures: tiny models for pass tests, MiniLM loaded and exported once per session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import graphopt
from graphopt import registry
from graphopt.bundle import ModelBundle
from graphopt.program import Program

torch.set_num_threads(2)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: tiny tensors run faster on one, and on a loaded 2-core
    machine two threads ran tiny training steps up to 20x slower (measured: 1.6 s against 0.07 s).
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_bundle() -> ModelBundle:
    """A random 64-wide, 2-layer encoder with the real tokenizer (ids modulo 1000)."""
    return registry.models.get("tiny")()


@pytest.fixture
def tiny_program(tiny_bundle: ModelBundle) -> Program:
    """A fresh module program of the tiny encoder (trace copies the module)."""
    return graphopt.trace(tiny_bundle)


@pytest.fixture(scope="session")
def _tiny_onnx(tiny_bundle: ModelBundle) -> Program:
    return graphopt.Pipeline([registry.passes.get("export")()]).run(graphopt.trace(tiny_bundle))


@pytest.fixture
def tiny_onnx_program(_tiny_onnx: Program) -> Program:
    """A fresh ONNX program of the tiny encoder, exported once per session."""
    return _tiny_onnx.clone()


@pytest.fixture(scope="session")
def minilm_bundle() -> ModelBundle:
    """The real all-MiniLM-L6-v2, loaded once per session."""
    return registry.models.get("minilm")()


@pytest.fixture(scope="session")
def minilm_onnx(minilm_bundle: ModelBundle) -> Program:
    """MiniLM exported once per session. Tests must not mutate it: clone() first."""
    return graphopt.Pipeline([registry.passes.get("export")()]).run(graphopt.trace(minilm_bundle))
