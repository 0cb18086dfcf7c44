"""The cpp backend's lowering: table-driven kernel formats, numerics against the pruned module, model.pt2 round trip."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest

import graphopt
from graphopt import registry
from graphopt.program import Program
from graphopt.testing import assert_backends_agree, sqnr_db

pytest.importorskip("graphopt.backends.cpp.backend")


@pytest.fixture(scope="module")
def pruned(tiny_bundle) -> Program:
    """Layer 0 pruned in 4×4 blocks to 75%, layer 1 unstructured to 90% (no training)."""
    prune = registry.passes.get("prune")
    passes = [prune(sparsity=0.75, pattern="4x4", layers=("layers.0.*",), evaluate=False),
              prune(sparsity=0.9, layers=("layers.1.*",), evaluate=False)]
    return graphopt.Pipeline(passes).run(graphopt.trace(tiny_bundle))


def _timing_table(path, rows: int, sparse: dict) -> str:
    """A kernel table for 64×64 and 128×64 at ``rows``: dense 1 ms, and for each
    ``(format, block)`` of ``sparse`` its ``((density, ms), ...)`` at fp32 and int8 alike."""
    entries = []
    for out, inp in ((64, 64), (128, 64)):
        entries.append({"out": out, "in": inp, "rows": rows, "format": "dense", "block": None, "dtype": "fp32",
                        "density": 1.0, "ms": 1.0})
        for (fmt, block), points in sparse.items():
            for dtype in ("fp32", "int8"):
                for density, ms in points:
                    entries.append({"out": out, "in": inp, "rows": rows, "format": fmt,
                                    "block": list(block) if block else None, "dtype": dtype, "density": density, "ms": ms})
    path.write_text(json.dumps({"entries": entries}))
    return str(path)


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> str:
    """64×64 and 128×64 measured (CSR fast below 20% density, BSR 4×4 fastest); 64×128 not at all."""
    return _timing_table(tmp_path_factory.mktemp("table") / "times.json", 16,
                         {("csr", None): ((0.1, 0.3), (0.3, 1.2)), ("bsr", (4, 4)): ((0.1, 0.2), (0.3, 0.5))})


def test_each_layer_gets_the_format_the_table_says(pruned: Program, table: str) -> None:
    executable = graphopt.compile(pruned, backend="cpp", table=table, aot=False)
    layers = executable.notes["layers"]
    for kind in ("attention.query", "attention.key", "attention.value", "attention.output", "ffn.intermediate"):
        assert (layers[f"layers.0.{kind}"]["format"], tuple(layers[f"layers.0.{kind}"]["block"])) == ("bsr", (4, 4))
        # 90% unstructured leaves ~80% of 4×4 blocks non-empty: beyond BSR's measured densities, so CSR.
        assert layers[f"layers.1.{kind}"]["format"] == "csr"
    for name in ("layers.0.ffn.output", "layers.1.ffn.output"):
        assert layers[name]["format"] == "dense" and "no timing" in layers[name]["reason"]
    assert executable.notes["formats"] == {"bsr 4x4": 5, "csr": 5, "dense": 2}
    targets = {str(n.target) for n in executable.exported.graph.nodes if n.op == "call_function"}
    assert {"graphopt.bsr_linear.default", "graphopt.csr_linear.default"} <= targets


def test_outputs_match_the_pruned_module_fp32_and_int8(pruned: Program, table: str) -> None:
    want = pruned.run()[0]
    got = graphopt.compile(pruned, backend="cpp", table=table, aot=False)(**pruned.example_inputs)[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    int8 = graphopt.compile(pruned, backend="cpp", table=table, int8=True, aot=False)
    assert int8.notes["formats"] == {"bsr 4x4 int8": 5, "csr int8": 5, "dense": 2}
    assert sqnr_db(int8(**pruned.example_inputs)[0], want) > 30.0


def test_attention_and_gelu_run_through_our_ops(pruned: Program, table: str) -> None:
    """Both layers' scaled_dot_product_attention and GELU become graphopt::attention and
    graphopt::gelu, with the same outputs (padding masked) as the program lowered with torch's."""
    ours = graphopt.compile(pruned, backend="cpp", table=table, aot=False)
    torchs = graphopt.compile(pruned, backend="cpp", table=table, aot=False, attention=False, gelu=False)
    targets = [str(n.target) for n in ours.exported.graph.nodes if n.op == "call_function"]
    assert ours.notes["attention_calls"] == 2 == targets.count("graphopt.attention.default")
    assert ours.notes["gelu_calls"] == 2 == targets.count("graphopt.gelu.default")
    assert not {"aten.scaled_dot_product_attention.default", "aten.gelu.default"} & set(targets)
    assert torchs.notes["attention_calls"] == torchs.notes["gelu_calls"] == 0
    assert {"aten.scaled_dot_product_attention.default", "aten.gelu.default"} <= {
        str(n.target) for n in torchs.exported.graph.nodes}
    inputs = pruned.tokenizer(["One short sentence.", "And a second, somewhat longer sentence here."])
    np.testing.assert_allclose(ours(**inputs)[0], torchs(**inputs)[0], rtol=0, atol=1e-5)


def test_attention_and_gelu_they_do_not_compute_are_left_to_torch() -> None:
    """Causal attention, dropout, a head size that is not a multiple of 8 and tanh GELU keep
    torch's ops."""
    import torch
    import torch.nn.functional as F
    from graphopt.backends.cpp.backend import lower_attention, lower_gelu

    class Attend(torch.nn.Module):
        def forward(self, q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
            causal = F.scaled_dot_product_attention(q, q, q, is_causal=True)
            dropped = F.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
            narrow = F.scaled_dot_product_attention(r, r, r)
            plain = F.scaled_dot_product_attention(q, q, q, scale=0.5)
            return causal.sum() + dropped.sum() + narrow.sum() + plain.sum() + F.gelu(q, approximate="tanh").sum()

    exported = torch.export.export(Attend(), (torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 12)))
    assert lower_attention(exported) == 1
    assert lower_gelu(exported) == 0
    targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert targets.count("aten.scaled_dot_product_attention.default") == 3
    (fused,) = [n for n in exported.graph.nodes if str(n.target) == "graphopt.attention.default"]
    assert fused.args[-1] == 0.5


@pytest.fixture(scope="module")
def compiled_int8(pruned: Program, table: str, tmp_path_factory):
    """The default lowering (AOTInductor), int8, saved; built once (~20 s)."""
    executable = graphopt.compile(pruned, backend="cpp", table=table, int8=True)
    return executable, executable.save(tmp_path_factory.mktemp("aot") / "out")


def test_aot_package_runs_only_where_the_cpu_has_every_feature_of_its_isa() -> None:
    """A package's ISA (Inductor's, such as "AVX512 AVX512_VNNI") is checked word by word: an
    AVX-512 host without VNNI must refuse VNNI code, and an unknown feature is refused."""
    import torch
    import torch._inductor.cpu_vec_isa
    from graphopt.backends.cpp.backend import _runs_here

    assert _runs_here("DEFAULT")
    assert not _runs_here("AVX2 NOT_A_FEATURE")
    assert _runs_here("AVX512 AVX512_VNNI") == (torch.cpu._is_avx512_supported() and torch.cpu._is_vnni_supported())
    assert _runs_here(str(torch._inductor.cpu_vec_isa.pick_vec_isa()).upper())  # what Inductor builds here


def test_model_pt2_loads_in_a_new_process_and_matches(pruned: Program, table: str, compiled_int8, tmp_path) -> None:
    """The default lowering compiles ahead of time (AOTInductor) and saves model.pt2 plus the
    compiled code without weights; a new process runs it when trusted, the exported graph when
    not, and both match the same program run eagerly."""
    executable, path = compiled_int8
    assert executable.notes["runs"] == "aotinductor"
    with pytest.raises(ValueError, match="takes inputs"):
        executable(input_ids=pruned.example_inputs["input_ids"])
    # The compiled code calls the kernels' C entry points, not the boxed dispatcher.
    assert b"aoti_torch_cpu_csr_linear_int8" in executable.package
    assert b"aoti_torch_cpu_bsr_linear_int8" in executable.package
    eager = graphopt.compile(pruned, backend="cpp", table=table, int8=True, aot=False)
    np.testing.assert_allclose(executable(**pruned.example_inputs)[0], eager(**pruned.example_inputs)[0],
                               rtol=0, atol=1e-5)
    # The package is code only: no row of the embedding table is in it (with the weights
    # compiled in, every row is, byte for byte).
    row = pruned.ir.embeddings.word_embeddings.weight[5].detach().numpy().tobytes()
    with zipfile.ZipFile(path.with_name("model.aoti.pt2")) as package:
        assert not any(row in package.read(member) for member in package.infolist())
    inputs = pruned.tokenizer(["One short sentence.", "And a second, somewhat longer sentence here."])
    np.savez(tmp_path / "inputs.npz", **{k: v.numpy() for k, v in inputs.items()})
    script = textwrap.dedent(f"""
        import json, numpy as np
        from graphopt.backends.cpp.backend import load_cpp
        inputs = dict(np.load({str(tmp_path / 'inputs.npz')!r}))
        runs = {{}}
        for trust in (False, True):
            loaded = load_cpp({str(path)!r}, trust_native_code=trust)
            runs[str(trust)] = loaded.notes["runs"]
            np.save({str(tmp_path)!r} + f"/got-{{trust}}.npy", loaded(**inputs)[0])
        print(json.dumps(runs))
    """)
    done = subprocess.run([sys.executable, "-c", script], check=True, timeout=300, capture_output=True, text=True)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"False": "exported graph (eager)",
                                                                 "True": "aotinductor"}
    want = eager(**inputs)[0]
    for trust in (False, True):
        np.testing.assert_allclose(np.load(tmp_path / f"got-{trust}.npy"), want, rtol=0, atol=1e-5)


def test_compiled_code_for_a_missing_instruction_set_is_not_run(pruned: Program, compiled_int8, monkeypatch,
                                                                caplog) -> None:
    from graphopt.backends.cpp import backend

    executable, path = compiled_int8
    monkeypatch.setattr(backend, "_ISA_FEATURES", {"DEFAULT": lambda: True})
    monkeypatch.setattr("torch.backends.cpu.get_cpu_capability", lambda: "DEFAULT")
    loaded = backend.load_cpp(path, trust_native_code=True)
    assert loaded.notes["runs"] == "exported graph (eager)" and "which this CPU (DEFAULT) lacks" in caplog.text
    np.testing.assert_allclose(loaded(**pruned.example_inputs)[0], executable(**pruned.example_inputs)[0],
                               rtol=0, atol=1e-5)


def test_torch_onnxruntime_and_cpp_agree(pruned: Program, table: str) -> None:
    """The same pruned program lowered to ONNX Runtime (after export) and to the cpp kernels: on
    the same tokenized sentences, each within 1e-4 (max abs) of the torch module and of each other."""
    inputs = pruned.tokenizer(["One short sentence.", "And a second, somewhat longer sentence here.",
                               "A third one."])
    onnx_program = graphopt.Pipeline([registry.passes.get("export")()]).run(pruned.clone())
    ort = graphopt.compile(onnx_program, backend="onnxruntime")
    cpp = graphopt.compile(pruned, backend="cpp", table=table, aot=False)
    assert_backends_agree(pruned.run(inputs)[0], {"onnxruntime": ort(**inputs)[0], "cpp": cpp(**inputs)[0]},
                          atol=1e-4)


def test_options_are_checked(pruned: Program) -> None:
    with pytest.raises(TypeError, match="unknown cpp backend options: thread"):
        graphopt.compile(pruned, backend="cpp", thread=2)
    with pytest.raises(ValueError, match="rows must be >= 1"):
        graphopt.compile(pruned, backend="cpp", rows=0)


def test_sell_is_chosen_where_it_measured_fastest(pruned: Program, tmp_path) -> None:
    """A table in which SELL-8 beats CSR and dense at batch 1: every measured pruned layer gets
    it, the exported program calls ``sell_linear``, and the outputs (also after a save and
    load) match the pruned module."""
    import torch
    from graphopt.backends.cpp.backend import load_cpp

    table = _timing_table(tmp_path / "times.json", 1,
                          {("csr", None): ((0.1, 0.3), (0.3, 1.2)), ("sell", None): ((0.1, 0.1), (0.3, 0.4))})
    executable = graphopt.compile(pruned, backend="cpp", table=table, rows=1, aot=False)
    assert executable.notes["formats"] == {"sell": 10, "dense": 2}
    targets = {str(n.target) for n in executable.exported.graph.nodes if n.op == "call_function"}
    assert "graphopt.sell_linear.default" in targets
    want = pruned.run()[0]
    np.testing.assert_allclose(executable(**pruned.example_inputs)[0], want, rtol=0, atol=1e-5)
    with torch.inference_mode():  # column indices still get version counters (checked once)
        loaded = load_cpp(executable.save(tmp_path / "out"))
        again = graphopt.compile(pruned, backend="cpp", table=table, rows=1, aot=False)
    for weights in (loaded.exported.state_dict, again.exported.state_dict):
        col_idx = [t for name, t in weights.items() if name.endswith("col_idx")]
        assert len(col_idx) == 10 and not any(t.is_inference() for t in col_idx)
    np.testing.assert_allclose(loaded(**pruned.example_inputs)[0], want, rtol=0, atol=1e-5)
    int8 = graphopt.compile(pruned, backend="cpp", table=table, rows=1, int8=True, aot=False)
    assert int8.notes["formats"] == {"sell int8": 10, "dense": 2}
    assert sqnr_db(int8(**pruned.example_inputs)[0], want) > 30.0


def test_sellp_is_chosen_where_it_measured_fastest_and_compiles(pruned: Program, tmp_path) -> None:
    """A table in which SELL-P beats SELL, CSR and dense at batch 1: the layers get it, and the
    model compiled ahead of time calls its C entry point (a signature that did not match the
    schema would fail here) and matches the pruned module, as does the saved and loaded one."""
    from graphopt.backends.cpp.backend import load_cpp

    table = _timing_table(tmp_path / "times.json", 1,
                          {("sell", None): ((0.1, 0.1), (0.3, 0.4)), ("sellp", None): ((0.1, 0.05), (0.3, 0.2))})
    executable = graphopt.compile(pruned, backend="cpp", table=table, rows=1, int8=True)
    assert executable.notes["formats"] == {"sellp int8": 10, "dense": 2}
    assert executable.notes["runs"] == "aotinductor"
    assert b"aoti_torch_cpu_sellp_linear_int8" in executable.package
    want = pruned.run()[0]
    assert sqnr_db(executable(**pruned.example_inputs)[0], want) > 30.0
    loaded = load_cpp(executable.save(tmp_path / "out"), trust_native_code=True)
    np.testing.assert_allclose(loaded(**pruned.example_inputs)[0], executable(**pruned.example_inputs)[0],
                               rtol=0, atol=1e-6)
    fp32 = graphopt.compile(pruned, backend="cpp", table=table, rows=1, aot=False)
    targets = {str(n.target) for n in fp32.exported.graph.nodes if n.op == "call_function"}
    assert "graphopt.sellp_linear.default" in targets
    np.testing.assert_allclose(fp32(**pruned.example_inputs)[0], want, rtol=0, atol=1e-5)


def test_a_corrupt_weight_in_compiled_code_raises_instead_of_reading_out_of_bounds(pruned: Program,
                                                                                   compiled_int8) -> None:
    """The compiled model calls the kernels' C entry points: their index checks still turn a
    column index beyond in_features into a Python error (through the C shim's error code),
    CSR's too, which are checked once per index tensor and version (the compiled model holds
    the same tensor, so the write below bumps the version it sees)."""
    executable, _ = compiled_int8
    state = executable.exported.state_dict
    name = next(k for k in state if k.endswith("col_idx") and state[k.removesuffix("col_idx") + "values"].dim() == 1)
    col_idx = state[name]  # a CSR layer's; the compiled model reads it in place
    before = executable(**pruned.example_inputs)[0]
    saved = col_idx[0].item()
    try:
        col_idx[0] = 30000
        with pytest.raises(RuntimeError):
            executable(**pruned.example_inputs)
    finally:
        col_idx[0] = saved
    np.testing.assert_array_equal(executable(**pruned.example_inputs)[0], before)


def test_compiled_code_calls_every_op_through_its_c_entry_point() -> None:
    """One module calling every op (the linear ones with and without bias), compiled by AOTInductor: each
    op's C entry point is in the package (a declaration that did not match its definition
    would crash or compute garbage), and the outputs equal the eager ops'."""
    import torch
    from graphopt.backends.cpp import ops
    from graphopt.backends.cpp.backend import SparseLinear, compile_ahead_of_time
    from graphopt.backends.cpp.ops import OP_SCHEMAS, pack_weight
    from torch import nn

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 24, generator=gen) * (torch.rand(16, 24, generator=gen) < 0.3)
    bias = torch.randn(16, generator=gen)
    layers = nn.ModuleList(
        SparseLinear(pack_weight(weight, layout, block, dtype), bias if dtype == torch.int8 else None)
        for layout, block in (("csr", None), ("bsr", (4, 4)), ("sell", None))
        for dtype in (torch.float32, torch.int8))

    class EveryOp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = layers

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            heads = x.unflatten(-1, (3, 8)).transpose(1, 2)  # [3, 5, 24] -> [3, 3 heads, 5, 8]
            mask = torch.zeros(x.shape[0], 1, 1, x.shape[1])
            attended = ops.gelu(ops.attention(heads, heads, heads, mask).transpose(1, 2).flatten(2))
            return torch.stack([layer(attended) for layer in self.layers])

    module, x = EveryOp().eval(), torch.randn(3, 5, 24, generator=gen)
    with torch.no_grad():
        runner, package = compile_ahead_of_time(torch.export.export(module, (x,)))
        want = module(x)
    assert all(f"aoti_torch_cpu_{name}".encode() in package for name in OP_SCHEMAS)
    torch.testing.assert_close(runner(x), want, rtol=0, atol=1e-6)
