"""Hugging Face models in: tiny configs trace (eager, with the reason), export, fuse, match torch in ORT.

Tolerance: ORT (fused, graph optimizations on) against the torch module, max abs 1e-4 on
last_hidden_state / logits; measured 1e-6 or less on all four.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import graphopt  # noqa: E402
from graphopt import registry  # noqa: E402
from graphopt.errors import ModelError  # noqa: E402
from graphopt.models.hf import hf_bundle  # noqa: E402
from graphopt.models.minilm import minilm_dir  # noqa: E402

ATOL = 1e-4
MS = "com.microsoft::"
SMALL = dict(vocab_size=1000, num_hidden_layers=2, num_attention_heads=4, hidden_size=64, intermediate_size=128,
             max_position_embeddings=128)

#: Model → (config, class, the contrib ops the fusions must produce), one layer each to keep the
#: exports quick (the saved BERT below has two). RoBERTa's positions are computed from the ids
#: (not 0..S-1), so its embeddings stay unfused; GPT-2's QKV comes from one Conv1D and a Split,
#: so it gets MultiHeadAttention rather than a packed Attention.
MODELS = {
    "distilbert": (lambda: transformers.DistilBertConfig(vocab_size=1000, dim=64, n_layers=1, n_heads=4, hidden_dim=128,
                                                          max_position_embeddings=128),
                   "DistilBertModel", {"Attention": 1, "SkipLayerNormalization": 2, "BiasGelu": 1,
                                       "EmbedLayerNormalization": 1}),
    "roberta": (lambda: transformers.RobertaConfig(**{**SMALL, "num_hidden_layers": 1, "max_position_embeddings": 130}),
                "RobertaModel", {"Attention": 1, "SkipLayerNormalization": 3, "BiasGelu": 1}),
    "gpt2": (lambda: transformers.GPT2Config(vocab_size=1000, n_embd=64, n_layer=1, n_head=4, n_positions=128,
                                             use_cache=False, bos_token_id=0, eos_token_id=0),
             "GPT2LMHeadModel", {"MultiHeadAttention": 1, "SkipLayerNormalization": 2, "FusedMatMul": 1}),
}


def _from_config(name: str) -> torch.nn.Module:
    config_factory, cls, _ = MODELS[name]
    config = config_factory()
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return getattr(transformers, cls)(config).eval()


def _assert_matches_torch(bundle: graphopt.ModelBundle, executable: graphopt.Executable) -> None:
    """ORT against torch at a batch and length the export never saw, with padding."""
    generator = torch.Generator().manual_seed(1)
    inputs = {"input_ids": torch.randint(3, 1000, (3, 20), generator=generator),
              "attention_mask": torch.ones(3, 20, dtype=torch.int64)}
    inputs["attention_mask"][1, 12:] = 0
    with torch.inference_mode():
        want = bundle.module(**inputs).numpy()
    np.testing.assert_allclose(executable(**inputs)[0], want, rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_config_models_trace_export_fuse_and_match(name: str) -> None:
    bundle = hf_bundle(_from_config(name))
    program = graphopt.trace(bundle)
    assert program.info["trace"]["path"] == "eager"
    assert program.info["trace"]["reason"].startswith("torch.fx.symbolic_trace failed: ")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = graphopt.Pipeline([registry.passes.get("export")(), registry.passes.get("ort-fusions")()]).run(program)
    fusions = program.history[-1]
    assert fusions.notes["contrib_ops"] == MODELS[name][2]
    assert fusions.step_drift.max_abs <= 1e-5 and program.history[-1].total_drift.max_abs <= ATOL
    assert [str(d) for d in program.ir.graph.inputs[0].shape] == ["batch", "sequence"]
    _assert_matches_torch(bundle, graphopt.compile(program, "onnxruntime"))


@pytest.fixture
def bert_folder(tmp_path: Path) -> Path:
    """A saved tiny BERT with a real tokenizer (MiniLM's, a BERT WordPiece vocabulary)."""
    folder = tmp_path / "tiny-bert"
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(**SMALL)).save_pretrained(folder)
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm_dir() / name, folder)
    return folder


def test_local_folder_through_compress(bert_folder: Path, tmp_path: Path) -> None:
    result = graphopt.compress(f"hf:{bert_folder}", "fp32", out=tmp_path / "out")
    report = result.report
    assert report["model"] == "tiny-bert" and report["trace"]["path"] == "eager"
    assert "symbolic_trace failed" in report["trace"]["reason"]
    assert [p["name"] for p in report["passes"]] == ["export", "ort-fusions"]
    assert report["passes"][1]["notes"]["contrib_ops"] == {
        "Attention": 2, "BiasGelu": 2, "EmbedLayerNormalization": 1, "SkipLayerNormalization": 4}
    assert report["final_check"]["onnxruntime"]["max_abs"] < ATOL
    assert result.program.example_inputs["input_ids"][0, 0] == 101  # tokenized: [CLS] first
    bundle = registry.models.get("hf")(str(bert_folder))
    _assert_matches_torch(bundle, result.executables["onnxruntime"])


def test_refusals_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"only: download it first .*hf:DIR"):
        graphopt.compress("hf:bert-base-uncased", "fp32")
    with pytest.raises(ModelError, match=r"needs a folder: --model hf:PATH"):
        graphopt.compress("hf:", "fp32")
    with pytest.raises(ModelError, match="no config.json"):
        graphopt.compress(f"hf:{tmp_path}", "fp32")
