"""Recipes: a TOML file names the model, the pipeline (passes with options) and the backends.

Example (``recipes/fp32.toml``)::

    description = "Export to ONNX and lower for ONNX Runtime in fp32"
    model = "minilm"

    [[pipeline]]
    pass = "export"
    opset = 21

    [[backend]]
    name = "onnxruntime"

Everything is checked when the recipe is loaded, before any model work: unknown keys,
pass names and options (with the nearest valid name), wrong types, passes out of kind
order. Errors name the file, line and column, and the key path (``pipeline[2].opset``).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.resources
import logging
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Mapping

from graphopt import registry
from graphopt.errors import PluginError, PreconditionError, RecipeError
from graphopt.pass_base import Pass
from graphopt.pipeline import Pipeline
from graphopt.program import Kind

__all__ = ["Recipe", "PassSpec", "BackendSpec", "load_recipe", "shipped_recipes"]

logger = logging.getLogger(__name__)

_TOP_KEYS = ("description", "model", "pipeline", "backend")


@dataclasses.dataclass(frozen=True)
class PassSpec:
    """One step of a recipe's pipeline: a registered pass name and its options."""

    name: str
    options: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class BackendSpec:
    """A backend to compile the result with, and its options."""

    name: str
    options: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A validated recipe. Build one with ``load_recipe`` or ``Recipe.from_dict``."""

    name: str
    description: str
    model: str | None
    pipeline: tuple[PassSpec, ...]
    backends: tuple[BackendSpec, ...]
    source: str
    sha256: str

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, name: str = "inline", source: str = "<dict>",
                  text: str | None = None) -> Recipe:
        """Validates a parsed recipe table. ``text`` (the TOML source) lets errors give line:col."""
        where = _Where(source, text)
        for key in data:
            if key not in _TOP_KEYS:
                where.fail((key,), f"unknown key {key!r}{_near(key, _TOP_KEYS)}")
        description = data.get("description", "")
        if not isinstance(description, str):
            where.fail(("description",), "must be a string")
        model = data.get("model")
        if model is not None and not isinstance(model, str):
            where.fail(("model",), "must be a model name or a path (string)")
        steps = data.get("pipeline", [])
        if not isinstance(steps, list) or not all(isinstance(s, Mapping) for s in steps):
            where.fail(("pipeline",), "must be an array of tables: [[pipeline]] blocks")
        pipeline = tuple(_pass_spec(i, step, where) for i, step in enumerate(steps))
        targets = data.get("backend", [{"name": "onnxruntime"}])
        if isinstance(targets, Mapping):
            targets = [targets]
        if not isinstance(targets, list) or not all(isinstance(t, Mapping) for t in targets):
            where.fail(("backend",), "must be an array of tables: [[backend]] blocks")
        backends = tuple(_backend_spec(i, t, where) for i, t in enumerate(targets))
        digest = hashlib.sha256((text or repr(sorted(data.items()))).encode()).hexdigest()
        recipe = cls(name, description, model, pipeline, backends, source, digest)
        start: Kind = "onnx" if (model or "").endswith(".onnx") else "module"
        try:
            recipe.build_pipeline(start)
        except PreconditionError as error:
            where.fail(("pipeline",), str(error))
        return recipe

    def passes(self, start: Kind = "module") -> list[Pass]:
        """Pass instances for a program starting at ``start``.

        On an ONNX input the leading ``module``→``onnx`` export step is already done, so it
        is skipped; any other step that needs the module side is refused.
        """
        specs = list(self.pipeline)
        if start == "onnx" and specs and registry.passes.get(specs[0].name).kind_in == "module":
            first = registry.passes.get(specs[0].name)
            if first.kind_out == "onnx":
                specs = specs[1:]
        return [registry.passes.get(s.name)(**s.options) for s in specs]

    def build_pipeline(self, start: Kind = "module", **pipeline_options: Any) -> Pipeline:
        """A ``Pipeline`` of this recipe's passes, its kind chain checked from ``start``."""
        pipeline = Pipeline(self.passes(start), **pipeline_options)
        try:
            pipeline.check_kinds(start)
        except PreconditionError as error:
            if start == "onnx":
                raise PreconditionError(f"recipe {self.name!r} cannot run on an ONNX file: {error}") from error
            raise
        return pipeline


def _pass_spec(index: int, step: Mapping[str, Any], where: _Where) -> PassSpec:
    path = ("pipeline", index)
    name = step.get("pass")
    if not isinstance(name, str):
        where.fail(path, "each [[pipeline]] block needs pass = \"<name>\" (see `graphopt passes`)")
    try:
        pass_cls = registry.passes.get(name)
    except PluginError as error:
        where.fail((*path, "pass"), str(error))
    options = {k: v for k, v in step.items() if k != "pass"}
    from graphopt.pass_base import coerce_options

    try:
        coerce_options(pass_cls.Options, options, where=f"pass {name!r}")
    except ValueError as error:
        bad = next((k for k in options if repr(k) in str(error)), None)
        where.fail((*path, bad) if bad else path, str(error))
    return PassSpec(name, options)


def _backend_spec(index: int, target: Mapping[str, Any], where: _Where) -> BackendSpec:
    name = target.get("name")
    if not isinstance(name, str):
        where.fail(("backend", index), "each [[backend]] block needs name = \"<backend>\"")
    try:
        registry.backends.get(name)
    except PluginError as error:
        where.fail(("backend", index, "name"), str(error))
    return BackendSpec(name, {k: v for k, v in target.items() if k != "name"})


def _near(word: str, choices: Any) -> str:
    near = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean {near[0]!r}?" if near else f"; valid: {', '.join(choices)}"


class _Where:
    """Turns a key path into ``file:line:col: key`` for error messages."""

    def __init__(self, source: str, text: str | None) -> None:
        self.source, self.lines = source, (text or "").splitlines()

    def fail(self, path: tuple[Any, ...], message: str) -> None:
        key = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(path))
        line, col = self._locate(path)
        at = f"{self.source}:{line}:{col}" if line else self.source
        raise RecipeError(f"{at}: {key}: {message}")

    def _locate(self, path: tuple[Any, ...]) -> tuple[int, int]:
        if not self.lines or not path:
            return 0, 0
        start, end = 0, len(self.lines)
        if len(path) >= 2 and isinstance(path[1], int):
            headers = [i for i, l in enumerate(self.lines) if re.match(rf"\s*\[\[\s*{re.escape(path[0])}\s*\]\]", l)]
            if path[1] < len(headers):
                start = headers[path[1]]
                end = next((i for i in range(start + 1, len(self.lines)) if re.match(r"\s*\[", self.lines[i])), end)
                if len(path) == 2 or path[2] is None:
                    return start + 1, self.lines[start].index("[") + 1
                path = (path[2],)
        else:
            end = next((i for i, l in enumerate(self.lines) if re.match(r"\s*\[", l)), end)
            for i, l in enumerate(self.lines):
                if re.match(rf"\s*\[+\s*{re.escape(str(path[0]))}\s*\]", l):
                    return i + 1, l.index("[") + 1
        for i in range(start, end):
            match = re.match(rf"(\s*)\"?{re.escape(str(path[0]))}\"?\s*=", self.lines[i])
            if match:
                return i + 1, len(match.group(1)) + 1
        return (start + 1, 1) if start else (0, 0)


def shipped_recipes() -> dict[str, Path]:
    """Name → path of every recipe shipped in ``graphopt.recipes``."""
    folder = importlib.resources.files("graphopt.recipes")
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".toml")}


def load_recipe(recipe: str | os.PathLike[str] | Recipe) -> Recipe:
    """Loads a shipped recipe by name, or a TOML file by path, and validates it fully.

    Raises:
        RecipeError: naming the file, line, column and key at fault.
    """
    if isinstance(recipe, Recipe):
        return recipe
    text_path = Path(recipe)
    shipped = shipped_recipes()
    if str(recipe) in shipped and not text_path.exists():
        text_path = shipped[str(recipe)]
    elif not text_path.exists():
        raise RecipeError(f"no recipe {str(recipe)!r}: not a shipped recipe{_near(str(recipe), sorted(shipped))}, "
                          "and no such file")
    try:
        raw = text_path.read_bytes()
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RecipeError(f"{text_path}: not UTF-8 text (byte {error.start}); save the recipe as UTF-8") from error
    except OSError as error:
        raise RecipeError(f"{text_path}: cannot read the recipe ({error.strerror})") from error
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise RecipeError(f"{text_path}: not valid TOML: {error}") from error
    except RecursionError as error:
        raise RecipeError(f"{text_path}: arrays or tables nest too deep to be a recipe") from error
    return Recipe.from_dict(data, name=text_path.stem, source=str(text_path), text=text)
