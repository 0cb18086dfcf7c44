"""Block-wise reconstruction: each Transformer layer of a student learns, alone, to reproduce the teacher's.

After a lossy rewrite of the weights (pruning, quantization), the student's layers are trained
one at a time, first to last: layer ``i`` gets the inputs that the student's own layers
``0 … i-1`` (already reconstructed) produce, and learns to give the output that the teacher's
layer ``i`` gives on the teacher's own inputs, by mean squared error over real tokens. So each
layer also corrects the error its predecessors left, and no step runs the whole model
forward and backward or the teacher at all (its outputs are computed once per layer): a step
costs about a sixth of an end-to-end distillation step on a six-layer model. This is the
layer-wise reconstruction of BRECQ (Li et al., 2021) and of the layer-wise distillation in
oBERT (Kurtic et al., 2022), here with the student's inputs propagated as in SparseGPT.

Measured on all-MiniLM-L6-v2 pruned to 90% (activation criterion with refit and sparse-90's
density table), held-out mean cosine with the dense model: one-shot 0.506; after 250 steps a
layer (batch 32, 2,048 sentences, both cores: ~190 s) 0.742 at lr 1e-3 and 0.784 at 6e-3 (the
default: Adam wants a large step here; 2e-2 diverges), where end-to-end distillation needed
2,800 steps and 29 minutes for 0.782; 500 steps a layer on 4,096 sentences (392 s) 0.807, and
2,000 steps a layer on 8,192 sentences (24 minutes) 0.832.

A caller can prune a block further while it trains (``prune_at``, ``prune``): its steps are cut
into phases, and each phase that ends worse than it began is put back before the next pruning.
The prune pass's ``reconstruct_rounds`` does so (0.797 -> 0.826 at 250 steps a layer; 0.887 with
2,000 steps a block of two layers in 25 minutes; a block of two at 63% sparsity diverged at lr
6e-3 in its first phase and was put back).

The model is split with ``torch.fx.passes.split_module`` at the layer scopes that
``symbolic_trace`` records (``graphopt.distill.find_layers``): ``submod_0`` is what comes
before the first layer, ``submod_{i+1}`` layer ``i`` (with any glue up to the next layer),
the last partition what follows the last layer. The partitions call the student's own
submodules, so training them trains the student. Both models run in eval mode (no dropout)
and are put back in the mode they had.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.split_module import split_module

from graphopt.distill import LayerList, find_layers, hidden_state_loss
from graphopt.program import flatten_outputs

__all__ = ["LayerReconstruction", "reconstruct_layers", "split_at_layers"]

logger = logging.getLogger(__name__)

Batch = Mapping[str, torch.Tensor]


def _layer_index(node: torch.fx.Node, layers: LayerList) -> int | None:
    for key in node.meta.get("nn_module_stack") or {}:
        parent, _, last = key.rpartition(".")
        if parent == layers.prefix and last.isdigit():
            return int(last)
    return None


def split_at_layers(gm: torch.fx.GraphModule, layers: LayerList | None = None, *,
                    layers_per_block: int = 1) -> torch.fx.GraphModule:
    """``gm`` as a chain of partitions ``submod_0`` … ``submod_{B+1}``: block ``b`` (layers
    ``b·k … b·k+k-1`` for ``k = layers_per_block``) in ``submod_{b+1}``, so with ``k = 1`` layer
    ``i`` is in ``submod_{i+1}``.

    A node outside every layer joins the partition of the last layer before it (``submod_0``
    before the first one; what follows the last layer gets ``submod_{B+1}``); a ``get_attr``
    joins the partition of its first user, so no partition passes a parameter to another.
    The partitions share ``gm``'s submodules and parameters.

    Raises:
        ValueError: ``gm`` has no layer list, ``layers_per_block`` < 1, or a layer's nodes are
            not contiguous.
    """
    if layers_per_block < 1:
        raise ValueError(f"split_at_layers: layers_per_block must be >= 1, got {layers_per_block}")
    layers = layers or find_layers(gm)
    blocks = -(-layers.count // layers_per_block)
    part: dict[torch.fx.Node, int] = {}
    current, last_index, seen_last = 0, -1, False
    for node in gm.graph.nodes:
        index = _layer_index(node, layers)
        if index is not None:
            if index < last_index:
                raise ValueError(f"split_at_layers: {node.name} of layer {index} comes after layer {last_index}")
            last_index = index
            current = index // layers_per_block + 1
            seen_last = seen_last or index == layers.count - 1
        elif seen_last and node.op not in ("get_attr", "output"):
            current = blocks + 1
        part[node] = current
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.users:
            part[node] = part[next(iter(node.users))]
    return split_module(gm, gm, lambda node: part[node], keep_original_order=True)


class _Chain:
    """Runs a split model's top graph over many batches a partition at a time, keeping each batch's live values.

    ``inputs(name)`` runs every batch up to partition ``name`` and returns its arguments;
    ``outputs(name)`` runs the partition and returns what it gave. Values no later node uses
    are dropped, so the memory held is what crosses the current cut (the hidden states and
    the attention mask). So the model runs once over the batches in all, not once per layer.
    """

    def __init__(self, split: torch.fx.GraphModule, batches: Sequence[Batch]) -> None:
        self.nodes = list(split.graph.nodes)
        self.interpreter = torch.fx.Interpreter(split)
        last_use = {node: i for i, node in enumerate(self.nodes)}
        for i, node in enumerate(self.nodes):
            for used in node.all_input_nodes:
                last_use[used] = i
        self.dead_after: dict[int, list[torch.fx.Node]] = {}
        for node, i in last_use.items():
            self.dead_after.setdefault(i, []).append(node)
        self.envs: list[dict[torch.fx.Node, Any]] = [{} for _ in batches]
        self.batches, self.position = batches, 0

    @torch.no_grad()
    def _step(self) -> None:
        """Runs the next node on every batch (values computed without grad: nothing to detach)."""
        node = self.nodes[self.position]
        for env, batch in zip(self.envs, self.batches, strict=True):
            if node.op == "placeholder":
                name = node.target.lstrip("*")
                if name not in batch and not node.args:
                    raise ValueError(f"reconstruct_layers: the batches have no input {name!r}")
                env[node] = batch[name] if name in batch else node.args[0]
            else:
                self.interpreter.env = env
                env[node] = self.interpreter.run_node(node)
            for dead in self.dead_after.get(self.position, ()):
                if dead is not node:
                    env.pop(dead, None)
        self.position += 1

    def _run_until(self, stop: torch.fx.Node) -> None:
        while self.nodes[self.position] is not stop:
            self._step()

    def _node(self, name: str) -> torch.fx.Node:
        return next(n for n in self.nodes if n.op == "call_module" and n.target == name)

    def inputs(self, name: str) -> list[tuple[Any, ...]]:
        node = self._node(name)
        self._run_until(node)
        return [tuple(torch.fx.node.map_arg(node.args, env.__getitem__)) for env in self.envs]

    def outputs(self, name: str) -> list[Any]:
        node = self._node(name)
        self._run_until(node)
        self._step()
        return [env[node] for env in self.envs]


def _block_loss(out: Any, target: Any, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error summed over the partition's float outputs; over real tokens for [batch, tokens, dim] ones."""
    terms = []
    for o, t in zip(flatten_outputs(out), flatten_outputs(target), strict=True):
        if not o.is_floating_point():
            continue
        by_token = token_mask is not None and o.dim() == 3 and o.shape[:2] == token_mask.shape
        terms.append(hidden_state_loss(o, t, token_mask) if by_token else F.mse_loss(o, t))
    if not terms:
        raise ValueError("reconstruct_layers: a layer has no floating-point output to reconstruct")
    return torch.stack(terms).sum()


@dataclasses.dataclass(frozen=True)
class LayerReconstruction:
    """One block's reconstruction: its mean squared error against the teacher's before and after.

    ``loss_before`` is the error the block started with, ``loss_after`` the one it ended with
    (after any pruning during its reconstruction, which may leave it higher). ``reverted``: how
    many phases training left worse than it found them (a learning rate too high for the model),
    each put back as it was.
    """

    layer: str
    steps: int
    loss_before: float
    loss_after: float
    seconds: float
    reverted: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in dataclasses.asdict(self).items()}


def _mean_loss(part: nn.Module, inputs: list[Any], targets: list[Any], masks: list[torch.Tensor | None],
               sample: Sequence[int]) -> float:
    with torch.no_grad():
        return sum(float(_block_loss(part(*inputs[j]), targets[j], masks[j])) for j in sample) / len(sample)


class _Phase:
    """The weights and error a phase of a block's training starts from, put back if it ends worse."""

    def __init__(self, params: list[nn.Parameter], error: float) -> None:
        self.params, self.error = params, error
        self.weights = [p.detach().clone() for p in params]

    def put_back_if_worse(self, error: float, optimizer: torch.optim.Optimizer) -> bool:
        if error <= self.error:
            return False
        with torch.no_grad():
            for p, p0 in zip(self.params, self.weights, strict=True):
                p.copy_(p0)
        optimizer.state.clear()  # its moments came from the steps just undone
        return True


def reconstruct_layers(student: torch.fx.GraphModule, teacher: torch.fx.GraphModule, batches: Sequence[Batch], *,
                       steps: int, lr: float = 6e-3, seed: int = 0, layers: LayerList | None = None,
                       layers_per_block: int = 1, after_step: Callable[[str], None] | None = None,
                       prune_at: Sequence[int] = (), prune: Callable[[Sequence[str], int], None] | None = None,
                       progress: Callable[[int, int, LayerReconstruction], None] | None = None,
                       ) -> list[LayerReconstruction]:
    """Trains each block of ``layers_per_block`` layers of ``student`` to reproduce ``teacher``'s, first to last.

    See the module doc; by default each block is one layer.

    Args:
        student: the fx model to reconstruct, in place; it and ``teacher`` must have the same
            layer list (the same graph, as after a weight-only rewrite).
        teacher: the reference model; not changed.
        batches: model inputs (``input_ids``, ``attention_mask``, …); ``attention_mask``, when
            present, weights the error by real tokens.
        steps: Adam steps per block, each on one batch drawn with ``seed``; the learning rate
            decays from ``lr`` to 0 on a cosine. A phase of a block (all its steps, or those
            between two ``prune_at`` points) whose error on the first 8 batches ends higher than
            it began is put back as it was (``reverted`` counts them).
        layers_per_block: how many consecutive layers are trained together, to give the
            teacher's output of the last of them (1: each layer alone).
        after_step: called with each trained layer's name (``layers.name(i)``) after each step
            (re-applying that layer's pruning masks).
        prune_at: steps of each block (increasing, within ``1 … steps-1``) before which ``prune``
            is called: the block's training is cut into phases at them.
        prune: called with the block's layer names and the index of the point in ``prune_at``;
            it prunes those layers further (``after_step`` then keeps the new masks).
        progress: called with (block index + 1, block count, result) as each block finishes.

    Returns:
        One ``LayerReconstruction`` per block, in order (``layer`` names a block of several
        layers by its first layer and the last one's index: ``layers.0-1``).

    Raises:
        ValueError: no batches, ``steps`` or ``layers_per_block`` < 1, ``prune_at`` without ``prune``
            or not increasing within ``1 … steps-1``, or the two models' layers differ.
    """
    if not batches:
        raise ValueError("reconstruct_layers needs at least one batch")
    if steps < 1:
        raise ValueError(f"reconstruct_layers: steps must be >= 1, got {steps}")
    if layers_per_block < 1:
        raise ValueError(f"reconstruct_layers: layers_per_block must be >= 1, got {layers_per_block}")
    prune_at = list(prune_at)
    if prune_at and (prune is None or prune_at != sorted(set(prune_at)) or prune_at[0] < 1 or prune_at[-1] >= steps):
        raise ValueError(f"reconstruct_layers: prune_at must be increasing steps in 1 … {steps - 1} with a prune "
                         f"function, got {prune_at}")
    layers = layers or find_layers(student)
    if find_layers(teacher, layers.prefix) != layers:
        raise ValueError(f"reconstruct_layers: the teacher's layers differ from the student's {layers}")
    student_chain = _Chain(split_at_layers(student, layers, layers_per_block=layers_per_block), batches)
    teacher_chain = _Chain(split_at_layers(teacher, layers, layers_per_block=layers_per_block), batches)
    blocks = [range(first, min(first + layers_per_block, layers.count))
              for first in range(0, layers.count, layers_per_block)]
    token_masks = [batch.get("attention_mask") for batch in batches]
    rng = random.Random(seed)
    modes = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    results: list[LayerReconstruction] = []
    try:
        for index, block in enumerate(blocks):
            name = f"submod_{index + 1}"
            names = [layers.name(i) for i in block]
            label = names[0] if len(block) == 1 else f"{names[0]}-{block[-1]}"
            part = student_chain.interpreter.module.get_submodule(name)
            params = [p for p in part.parameters() if p.requires_grad]
            start = time.perf_counter()
            targets = teacher_chain.outputs(name)
            inputs = student_chain.inputs(name)
            sample = range(min(8, len(batches)))
            before = _mean_loss(part, inputs, targets, token_masks, sample)
            phase, reverted = _Phase(params, before), 0
            optimizer = torch.optim.Adam(params, lr=lr) if params else None
            for step in range(steps if params else 0):
                if step in prune_at:
                    error = _mean_loss(part, inputs, targets, token_masks, sample)
                    if phase.put_back_if_worse(error, optimizer):
                        reverted, error = reverted + 1, phase.error
                    prune(names, prune_at.index(step))
                    phase = _Phase(params, _mean_loss(part, inputs, targets, token_masks, sample))
                    logger.info("reconstruct: %s mse %.4g, pruned further before step %d: %.4g", label, error,
                                step, phase.error)
                for group in optimizer.param_groups:
                    group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / steps))
                j = rng.randrange(len(batches))
                loss = _block_loss(part(*inputs[j]), targets[j], token_masks[j])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if after_step is not None:
                    for layer_name in names:
                        after_step(layer_name)
            after = _mean_loss(part, inputs, targets, token_masks, sample)
            if optimizer is not None and phase.put_back_if_worse(after, optimizer):
                reverted, after = reverted + 1, phase.error
            result = LayerReconstruction(label, steps if params else 0, before, after, time.perf_counter() - start,
                                         reverted)
            logger.info("reconstruct: %s mse %.4g -> %.4g (%d steps, %.1f s)%s", result.layer, result.loss_before,
                        result.loss_after, result.steps, result.seconds,
                        f": {reverted} phase(s) no better, weights put back" if reverted else "")
            results.append(result)
            if progress is not None:
                progress(index + 1, len(blocks), result)
    finally:
        student.train(modes[0])
        teacher.train(modes[1])
    return results
