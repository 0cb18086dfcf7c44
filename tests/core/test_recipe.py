"""Recipes are validated before any work; errors give file:line:col, the key and the nearest name."""

from __future__ import annotations

from pathlib import Path

import pytest

from graphopt.errors import RecipeError
from graphopt.recipe import load_recipe, shipped_recipes

GOOD = """\
description = "test"
model = "tiny"

[[pipeline]]
pass = "export"
opset = 21

[[backend]]
name = "onnxruntime"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


def test_shipped_recipes_load() -> None:
    assert "fp32" in shipped_recipes()
    for name in shipped_recipes():
        recipe = load_recipe(name)
        assert recipe.pipeline, name


def test_good_recipe(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, GOOD))
    assert [p.name for p in recipe.pipeline] == ["export"]
    assert recipe.pipeline[0].options == {"opset": 21}
    assert [b.name for b in recipe.backends] == ["onnxruntime"]


@pytest.mark.parametrize("text, pattern", [
    (GOOD.replace('model = "tiny"', 'modle = "tiny"'), r"recipe.toml:2:1: modle: unknown key 'modle'; did you mean 'model'"),
    (GOOD.replace('pass = "export"', 'pass = "exprot"'), r"recipe.toml:5:1: pipeline\[0\].pass: unknown pass 'exprot'; did you mean 'export'"),
    (GOOD.replace("opset = 21", "opsett = 21"), r"recipe.toml:6:1: pipeline\[0\].opsett: .*unknown option 'opsett'; did you mean 'opset'"),
    (GOOD.replace("opset = 21", 'opset = "21"'), r"recipe.toml:6:1: pipeline\[0\].opset: .*must be int, got str"),
    (GOOD.replace("opset = 21", "opset = 99"), r"pipeline\[0\]: .*opset must be between 18 and 23"),
    (GOOD.replace("opset = 21", "dynamic = 1"), r"pipeline\[0\].dynamic: .*must be bool, got int"),
    (GOOD.replace('name = "onnxruntime"', 'name = "onnxrt"'), r"recipe.toml:9:1: backend\[0\].name: unknown backend 'onnxrt'"),
    (GOOD + "\n[[pipeline]]\npass = \"export\"\n", r"pipeline: step 2 \('export'\) takes kind 'module' but step 1 \('export'\) gives kind 'onnx'"),
    ("description = \"x\"\n[[pipeline]\n", r"recipe.toml: not valid TOML"),
    ("[[pipeline]]\nopset = 21\n", r"recipe.toml:1:1: pipeline\[0\]: each \[\[pipeline\]\] block needs pass"),
])
def test_bad_recipes_are_refused_with_location(tmp_path: Path, text: str, pattern: str) -> None:
    with pytest.raises(RecipeError, match=pattern):
        load_recipe(write(tmp_path, text))


def test_non_utf8_recipe(tmp_path: Path) -> None:
    path = tmp_path / "recipe.toml"
    path.write_bytes(b"description = \"\xff\"\n")
    with pytest.raises(RecipeError, match="not UTF-8"):
        load_recipe(path)


def test_unknown_recipe_name() -> None:
    with pytest.raises(RecipeError, match="no recipe 'fp33'.*did you mean 'fp32'"):
        load_recipe("fp33")
