"""ModelBundle: a model and what graphopt needs to run it on real text."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import torch
from torch import nn

__all__ = ["ModelBundle", "Tokenize"]

#: Turns sentences into named model inputs: ``tokenize(sentences) -> {"input_ids": ..., ...}``.
Tokenize = Callable[..., Mapping[str, torch.Tensor]]


@dataclasses.dataclass(frozen=True)
class ModelBundle:
    """A model, its example inputs, and (for text models) the tokenizer that feeds it.

    Attributes:
        name: Short name for reports (``"minilm"``).
        module: The eager model. graphopt never mutates it: ``trace`` works on a copy.
        example_inputs: Named inputs, batch and sequence of at least 2.
        tokenizer: Optional; when given, the final check runs on held-out sentences.
        output_names: One name per flattened output.
        info: Free-form provenance (weights file, config) copied into the report.
    """

    name: str
    module: nn.Module
    example_inputs: Mapping[str, torch.Tensor]
    tokenizer: Tokenize | None = None
    output_names: tuple[str, ...] = ("output",)
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)
