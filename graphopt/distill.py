"""Distillation losses, and the captures they need, without model-specific code.

Four terms, combined with weights by `DistillationLoss` (every figure is averaged, so the
weights are comparable across batch sizes):

- `SoftLabelLoss` (Hinton): ``KL(softmax(z_t/T) ‖ softmax(z_s/T)) · T²``, averaged over
  rows. For a sentence encoder (``logits="similarity"``) the logits are *in-batch cosine
  similarities*: with unit sentence embeddings ``ê_i`` (the model's output, mean-pooled
  over real tokens first if it is ``[batch, seq, dim]``),
  ``z_ij = cos(e_i, e_j) / τ`` for ``j ≠ i``: row ``i`` is a distribution over the *other*
  sentences of the batch (the diagonal is dropped, since ``cos(e_i, e_i) = 1`` says
  nothing), so a batch of ``B`` gives ``B`` rows of ``B − 1`` logits. ``τ`` is
  ``similarity_temperature`` (0.05, the scale of contrastive sentence-embedding training),
  ``T`` the Hinton temperature. For a model with a head (``logits="output"``) the logits
  are its output ``[batch, classes]`` or ``[batch, seq, classes]`` (padded positions out).
- `HiddenStateLoss`: MSE (mean over real tokens and features) or ``1 − cos`` (mean over
  real tokens) between each student layer's output and its mapped teacher layer's.
- `AttentionLoss` (TinyBERT / MiniLM): ``KL(p_t ‖ p_s)`` between attention probabilities
  of mapped layers, summed over keys, averaged over heads and real (non-padded) queries.
- `OutputLoss`: ``1 − cos`` (or MSE) between the models' outputs (sentence embeddings).

Layer outputs are captured by module name: a forward hook on the layer module of an eager
model, or, in a `torch.fx.GraphModule` (whose layers are no longer called modules), a tap
node after the last node of the layer's scope (``node.meta["nn_module_stack"]``), inserted
for the capture and removed after. Attention probabilities are captured by
`AttentionCapture`, a `TorchFunctionMode` that sees every call of
``F.scaled_dot_product_attention`` (there is no softmax node to read) and recomputes
``log_softmax(QKᵀ·scale + mask)`` from its arguments, honouring ``attn_mask`` (bool or
additive), ``is_causal``, ``scale`` and ``enable_gqa``; the call itself runs unchanged.
No library offers this for SDPA models, hence the hand-written capture.

Layers are found generically (`find_layers`): the longest ``nn.ModuleList`` of modules of
one class (``layers`` in our encoder, ``encoder.layer`` in HF BERT), or in an fx graph the
longest run of scopes ``<prefix>.0 … <prefix>.n-1`` of one class. Student layer ``i`` maps
to teacher layer ``round_half_up((i + 1) · L_t / L_s) − 1`` unless a map is given
(`uniform_layer_map`): 3 of 6 gives 1, 3, 5, so the last layers always meet.

Example::

    loss = DistillationLoss([SoftLabelLoss(temperature=2.0), HiddenStateLoss(), AttentionLoss()])
    loss.bind(student, teacher)
    with torch.no_grad():
        t = loss.run(teacher, batch, "teacher")
    value = loss(loss.run(student, batch, "student"), t, batch)
    value.total.backward()
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from graphopt.program import Program, flatten_outputs

__all__ = [
    "AttentionCapture",
    "AttentionLoss",
    "Captured",
    "DistillationLoss",
    "HiddenStateLoss",
    "LayerList",
    "LossValue",
    "OutputLoss",
    "SoftLabelLoss",
    "attention_kl",
    "attention_log_probs",
    "capture_outputs",
    "find_layers",
    "hidden_state_loss",
    "keep_teacher",
    "scope_output",
    "sentence_embedding",
    "similarity_logits",
    "soft_label_kl",
    "uniform_layer_map",
]

logger = logging.getLogger(__name__)

Metric = Literal["mse", "cosine"]


# ----------------------------------------------------------------------------- layers

@dataclasses.dataclass(frozen=True)
class LayerList:
    """The Transformer layers of a model: ``<prefix>.0`` … ``<prefix>.<count-1>``."""

    prefix: str
    count: int

    def name(self, index: int) -> str:
        return f"{self.prefix}.{index}"


def _fx_scopes(gm: torch.fx.GraphModule) -> dict[str, type]:
    """Scope name → module class, from the ``nn_module_stack`` that ``symbolic_trace`` records."""
    scopes: dict[str, type] = {}
    for node in gm.graph.nodes:
        for key, (_, cls) in (node.meta.get("nn_module_stack") or {}).items():
            scopes.setdefault(key, cls)
    return scopes


def find_layers(module: nn.Module, prefix: str | None = None) -> LayerList:
    """The model's layer list: ``prefix`` if given, else the longest uniform one.

    Raises:
        ValueError: no layer list (or none at ``prefix``), naming what was found.
    """
    groups: dict[str, dict[int, type]] = {}
    if isinstance(module, torch.fx.GraphModule):
        for key, cls in _fx_scopes(module).items():
            parent, _, last = key.rpartition(".")
            if last.isdigit() and "@" not in key:
                groups.setdefault(parent, {})[int(last)] = cls
    else:
        for name, sub in module.named_modules():
            if isinstance(sub, nn.ModuleList) and len(sub):
                groups[name] = {i: type(child) for i, child in enumerate(sub)}
    uniform = {p: len(g) for p, g in groups.items()
               if sorted(g) == list(range(len(g))) and len(set(g.values())) == 1}
    if prefix is not None:
        if prefix not in uniform:
            raise ValueError(f"no layer list {prefix!r} in {type(module).__name__}; "
                             f"layer lists found: {sorted(uniform) or 'none'}")
        return LayerList(prefix, uniform[prefix])
    if not uniform:
        raise ValueError(f"{type(module).__name__} has no list of Transformer layers "
                         "(an nn.ModuleList of modules of one class); name it with layers=...")
    best = max(uniform.values())
    prefix = next(p for p, n in uniform.items() if n == best)
    return LayerList(prefix, best)


def uniform_layer_map(student_layers: int, teacher_layers: int) -> tuple[int, ...]:
    """Teacher layer for each student layer: ``round_half_up((i+1)·L_t/L_s) − 1``."""
    if not 0 < student_layers <= teacher_layers:
        raise ValueError(f"cannot map {student_layers} student layers onto {teacher_layers} teacher layers")
    return tuple(math.floor((i + 1) * teacher_layers / student_layers + 0.5) - 1 for i in range(student_layers))


def keep_teacher(program: Program) -> nn.Module:
    """Sets ``program.teacher`` to a frozen copy of its module, unless a teacher is already kept.

    A lossy pass that changes the architecture calls this before rewriting, so that a later
    ``distill`` learns from the model before the first such pass, not from a damaged one.
    """
    if program.teacher is None:
        if program.kind != "module":
            raise ValueError("keep_teacher needs a program of kind 'module'")
        teacher = copy.deepcopy(program.ir).eval()
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)
        program.teacher = teacher
    return program.teacher


# ----------------------------------------------------------------------------- captures

def _first_tensor(output: Any) -> torch.Tensor:
    tensors = flatten_outputs(output)
    if not tensors:
        raise ValueError("the captured module returned no tensor")
    return tensors[0]


class _Tap(nn.Module):
    """Identity that records its input: inserted in an fx graph after a scope's last node."""

    def __init__(self, store: dict[str, torch.Tensor], key: str) -> None:
        super().__init__()
        self.store, self.key = store, key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.store[self.key] = x
        return x


def scope_output(gm: torch.fx.GraphModule, scope: str) -> torch.fx.Node:
    """The last node of ``scope`` whose value is used outside it: the scope's output."""
    inside = [n for n in gm.graph.nodes if scope in (n.meta.get("nn_module_stack") or {})]
    members = set(inside)
    leaving = [n for n in inside if any(user not in members for user in n.users)]
    if not leaving:
        raise ValueError(f"no node of scope {scope!r} in the fx graph; scopes: "
                         f"{sorted(_fx_scopes(gm))[:10]}…")
    return leaving[-1]


@contextlib.contextmanager
def capture_outputs(module: nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Records the output of each named module (first tensor of it) while the block runs.

    In an fx ``GraphModule``, a name that is not a called submodule is a scope: a tap is
    inserted after the scope's output node and removed on exit.
    """
    store: dict[str, torch.Tensor] = {}
    handles, taps = [], []
    called = ({n.target for n in module.graph.nodes if n.op == "call_module"}
              if isinstance(module, torch.fx.GraphModule) else None)
    try:
        for name in names:
            if called is None or name in called:
                sub = module.get_submodule(name)
                handles.append(sub.register_forward_hook(
                    lambda _m, _i, out, key=name: store.__setitem__(key, _first_tensor(out))))
                continue
            assert isinstance(module, torch.fx.GraphModule)
            node = scope_output(module, name)
            tap_name = f"_graphopt_tap_{len(taps)}"
            module.add_submodule(tap_name, _Tap(store, name))
            with module.graph.inserting_after(node):
                taps.append((tap_name, module.graph.call_module(tap_name, (node,))))
        if taps:
            module.recompile()
        yield store
    finally:
        for handle in handles:
            handle.remove()
        if taps:
            assert isinstance(module, torch.fx.GraphModule)
            for tap_name, tap in taps:
                module.graph.erase_node(tap)
                module.delete_submodule(tap_name)
            module.recompile()


def attention_log_probs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor | None = None,
                        attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                        is_causal: bool = False, scale: float | None = None,
                        enable_gqa: bool = False) -> torch.Tensor:
    """``log_softmax(QKᵀ·scale + mask)`` as ``F.scaled_dot_product_attention`` computes it.

    Takes SDPA's own arguments (value and dropout are ignored: the probabilities are the
    clean ones). Masked scores are clamped to the dtype's finite minimum, so a row whose
    keys are all masked is uniform rather than NaN. Returns float32 ``[..., L, S]``.
    """
    scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    if enable_gqa and key.size(-3) != query.size(-3):
        key = key.repeat_interleave(query.size(-3) // key.size(-3), dim=-3)
    scores = (query @ key.transpose(-2, -1)).float() * scale
    lowest = torch.finfo(scores.dtype).min
    if is_causal:
        causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~causal, lowest)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, lowest)
        else:
            scores = scores + attn_mask.float()
    return scores.clamp(min=lowest).log_softmax(dim=-1)


class AttentionCapture(TorchFunctionMode):
    """Records attention log-probabilities of every ``F.scaled_dot_product_attention`` call.

    Args:
        keep: call indices to record (others are only counted); ``None`` records all.

    Attributes:
        maps: call index → float32 log-probabilities ``[batch, heads, queries, keys]``.
        calls: how many SDPA calls were seen.

    Example::

        with AttentionCapture() as capture:
            model(**batch)
        first_layer = capture.maps[0].exp()  # rows sum to 1
    """

    def __init__(self, keep: set[int] | None = None) -> None:
        super().__init__()
        self.keep = keep
        self.maps: dict[int, torch.Tensor] = {}
        self.calls = 0

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (),
                           kwargs: Mapping[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        # The mode is inactive inside this handler, so neither call below re-enters it.
        if func is F.scaled_dot_product_attention:
            if self.keep is None or self.calls in self.keep:
                self.maps[self.calls] = attention_log_probs(*args, **kwargs)
            self.calls += 1
        return func(*args, **kwargs)


# ----------------------------------------------------------------------------- pure losses

def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` over the positions where ``mask`` (broadcastable, 0/1) is set."""
    if mask is None:
        return values.mean()
    weights = mask.to(values.dtype).expand_as(values)
    return (values * weights).sum() / weights.sum().clamp(min=1.0)


def similarity_logits(embeddings: torch.Tensor, tau: float) -> torch.Tensor:
    """In-batch cosine logits ``z_ij = cos(e_i, e_j)/τ``, diagonal dropped: ``[B, B−1]``."""
    unit = F.normalize(embeddings.float(), dim=-1)
    logits = unit @ unit.T / tau
    n = logits.size(0)
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=logits.device)
    return logits[off_diagonal].view(n, n - 1)


def soft_label_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """``KL(softmax(z_t/T) ‖ softmax(z_s/T)) · T²`` over the last axis, averaged over rows.

    Args:
        mask: 0/1 over the leading axes (``[B, S]`` for token logits); rows with 0 are left out.
    """
    log_s = (student_logits.float() / temperature).log_softmax(dim=-1)
    log_t = (teacher_logits.float() / temperature).log_softmax(dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(dim=-1)
    return _masked_mean(kl, mask) * temperature ** 2


def hidden_state_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None,
                      metric: Metric = "mse") -> torch.Tensor:
    """MSE (mean over real positions and features) or ``1 − cos`` (mean over real positions).

    Args:
        student, teacher: ``[..., dim]`` of the same shape.
        mask: 0/1 over the leading axes (``[B, S]``), or ``None`` for all positions.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"hidden states differ in shape: student {tuple(student.shape)}, teacher "
                         f"{tuple(teacher.shape)}; hidden-state distillation needs equal widths")
    s, t = student.float(), teacher.float()
    per_position = (s - t).pow(2).mean(dim=-1) if metric == "mse" else 1.0 - F.cosine_similarity(s, t, dim=-1)
    return _masked_mean(per_position, mask)


def attention_kl(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor,
                 query_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``Σ_k p_t (log p_t − log p_s)`` averaged over heads and real queries.

    Args:
        student_log_probs, teacher_log_probs: ``[B, H, Q, K]`` log-probabilities.
        query_mask: ``[B, Q]`` 0/1, padded queries 0.
    """
    if student_log_probs.shape != teacher_log_probs.shape:
        raise ValueError(f"attention maps differ in shape: student {tuple(student_log_probs.shape)}, "
                         f"teacher {tuple(teacher_log_probs.shape)} (heads must match)")
    kl = (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(dim=-1)
    return _masked_mean(kl, None if query_mask is None else query_mask[:, None, :])


# ----------------------------------------------------------------------------- terms

@dataclasses.dataclass
class Captured:
    """One model's forward on a batch: outputs, mapped layer outputs, mapped attention maps."""

    outputs: tuple[torch.Tensor, ...]
    hidden: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    attention: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class LossValue:
    """The weighted total (what is back-propagated) and each unweighted term."""

    total: torch.Tensor
    parts: dict[str, torch.Tensor]


def sentence_embedding(output: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``[B, D]`` as is; ``[B, S, D]`` mean-pooled over real tokens."""
    if output.dim() == 2:
        return output
    if mask is None:
        return output.mean(dim=1)
    weights = mask.to(output.dtype).unsqueeze(-1)
    return (output * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


@dataclasses.dataclass(frozen=True)
class SoftLabelLoss:
    """Hinton's soft labels on in-batch similarity logits, or on a head's logits."""

    weight: float = 1.0
    temperature: float = 1.0
    logits: Literal["similarity", "output"] = "similarity"
    similarity_temperature: float = 0.05
    name: ClassVar[str] = "soft_label"
    needs: ClassVar[str] = "outputs"

    def __call__(self, s: Captured, t: Captured, mask: torch.Tensor | None) -> torch.Tensor:
        zs, zt = s.outputs[0], t.outputs[0]
        if self.logits == "output":
            return soft_label_kl(zs, zt, self.temperature, mask if zs.dim() == 3 else None)
        if zs.size(0) < 2:
            return zs.new_zeros(())
        tau = self.similarity_temperature
        return soft_label_kl(similarity_logits(sentence_embedding(zs, mask), tau),
                             similarity_logits(sentence_embedding(zt, mask), tau), self.temperature)


@dataclasses.dataclass(frozen=True)
class HiddenStateLoss:
    """MSE or cosine between each student layer's output and its mapped teacher layer's."""

    weight: float = 1.0
    metric: Metric = "mse"
    name: ClassVar[str] = "hidden"
    needs: ClassVar[str] = "hidden"

    def __call__(self, s: Captured, t: Captured, mask: torch.Tensor | None) -> torch.Tensor:
        terms = [hidden_state_loss(s.hidden[i], t.hidden[i], mask, self.metric) for i in s.hidden]
        return torch.stack(terms).mean()


@dataclasses.dataclass(frozen=True)
class AttentionLoss:
    """KL between mapped layers' attention probabilities."""

    weight: float = 1.0
    name: ClassVar[str] = "attention"
    needs: ClassVar[str] = "attention"

    def __call__(self, s: Captured, t: Captured, mask: torch.Tensor | None) -> torch.Tensor:
        return torch.stack([attention_kl(s.attention[i], t.attention[i], mask) for i in s.attention]).mean()


@dataclasses.dataclass(frozen=True)
class OutputLoss:
    """``1 − cos`` or MSE between the models' outputs (sentence embeddings)."""

    weight: float = 1.0
    metric: Metric = "cosine"
    name: ClassVar[str] = "output"
    needs: ClassVar[str] = "outputs"

    def __call__(self, s: Captured, t: Captured, mask: torch.Tensor | None) -> torch.Tensor:
        return hidden_state_loss(s.outputs[0], t.outputs[0], mask if s.outputs[0].dim() == 3 else None,
                                 self.metric)


Term = SoftLabelLoss | HiddenStateLoss | AttentionLoss | OutputLoss


class DistillationLoss:
    """A weighted sum of terms, and the layer mapping between one student and one teacher.

    Args:
        terms: the loss terms, each carrying its weight; terms of weight 0 are dropped.
        layer_map: the teacher layer for each student layer (default `uniform_layer_map`).
        student_layers, teacher_layers: layer-list prefixes (``"layers"``); found if ``None``.

    Raises:
        ValueError: no term of positive weight, a repeated term, a negative weight.
    """

    def __init__(self, terms: Sequence[Term], *, layer_map: Sequence[int] | None = None,
                 student_layers: str | None = None, teacher_layers: str | None = None) -> None:
        for term in terms:
            if not (term.weight >= 0 and math.isfinite(term.weight)):
                raise ValueError(f"loss {term.name!r}: weight must be finite and >= 0, got {term.weight}")
        self.terms = tuple(term for term in terms if term.weight > 0)
        names = [term.name for term in self.terms]
        if not self.terms:
            raise ValueError("DistillationLoss needs at least one term with a positive weight")
        if len(set(names)) != len(names):
            raise ValueError(f"DistillationLoss: each term may appear once, got {names}")
        self.layer_map = tuple(layer_map) if layer_map else None
        self._prefixes = {"student": student_layers, "teacher": teacher_layers}
        self._layers: dict[str, LayerList] = {}
        self.pairs: tuple[int, ...] = ()

    def __repr__(self) -> str:
        return f"DistillationLoss({list(self.terms)!r}, layer_map={self.pairs or self.layer_map})"

    @property
    def _needs(self) -> set[str]:
        return {term.needs for term in self.terms}

    def bind(self, student: nn.Module, teacher: nn.Module) -> DistillationLoss:
        """Finds both models' layers and fixes the map; needed before `run` when layers are used."""
        if not self._needs & {"hidden", "attention"}:
            return self
        self._layers = {"student": find_layers(student, self._prefixes["student"]),
                        "teacher": find_layers(teacher, self._prefixes["teacher"])}
        n_s, n_t = self._layers["student"].count, self._layers["teacher"].count
        pairs = self.layer_map or uniform_layer_map(n_s, n_t)
        if len(pairs) != n_s or not all(0 <= j < n_t for j in pairs):
            raise ValueError(f"layer_map {list(pairs)} must give one teacher layer in [0, {n_t}) for each "
                             f"of the {n_s} student layers")
        self.pairs = tuple(pairs)
        logger.info("distillation layer map (student -> teacher): %s",
                    ", ".join(f"{i}->{j}" for i, j in enumerate(self.pairs)))
        return self

    def run(self, model: nn.Module, inputs: Mapping[str, torch.Tensor],
            side: Literal["student", "teacher"]) -> Captured:
        """Runs ``model(**inputs)`` and captures what the terms need, keyed by student layer."""
        needs = self._needs
        if needs & {"hidden", "attention"} and not self._layers:
            raise RuntimeError("DistillationLoss.bind(student, teacher) must be called before run()")
        layers = self._layers.get(side)
        index = ({i: (i if side == "student" else j) for i, j in enumerate(self.pairs)} if layers else {})
        names = [layers.name(j) for j in index.values()] if layers and "hidden" in needs else []
        attention = AttentionCapture(set(index.values())) if "attention" in needs else None
        with capture_outputs(model, names) as hidden, attention or contextlib.nullcontext():
            outputs = flatten_outputs(model(**inputs))
        captured = Captured(outputs)
        if names:
            captured.hidden = {i: hidden[layers.name(j)] for i, j in index.items()}
        if attention is not None:
            if attention.calls != layers.count:
                raise ValueError(f"the {side} made {attention.calls} scaled_dot_product_attention calls "
                                 f"for {layers.count} layers ({layers.prefix}); attention distillation "
                                 "needs one call per layer (HF models: attn_implementation='sdpa')")
            captured.attention = {i: attention.maps[j] for i, j in index.items()}
        return captured

    def __call__(self, student: Captured, teacher: Captured, inputs: Mapping[str, torch.Tensor]) -> LossValue:
        mask = inputs.get("attention_mask")
        parts = {term.name: term(student, teacher, mask) for term in self.terms}
        total = torch.stack([term.weight * parts[term.name] for term in self.terms]).sum()
        return LossValue(total, parts)
