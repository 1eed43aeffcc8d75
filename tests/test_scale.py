"""benchmarks/scale_check.py and scripts/scale_bundle.sh: the pieces that run without a measurement.
(The end-to-end check, a fresh venv installed from the bundle running `scale_check.py --quick`, takes
minutes: it is a CI step, see benchmarks/README.md.)"""
from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_scale_check():
    spec = importlib.util.spec_from_file_location("scale_check", REPO / "benchmarks" / "scale_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_thread_counts_and_groupings():
    sc = load_scale_check()
    assert sc.thread_counts(1) == [1] and sc.thread_counts(2) == [1, 2]
    assert sc.thread_counts(16) == [1, 2, 4, 8, 16] and sc.thread_counts(24) == [1, 2, 4, 8, 16, 24]
    assert set(sc.alternative_groupings(16)) == {"planner-auto", "equal", "cores-per-stream-5"}
    assert sc.alternative_groupings(24)["cores-per-stream-8"] == 8 and "cores-per-stream-5" not in sc.alternative_groupings(12)
    assert sc.cpu_slug("Intel(R) Xeon(R) Platinum 8480+", 56) == "intel-xeon-platinum-8480-56c"
    assert sc.cpu_slug(None, 16) == "unknown-16c"


def test_bundle_run_without_a_bundle_is_a_clear_error(tmp_path):
    r = subprocess.run(["bash", str(REPO / "scripts" / "scale_bundle.sh"), "--run", "--dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "prepare the bundle first" in r.stderr
    r = subprocess.run(["bash", str(REPO / "scripts" / "scale_bundle.sh"), "--bogus"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown option" in r.stderr
