"""Reading what a model's layers see on calibration data: the hooks every data-aware pass shares.

- ``real_tokens`` keeps the positions of a ``[batch, sequence, ...]`` activation that the
  attention mask marks as real (padding would skew every statistic).
- ``capture_inputs`` hooks named submodules and hands each forward's input, real tokens
  only, to a callback: quantization observers, GPTQ's Hessians and the statistics below are
  all built on it.
- ``collect_second_moments`` gives ``E[x xᵀ]`` of named layers' inputs: activation-aware
  low-rank splitting whitens with it, activation-aware pruning scores and refits with it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

__all__ = ["capture_inputs", "collect_second_moments", "real_tokens"]


def real_tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``x`` [b, s, ...] restricted to the positions where ``mask`` [b, s] is set, else ``x`` itself."""
    if mask is None or x.dim() < 3 or tuple(x.shape[:2]) != tuple(mask.shape):
        return x
    return x[mask.bool()]


@contextlib.contextmanager
def capture_inputs(module: nn.Module, names: Sequence[str],
                   callback: Callable[[str, torch.Tensor], None]) -> Iterator[Callable[[torch.Tensor | None], None]]:
    """Hooks ``names``; each forward hands ``callback(name, input)`` the input's real tokens.

    Yields a setter for the current batch's attention mask (``None``: keep every position).
    The hooks are removed on exit, also when the callback raises.
    """
    state: dict[str, torch.Tensor | None] = {"mask": None}

    def hook_for(name: str) -> Callable[..., None]:
        return lambda _module, args: callback(name, real_tokens(args[0].detach(), state["mask"]))

    handles = [module.get_submodule(name).register_forward_pre_hook(hook_for(name)) for name in names]
    try:
        yield lambda mask: state.__setitem__("mask", mask)
    finally:
        for handle in handles:
            handle.remove()


class _InputsSeen(Exception):
    """Raised by a capture callback to end a forward pass once every wanted input was recorded."""


def collect_second_moments(module: nn.Module, names: Iterable[str], batches: Iterable[Mapping[str, torch.Tensor]],
                           mask_key: str = "attention_mask", stop_early: bool = False) -> dict[str, torch.Tensor]:
    """``E[x xᵀ]`` (float64, n×n) of the input of each named submodule over ``batches``.

    Tokens where ``batches[mask_key]`` is 0 (padding) are left out when the input is
    ``[batch, sequence, n]`` and the mask matches; otherwise every row counts. The module
    runs in eval mode without gradients. ``stop_early`` ends each forward pass as soon as
    every named submodule has seen its input (the rest of the model is not run; right only
    when each runs once per pass, as a Linear in an encoder).
    """
    names = list(names)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    seen: set[str] = set()

    def record(name: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        # One batch's xᵀx in fp32 (exact enough for a few thousand rows), summed in fp64.
        sums[name] = sums.get(name, 0) + (x.T @ x).double()
        counts[name] = counts.get(name, 0) + x.shape[0]
        seen.add(name)
        if stop_early and len(seen) == len(names):
            raise _InputsSeen

    was_training = module.training
    module.eval()
    try:
        with capture_inputs(module, names, record) as set_mask, torch.no_grad():
            for batch in batches:
                set_mask(batch.get(mask_key))
                seen.clear()
                try:
                    module(**batch)
                except _InputsSeen:
                    pass
    finally:
        module.train(was_training)
    return {name: sums[name] / max(counts[name], 1) for name in sums}
