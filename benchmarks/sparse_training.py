"""Would sparse kernels speed up training a pruned block? One block-reconstruction step, dense against sparse.

A measurement for a feature not built (issue 9's notes): the prune pass's block-wise
reconstruction trains pruned Linears whose weights are 63–90% zero with dense matmuls. Here each
Linear of one block of two MiniLM layers (batch 32, max_length 32, as the sparse-90 recipe
trains) is swapped for a ``torch.autograd.Function`` whose forward and input gradient run on
graphopt's ``csr_linear`` (the mask's CSR and its transpose's, values gathered from the dense
weight every step, as training changes them), the weight gradient staying a dense matmul. Both
variants take the same Adam steps and re-apply the masks, as ``graphopt.blockwise`` does. It
checks the sparse outputs and gradients against eager first, then prints the median step time of
each and the speed-up (dense / sparse) per sparsity.

Measured here (2 threads, 2026-11-30, two runs): 1.19–1.31× at 90%, 1.14–1.27× at 87%, 0.79–0.87×
at 63% (slower): about 1.1× over a 3-round run, whose first phase is at 63%.

Usage::

    python benchmarks/sparse_training.py [--sparsities 0.9 0.87 0.63] [--steps 25] [--threads 2]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class _CsrPair:
    """A mask's CSR structure and its transpose's (``pack_csr`` of the mask), with where each stored value sits in the
    dense weight: the values are gathered from the weight every step, as training changes them."""

    def __init__(self, mask: torch.Tensor) -> None:
        from backends.cpp.packing import pack_csr

        self.out, self.inp = mask.shape
        self.csr, self.csr_t = pack_csr(mask.float(), row_multiple=1), pack_csr(mask.t().float(), row_multiple=1)
        rows, cols = _entries(self.csr)
        self.flat = rows * self.inp + cols
        rows_t, cols_t = _entries(self.csr_t)  # entry (i, o) of W.T is W[o, i]
        self.flat_t = cols_t * self.inp + rows_t


def _entries(csr) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of each stored entry of a ``CsrWeight``, in storage order."""
    counts = (csr.row_ptr[1:] - csr.row_ptr[:-1]).long()
    return torch.repeat_interleave(torch.arange(len(counts)), counts), csr.col_idx.long()


class _SparseLinear(torch.autograd.Function):
    """``x @ W.T + b`` and ``dL/dx`` on the CSR kernel; ``dL/dW`` dense (the masks are re-applied after the step)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, csr: _CsrPair) -> torch.Tensor:
        from backends.cpp.ops import csr_linear

        ctx.save_for_backward(x, weight)
        ctx.csr = csr
        values = weight.detach().reshape(-1)[csr.flat]
        return csr_linear(x.contiguous(), csr.csr.row_ptr, csr.csr.col_idx, values, bias.detach(), csr.out)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        from backends.cpp.ops import csr_linear

        x, weight = ctx.saved_tensors
        csr = ctx.csr
        grad_y = grad_y.contiguous()
        grad_x = csr_linear(grad_y, csr.csr_t.row_ptr, csr.csr_t.col_idx, weight.detach().reshape(-1)[csr.flat_t], None,
                            csr.inp)
        rows = grad_y.reshape(-1, csr.out)
        return grad_x, rows.t() @ x.reshape(-1, csr.inp), rows.sum(0), None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.87, 0.63])
    parser.add_argument("--steps", type=int, default=25, help="timed steps per variant (after 3 warm-up steps)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import graphopt
    from backends.cpp import build
    from graphopt.blockwise import _block_loss, _Chain, split_at_layers
    from graphopt.data.corpus import OWN_DATA, load_training_data
    from graphopt.distill import find_layers
    from models.minilm import load_minilm

    build.load_extension()
    bundle = load_minilm()
    model = graphopt.trace(bundle).ir.eval()
    split = split_at_layers(model, find_layers(model), layers_per_block=2)
    sentences = random.Random(0).sample(list(load_training_data(OWN_DATA, bundle.tokenizer)), 32 * 8)
    batches = [bundle.tokenizer(sentences[i:i + 32], max_length=32) for i in range(0, len(sentences), 32)]
    inputs = _Chain(split, batches).inputs("submod_1")
    block = split.submod_1
    with torch.no_grad():
        targets = [block(*args).detach() + 0.01 for args in inputs]  # a target the block is not at yet
    token_masks = [b["attention_mask"] for b in batches]
    linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
    dense_forward = {m: m.forward for m in linears}

    def step_ms(masks: list[torch.Tensor]) -> float:
        optimizer = torch.optim.Adam([p for p in block.parameters() if p.requires_grad], lr=1e-4)
        times = []
        for i in range(3 + args.steps):
            start = time.perf_counter()
            j = i % len(batches)
            loss = _block_loss(block(*inputs[j]), targets[j], token_masks[j])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for m, mask in zip(linears, masks, strict=True):
                    m.weight.masked_fill_(~mask, 0.0)
            times.append(time.perf_counter() - start)
        return statistics.median(times[3:]) * 1e3

    print(f"# one training step of MiniLM layers 0-1 (batch 32, max_length 32), {args.threads} thread(s); "
          f"speed-up = dense / sparse")
    print("| sparsity | dense ms | sparse ms | speed-up | max |Δy| | max rel. Δ grad |")
    print("|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for sparsity in args.sparsities:
        masks = [torch.rand(m.weight.shape, generator=gen) >= sparsity for m in linears]
        for m, mask in zip(linears, masks, strict=True):
            m.forward = dense_forward[m]
            with torch.no_grad():
                m.weight.masked_fill_(~mask, 0.0)
        dense = step_ms(masks)
        probe = [linears[0].weight, linears[-1].weight]
        reference = block(*inputs[0])
        reference_grads = torch.autograd.grad(reference.sum(), probe)
        for m, mask in zip(linears, masks, strict=True):
            csr = _CsrPair(mask)
            m.forward = lambda x, m=m, csr=csr: _SparseLinear.apply(x, m.weight, m.bias, csr)
        got = block(*inputs[0])
        grads = torch.autograd.grad(got.sum(), probe)
        dy = float((got - reference).detach().abs().max())
        dg = max(float((g - r).abs().max() / r.abs().max()) for g, r in zip(grads, reference_grads, strict=True))
        if dy > 1e-4 or dg > 1e-4:
            raise SystemExit(f"sparse step disagrees with dense at {sparsity}: |dy| {dy:.2e}, grad {dg:.2e}")
        sparse = step_ms(masks)
        print(f"| {sparsity:.2f} | {dense:.1f} | {sparse:.1f} | {dense / sparse:.2f}× | {dy:.1e} | {dg:.1e} |",
              flush=True)


if __name__ == "__main__":
    main()
