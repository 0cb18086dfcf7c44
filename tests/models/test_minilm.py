"""Our BertEncoder against sentence-transformers, and its fx / export / padding contracts."""

from __future__ import annotations

import fnmatch
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from graphopt.data import load_sentences
from graphopt.models.minilm import (
    BertConfig,
    BertEncoder,
    ModelBundle,
    _hf_key,
    _load_hf_weights,
    load_minilm,
    minilm_dir,
    tiny_encoder,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

COSINE_FLOOR = 0.9999


@pytest.fixture(scope="module")
def minilm() -> ModelBundle:
    return load_minilm()


@pytest.fixture(scope="module")
def sentences() -> list[str]:
    # 20 real sentences across topics, short and long, from the frozen heldout split.
    heldout = load_sentences("heldout")
    return list(heldout[:: max(1, len(heldout) // 20)][:20])


@pytest.mark.slow
def test_matches_sentence_transformers(minilm: ModelBundle, sentences: list[str]) -> None:
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(minilm_dir()), device="cpu")
    expected = reference.encode(sentences, convert_to_tensor=True, batch_size=32)
    with torch.no_grad():
        ours = minilm.module(**minilm.tokenizer(sentences))
    cosine = F.cosine_similarity(ours, expected.to(ours.dtype), dim=1)
    assert len(sentences) == 20
    assert cosine.min() >= COSINE_FLOOR, (
        f"cosine vs sentence-transformers must be >= {COSINE_FLOOR} for every sentence; "
        f"worst {cosine.min().item():.7f} on {sentences[int(cosine.argmin())]!r}"
    )
    norms = ours.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-6, rtol=0)


def test_example_inputs(minilm: ModelBundle) -> None:
    ex = minilm.example_inputs
    assert set(ex) == {"input_ids", "attention_mask"}
    for tensor in ex.values():
        assert tensor.shape == (2, 16) and tensor.dtype == torch.int64
    # Two different real sentences, both padded: padding is exercised.
    assert (ex["attention_mask"].sum(dim=1) < 16).all()
    assert ex["attention_mask"][0].sum() != ex["attention_mask"][1].sum()


def test_module_names_for_globbing(minilm: ModelBundle) -> None:
    names = dict(minilm.module.named_modules())
    linears = [n for n, m in names.items() if isinstance(m, torch.nn.Linear)]
    assert len(fnmatch.filter(linears, "layers.*.attention.*")) == 6 * 4
    assert len(fnmatch.filter(linears, "layers.*.ffn.*")) == 6 * 2
    for name in (
        "embeddings.word_embeddings",
        "embeddings.position_embeddings",
        "embeddings.token_type_embeddings",
        "embeddings.LayerNorm",
        "layers.5.attention_norm",
        "layers.5.ffn_norm",
    ):
        assert name in names
    assert not minilm.module.training


def test_fx_trace_equals_eager(minilm: ModelBundle, sentences: list[str]) -> None:
    traced = torch.fx.symbolic_trace(minilm.module)
    for inputs in (minilm.example_inputs, minilm.tokenizer(sentences[:5])):
        with torch.no_grad():
            torch.testing.assert_close(
                traced(**inputs), minilm.module(**inputs), atol=1e-6, rtol=0
            )


@pytest.mark.slow
def test_export_dynamic_batch_and_sequence(minilm: ModelBundle) -> None:
    batch, sequence = torch.export.Dim("batch", max=1024), torch.export.Dim("sequence", max=512)
    ex = minilm.example_inputs
    program = torch.export.export(
        minilm.module,
        (ex["input_ids"], ex["attention_mask"]),
        dynamic_shapes=({0: batch, 1: sequence}, {0: batch, 1: sequence}),
    )
    exported = program.module()
    generator = torch.Generator().manual_seed(0)
    for b, s in ((1, 7), (3, 33), (3, 7), (1, 33)):
        ids = torch.randint(1000, 30000, (b, s), generator=generator)
        mask = torch.ones(b, s, dtype=torch.int64)
        mask[-1, s // 2 :] = 0
        with torch.no_grad():
            torch.testing.assert_close(
                exported(ids, mask), minilm.module(ids, mask), atol=1e-5, rtol=0
            )


def test_padding_does_not_change_embedding(minilm: ModelBundle, sentences: list[str]) -> None:
    with torch.no_grad():
        alone = minilm.module(**minilm.tokenizer(sentences[:3]))
        padded = minilm.module(**minilm.tokenizer(sentences[:3], pad_to=64))
        single = minilm.module(**minilm.tokenizer(sentences[1:2]))
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(single[0], alone[1], atol=1e-5, rtol=0)


def test_tokenizer_contract(minilm: ModelBundle) -> None:
    tokenizer = minilm.tokenizer
    batch = tokenizer(["one two three", "a much longer sentence " * 50], max_length=20)
    assert batch["input_ids"].shape == (2, 20)
    assert batch["attention_mask"][0].sum() == 5  # [CLS] one two three [SEP]
    assert batch["input_ids"][1, -1] == 102  # truncation keeps [SEP]
    with pytest.raises(ValueError, match="pad_to=4"):
        tokenizer(["a sentence that is longer than four tokens"], pad_to=4)
    with pytest.raises(TypeError):
        tokenizer("not a list")


def test_tiny_encoder_is_deterministic_and_small() -> None:
    a, b, c = tiny_encoder(0), tiny_encoder(0), tiny_encoder(1)
    state_a, state_b, state_c = (x.module.state_dict() for x in (a, b, c))
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert not torch.equal(state_a["layers.0.attention.query.weight"],
                           state_c["layers.0.attention.query.weight"])
    size = sum(p.numel() * p.element_size() for p in a.module.parameters())
    assert size < 2.5e6, f"tiny encoder is {size / 1e6:.2f} MB, budget 2.5 MB"
    assert int(a.example_inputs["input_ids"].max()) < a.module.config.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(a.module(**a.example_inputs), b.module(**b.example_inputs))
        traced = torch.fx.symbolic_trace(a.module)
        torch.testing.assert_close(traced(**a.example_inputs), a.module(**a.example_inputs))


def test_tiny_encoder_trains() -> None:
    module = tiny_encoder().module.train()
    ids = torch.randint(0, 1000, (2, 8))
    out = module(ids, torch.ones_like(ids))
    out.sum().backward()
    assert module.layers[0].attention.query.weight.grad is not None


def test_hf_key_mapping_round_trip(tmp_path) -> None:
    """Save tiny weights under HF names, load into a fresh encoder; drop one, get its name."""
    source = tiny_encoder(3)
    hf_state = {_hf_key(k): v.contiguous() for k, v in source.module.state_dict().items()}
    assert "encoder.layer.1.attention.output.LayerNorm.weight" in hf_state
    save_file(hf_state, tmp_path / "full.safetensors")
    target = BertEncoder(source.module.config).eval()
    _load_hf_weights(target, tmp_path / "full.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(
            target(**source.example_inputs), source.module(**source.example_inputs)
        )

    del hf_state["encoder.layer.0.intermediate.dense.weight"]
    save_file(hf_state, tmp_path / "partial.safetensors")
    with pytest.raises(KeyError, match="encoder.layer.0.intermediate.dense.weight"):
        _load_hf_weights(BertEncoder(source.module.config), tmp_path / "partial.safetensors")


def test_config_rejects_bad_heads() -> None:
    with pytest.raises(ValueError, match="heads"):
        BertConfig(hidden=64, heads=5)
