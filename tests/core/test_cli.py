"""The CLI and ``graphopt.compress`` end to end on the tiny model; refusals leave nothing behind."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import graphopt
from graphopt.cli import main
from graphopt.errors import ModelError


def test_compress_writes_artifacts_and_is_byte_identical(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    assert main(["compress", "--model", "tiny", "--recipe", "fp32", "-o", str(first)]) == 0
    table = capsys.readouterr().out
    assert "export" in table and "held-out sentences" in table
    assert main(["compress", "--model", "tiny", "--recipe", "fp32", "-o", str(second)]) == 0
    assert sorted(p.name for p in first.iterdir()) == ["model.onnx", "report.json", "report.md"]
    assert (first / "model.onnx").read_bytes() == (second / "model.onnx").read_bytes()
    report = json.loads((first / "report.json").read_text())
    assert report["passes"][0]["name"] == "export"
    check = report["final_check"]["onnxruntime"]
    assert check["worst_cosine"] > 0.99999 and check["n"] > 50
    assert "pkg.torch.onnx.stack_trace" not in (first / "model.onnx").read_bytes().decode("latin-1")
    assert "| export |" in (first / "report.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"], "no temporary folder is left"


def test_provenance_in_metadata(tmp_path: Path) -> None:
    import onnx

    result = graphopt.compress("tiny", "fp32", out=tmp_path / "o")
    meta = {p.key: p.value for p in onnx.load(str(result.out / "model.onnx")).metadata_props}
    assert meta["graphopt.version"] == graphopt.__version__ and meta["graphopt.recipe"] == "fp32"
    assert json.loads(meta["graphopt.passes"])[0] == {"name": "export", "options": {"opset": 21, "dynamic": True, "optimize": True}}
    assert not any("time" in key or "wall" in key for key in meta), "no timings in the artifact"


@pytest.mark.parametrize("args, message", [
    (["--model", "minilmm"], "unknown model 'minilmm': did you mean 'minilm'"),
    (["--model", "/nonexistent/model.onnx"], "no such file"),
    (["--recipe", "nope"], "no recipe 'nope'"),
])
def test_user_errors_exit_2_and_write_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                              message: str) -> None:
    argv = ["compress", "--model", "tiny", "--recipe", "fp32", "-o", str(tmp_path / "out")]
    for flag, value in zip(args[::2], args[1::2]):
        argv[argv.index(flag) + 1] = value
    assert main(argv) == 2
    assert message in capsys.readouterr().err.replace("\n", " ")
    assert list(tmp_path.iterdir()) == []


def test_corrupt_onnx_file_is_refused_and_not_modified(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not protobuf \xff\xff")
    digest = hashlib.sha256(bad.read_bytes()).hexdigest()
    assert main(["compress", "--model", str(bad), "--recipe", "fp32", "-o", str(tmp_path / "out")]) == 2
    assert "bad.onnx" in capsys.readouterr().err
    assert hashlib.sha256(bad.read_bytes()).hexdigest() == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]


def test_output_that_cannot_be_created(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["compress", "--model", "tiny", "--recipe", "fp32", "-o", str(blocker / "out")]) == 2
    assert "cannot create the output's parent folder" in capsys.readouterr().err


class DataDependent(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: neither fx nor torch.export can trace it
            return self.linear(x)
        return -self.linear(x)


def test_untraceable_model_is_refused_naming_it(tmp_path: Path) -> None:
    bundle = graphopt.ModelBundle("branchy", DataDependent(), {"x": torch.ones(2, 3, 4)})
    with pytest.raises(ModelError, match=r"model 'branchy' cannot be exported.*Symbolic trace: torch.fx.symbolic_trace failed"):
        graphopt.compress(bundle, "fp32", out=tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_no_traceback_on_user_error(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "graphopt.cli", "compress", "--model", "nope", "--recipe", "fp32",
                          "-o", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "Traceback" not in run.stderr and "unknown model 'nope'" in run.stderr


def test_help_texts(capsys: pytest.CaptureFixture[str]) -> None:
    for command in (["--help"], ["compress", "--help"], ["passes", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(command)
        assert exit_info.value.code == 0
    assert "--recipe" in capsys.readouterr().out


def test_passes_lists_kinds_and_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["passes", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["passes"]}
    export = rows["export"]
    assert (export["kind_in"], export["kind_out"], export["exact"], export["tolerance"]) == ("module", "onnx", True, 1e-4)
    assert {"name": "opset", "type": "int", "default": 21} in export["options"]


@pytest.mark.parametrize("terminal", [False, True])
def test_progress_off_a_terminal_is_printed_as_lines(terminal: bool) -> None:
    """Off a terminal the live status line is never drawn, so progress is printed: a pass's
    start at once, later messages at most every line_interval_s; on a terminal, nothing extra."""
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from graphopt.cli import _RichProgress

    out = io.StringIO()
    now = [100.0]
    progress = _RichProgress(Console(file=out, force_terminal=terminal, width=200), line_interval_s=30,
                             clock=lambda: now[0])
    prune = SimpleNamespace(name="prune", train_progress=None, progress_message=None)
    progress.before_pass(0, 2, prune, None)
    now[0] += 10
    prune.progress_message("reconstructing layer by layer")  # 10 s after the last line: not printed
    now[0] += 25
    prune.train_progress(SimpleNamespace(step=7, steps=900, loss=0.25, parts={"output": 0.25}))
    now[0] += 5
    progress.before_pass(1, 2, SimpleNamespace(name="export"), None)  # a new pass: printed at once
    lines = out.getvalue().splitlines()
    if terminal:
        assert lines == []
    else:
        assert lines == ["pass 1/2: prune (0 s)",
                         "pass 1/2: prune step 7/900, loss 0.25 (output 0.25) (35 s)",
                         "pass 2/2: export (40 s)"]
