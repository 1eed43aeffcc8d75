"""The README's main command, `parnet-cpu demo`, end to end (on a subset of the test images)."""
from __future__ import annotations

import json

import pytest

from parnet_cpu.cli import main

pytestmark = pytest.mark.slow  # the whole demo


def test_demo_end_to_end(tmp_path, capsys):
    from parnet_cpu.runtime.engine import precision_supported
    from parnet_cpu.data.fmnist import find_fashion_mnist

    try:
        find_fashion_mnist()
        real = True
    except FileNotFoundError:
        real = False
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--test-limit", "500", "--quick"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "demo.json").read_text())
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    # the table leads with ParNet-S at its real size, every precision the CPU has, and the runtime
    assert "ParNet-S 224x224" in printed and "random weights" in printed
    speed = summary["speed_half"]
    rows = {(r["engine"], r["precision"], r["batch"]) for r in speed["rows"]}
    precisions = ["fp32", "int8"] + (["bf16"] if precision_supported("bf16") else [])
    assert rows == {("ov-latency", p, b) for p in precisions for b in (1, 8)} | {("auto", "int8", 1), ("auto", "int8", 8)}
    for label in ("OpenVINO FP32", "OpenVINO INT8", "parnet-cpu Runtime INT8"):
        assert label in printed
    assert all(r["median_ms"] > 0 for r in speed["rows"])
    # timed in alternating rounds like bench: each speed-up is a per-round ratio with its range, and the
    # other load on the CPUs is recorded
    for r in speed["rows"]:
        assert r["rounds"] == 5 and r["throughput_ratio_vs_fp32"]["min"] <= r["throughput_ratio_vs_fp32"]["median"]
    assert isinstance(speed["machine_was_quiet"], bool) and "during" in speed["other_load"]
    if real:
        acc = summary["accuracy_half"]["accuracy"]
        # the shipped model: 94.6% on test images 0..999 (parnet_fmnist.json); INT8 stays within a point
        assert acc["fp32"]["top1"] >= 92.0 and acc["fp32"]["labelled"] == 500
        assert abs(acc["fp32"]["top1"] - acc["int8"]["top1"]) <= 1.0
        assert summary["accuracy_half"]["int8_vs_fp32"]["top1_agreement"] >= 97.0
    else:
        assert summary["accuracy_half"] is None and "Accuracy: not measured" in printed
