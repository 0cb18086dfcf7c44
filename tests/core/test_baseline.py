"""compress --baseline: the artifact's size, ORT speed and held-out accuracy beside the baseline recipe's."""

from __future__ import annotations

import json

from graphopt.cli import main

INT8_DYNAMIC = """
description = "tiny, dynamic int8"
model = "tiny"
[[pipeline]]
pass = "calibrate"
mode = "dynamic"
[[pipeline]]
pass = "export"
[[pipeline]]
pass = "ort-fusions"
pack_qkv = false
embed_layer_norm = false
[[pipeline]]
pass = "quantize"
[[backend]]
name = "onnxruntime"
"""


def test_compress_against_the_fp32_baseline(tmp_path, capsys) -> None:
    recipe = tmp_path / "int8.toml"
    recipe.write_text(INT8_DYNAMIC)
    assert main(["compress", "--model", "tiny", "--recipe", str(recipe), "--baseline", "fp32",
                 "-o", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "against the fp32 artifact" in printed
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    row = report["baseline"]["onnxruntime"]
    assert report["baseline"]["recipe"] == "fp32"
    # The int8 file holds 1-byte Linear weights: smaller than the fp32 one, by the files' own sizes.
    assert row["bytes"] == report["artifacts"]["model.onnx"] and row["size_ratio"] < 0.9
    for batch in ("1", "8"):
        t = row["latency"][batch]
        assert t["p50_ms"] > 0 and t["baseline_p50_ms"] > 0
        assert abs(t["speedup"] - t["baseline_p50_ms"] / t["p50_ms"]) < 1e-9
    # Both were checked on the same held-out sentences; fp32 agrees with torch better than int8 does.
    ours, base = row["accuracy"]["ours"], row["accuracy"]["baseline"]
    assert ours["n"] == base["n"] and base["mean_cosine"] >= ours["mean_cosine"]
    assert "## Against the fp32 artifact" in (tmp_path / "out" / "report.md").read_text()
