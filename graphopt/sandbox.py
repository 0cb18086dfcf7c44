"""Run ONNX Runtime on untrusted models in a child process, so a native crash is an error.

ONNX Runtime can crash the process that creates a session on a legal but unusual model
(measured: a ``LayerNormalization`` with an explicit empty bias passes the ONNX checker and
segfaults ORT at its default optimization level). ``probe_onnx_model`` creates the
sessions in a child process with a time limit and returns the outputs, or raises a
``FormatError`` naming the file and how the child died.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from graphopt.errors import FormatError

__all__ = ["probe_onnx_model"]

logger = logging.getLogger(__name__)

_CHILD = Path(__file__).with_name("_ort_child.py")
#: The probe child's address-space cap: Python, numpy and ONNX Runtime take about 1 GiB of
#: address space before a model is loaded; the rest is for the model (several copies while
#: ORT optimizes it) and its activations. A hostile file that asks for more fails there.
PROBE_BASE_BYTES = 4 << 30
PROBE_BYTES_PER_MODEL_BYTE = 6


def probe_onnx_model(model_bytes: bytes, inputs: Mapping[str, torch.Tensor], *, source: str,
                     timeout_s: float = 300.0, max_bytes: int | None = None) -> tuple[np.ndarray, ...]:
    """Runs the model once in a child process; returns its outputs.

    ``max_bytes`` caps the child's address space (default ``PROBE_BASE_BYTES`` plus
    ``PROBE_BYTES_PER_MODEL_BYTE`` times the model's size).

    Raises:
        FormatError: ONNX Runtime refused the model, crashed on it, or ran past ``timeout_s``.
    """
    with tempfile.TemporaryDirectory(prefix="graphopt-probe-") as folder:
        model_path, inputs_path, outputs_path = (Path(folder) / n for n in ("model.onnx", "in.npz", "out.npz"))
        model_path.write_bytes(model_bytes)
        np.savez(inputs_path, **{k: v.numpy() for k, v in inputs.items()})
        try:
            # -I: the script's folder (graphopt/, which holds an inspect.py) must not shadow the stdlib.
            limit = max_bytes or PROBE_BASE_BYTES + PROBE_BYTES_PER_MODEL_BYTE * len(model_bytes)
            run = subprocess.run([sys.executable, "-I", str(_CHILD), str(model_path), str(inputs_path), str(outputs_path),
                                  str(limit)],
                                 capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as error:
            raise FormatError(f"{source}: ONNX Runtime did not finish loading and running the model within "
                              f"{timeout_s:.0f} s") from error
        if run.returncode < 0:
            name = signal.Signals(-run.returncode).name
            raise FormatError(f"{source}: ONNX Runtime crashed ({name}) while loading this model; graphopt "
                              "refuses it. Check the model with onnx.checker and ONNX Runtime directly")
        if run.returncode != 0:
            lines = [line for line in run.stderr.strip().splitlines() if line.strip()]
            reason = lines[-1] if lines else f"exit code {run.returncode}"
            raise FormatError(f"{source}: ONNX Runtime cannot run this model: {reason}")
        with np.load(outputs_path) as data:
            return tuple(data[f"arr_{i}"] for i in range(len(data.files)))
