"""Loading user-supplied PyTorch files without running their code.

``torch.export.load`` of a ``.pt2`` whose weight is marked as pickled ran a planted payload
(measured); with ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` it was blocked and a clean ``.pt2``
still loaded. So ``load_exported_program`` scans the archive first (a zip, within size
limits, no member escaping the archive), then loads with that guard set for the call,
and turns the weights-only unpickler's refusal into an ``UnsafeFileError`` that names the
file and the offending global. ``load_state_dict`` is ``torch.load(weights_only=True)``
with no fallback, and prefers safetensors.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Iterator

import torch

from graphopt.errors import FormatError, UnsafeFileError

__all__ = ["load_exported_program", "load_state_dict", "scan_pt2"]

logger = logging.getLogger(__name__)

#: Refuse archives that would inflate beyond this (a zip bomb, or not a model we made).
MAX_UNCOMPRESSED_BYTES = 8 << 30


@contextlib.contextmanager
def _weights_only_guard() -> Iterator[None]:
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def scan_pt2(path: Path) -> list[str]:
    """Checks a ``.pt2`` archive's structure; returns the names of weights stored as pickles.

    Raises:
        FormatError: not a zip archive, or its configuration is unreadable.
        UnsafeFileError: a member escapes the archive or it inflates past the size limit.
    """
    if not path.is_file():
        raise FormatError(f"{path}: no such file; give the path of a model.pt2")
    if not zipfile.is_zipfile(path):
        raise FormatError(f"{path}: not a .pt2 archive (not a zip file)")
    pickled = []
    with zipfile.ZipFile(path) as archive:
        total = 0
        for info in archive.infolist():
            total += info.file_size
            if info.filename.startswith("/") or ".." in Path(info.filename).parts:
                raise UnsafeFileError(f"{path}: archive member {info.filename!r} escapes the archive")
        if total > MAX_UNCOMPRESSED_BYTES:
            raise UnsafeFileError(f"{path}: inflates to {total} bytes, over the {MAX_UNCOMPRESSED_BYTES} limit")
        for name in archive.namelist():
            if name.endswith("_config.json"):
                try:
                    config = json.loads(archive.read(name)).get("config", {})
                except (ValueError, AttributeError) as error:
                    raise FormatError(f"{path}: {name} is not valid JSON ({error})") from error
                pickled += [key for key, meta in config.items() if isinstance(meta, dict) and meta.get("use_pickle")]
    return pickled


def load_exported_program(path: str | os.PathLike[str]) -> torch.export.ExportedProgram:
    """``torch.export.load`` under the weights-only guard, after ``scan_pt2``.

    Raises:
        UnsafeFileError: the archive holds a pickle that would import a global not on
            torch's weights-only allow-list (the message names it).
    """
    path = Path(path)
    pickled = scan_pt2(path)
    if pickled:
        logger.info("%s: weights stored as pickles (loaded weights-only): %s", path, ", ".join(pickled))
    try:
        with _weights_only_guard():
            return torch.export.load(str(path))
    except Exception as error:  # torch.export.load reports a bad archive with many types, asserts included
        if isinstance(error, pickle.UnpicklingError) or "weights_only" in str(error).lower():
            raise UnsafeFileError(f"{path}: refused: it holds a pickle that would run code "
                                  f"(offending global: {_offending_global(error)}). Only load .pt2 files you "
                                  "trust, re-exported with graphopt") from error
        raise FormatError(f"{path}: cannot load this .pt2 ({type(error).__name__}: "
                          f"{(str(error).splitlines() or [''])[0]})") from error


def _offending_global(error: BaseException) -> str:
    """The global the weights-only unpickler refused, or its stated reason when it names none."""
    text = str(error)
    match = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+(?: [\w.]+)?)", text)
    if match:
        return match.group(1).replace(" ", ".")
    reason = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    return reason.group(1).strip() if reason else "an object outside torch's weights-only allow-list"


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Weights from safetensors (preferred) or ``torch.load(weights_only=True)``; never a full unpickle."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeFileError(f"{path}: refused: it holds a pickle that would run code (offending global: "
                              f"{_offending_global(error)}); convert it to safetensors") from error
