"""Atomic artifact folders: write into a temporary folder beside the target, then rename.

A run writes ``OUT/model.onnx``, ``OUT/report.json`` and the rest into
``.OUT.graphopt-tmp-<pid>-<token>`` in the same parent folder (so the final rename is a
same-filesystem ``rename(2)``), and only when every file is complete renames it to ``OUT``.
A previous artifact at ``OUT`` is moved aside first and deleted after, so at every
instant ``OUT`` is absent, the previous complete artifact, or the new complete one. A
failed run removes its temporary folder; a later run removes temporary folders whose
owning process is dead, and puts a moved-aside previous artifact back when its process died
between the two renames (so ``OUT`` is never lost to a kill). When the disk fills up, the
error names the target and the bytes the artifact needs (what the caller declared it would
write, else at least what reached the disk before it filled).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from graphopt.errors import OutputError

__all__ = ["atomic_output_dir", "check_output_target"]

logger = logging.getLogger(__name__)

_TMP_MARK = ".graphopt-tmp-"
_OLD_MARK = ".graphopt-old-"


def check_output_target(out: str | os.PathLike[str]) -> Path:
    """Fails fast, before any model work, if ``out`` cannot become an artifact folder."""
    target = Path(out)
    if target.exists() and not target.is_dir():
        raise OutputError(f"{target}: exists and is not a folder; choose another output path")
    parent = target.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"{parent}: cannot create the output's parent folder ({error.strerror})") from error
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{parent}: not writable; choose an output folder you can write to")
    _remove_stale(parent, target.name)
    return target


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(parent: Path, name: str) -> None:
    target = parent / name
    for mark in (_TMP_MARK, _OLD_MARK):
        for stale in parent.glob(f".{name}{mark}*"):
            try:
                pid = int(stale.name[len(name) + 1 + len(mark):].split("-")[0])
            except ValueError:
                continue
            if pid == os.getpid() or _pid_alive(pid):
                continue
            if mark == _OLD_MARK and not target.exists():
                # Killed between moving the previous artifact aside and renaming the new one in.
                logger.info("restoring the previous artifact %s from %s (its process %d is gone)", target, stale, pid)
                os.rename(stale, target)
                continue
            logger.info("removing stale temporary folder %s (its process %d is gone)", stale, pid)
            shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike[str], *, expected_bytes: int | None = None) -> Iterator[Path]:
    """Yields an empty staging folder; on success it replaces ``out`` in one rename.

    Args:
        out: the artifact folder to create or replace.
        expected_bytes: how many bytes the caller will write into the staging folder, when it
            knows (serialized model plus external data); named in the disk-full error.

    Raises:
        OutputError: the target cannot be written, or the disk filled up.
    """
    target = check_output_target(out).absolute()
    staging = target.parent / f".{target.name}{_TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        staging.mkdir(mode=0o755)
    except OSError as error:
        raise OutputError(f"{staging}: cannot create the temporary output folder ({error.strerror})") from error
    try:
        yield staging
        _replace(staging, target)
    except OSError as error:
        written = _folder_bytes(staging)
        shutil.rmtree(staging, ignore_errors=True)
        if error.errno == errno.ENOSPC:
            needed = (f"needs {expected_bytes} bytes" if expected_bytes is not None and expected_bytes >= written
                      else f"needs more than {written} bytes")
            raise OutputError(f"{target}: the disk is full while writing the artifact, which {needed} "
                              f"({written} bytes fitted before the disk filled); nothing was written and any "
                              f"previous artifact is kept. Free at least that much space in {target.parent} "
                              "and run again") from error
        raise OutputError(f"{target}: cannot write the artifact ({error.strerror or error})") from error
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _folder_bytes(folder: Path) -> int:
    """Bytes in the regular files under ``folder`` (0 where it cannot be read)."""
    total = 0
    for path in folder.rglob("*"):
        with contextlib.suppress(OSError):
            if path.is_file():
                total += path.stat().st_size
    return total


def _replace(staging: Path, target: Path) -> None:
    for path in staging.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    if not target.exists():
        os.rename(staging, target)
        return
    old = target.parent / f".{target.name}{_OLD_MARK}{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(target, old)
    try:
        os.rename(staging, target)
    except OSError:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
