"""Calibration plumbing shared by the quantization passes: layer selection, data, hooks, drift.

- ``select_layers`` picks submodules of a type by module-name glob, and refuses a glob
  that matches nothing (a typo would otherwise quantize nothing, silently).
- ``calibration_batches`` tokenizes the *calibration* split (never the held-out one:
  ``assert_not_heldout`` guards it) into batches.
- ``capture_inputs`` (from ``graphopt.calibration``, re-exported) runs batches with forward
  hooks on named layers and hands each layer's input, restricted to real (non-padded)
  tokens, to a callback.
- ``smoothing_factors`` computes SmoothQuant's per-channel factors.
- ``agreement`` is the drift figure sensitivity analysis and mixed precision use:
  mean and worst row cosine of outputs against reference outputs.
"""

from __future__ import annotations

import fnmatch
import logging
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from graphopt.calibration import capture_inputs
from graphopt.data import assert_not_heldout, load_sentences
from graphopt.program import Program, flatten_outputs
from graphopt.quantization.spec import QUANT_KEY, QuantSpec

__all__ = ["select_layers", "calibration_batches", "capture_inputs", "smoothing_factors", "run_outputs",
           "agreement", "get_specs", "set_spec"]

logger = logging.getLogger(__name__)

#: Called with (done, total) as calibration batches run.
Progress = Callable[[int, int], None]


def select_layers(module: nn.Module, include: Sequence[str], exclude: Sequence[str] = (),
                  types: tuple[type[nn.Module], ...] = (nn.Linear,), *, where: str = "calibrate") -> list[str]:
    """Names of submodules of ``types`` matched by an ``include`` glob and by no ``exclude`` glob.

    Raises:
        ValueError: a glob matches no layer of these types (the message lists a few that exist).
    """
    kind = " or ".join(f"nn.{t.__name__}" for t in types)
    candidates = [name for name, sub in module.named_modules() if name and isinstance(sub, types)]
    for option, globs in (("include", include), ("exclude", exclude)):
        for glob in globs:
            if not any(fnmatch.fnmatchcase(name, glob) for name in candidates):
                more = f" (and {len(candidates) - 6} more)" if len(candidates) > 6 else ""
                shown = ", ".join(candidates[:6]) + more
                raise ValueError(f"{where}: {option} glob {glob!r} matches no {kind} layer; "
                                 f"the layers are: {shown or 'none'}")
    chosen = [n for n in candidates if any(fnmatch.fnmatchcase(n, g) for g in include)
              and not any(fnmatch.fnmatchcase(n, g) for g in exclude)]
    if not chosen and include:
        raise ValueError(f"{where}: the include globs {list(include)} minus the exclude globs {list(exclude)} "
                         f"leave no {kind} layer")
    return chosen


def calibration_batches(program: Program, batches: int, batch_size: int, max_length: int = 128,
                        *, where: str = "calibrate") -> list[dict[str, torch.Tensor]]:
    """Tokenized batches of the calibration split; the example inputs when the model has no tokenizer."""
    if program.tokenizer is None:
        logger.info("%s: the model has no tokenizer; calibrating on its example inputs", where)
        return [dict(program.example_inputs)]
    sentences = load_sentences("calibration")
    assert_not_heldout(sentences, consumer=where)
    wanted = min(batches * batch_size, len(sentences))
    if wanted < batches * batch_size:
        logger.info("%s: %d batches of %d asked, the calibration split has %d sentences",
                    where, batches, batch_size, len(sentences))
    chosen = list(sentences[:wanted])
    return [dict(program.tokenizer(chosen[i:i + batch_size], max_length=max_length))
            for i in range(0, len(chosen), batch_size)]


def smoothing_factors(activation_absmax: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel factors ``s_j = max|x_j|^α / max|W_:j|^(1-α)``.

    ``weights`` are the ``[out, in]`` weights of every layer that reads the same input (they
    share one ``s``, so one division serves them all). Channels that never fire, or whose
    weights are all zero, keep ``s = 1``.
    """
    w_max = torch.stack([w.detach().abs().amax(0) for w in weights]).amax(0).float()
    x_max = activation_absmax.float()
    s = x_max.clamp(min=1e-5) ** alpha / w_max.clamp(min=1e-5) ** (1 - alpha)
    return torch.where((x_max > 0) & (w_max > 0), s, torch.ones_like(s))


def run_outputs(module: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> list[np.ndarray]:
    """The module's first output on each batch, as float64 numpy."""
    with torch.inference_mode():
        return [flatten_outputs(module(**batch))[0].double().numpy() for batch in batches]


def agreement(outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> tuple[float, float]:
    """Mean and worst row cosine of ``outputs`` against ``reference`` (rows: the last axis)."""
    cosines = []
    for got, want in zip(outputs, reference):
        got, want = got.reshape(-1, got.shape[-1]), want.reshape(-1, want.shape[-1])
        norms = np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1)
        cosines.append(np.sum(got * want, axis=1) / np.maximum(norms, 1e-30))
    all_cos = np.concatenate(cosines)
    return float(all_cos.mean()), float(all_cos.min())


def get_specs(program: Program) -> dict[str, QuantSpec]:
    """Module name → ``QuantSpec`` of every layer the program's annotations quantize."""
    return {name: facts[QUANT_KEY] for name, facts in program.annotations.items()
            if isinstance(facts.get(QUANT_KEY), QuantSpec)}


def set_spec(program: Program, name: str, spec: QuantSpec) -> None:
    """Writes ``spec`` as the quantization of layer ``name``."""
    program.annotations.setdefault(name, {})[QUANT_KEY] = spec
