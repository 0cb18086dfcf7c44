"""Sparse x dense linear layers on CPU: graphopt's C++ kernels against dense and sparse peers.

Measures y = x @ W.T + b for Transformer-sized W, in one process, with
``torch.set_num_threads(--threads)`` (2 by default): per case, every contender is timed side
by side in 15 rounds (5 with --quick; ``graphopt.bench.interleaved_ms``), medians after warm-up:

* ours: the fastest of ``graphopt::csr_linear``, ``sell_linear`` and ``sellp_linear`` (fp32) on
  unstructured patterns, ``bsr_linear`` on block-sparse ones (column ``fmt``), and the same layout with int8
  values and per-row scales;
* best dense: the faster of ``F.linear`` (MKL) and a ``torch.utils.mkldnn`` Linear (oneDNN),
  both on the dense weight that has the zeros in it;
* ``torch.sparse`` CSR (``torch.addmm`` with a CSR weight) and scipy CSR (single-threaded).

Convention: every ratio is a speed-up, ``t_theirs / t_ours``: above 1 we are faster. A win
counts only beyond the noise, which on a shared 2-core machine is large: the issue's
rule is +-10% at batch 8 and +-20% at batch 1.

Bandwidth: bytes read by our kernel (values, indices, row pointers, activations) over its
time, against the bandwidth of a tensor copy ((read + write) bytes / time) measured here for
each case with the same footprint and threads, so in the same cache level (printed as L2, L3
or DRAM from the sizes sysfs gives; VMs misreport L3).

Usage::

    python benchmarks/sparse.py            # full table, a few minutes
    python benchmarks/sparse.py --quick    # a subset, well under a minute
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from graphopt.backends.cpp import build
from graphopt.backends.cpp.ops import (
    BsrWeight,
    CsrWeight,
    SellpWeight,
    SellWeight,
    pack_weight,
    sparse_linear,
)
from torch.utils import mkldnn as mkldnn_utils

from graphopt.bench import interleaved_ms

try:
    import scipy.sparse as scipy_sparse
except ImportError:  # scipy is a test extra
    scipy_sparse = None


#: Clock for timing: wall time, or this thread's CPU time (``--clock thread``, with
#: ``--threads 1``), which excludes time other processes hold the core.
CLOCK: Callable[[], float] = time.perf_counter


def timeit(fn: Callable[[], object], budget_s: float, max_reps: int = 200) -> float:
    """Median seconds per call of ``fn`` after warm-up, within about ``budget_s``."""
    fn()
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    warm = min(20, max(1, int(0.05 / max(first, 1e-7))))
    for _ in range(warm):
        fn()
    reps = int(min(max_reps, max(5, budget_s / max(first, 1e-7))))
    # Thread CPU time ticks too coarsely for one call of a few microseconds: time groups.
    group = max(1, int(2e-4 / max(first, 1e-7))) if CLOCK is not time.perf_counter else 1
    times = []
    for _ in range(max(5, reps // group)):
        t0 = CLOCK()
        for _ in range(group):
            fn()
        times.append((CLOCK() - t0) / group)
    return statistics.median(times)


def cache_bytes() -> dict[str, int]:
    """The L2 (per core) and L3 bytes this benchmark counts on, from Linux's sysfs.

    The benchmark has run on Zen 3, Zen 4 and Xeon hosts whose L2 ranges from 0.5 to 2 MB, so
    the levels are read, not assumed; where sysfs says nothing, 1 MB and 32 MB. L3 is capped at
    8 L2s: a VM may report its socket's whole L3 (480 MB on one host, where copies of 120 MB ran
    at DRAM speed), of which a core gets a share.
    """
    sizes = {"L2": 2**20, "L3": 32 * 2**20}
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level, kind = (index / "level").read_text().strip(), (index / "type").read_text().strip()
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        if kind in ("Unified", "Data") and level in ("2", "3") and size[:-1].isdigit():
            sizes[f"L{level}"] = int(size[:-1]) * {"K": 2**10, "M": 2**20, "G": 2**30}.get(size[-1], 1)
    return {"L2": sizes["L2"], "L3": min(sizes["L3"], 8 * sizes["L2"])}


def copy_bandwidth(nbytes: int, budget_s: float) -> float:
    """(read + write) bytes per second of copying an ``nbytes`` tensor."""
    src = torch.rand(nbytes // 4)
    dst = torch.empty_like(src)
    return 2 * nbytes / timeit(lambda: dst.copy_(src), budget_s)


@dataclass
class Case:
    out: int
    inp: int
    pattern: str  # "unstructured" or "RxC"
    sparsity: float
    batch: int


def make_weight(
    out: int, inp: int, pattern: str, sparsity: float, gen: torch.Generator
) -> torch.Tensor:
    w = torch.randn(out, inp, generator=gen) / math.sqrt(inp)
    if pattern == "unstructured":
        return w * (torch.rand(out, inp, generator=gen) >= sparsity)
    r, c = (int(v) for v in pattern.split("x"))
    keep = torch.rand(-(-out // r), -(-inp // c), generator=gen) >= sparsity
    mask = keep.repeat_interleave(r, 0).repeat_interleave(c, 1)[:out, :inp]
    return w * mask


def thread_scaling(threads: int, budget: float) -> float:
    """Speed-up of a compute-bound GEMM (512 x 512 x 512, MKL) at ``threads`` over one thread.

    Says what the machine's CPUs are at this moment: a virtual machine's vCPUs can be separate
    cores (close to ``threads``) or share one physical core (close to 1; measured both on the
    2-vCPU development VM within minutes). Multi-threaded figures below mean that many cores
    only in the first case.
    """
    a, b = torch.randn(512, 512), torch.randn(512, 512)

    def at(n: int) -> Callable[[], object]:
        def run() -> object:
            torch.set_num_threads(n)
            return torch.mm(a, b)
        return run

    ms = interleaved_ms({1: at(1), threads: at(threads)}, 9, target_s=budget / 9, clock=time.perf_counter)
    torch.set_num_threads(threads)
    return ms[1] / ms[threads]


def call_floor(budget: float) -> tuple[float, float]:
    """Seconds per call of our op and of ``F.linear`` on an 8x8 identity weight at batch 1.

    Almost no arithmetic: what remains is the cost of calling an op from Python (argument
    parsing, dispatch, the output's allocation). Every time in the table includes it once, which
    matters at batch 1: a custom op goes through the dispatcher's boxed path, a native one does not.
    """
    eye, x = torch.eye(8), torch.randn(1, 8)
    packed = pack_weight(eye, "csr", None)
    ms = interleaved_ms({"ours": lambda: sparse_linear(x, packed, None), "dense": lambda: F.linear(x, eye)},
                        15, target_s=budget / 15, clock=CLOCK)
    return ms["ours"] / 1e3, ms["dense"] / 1e3


def kernel_bytes(packed: CsrWeight | BsrWeight | SellWeight | SellpWeight, batch: int) -> int:
    n = packed.nbytes - (packed.scales.numel() * 4 if packed.scales is not None else 0)
    return n + batch * packed.shape[1] * 4


def run_case(
    case: Case, budget: float, gen: torch.Generator, caches: dict[str, int], threads: int
) -> dict[str, object]:
    w = make_weight(case.out, case.inp, case.pattern, case.sparsity, gen)
    b = torch.randn(case.out, generator=gen)
    x = torch.randn(case.batch, case.inp, generator=gen)
    lin = torch.nn.Linear(case.inp, case.out)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    lin.eval()
    onednn = mkldnn_utils.to_mkldnn(lin)
    csr = w.to_sparse_csr()
    bcol = b[:, None]
    xt = x.t()
    fns = {"mkl": lambda: F.linear(x, w, b), "onednn": lambda: onednn(x),
           "torch_csr": lambda: torch.addmm(bcol, csr, xt)}
    if scipy_sparse is not None:
        wsp = scipy_sparse.csr_matrix(w.numpy())
        xn = x.numpy().T.copy()
        bn = b.numpy()[:, None]
        fns["scipy"] = lambda: wsp @ xn + bn
    # Ours: the fastest of our layouts for the pattern (CSR, SELL-8 or SELL-P for unstructured),
    # fp32 and int8 values, all timed side by side with the peers.
    if case.pattern == "unstructured":
        layouts: list[tuple[str, tuple[int, int] | None]] = [("csr", None), ("sell", None), ("sellp", None)]
    else:
        layouts = [("bsr", tuple(int(v) for v in case.pattern.split("x")))]  # type: ignore[list-item]
    packs = {}
    for layout, block in layouts:
        for dtype in (torch.float32, torch.int8):
            packed = pack_weight(w, layout, block, dtype)
            if dtype == torch.float32:
                ref = F.linear(x, packed.to_dense(), b)
                y = sparse_linear(x, packed, b)
                assert torch.allclose(y, ref, rtol=1e-4, atol=1e-4), f"{layout} kernel disagrees with dense reference"
            packs[(layout, dtype)] = packed
            fns[(layout, dtype)] = lambda packed=packed: sparse_linear(x, packed, b)
    rounds = 5 if budget < 0.2 else 15
    ms = interleaved_ms(fns, rounds, target_s=budget / rounds, clock=CLOCK)
    t = {key: v / 1e3 for key, v in ms.items()}
    t_mkl, t_onednn, t_torch_csr = t["mkl"], t["onednn"], t["torch_csr"]
    t_scipy = t.get("scipy", float("nan"))
    layout = min((t[(lay, torch.float32)], lay) for lay, _ in layouts)[1]
    t_ours, ours = t[(layout, torch.float32)], packs[(layout, torch.float32)]
    t_ours8 = t[(layout, torch.int8)]
    nbytes = kernel_bytes(ours, case.batch)
    # Each thread reads its share of the weight from its own L2; L3 and DRAM are shared.
    per_thread = nbytes / threads
    level = "L2" if per_thread <= caches["L2"] else ("L3" if nbytes <= caches["L3"] else "DRAM")
    # The bound: a copy with the same footprint (half the bytes read, half written) on as many
    # threads, so it sits in whatever cache the kernel's data sits in, however the VM's levels
    # are reported.
    copy = copy_bandwidth(max(nbytes // 2, 4096), budget / 4)
    dense_best = min(t_mkl, t_onednn)
    return {
        "t_dense": dense_best,
        "dense_by": "mkl" if t_mkl <= t_onednn else "onednn",
        "t_ours": t_ours,
        "layout": layout,
        "t_ours8": t_ours8,
        "vs_dense": dense_best / t_ours,
        "vs_dense8": dense_best / t_ours8,
        "vs_torch_csr": t_torch_csr / t_ours,
        "vs_scipy": t_scipy / t_ours,
        "gbps": nbytes / t_ours / 1e9,
        "level": level,
        "copy_gbps": copy / 1e9,
        "bw_frac": nbytes / t_ours / copy,
    }


def cases(quick: bool) -> list[Case]:
    shapes = [(384, 1536), (1536, 384)] if quick else [(384, 1536), (1536, 384), (4096, 4096)]
    batches = [1, 8] if quick else [1, 8, 128]
    patterns = [("unstructured", s) for s in ((0.7, 0.9) if quick else (0.5, 0.7, 0.9, 0.95))]
    patterns += [(p, 0.9) for p in (("1x8",) if quick else ("1x8", "4x4", "16x1"))]
    return [Case(o, i, p, s, bt) for (o, i) in shapes for p, s in patterns for bt in batches]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a subset with short timing budgets")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--budget", type=float, default=None, help="seconds of timing per measurement"
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "thread"),
        default="wall",
        help="'thread': this thread's CPU time, robust on a shared machine; needs --threads 1",
    )
    args = parser.parse_args(argv)
    global CLOCK
    if args.clock == "thread":
        if args.threads != 1:
            parser.error("--clock thread measures one thread; use it with --threads 1")
        CLOCK = time.thread_time
    budget = args.budget or (0.1 if args.quick else 0.4)
    torch.set_num_threads(args.threads)
    build.load_extension()
    gen = torch.Generator().manual_seed(0)
    load0 = os.getloadavg()
    cpu = platform.processor() or platform.machine()
    print(f"# {cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    print(f"# threads={args.threads}, clock={args.clock}, load average at start {load0[0]:.1f}")
    caches = cache_bytes()
    with torch.inference_mode():
        # Each copy reads one tensor and writes another: two of them fill half the level.
        bw = {
            "L2": copy_bandwidth(caches["L2"] // 4, budget),
            "L3": copy_bandwidth(caches["L3"] // 4, budget),
            "DRAM": copy_bandwidth(512 * 2**20, max(budget, 1.0)),
        }
        floor_ours, floor_dense = call_floor(budget)
        scaling = thread_scaling(args.threads, budget) if args.threads > 1 else 1.0
    levels = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in bw.items())
    print(f"# copy bandwidth, (read + write) GB/s: {levels} (L2 {caches['L2'] / 2**20:g} MB a core, "
          f"L3 {caches['L3'] / 2**20:g} MB counted; lvl: where the working set fits, a thread's share "
          "in its L2, or all of it in L3)")
    print(f"# call cost, in every time below (an 8x8 weight, batch 1): our op {floor_ours * 1e6:.1f} us, "
          f"F.linear {floor_dense * 1e6:.1f} us")
    if args.threads > 1:
        print(f"# {args.threads} threads vs 1 on a compute-bound GEMM: {scaling:.2f}x "
              f"({'separate cores' if scaling > 1 + 0.5 * (args.threads - 1) else 'the CPUs share cores now'})")
    print("# speed-up = t_theirs / t_ours (> 1: ours faster); bw = bytes our kernel reads / time;")
    print("# copy = (read + write) GB/s of a tensor copy with the same footprint on as many threads;")
    print("# frac = bw / copy: how close the kernel comes to streaming its bytes. Times: medians.")
    print(HEADER)
    print("-" * len(HEADER))
    with torch.inference_mode():
        for case in cases(args.quick):
            print(format_row(case, run_case(case, budget, gen, caches, args.threads)), flush=True)
    load1 = os.getloadavg()[0]
    print(
        f"# load average at end {load1:.1f} on {os.cpu_count()} CPUs (noisy above {args.threads})"
    )


HEADER = (
    f"{'shape':>10} {'pattern':>12} {'sp%':>4} {'batch':>5} | {'dense us':>9} {'by':>6} | "
    f"{'ours us':>9} {'fmt':>5} {'xDense':>6} {'xTorchCSR':>9} {'xScipy':>6} | "
    f"{'int8 us':>9} {'xDense':>6} | {'GB/s':>6} {'lvl':>4} {'copy':>6} {'frac':>5}"
)


def format_row(case: Case, r: dict[str, object]) -> str:
    """One line of the table, aligned with ``HEADER``."""
    us = {k: float(r[k]) * 1e6 for k in ("t_dense", "t_ours", "t_ours8")}
    return (
        f"{case.out:>4}x{case.inp:<5} {case.pattern:>12} {case.sparsity * 100:>4.0f} "
        f"{case.batch:>5} | {us['t_dense']:>9.1f} {r['dense_by']:>6} | "
        f"{us['t_ours']:>9.1f} {r['layout']:>5} {r['vs_dense']:>6.2f} {r['vs_torch_csr']:>9.2f} "
        f"{r['vs_scipy']:>6.2f} | {us['t_ours8']:>9.1f} {r['vs_dense8']:>6.2f} | "
        f"{r['gbps']:>6.1f} {r['level']:>4} {r['copy_gbps']:>6.1f} {r['bw_frac']:>5.2f}"
    )


if __name__ == "__main__":
    main()
