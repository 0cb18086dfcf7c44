"""Entry into graphopt: ``trace`` a PyTorch model, or ``load`` an ONNX file, into a Program."""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx
import onnx_ir as ir
import torch
from torch import nn

from graphopt.bundle import ModelBundle
from graphopt.errors import FormatError, ModelError
from graphopt.onnx_io import read_onnx
from graphopt.program import Program, flatten_outputs
from graphopt.sandbox import probe_onnx_model

__all__ = ["trace", "load", "synthesize_inputs"]

logger = logging.getLogger(__name__)

#: Largest example input graphopt synthesizes (elements), checked before allocating.
MAX_EXAMPLE_ELEMENTS = 1 << 24

#: Example batch and sequence for inputs synthesized from an ONNX file's dynamic axes.
_EXAMPLE_DIMS = {"batch": 2, "sequence": 16}


def trace(model: nn.Module | ModelBundle, example_inputs: Mapping[str, torch.Tensor] | None = None,
          *, output_names: tuple[str, ...] | None = None, name: str | None = None) -> Program:
    """Turns a PyTorch model into a Program of kind ``module``.

    The model is copied (graphopt never changes the caller's module) and put in eval
    mode. ``torch.fx.symbolic_trace`` is tried first, since passes that need structure
    pattern-match on the fx graph; when it fails (HF models often do), the program holds
    the eager copy and ``program.info["trace"]`` says which path was taken and why.

    Args:
        model: An ``nn.Module`` or a ``ModelBundle``.
        example_inputs: Named inputs; batch and sequence must be at least 2 because
            ``torch.export`` specialises a dimension of size 1. Taken from the bundle if omitted.
        output_names: Names for the flattened outputs (default ``output``, ``output_1``...).
        name: Name for reports.

    Raises:
        ModelError: if the inputs are missing or too small, or the model does not run on them.
    """
    bundle = model if isinstance(model, ModelBundle) else None
    module = bundle.module if bundle else model
    if not isinstance(module, nn.Module):
        raise ModelError(f"graphopt.trace takes an nn.Module or a ModelBundle, got {type(model).__name__}")
    inputs = dict(example_inputs if example_inputs is not None else (bundle.example_inputs if bundle else {}))
    if not inputs:
        raise ModelError("graphopt.trace needs example inputs: a dict of named tensors, "
                         "batch and sequence of at least 2")
    for key, value in inputs.items():
        if not isinstance(value, torch.Tensor):
            raise ModelError(f"example input {key!r} is a {type(value).__name__}, not a tensor")
        if any(d < 2 for d in value.shape[:2]):
            raise ModelError(f"example input {key!r} has shape {tuple(value.shape)}: use batch and sequence "
                             "of at least 2 (torch.export specialises a dimension of size 1)")
    module = copy.deepcopy(module).eval()
    try:
        with torch.inference_mode():
            outputs = flatten_outputs(module(**inputs))
    except Exception as error:
        raise ModelError(f"the model does not run on its example inputs ({sorted(inputs)}): "
                         f"{type(error).__name__}: {error}") from error
    if not outputs:
        raise ModelError("the model returned no tensor")
    names = tuple(output_names or (bundle.output_names if bundle else ()))
    if len(names) != len(outputs):
        names = ("output",) if len(outputs) == 1 else tuple(f"output_{i}" for i in range(len(outputs)))
    ir_module, trace_info = _symbolic_trace(module)
    info: dict[str, Any] = {"model": name or (bundle.name if bundle else type(module).__name__),
                            "source": "module", "trace": trace_info}
    if bundle:
        info.update(bundle.info)
    return Program("module", ir_module, inputs, tuple(t.detach().float().numpy() for t in outputs), names,
                   info=info, tokenizer=bundle.tokenizer if bundle else None)


def _symbolic_trace(module: nn.Module) -> tuple[nn.Module, dict[str, str]]:
    try:
        traced = torch.fx.symbolic_trace(module)
    except Exception as error:  # fx raises many types: TraceError, TypeError, AttributeError...
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        logger.info("symbolic trace failed, keeping the eager module: %s", reason)
        return module, {"path": "eager", "reason": f"torch.fx.symbolic_trace failed: {reason}"}
    return traced, {"path": "fx", "reason": "torch.fx.symbolic_trace succeeded"}


def load(path: str | os.PathLike[str]) -> Program:
    """Reads an ONNX file into a Program of kind ``onnx``; the file is never modified.

    External data is read only from inside the model's folder (see ``read_onnx``).
    Example inputs are synthesized from the graph inputs (dynamic axes get batch 2 and
    sequence 16; integer inputs named like masks get ones, other integers small token
    ids), and the reference output is the file's own output on them in ONNX Runtime, run
    first in a child process so that a native crash is reported, not suffered.

    Raises:
        FormatError: if the file is missing, unreadable or not a valid ONNX model.
    """
    path = Path(path)
    proto = read_onnx(path)
    try:
        model = ir.from_proto(proto)
    except Exception as error:
        raise FormatError(f"{path}: not a valid ONNX model ({type(error).__name__}: {error})") from error
    try:
        inputs = synthesize_inputs(model)
    except FormatError as error:
        raise FormatError(f"{path}: {error}") from error
    except Exception as error:
        raise FormatError(f"{path}: cannot make example inputs for this model ({type(error).__name__}: {error})") from error
    # The first ONNX Runtime session on a user's file runs in a child process: a native crash
    # there becomes a FormatError instead of taking graphopt down.
    reference = probe_onnx_model(proto.SerializeToString(), inputs, source=str(path))
    names = tuple(v.name for v in model.graph.outputs)
    return Program("onnx", model, inputs, reference, names,
                   info={"model": path.stem, "source": str(path), "trace": {"path": "onnx", "reason": "loaded from file"}})


def synthesize_inputs(model: ir.Model, *, batch: int = _EXAMPLE_DIMS["batch"],
                      sequence: int = _EXAMPLE_DIMS["sequence"]) -> dict[str, torch.Tensor]:
    """Example inputs for an ONNX model's graph inputs, deterministic (seeded).

    A dynamic dimension gets ``batch`` at axis 0 and ``sequence`` elsewhere.
    """
    generator = torch.Generator().manual_seed(0)
    inputs = {}
    for value in model.graph.inputs:
        if value.name in model.graph.initializers:
            continue
        shape = [d if isinstance(d, int) else (batch if i == 0 else sequence)
                 for i, d in enumerate(value.shape or [])]
        # Each dimension is capped as well as the product: a zero dimension makes the product 0,
        # and numpy refuses (ValueError) a shape like [2**31, 0, 2**31] that torch accepts (fuzzing found it).
        if (any(d < 0 for d in shape) or max(shape, default=0) > MAX_EXAMPLE_ELEMENTS
                or int(np.prod(shape, dtype=np.float64)) > MAX_EXAMPLE_ELEMENTS):
            raise FormatError(f"graph input {value.name!r} declares shape {shape}: negative or over "
                              f"{MAX_EXAMPLE_ELEMENTS} elements; graphopt cannot make example inputs for it")
        dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
        if np.issubdtype(dtype, np.integer):
            if "mask" in value.name:
                tensor = torch.ones(shape, dtype=torch.int64)
            elif "type" in value.name or "position" in value.name:
                tensor = torch.zeros(shape, dtype=torch.int64)
                if "position" in value.name and len(shape) >= 2:
                    tensor = torch.arange(shape[-1]).expand(shape).clone()
            else:
                tensor = torch.randint(1, 100, shape, generator=generator)
            inputs[value.name] = tensor.to(torch.from_numpy(np.zeros(0, dtype)).dtype)
        elif dtype == np.bool_:
            inputs[value.name] = torch.ones(shape, dtype=torch.bool)
        else:
            inputs[value.name] = torch.randn(shape, generator=generator).to(torch.from_numpy(np.zeros(0, dtype)).dtype)
    return inputs
