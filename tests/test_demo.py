"""The README's main command, `parnet-cpu demo`, end to end (on a subset of the test images)."""
from __future__ import annotations

import json

from parnet_cpu.cli import main


def test_demo_end_to_end(tmp_path, capsys):
    from parnet_cpu.training.idx import find_fashion_mnist

    try:
        find_fashion_mnist()
        real = True
    except FileNotFoundError:
        real = False
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--test-limit", "500"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "demo.json").read_text())
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert "OpenVINO INT8" in printed and "multi-stream INT8" in printed
    rows = [r for part in ("fp32", "int8") for r in summary["bench"][part]["rows"]]
    assert {r["engine"] for r in rows} == {"torch-eager", "ov-latency", "multistream"}
    assert not [r for r in rows if "error" in r]
    if real:
        acc = summary["accuracy"]
        # the shipped model: 94.6% on test images 0..999 (parnet_fmnist.json); INT8 stays within a point
        assert acc["fp32"]["top1"] >= 92.0 and acc["fp32"]["labelled"] == 500
        assert abs(acc["fp32"]["top1"] - acc["int8"]["top1"]) <= 1.0
        assert summary["int8_vs_fp32"]["top1_agreement"] >= 97.0
    else:
        assert "accuracy" not in summary and summary["model"]["name"] == "parnet_s"
