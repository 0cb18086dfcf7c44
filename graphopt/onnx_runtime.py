"""ONNX Runtime sessions the way graphopt makes them everywhere: one place for the options.

Core code measures ONNX programs in ONNX Runtime (drift checks, the final check, bench),
so the session settings that matter for correct measurement live here once:
``session.intra_op.allow_spinning`` is off by default because idle sessions spinning on a
2-core machine tripled another session's latency (measured).
"""

from __future__ import annotations

import logging
from typing import Literal, Mapping

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import torch

__all__ = ["OptimizationLevel", "session_options", "create_session", "run_session", "run_onnx_model"]

logger = logging.getLogger(__name__)

OptimizationLevel = Literal["disabled", "basic", "extended", "all"]

_LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def session_options(
    *,
    threads: int | None = None,
    optimization: OptimizationLevel = "all",
    spinning: bool = False,
    optimized_model_path: str | None = None,
) -> ort.SessionOptions:
    """Builds ``SessionOptions``; ``threads=None`` lets ONNX Runtime pick (one per core)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = _LEVELS[optimization]
    if threads is not None:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.log_severity_level = 3
    if optimized_model_path is not None:
        options.optimized_model_filepath = optimized_model_path
    return options


def create_session(model: bytes | str, options: ort.SessionOptions | None = None) -> ort.InferenceSession:
    """An ``InferenceSession`` on the CPU from serialized bytes or a path."""
    return ort.InferenceSession(model, sess_options=options or session_options(),
                                providers=["CPUExecutionProvider"])


def run_session(session: ort.InferenceSession, inputs: Mapping[str, torch.Tensor | np.ndarray]) -> tuple[np.ndarray, ...]:
    """Feeds the named inputs the session declares (others are ignored) and runs it."""
    feeds = {}
    for meta in session.get_inputs():
        if meta.name not in inputs:
            raise KeyError(f"the model needs input {meta.name!r}; given {sorted(inputs)}")
        value = inputs[meta.name]
        feeds[meta.name] = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    return tuple(np.asarray(o) for o in session.run(None, feeds))


def run_onnx_model(
    model: ir.Model, inputs: Mapping[str, torch.Tensor | np.ndarray], optimization: OptimizationLevel = "disabled"
) -> tuple[np.ndarray, ...]:
    """Runs an ``onnx_ir.Model`` once; optimizations off so the graph itself is measured."""
    data = ir.to_proto(model).SerializeToString()
    return run_session(create_session(data, session_options(optimization=optimization)), inputs)
