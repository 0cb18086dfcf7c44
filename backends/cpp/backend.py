"""The ``cpp`` backend: pruned Linears run graphopt's sparse kernels; the model is saved as ``model.pt2``.

Takes a Program of kind ``module``. Each ``nn.Linear`` that ``prune`` annotated
(``annotations[name]["sparsity"]``) is lowered to the kernel format that measured fastest for
its shape and mask at ``rows`` = batch × sequence, read from the timing table
(``graphopt.sparsity.KernelTable``, shipped as ``graphopt/data/sparse_kernel_times.json``):
CSR, SELL-8 (batch-1 gathers) or a BSR block shape, with fp32 values or (``int8=True``) int8 values and one fp32 scale
per output row. Where no sparse format beats dense by the table's ``margin``, the layer stays a
dense ``nn.Linear``. The choice reads measured times, never times anything, so the same
program gives the same lowering. Other layers are left as they are.

Attention goes to ``graphopt::attention`` (``lower_attention``, on the exported graph): each
``scaled_dot_product_attention`` with float32 inputs, heads a multiple of 8 wide, an additive
mask or none, no dropout and not causal. At a sentence's length torch's CPU attention spends most
of its time outside the arithmetic; ours (``attention.cpp``, torch's kernel inside the op beyond
128 keys) measured on MiniLM 90% int8, one thread, 80 alternating rounds: batch 1 2.51 vs
2.74 ms (-8%), batch 8 12.8 vs 13.4 ms (-5%). ``attention=False`` keeps torch's. Exact GELU
goes to ``graphopt::gelu`` (``lower_gelu``: a rational erf instead of torch's exp-based one,
within 1e-6): batch 8 11.3 vs 12.1 ms (-6%), batch 1 unchanged (2.44 ms both; 80 rounds).

The lowered module is exported once with ``torch.export`` (batch and sequence dynamic,
``Dim.AUTO``: a named ``Dim`` fails on MiniLM's position table, which bounds the sequence)
and saved as ``model.pt2``. Then (``aot=True``, the default) AOTInductor compiles that program
ahead of time for this CPU: the dense rest of the graph (embeddings, layer norms, GELU,
attention, residual adds) becomes fused C++ code calling our ops through their C entry
points (``ops.c_shim_declarations``; not the boxed dispatcher), with no Python or Dynamo
guard on the call path. Measured on MiniLM 90% sparse, int8, one sentence, one thread: eager
exported graph 9.7 ms, ``torch.compile`` 7.0 ms (0.6 ms of it Dynamo's guards), AOTInductor
4.1 ms. The compiled code is written beside the program as ``model.aoti.pt2`` *without the
weights* (``package_constants_in_so=False``: ~2 MB of code, the weights are read from
``model.pt2``). The executable runs what is saved, under ``torch.inference_mode``.

Loading needs graphopt (the ops' schemas, ``backends/cpp/ops.py``) and a C++ compiler (the
kernels build on first use): ``load_cpp(path)`` runs the exported graph, which is safe to load
from anyone (weights-only guard); ``load_cpp(path, trust_native_code=True)`` also loads
``model.aoti.pt2``, a shared library that runs as native code: only for files you made or
trust, and only on a CPU with the instruction set it was compiled for (checked).

Written by the pruning work (issue 9) as the lowering of issue 6's backend, which did not
exist yet; the kernels, packing and build are issue 6's.
"""

from __future__ import annotations

import collections
import copy
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.fx
from torch import nn

from graphopt.backend import Backend, Executable
from graphopt.program import Program, flatten_outputs
from graphopt.sparsity import SPARSITY_KEY, KernelChoice, KernelTable

from .build import load_extension
from .ops import BsrWeight, CsrWeight, SellpWeight, SellWeight, c_shim_declarations, pack_weight
from .packing import linear_op

__all__ = ["AOT_PACKAGE_NAME", "CppBackend", "CppExecutable", "SparseLinear", "compile_ahead_of_time", "load_cpp",
           "lower_attention", "lower_gelu", "lower_sparse_linears"]

logger = logging.getLogger(__name__)


class SparseLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` packed for ``graphopt::{csr,bsr,sell,sellp}_linear[_int8]``.

    The packed tensors are buffers, so ``torch.export`` saves them with the program.
    """

    def __init__(self, packed: CsrWeight | BsrWeight | SellWeight | SellpWeight, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = packed.shape
        self.layout = packed.LAYOUT
        self.fields = packed.op_fields
        self.int8 = packed.scales is not None
        for field in self.fields:
            self.register_buffer(field, getattr(packed, field))
        self.register_buffer("scales", packed.scales if self.int8 else torch.ones(0))
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        op = linear_op(self.layout, int8=self.int8)
        packed = [getattr(self, field) for field in self.fields]
        if self.int8:
            packed.append(self.scales)
        return op(x, *packed, self.bias, self.out_features)

    def extra_repr(self) -> str:
        block = f", block={tuple(self.values.shape[1:])}" if self.layout == "bsr" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.layout}{block}, "
                f"{'int8' if self.int8 else 'fp32'}, nnz={self.values.numel()}")


def lower_sparse_linears(module: nn.Module, annotations: dict[str, dict[str, Any]], table: KernelTable, *,
                         rows: int, int8: bool, margin: float,
                         unmeasured: Literal["dense", "csr"]) -> dict[str, dict[str, Any]]:
    """Swaps each annotated ``nn.Linear`` of ``module`` (in place) for the format the table picks.

    Returns:
        One row per annotated layer: the choice, its reason and the layer's sparsity.
    """
    rows_out: dict[str, dict[str, Any]] = {}
    for name, note in sorted(annotations.items()):
        sparsity = note.get(SPARSITY_KEY)
        if sparsity is None:
            continue
        linear = module.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"cpp backend: layer {name!r} is annotated sparse but is {type(linear).__name__}, "
                            "not nn.Linear")
        mask = sparsity["mask"].to(torch.bool)
        weight = linear.weight.detach().float()
        if bool(weight[~mask].any()):
            logger.warning("cpp backend: %s has nonzero weights outside its pruning mask (trained after "
                           "prune?); the mask is applied", name)
            weight = weight * mask
        choice: KernelChoice = table.choose(mask, rows, int8=int8, margin=margin, unmeasured=unmeasured)
        rows_out[name] = {"pattern": sparsity.get("pattern"), "sparsity": sparsity.get("sparsity"),
                          **choice.as_dict()}
        if choice.format == "dense":
            continue
        dtype = torch.int8 if choice.int8 else torch.float32
        masked = weight * mask  # pruned entries are exactly zero, so packing keeps the mask's pattern
        packed = pack_weight(masked, choice.format, choice.block, dtype)
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, child, SparseLinear(packed, linear.bias))
    if isinstance(module, torch.fx.GraphModule):
        module.recompile()
    return rows_out


def _val(arg: Any) -> Any:
    """A graph argument's fake value (the tensor a Node stands for), or the constant itself."""
    return arg.meta.get("val") if isinstance(arg, torch.fx.Node) else arg


def _swap_calls(exported: torch.export.ExportedProgram, target: torch._ops.OpOverload, op: torch._ops.OpOverload,
                arguments: Callable[[dict[str, Any]], tuple[Any, ...] | None]) -> int:
    """Replaces each call of ``target`` in ``exported``'s graph (in place) by a call of ``op``
    with ``arguments(kwargs)`` (the call's arguments by schema name), or leaves it where that is
    None. The new node's fake value comes from ``op``'s fake implementation. Returns the count."""
    graph = exported.graph_module.graph
    swapped = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not target:
            continue
        bound = torch.fx.operator_schemas.normalize_function(target, node.args, node.kwargs,
                                                             normalize_to_only_use_kwargs=True)
        args = arguments(bound.kwargs)
        if args is None:
            continue
        with graph.inserting_before(node):
            swap = graph.call_function(op, args)
        swap.meta.update(node.meta)
        with node.meta["val"].fake_mode:
            swap.meta["val"] = op(*(_val(a) for a in args))
        node.replace_all_uses_with(swap)
        graph.erase_node(node)
        swapped += 1
    if swapped:
        graph.lint()
        exported.graph_module.recompile()
    return swapped


def lower_attention(exported: torch.export.ExportedProgram) -> int:
    """Swaps each ``aten.scaled_dot_product_attention`` of ``exported`` that ``graphopt::attention``
    computes (in place): float32 q, k, v with equal heads and a head size that is a multiple of
    8, an additive float32 mask or none, no dropout, not causal. Others stay as they are.

    Outputs are unchanged up to rounding (a different summation order); measured in the
    module docstring. Returns how many calls were swapped.
    """

    def arguments(a: dict[str, Any]) -> tuple[Any, ...] | None:
        q, k, v, mask = (a[name] for name in ("query", "key", "value", "attn_mask"))
        vals, mask_val = [_val(t) for t in (q, k, v)], _val(mask)
        if (a.get("dropout_p", 0.0) != 0.0 or a.get("is_causal", False) or a.get("enable_gqa", False)
                or any(not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.dim() != 4 for t in vals)
                or (mask is not None and (not isinstance(mask_val, torch.Tensor) or mask_val.dtype != torch.float32
                                          or mask_val.dim() > 4))):
            return None
        dims = [t.shape[3] for t in vals]
        same_heads = vals[0].shape[1] == vals[1].shape[1]
        if not all(isinstance(d, int) and d == dims[0] for d in dims) or dims[0] % 8 or not same_heads:
            return None
        scale = a.get("scale")
        return q, k, v, mask, float(dims[0] ** -0.5 if scale is None else scale)

    return _swap_calls(exported, torch.ops.aten.scaled_dot_product_attention.default,
                       torch.ops.graphopt.attention.default, arguments)


def lower_gelu(exported: torch.export.ExportedProgram) -> int:
    """Swaps each exact (erf) ``aten.gelu`` of a float32 tensor in ``exported`` for
    ``graphopt::gelu`` (in place); the tanh form stays. Outputs agree to ~1e-6 absolute (its
    erf is a rational approximation, torch's a polynomial with exp). Returns the count."""

    def arguments(a: dict[str, Any]) -> tuple[Any, ...] | None:
        x = _val(a["input"])
        if a.get("approximate", "none") != "none" or not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
            return None
        return (a["input"],)

    return _swap_calls(exported, torch.ops.aten.gelu.default, torch.ops.graphopt.gelu.default, arguments)


#: File name of the AOTInductor package (compiled code, no weights) beside ``model.pt2``.
AOT_PACKAGE_NAME = "model.aoti.pt2"
#: The host checks for each word of an AOTInductor package's ISA (``AOTI_CPU_ISA``: Inductor's
#: vector ISA upper-cased, such as "AVX2" or "AVX512 AVX512_VNNI"): compiled code runs on the
#: host only if it has every one of them.
_ISA_FEATURES: dict[str, Callable[[], bool]] = {
    "DEFAULT": lambda: True,
    "AVX2": torch.cpu._is_avx2_supported,
    "AVX512": torch.cpu._is_avx512_supported,
    "AVX512_VNNI": torch.cpu._is_vnni_supported,
    "AMX_TILE": torch.cpu._is_amx_tile_supported,
}


def _runs_here(isa: str) -> bool:
    """Whether this host has every feature of an AOTInductor package's ISA (an unknown one: no)."""
    return all(word in _ISA_FEATURES and _ISA_FEATURES[word]() for word in isa.split())


def compile_ahead_of_time(exported: torch.export.ExportedProgram) -> tuple[Any, bytes]:
    """Compiles ``exported`` with AOTInductor (code only, no weights) and loads it with the
    program's weights; returns the callable model and the package's bytes."""
    import torch._inductor

    load_extension()  # the compiled code calls our ops' C entry points, resolved at load
    with tempfile.TemporaryDirectory(prefix="graphopt-aoti-") as folder:
        package = Path(folder) / AOT_PACKAGE_NAME
        configs = {"aot_inductor.package_constants_in_so": False,
                   "aot_inductor.custom_ops_to_c_shims": c_shim_declarations()}
        torch._inductor.aoti_compile_and_package(exported, package_path=str(package), inductor_configs=configs)
        return _load_package(package, exported), package.read_bytes()


def _load_package(package: Path, exported: torch.export.ExportedProgram) -> Any:
    import torch._inductor

    runner = torch._inductor.aoti_load_package(str(package))
    isa = runner.get_metadata().get("AOTI_CPU_ISA", "DEFAULT")
    if not _runs_here(isa):
        host = torch.backends.cpu.get_cpu_capability()
        raise RuntimeError(f"{package} was compiled for {isa}, which this CPU ({host}) lacks")
    weights = {**exported.state_dict, **exported.constants}
    missing = [name for name in runner.get_constant_fqns() if name not in weights]
    if missing:
        raise RuntimeError(f"{package} needs weights the program lacks: {', '.join(missing[:5])}")
    # user_managed: the runner reads the program's tensors in place instead of a second copy.
    runner.load_constants({name: weights[name] for name in runner.get_constant_fqns()},
                          check_full_update=True, user_managed=True)
    return runner


class CppExecutable(Executable):
    """A ``torch.export`` program calling graphopt's ops, and optionally its AOTInductor build
    (``package``); ``notes`` tells each layer's format and how the program runs."""

    artifact_name = "model.pt2"

    def __init__(self, exported: torch.export.ExportedProgram, notes: dict[str, Any] | None = None,
                 runner: Any = None, package: bytes | None = None) -> None:
        load_extension()
        self.exported = exported
        self.module = exported.module()
        self.notes = notes or {}
        self.runner, self.package = runner, package
        # The compiled model's flat inputs, in its call-spec order (see _run_compiled).
        self._input_names: tuple[str, ...] = () if runner is None else tuple(
            torch.utils._pytree.treespec_loads(runner.loader.get_call_spec()[0]).child(1).context)
        self.notes["runs"] = "aotinductor" if runner is not None else "exported graph (eager)"

    def __call__(self, **inputs: torch.Tensor | np.ndarray) -> tuple[np.ndarray, ...]:
        tensors = {k: torch.as_tensor(v) for k, v in inputs.items()}
        with torch.inference_mode():
            if self.runner is not None:
                outputs = self._run_compiled(tensors)
            else:
                outputs = flatten_outputs(self.module(**tensors))
            return tuple(t.float().numpy() for t in outputs)

    def _run_compiled(self, tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        # The loader's flat call rather than AOTICompiledModel.__call__, which re-reads its
        # call spec and flattens and unflattens pytrees on every call: 0.16 ms of a 3.5 ms
        # MiniLM batch-1 forward (150 alternating rounds, one thread).
        if tensors.keys() != set(self._input_names):
            raise ValueError(f"cpp: the model takes inputs {list(self._input_names)}, got {list(tensors)}")
        return [t for t in self.runner.loader.boxed_run([tensors[name] for name in self._input_names])
                if isinstance(t, torch.Tensor)]

    def artifact_bytes(self) -> int:
        """The exported program's weights and constants (the graph itself is small beside them)."""
        tensors = {id(t): t for t in (*self.exported.state_dict.values(), *self.exported.constants.values())
                   if isinstance(t, torch.Tensor)}
        return sum(t.numel() * t.element_size() for t in tensors.values()) + len(self.package or b"")

    def write_into(self, folder: Path) -> list[Path]:
        path = folder / self.artifact_name
        torch.export.save(self.exported, str(path))
        if self.package is None:
            return [path]
        (folder / AOT_PACKAGE_NAME).write_bytes(self.package)
        return [path, folder / AOT_PACKAGE_NAME]


def load_cpp(path: str | Path, *, trust_native_code: bool = False) -> CppExecutable:
    """Loads a ``model.pt2`` written by this backend (weights-only guard, kernels built if needed).

    Args:
        path: the ``model.pt2``.
        trust_native_code: also load ``model.aoti.pt2`` beside it, the program compiled by
            AOTInductor: a shared library, so loading it runs its code. Without it (or when it
            was compiled for an instruction set this CPU lacks, logged) the exported graph runs
            eagerly: the same outputs, slower.
    """
    from graphopt.safe_load import load_exported_program

    load_extension()
    # Not inference tensors, even when called under inference_mode: the kernels check a
    # weight's column indices once per tensor version, and inference tensors have none.
    with torch.inference_mode(False):
        exported = load_exported_program(path)
    package = Path(path).with_name(AOT_PACKAGE_NAME)
    if not package.is_file():
        return CppExecutable(exported)
    if not trust_native_code:
        logger.info("cpp: %s holds compiled native code; pass trust_native_code=True to run it (faster)", package)
        return CppExecutable(exported)
    try:
        runner = _load_package(package, exported)
    except RuntimeError as error:
        logger.warning("cpp: not running %s (%s); running the exported graph", package, error)
        return CppExecutable(exported)
    return CppExecutable(exported, runner=runner, package=package.read_bytes())


class CppBackend(Backend):
    """Lowers pruned Linears to graphopt's sparse kernels and exports the module as ``model.pt2``."""

    name = "cpp"
    kind = "module"

    def compile(self, program: Program, *, int8: bool = False, rows: int = 16, margin: float = 0.9,
                table: str = "", unmeasured: Literal["dense", "csr"] = "dense", aot: bool = True,
                attention: bool = True, gelu: bool = True, **options: Any) -> CppExecutable:
        """Args: int8 (int8 values with per-row scales), rows (batch × sequence the table is read
        at; 16 is one sentence), margin (a sparse format must take under margin × the dense time),
        table (a timing table JSON; "" = the shipped one), unmeasured ("dense" or "csr" for a shape
        the table lacks), aot (compile with AOTInductor: ~20 s for a tiny model, ~1 min for
        MiniLM; False runs the exported graph eagerly), attention (attention through
        graphopt::attention where it applies, ``lower_attention``), gelu (exact GELU through
        graphopt::gelu, ``lower_gelu``)."""
        if options:
            raise TypeError(f"unknown cpp backend options: {', '.join(sorted(options))}")
        if rows < 1 or not 0 < margin <= 10 or unmeasured not in ("dense", "csr"):
            raise ValueError(f"cpp backend: rows must be >= 1 (got {rows}), margin in (0, 10] (got {margin}), "
                             f"unmeasured 'dense' or 'csr' (got {unmeasured!r})")
        timing = KernelTable.load(Path(table)) if table else KernelTable.shipped()
        module = copy.deepcopy(program.ir).eval()
        layers = lower_sparse_linears(module, program.annotations, timing, rows=rows, int8=int8,
                                      margin=margin, unmeasured=unmeasured)
        counts = collections.Counter(
            "dense" if r["format"] == "dense" else f"{r['format']}{'' if not r['block'] else ' %dx%d' % tuple(r['block'])}"
            f"{' int8' if r['int8'] else ''}" for r in layers.values())
        logger.info("cpp: %s", ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no sparse layer")
        # AUTO: dynamic, with the ranges the model implies (sequence <= max positions).
        auto = torch.export.Dim.AUTO
        dynamic = {k: {0: auto, 1: auto} if v.dim() >= 2 else {0: auto} for k, v in program.example_inputs.items()}
        with torch.no_grad():
            exported = torch.export.export(module, (), kwargs=dict(program.example_inputs), dynamic_shapes=dynamic)
        notes = {"rows": rows, "int8": int8, "margin": margin, "table": timing.describe(), "formats": dict(counts),
                 "attention_calls": lower_attention(exported) if attention else 0,
                 "gelu_calls": lower_gelu(exported) if gelu else 0, "layers": layers}
        if not aot:
            return CppExecutable(exported, notes)
        logger.info("cpp: compiling the program ahead of time with AOTInductor (about a minute for MiniLM)")
        runner, package = compile_ahead_of_time(exported)
        return CppExecutable(exported, notes, runner=runner, package=package)
