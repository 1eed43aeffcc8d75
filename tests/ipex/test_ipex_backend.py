"""IPEX static INT8 backend. Runs in the IPEX environment (`bash scripts/ipex_env.sh`, which CI runs);
the default environment does not collect this folder (tests/conftest.py)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from parnet_cpu.artifacts import ModelDir
from parnet_cpu.cli import main
from parnet_cpu.data import load_and_preprocess

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "calibration" / "sample"
NARROW_ARGS = ["--model", "parnet_s", "--planes", "16,32,64,128", "--input-size", "64", "--activation", "silu"]


@pytest.fixture(scope="module")
def ipex_int8(tmp_path_factory):
    out = tmp_path_factory.mktemp("ipex") / "m"
    assert main(["quantize", *NARROW_ARGS, "--calib", str(SAMPLE), "--out", str(out), "--subset-size", "16",
                 "--backend", "ipex", "--quiet"]) == 0
    return out


def test_report_fidelity_and_int8_graph(ipex_int8):
    report = json.loads((ipex_int8 / "report.json").read_text())
    assert report["backend"] == "ipex" and report["versions"]["torch"].startswith("2.8")
    counts = report["runtime_precision"]["int8"]["counts"]
    assert counts.get("ipex::LlgaFusionGroup", 0) >= 40  # oneDNN Graph int8 fusions, one per conv
    fid = report["evaluation"]["int8_vs_fp32"]
    # measured on this random-weight narrow model: SQNR 50.5 dB, 100% agreement on the held-out photos
    assert fid["sqnr_db"] >= 30.0 and fid["top1_agreement"] >= 75.0


def test_reload_identical_and_eval(ipex_int8, tmp_path):
    from parnet_cpu.quantization.ipex_backend import IpexBackend

    md = ModelDir.open(ipex_int8)
    x = np.stack([load_and_preprocess(p, md.preprocess_config()) for p in sorted(SAMPLE.glob("*.jpg"))[:3]])
    a = IpexBackend().compile(ipex_int8, "int8")(x)[0]
    b = IpexBackend().compile(ipex_int8, "int8")(x)[0]
    np.testing.assert_array_equal(a, b)
    import shutil

    data = tmp_path / "val" / "n01440764"
    data.mkdir(parents=True)
    for p in sorted(SAMPLE.glob("*.jpg"))[:4]:
        shutil.copy(p, data / p.name)
    out = tmp_path / "eval.json"
    assert main(["eval", "--model-dir", str(ipex_int8), "--data", str(tmp_path / "val"), "--backend", "ipex",
                 "--json", str(out), "--quiet"]) == 0
    assert json.loads(out.read_text())["labelled"] == 4
