"""Fuzzing graphopt's input doors, each case isolated so that a crash or hang is a finding.

Targets (``TARGETS``) take raw bytes and exercise one door: a recipe's text, an ONNX
file's bytes (raw or structurally mutated), a ``.pt2`` archive. A case *passes* when
graphopt either succeeds or raises its own ``GraphoptError``, writes nothing beside the
input, and runs no payload. Anything else — another exception, a signal, a hang past the
time limit, a leftover file — is a *failure*.

Cases run in a long-lived worker process (starting Python and importing torch per case
would cost seconds), under a memory limit; when a case kills or hangs the worker, that
case is recorded as a failure and a fresh worker takes the next one. ``tests/fuzz``
runs a smoke campaign in CI and replays the fixed corpus; ``benchmarks/reliability.py``
runs the long campaign.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import resource
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

__all__ = ["Outcome", "run_cases", "generate_cases", "TARGETS", "mutate_bytes", "mutate_onnx_structure", "mutate_pt2",
           "seed_inputs", "WORKER_TIME_LIMIT_S"]

logger = logging.getLogger(__name__)

WORKER_TIME_LIMIT_S = 60.0
WORKER_MEMORY_BYTES = 12 << 30
PAYLOAD_MARKER_ENV = "GRAPHOPT_FUZZ_MARKER"


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One case's verdict: ``ok`` (success), ``refused`` (a GraphoptError), or a failure kind."""

    target: str
    verdict: str  # ok | refused | exception | crash | hang | leftover | payload
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.verdict not in ("ok", "refused")


def _target_recipe(folder: Path, data: bytes) -> None:
    from graphopt.recipe import load_recipe

    path = folder / "recipe.toml"
    path.write_bytes(data)
    load_recipe(path)


def _target_onnx(folder: Path, data: bytes) -> None:
    import graphopt

    path = folder / "model.onnx"
    path.write_bytes(data)
    graphopt.load(path)


def _target_pt2(folder: Path, data: bytes) -> None:
    from graphopt.safe_load import load_exported_program

    path = folder / "model.pt2"
    path.write_bytes(data)
    load_exported_program(path)


TARGETS: dict[str, Callable[[Path, bytes], None]] = {"recipe": _target_recipe, "onnx": _target_onnx, "pt2": _target_pt2}


def _run_one(target: str, data: bytes) -> Outcome:
    from graphopt.errors import GraphoptError

    with tempfile.TemporaryDirectory(prefix="graphopt-fuzz-") as name:
        folder = Path(name)
        try:
            TARGETS[target](folder, data)
            verdict, detail = "ok", ""
        except GraphoptError as error:
            verdict, detail = "refused", str(error)[:200]
        except Exception as error:  # the finding: graphopt let a foreign exception escape
            verdict, detail = "exception", f"{type(error).__name__}: {str(error)[:300]}"
        leftovers = sorted(p.name for p in folder.iterdir() if p.name not in ("recipe.toml", "model.onnx", "model.pt2"))
        if leftovers and verdict in ("ok", "refused"):
            verdict, detail = "leftover", ", ".join(leftovers)
    marker = os.environ.get(PAYLOAD_MARKER_ENV)
    if marker and Path(marker).exists():
        verdict, detail = "payload", f"payload marker {marker} was created"
    return Outcome(target, verdict, detail)


def _worker() -> None:
    """Reads ``target<TAB>hex`` lines, answers one JSON outcome line per case."""
    resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, WORKER_MEMORY_BYTES))
    logging.disable(logging.CRITICAL)
    import warnings

    warnings.simplefilter("ignore")
    for line in sys.stdin:
        target, payload = line.rstrip("\n").split("\t")
        outcome = _run_one(target, bytes.fromhex(payload))
        sys.stdout.write(json.dumps(dataclasses.asdict(outcome)) + "\n")
        sys.stdout.flush()


class _Worker:
    def __init__(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", "from graphopt.fuzzing import _worker; _worker()"],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                        text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})

    def run(self, target: str, data: bytes, timeout: float) -> Outcome:
        import select

        assert self.process.stdin and self.process.stdout
        try:
            self.process.stdin.write(f"{target}\t{data.hex()}\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            return self._died(target)
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            self.process.kill()
            return Outcome(target, "hang", f"no answer within {timeout:.0f} s")
        line = self.process.stdout.readline()
        if not line:
            return self._died(target)
        return Outcome(**json.loads(line))

    def _died(self, target: str) -> Outcome:
        code = self.process.wait()
        return Outcome(target, "crash", f"worker died with exit code {code}")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def run_cases(cases: Iterable[tuple[str, bytes]], *, timeout: float = WORKER_TIME_LIMIT_S) -> Iterator[Outcome]:
    """Runs every case in a worker process, restarting it after a crash or hang."""
    worker = _Worker()
    try:
        for target, data in cases:
            outcome = worker.run(target, data, timeout)
            yield outcome
            if outcome.verdict in ("crash", "hang"):
                worker.close()
                worker = _Worker()
    finally:
        worker.close()


def mutate_bytes(data: bytes, rng: random.Random, rounds: int = 4) -> bytes:
    """Byte-level mutations: flips, overwrites with interesting values, deletions, splices, truncation."""
    buffer = bytearray(data)
    for _ in range(rng.randint(1, rounds)):
        if not buffer:
            buffer = bytearray(rng.randbytes(8))
        choice, at = rng.random(), rng.randrange(len(buffer))
        if choice < 0.3:
            buffer[at] ^= 1 << rng.randrange(8)
        elif choice < 0.5:
            value = rng.choice([0x00, 0xFF, 0x7F, 0x80, 0x01])
            buffer[at:at + 1] = bytes([value]) * rng.randint(1, 8)
        elif choice < 0.65:
            del buffer[at:at + rng.randint(1, 64)]
        elif choice < 0.8:
            start = rng.randrange(len(buffer))
            buffer[at:at] = buffer[start:start + rng.randint(1, 64)]
        elif choice < 0.9:
            del buffer[rng.randrange(len(buffer)):]
        else:
            buffer[at:at] = rng.randbytes(rng.randint(1, 16))
    return bytes(buffer)


def mutate_pt2(data: bytes, rng: random.Random) -> bytes:
    """Mutates one member of a ``.pt2`` zip (its JSON configs or its weight bytes), keeping a valid zip."""
    import io

    source = zipfile.ZipFile(io.BytesIO(data))
    names = source.namelist()
    victim = rng.choice(names)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for info in source.infolist():
            member = source.read(info.filename)
            if info.filename == victim:
                member = mutate_bytes(member, rng)
            archive.writestr(info, member)
    return out.getvalue()


_OPS = ["Add", "MatMul", "Gemm", "LayerNormalization", "Softmax", "Reshape", "Transpose", "Gather", "Concat",
        "Loop", "If", "Unknown", "Attention", "DequantizeLinear", "Resize", "Einsum"]


def mutate_onnx_structure(data: bytes, rng: random.Random) -> bytes:
    """Structure-editing mutations of a valid ``ModelProto``: ops, inputs, attributes, shapes, dtypes."""
    import onnx

    model = onnx.load_from_string(data)
    graph = model.graph
    for _ in range(rng.randint(1, 3)):
        choice = rng.randrange(11)
        node = rng.choice(graph.node) if graph.node else None
        if choice == 0 and node is not None:
            node.op_type = rng.choice(_OPS)
        elif choice == 1 and node is not None and node.input:
            del node.input[rng.randrange(len(node.input))]
        elif choice == 2 and node is not None:
            node.input.append("")  # an explicit empty optional input, the measured ORT crash
        elif choice == 3 and node is not None and node.attribute:
            attr = rng.choice(node.attribute)
            attr.i = rng.choice([-1, 0, 1 << 40, -(1 << 62)])
            attr.f = rng.choice([float("nan"), float("inf"), -0.0])
        elif choice == 4 and graph.initializer:
            tensor = rng.choice(graph.initializer)
            if tensor.dims:
                tensor.dims[rng.randrange(len(tensor.dims))] = rng.choice([0, -1, 1 << 30, 3])
        elif choice == 5 and graph.initializer:
            rng.choice(graph.initializer).data_type = rng.randrange(1, 24)
        elif choice == 6 and graph.initializer:
            del graph.initializer[rng.randrange(len(graph.initializer))]
        elif choice == 7 and node is not None and node.output:
            node.output[0] = rng.choice([v.name for v in graph.output] or ["x"])
        elif choice == 8:
            for opset in model.opset_import:
                opset.version = rng.choice([1, 7, 13, 21, 99])
        elif choice == 9 and graph.input:
            dims = graph.input[0].type.tensor_type.shape.dim
            if dims:
                dims[rng.randrange(len(dims))].dim_value = rng.choice([0, 1, 1 << 31])
        elif choice == 10 and node is not None:
            node.domain = rng.choice(["com.microsoft", "ai.onnx.ml", "evil.domain", ""])
    return model.SerializeToString()


def seed_inputs() -> dict[str, list[bytes]]:
    """Valid seeds per target: the shipped recipes, small ONNX models, a small .pt2."""
    import io

    import numpy as np
    import onnx
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from graphopt.recipe import shipped_recipes

    recipes = [path.read_bytes() for path in shipped_recipes().values()]
    rng = np.random.default_rng(0)
    matmul = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["a"]),
         helper.make_node("LayerNormalization", ["a", "g", "b"], ["y"], axis=-1)], "seed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", 8])],
        [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w"),
         numpy_helper.from_array(np.zeros(8, np.float32), "b"), numpy_helper.from_array(np.ones(8, np.float32), "g")]),
        opset_imports=[helper.make_opsetid("", 21)])

    class Small(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.gelu(self.linear(x))

    buffer = io.BytesIO()
    torch.export.save(torch.export.export(Small(), (torch.ones(2, 4),)), buffer)
    return {"recipe": recipes, "onnx": [matmul.SerializeToString()], "pt2": [buffer.getvalue()]}


def generate_cases(counts: dict[str, int], seed: int = 0) -> Iterator[tuple[str, str, bytes]]:
    """(category, target, bytes) for each requested category: recipe, onnx-bytes, onnx-structure, pt2."""
    rng = random.Random(seed)
    seeds = seed_inputs()
    for category, count in counts.items():
        for _ in range(count):
            if category == "recipe":
                yield category, "recipe", mutate_bytes(rng.choice(seeds["recipe"]), rng)
            elif category == "onnx-bytes":
                yield category, "onnx", mutate_bytes(rng.choice(seeds["onnx"]), rng)
            elif category == "onnx-structure":
                yield category, "onnx", mutate_onnx_structure(rng.choice(seeds["onnx"]), rng)
            elif category == "pt2":
                yield category, "pt2", mutate_pt2(rng.choice(seeds["pt2"]), rng)
            else:
                raise ValueError(f"unknown fuzz category {category!r}")
