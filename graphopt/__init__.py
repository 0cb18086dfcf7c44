"""graphopt: a compiler toolchain that makes Transformer models small and fast for inference.

The pieces, in the order data flows through them::

    program = graphopt.trace(model, example_inputs)      # or graphopt.load("model.onnx")
    program = graphopt.Pipeline(passes).run(program)     # passes from graphopt.registry.passes
    executable = graphopt.compile(program, backend="onnxruntime")
    executable.save("out")

or all at once, as the CLI does: ``graphopt.compress("minilm", "fp32", out="out")``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from graphopt.backend import Backend, Executable, compile  # noqa: E402
from graphopt.bundle import ModelBundle  # noqa: E402
from graphopt.compress import CompressResult, compress  # noqa: E402
from graphopt.errors import GraphoptError  # noqa: E402
from graphopt.pass_base import Pass, PassResult  # noqa: E402
from graphopt.pipeline import Pipeline  # noqa: E402
from graphopt.program import Program  # noqa: E402
from graphopt.recipe import Recipe, load_recipe  # noqa: E402
from graphopt.trace import load, trace  # noqa: E402

__all__ = [
    "__version__", "Backend", "Executable", "compile", "ModelBundle", "CompressResult", "compress",
    "GraphoptError", "Pass", "PassResult", "Pipeline", "Program", "Recipe", "load_recipe", "load", "trace",
]
