"""A planted pickle payload in a .pt2 or a weights file never runs; clean files still load."""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from graphopt.errors import FormatError, UnsafeFileError
from graphopt.safe_load import load_exported_program, load_state_dict


class Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Small(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


@pytest.fixture
def clean_pt2(tmp_path: Path) -> Path:
    path = tmp_path / "clean.pt2"
    torch.export.save(torch.export.export(Small(), (torch.ones(2, 4),)), str(path))
    return path


def plant(clean: Path, target: Path, marker: Path) -> Path:
    """Marks weight_0 as pickled and replaces its bytes with a payload that touches ``marker``."""
    with zipfile.ZipFile(clean) as source, zipfile.ZipFile(target, "w") as out:
        for info in source.infolist():
            data = source.read(info.filename)
            if info.filename.endswith("model_weights_config.json"):
                config = json.loads(data)
                for meta in config["config"].values():
                    meta["use_pickle"] = True
                data = json.dumps(config).encode()
            elif info.filename.endswith("data/weights/weight_0"):
                data = pickle.dumps(Payload(str(marker)), protocol=2)
            out.writestr(info, data)
    return target


def test_clean_pt2_loads(clean_pt2: Path) -> None:
    program = load_exported_program(clean_pt2)
    assert program.module()(torch.ones(2, 4)).shape == (2, 4)


def test_planted_payload_is_refused_and_never_runs(clean_pt2: Path, tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    hostile = plant(clean_pt2, tmp_path / "hostile.pt2", marker)
    with pytest.raises(UnsafeFileError, match=r"hostile.pt2: refused.*offending global: posix.system"):
        load_exported_program(hostile)
    assert not marker.exists(), "the payload ran"
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None, "the guard is set only for the call"


def test_not_an_archive(tmp_path: Path) -> None:
    path = tmp_path / "x.pt2"
    path.write_bytes(b"not a zip")
    with pytest.raises(FormatError, match="not a .pt2 archive"):
        load_exported_program(path)


def test_state_dict_payload_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "weights.pt"
    with open(path, "wb") as handle:
        pickle.dump({"w": Payload(str(marker))}, handle, protocol=2)
    with pytest.raises(UnsafeFileError, match="weights.pt: refused.*posix.system"):
        load_state_dict(path)
    assert not marker.exists()
    clean = tmp_path / "clean.pt"
    torch.save({"w": torch.ones(2)}, clean)
    assert torch.equal(load_state_dict(clean)["w"], torch.ones(2))
