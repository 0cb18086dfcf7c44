"""Hugging Face transformers models in: ``--model hf:FOLDER``, or a model built from a config.

Registered as the ``hf`` entry point of ``graphopt.models``; ``graphopt.compress`` calls it
with what follows ``hf:`` (see ``graphopt.compress.resolve_model``). Only local folders are
read, with ``local_files_only=True``: graphopt never downloads weights.

``HFOutput`` wraps the model so that ``forward(input_ids, attention_mask)`` returns one
tensor: ``logits`` for models with a head (``*ForCausalLM``, ``*LMHeadModel``,
``*ForSequenceClassification``...), else ``last_hidden_state``. Decoders run with
``use_cache=False`` (no past key/values in or out). Attention is ``sdpa``, which exports
with dynamic batch and sequence for BERT, DistilBERT, RoBERTa and GPT-2 (measured,
transformers 5.24, torch 2.13) and gives onnxscript's attention fusions the pattern they
match. ``torch.fx.symbolic_trace`` fails on all four, so programs hold the eager module
and the report says why.

The bundle has no sentence tokenizer: an HF model's outputs are hidden states or logits,
not sentence embeddings, so the final check compares outputs on the example inputs
(tokenized from the folder's tokenizer when it has one, else random ids).

Example::

    graphopt compress --model hf:./bert-base-uncased --recipe fp32 -o out
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graphopt.bundle import ModelBundle
from graphopt.errors import ModelError

__all__ = ["HFOutput", "load_hf", "hf_bundle"]

logger = logging.getLogger(__name__)

EXAMPLE_SENTENCES = ("The quick brown fox jumps over the lazy dog.", "Compilers make models faster.")
EXAMPLE_LENGTH = 16
_HEADS = ("ForCausalLM", "LMHeadModel", "ForSequenceClassification", "ForTokenClassification", "ForMaskedLM")


class HFOutput(nn.Module):
    """``forward(input_ids, attention_mask) -> tensor``: one output of a transformers model."""

    def __init__(self, model: nn.Module, output: str) -> None:
        super().__init__()
        self.model, self.output = model, output

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)[self.output]


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as error:
        raise ModelError("Hugging Face models need transformers: pip install 'graphopt[hf]'") from error
    return transformers


def hf_bundle(model: nn.Module, tokenizer: Any = None, *, name: str | None = None,
              info: dict[str, Any] | None = None) -> ModelBundle:
    """Wraps an in-memory transformers model (e.g. built from a config) as a ``ModelBundle``."""
    config = model.config
    if getattr(config, "use_cache", False):
        config.use_cache = False
    output = "logits" if any(type(model).__name__.endswith(h) for h in _HEADS) else "last_hidden_state"
    vocab = int(getattr(config, "vocab_size", 1000))
    if tokenizer is not None:
        if tokenizer.pad_token is None:  # GPT-2's tokenizer has none; any id works under the mask
            tokenizer.pad_token = tokenizer.eos_token
        encoded = tokenizer(list(EXAMPLE_SENTENCES), padding="max_length", truncation=True,
                            max_length=EXAMPLE_LENGTH, return_tensors="pt")
        inputs = {"input_ids": encoded["input_ids"] % vocab,  # a test model may have a smaller vocabulary
                  "attention_mask": encoded["attention_mask"].to(torch.int64)}
    else:
        generator = torch.Generator().manual_seed(0)
        inputs = {"input_ids": torch.randint(3, vocab, (2, EXAMPLE_LENGTH), generator=generator),
                  "attention_mask": torch.ones(2, EXAMPLE_LENGTH, dtype=torch.int64)}
        inputs["attention_mask"][1, EXAMPLE_LENGTH * 3 // 4:] = 0  # a padded row exercises the mask
    details = {"hf_class": type(model).__name__, "hf_model_type": getattr(config, "model_type", "?"),
               "hf_output": output, "attn_implementation": getattr(config, "_attn_implementation", None),
               **(info or {})}
    return ModelBundle(name or f"hf-{details['hf_model_type']}", HFOutput(model.eval(), output), inputs,
                       None, (output,), details)


def load_hf(source: str = "") -> ModelBundle:
    """A saved Hugging Face transformers model from a local folder, offline: --model hf:FOLDER.

    Raises:
        ModelError: not a folder, no config in it, transformers missing, or the load fails.
    """
    if not source:
        raise ModelError("model 'hf' needs a folder: --model hf:PATH/TO/FOLDER")
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise ModelError(f"hf:{source}: not a local folder. graphopt reads Hugging Face models offline only: "
                         f"download it first (huggingface-cli download {source} --local-dir DIR) and pass hf:DIR")
    if not (folder / "config.json").is_file():
        raise ModelError(f"hf:{source}: no config.json in {folder}; is it a saved transformers model?")
    transformers = _transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        architecture = (getattr(config, "architectures", None) or [""])[0]
        auto = next((getattr(transformers, cls) for head, cls in (
            ("ForCausalLM", "AutoModelForCausalLM"), ("LMHeadModel", "AutoModelForCausalLM"),
            ("ForSequenceClassification", "AutoModelForSequenceClassification"),
            ("ForTokenClassification", "AutoModelForTokenClassification"),
            ("ForMaskedLM", "AutoModelForMaskedLM")) if architecture.endswith(head)), transformers.AutoModel)
        model = auto.from_pretrained(folder, local_files_only=True, attn_implementation="sdpa",
                                     dtype=torch.float32)
    except Exception as error:
        raise ModelError(f"hf:{source}: transformers cannot load it ({type(error).__name__}: "
                         f"{str(error).strip().splitlines()[0] if str(error).strip() else ''})") from error
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as error:  # a folder without tokenizer files still gives a model
        logger.info("hf:%s: no usable tokenizer (%s); example inputs are random ids", source, error)
        tokenizer = None
    logger.info("loaded %s from %s", type(model).__name__, folder)
    return hf_bundle(model, tokenizer, name=folder.name, info={"hf_folder": str(folder.resolve())})
