"""Artifacts are written atomically: a failure leaves nothing; a previous artifact survives."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from graphopt.errors import OutputError
from graphopt.writer import atomic_output_dir, check_output_target


def test_success_renames_into_place(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with atomic_output_dir(out) as staging:
        (staging / "a.txt").write_text("new")
        assert not out.exists()
    assert (out / "a.txt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failure_leaves_nothing_and_keeps_previous(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out) as staging:
            (staging / "a.txt").write_text("half")
            raise RuntimeError("boom")
    assert (out / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_replaces_previous_artifact(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with atomic_output_dir(out) as staging:
        (staging / "a.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_output_that_is_a_file(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(OutputError, match="exists and is not a folder"):
        check_output_target(target)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_parent(tmp_path: Path) -> None:
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="not writable"):
            check_output_target(tmp_path / "out")
    finally:
        tmp_path.chmod(0o700)


def test_stale_temporary_folder_of_a_dead_process_is_removed(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.graphopt-tmp-{int(dead.stdout)}-abcd"
    stale.mkdir()
    (stale / "model.onnx").write_text("partial")
    live = tmp_path / f".out.graphopt-tmp-{os.getppid()}-abcd"
    live.mkdir()
    check_output_target(tmp_path / "out")
    assert not stale.exists()
    assert live.exists(), "a temporary folder whose owner lives is left alone"


def test_disk_full_keeps_previous_and_removes_temporary(tmp_path: Path) -> None:
    """The error names the target and the bytes needed: declared by the caller, else a lower bound."""
    import errno

    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("old")
    with (pytest.raises(OutputError, match="disk is full.*previous artifact is kept") as raised,
          atomic_output_dir(out, expected_bytes=123456) as staging):
        (staging / "a.txt").write_text("partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    message = str(raised.value)
    assert str(out) in message and "needs 123456 bytes" in message and "7 bytes fitted" in message
    assert (out / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with (pytest.raises(OutputError, match="needs more than 7 bytes"),  # size not declared
          atomic_output_dir(out) as staging):
        (staging / "a.txt").write_text("partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert (out / "a.txt").read_text() == "old"


def test_disk_full_while_saving_names_the_model_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      tiny_onnx_program) -> None:
    """Through a real executable: the bytes needed are the serialized model's."""
    import errno

    import graphopt

    executable = graphopt.compile(tiny_onnx_program, backend="onnxruntime")
    real_write = Path.write_bytes

    def full_disk(path: Path, data: bytes) -> int:
        real_write(path, data[: len(data) // 3])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(OutputError) as raised:
        executable.save(tmp_path / "out")
    message = str(raised.value)
    assert str(tmp_path / "out") in message
    assert f"needs {len(executable.model_bytes)} bytes" in message
    assert list(tmp_path.iterdir()) == []
