"""Issue 26 item 2: a serving-only model folder that verifies. `parnet-cpu slim DIR` keeps parnet.json and the IR
a Runtime serves, removes the other recorded model files (FP32 IR, model_deploy.pt, model.onnx), says so in the
manifest (`serving_only`) and re-seals it; before, a folder with only the INT8 IR served but failed `verify`.
Real folders (the narrow ParNet exported with ONNX and quantized with NNCF), real CLI, real Runtime."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


FULL = {"parnet.json", "model_fp32.xml", "model_fp32.bin", "model_int8.xml", "model_int8.bin", "model_deploy.pt",
        "model.onnx"}


@pytest.fixture(scope="module")
def full_folder(narrow_int8_copy, tmp_path_factory) -> Path:
    """A folder as `export --onnx` then `quantize` leave it (conftest's session folder; only the files matter)."""
    out = narrow_int8_copy(tmp_path_factory.mktemp("slim") / "full")
    assert names(out) == FULL
    return out


@pytest.fixture
def folder(full_folder, tmp_path) -> Path:
    return Path(shutil.copytree(full_folder, tmp_path / "model"))


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "parnet_cpu", *args], capture_output=True, text=True, timeout=300)


def names(folder: Path) -> set[str]:
    """What is in the folder, less the runtime's caches (a Runtime run on the module's folder leaves them)."""
    return {p.name for p in folder.iterdir()} - {"compile_cache", "plan_cache.json"}


def manifest(folder: Path) -> dict:
    return json.loads((folder / "parnet.json").read_text())


def logits(folder: Path, precision: str) -> np.ndarray:
    from parnet_cpu.runtime.runtime import Runtime

    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    with Runtime(folder, precision=precision, plan="single") as rt:
        return np.asarray(rt.infer(x))


def test_a_slim_folder_keeps_what_a_runtime_needs_verifies_and_answers_the_same(folder, full_folder):
    r = cli("slim", str(folder))
    assert r.returncode == 0, r.stderr
    assert "removed model.onnx, model_deploy.pt, model_fp32.bin, model_fp32.xml" in r.stdout
    assert names(folder) == {"parnet.json", "model_int8.xml", "model_int8.bin"}
    m = manifest(folder)
    assert m["serving_only"] == {"precisions": ["int8"],
                                 "removed": ["model.onnx", "model_deploy.pt", "model_fp32.bin", "model_fp32.xml"]}
    assert set(m["files"]) == {"model_int8.xml", "model_int8.bin"}
    assert m["files"]["model_int8.bin"] == manifest(full_folder)["files"]["model_int8.bin"]  # kept, not re-hashed
    v = cli("verify", str(folder))
    assert v.returncode == 0 and "serving-only  keeps int8" in v.stdout, v.stdout + v.stderr
    np.testing.assert_array_equal(logits(folder, "int8"), logits(full_folder, "int8"))
    # what slim removed is named when asked for
    from parnet_cpu.artifacts import ModelDir, ModelDirError

    with pytest.raises(ModelDirError, match="serving-only folder: `parnet-cpu slim` removed model_fp32.xml"):
        ModelDir.open(folder).ir_path("fp32")


@pytest.mark.slow
def test_keep_several_precisions_then_slim_further(folder):
    r = cli("slim", str(folder), "--keep", "int8", "--keep", "fp32")
    assert r.returncode == 0, r.stderr
    assert names(folder) == FULL - {"model_deploy.pt", "model.onnx"}
    assert cli("verify", str(folder)).returncode == 0
    assert cli("slim", str(folder), "--keep", "fp32", "--keep", "int8").returncode == 0  # again: nothing to do
    r = cli("slim", str(folder), "--keep", "int8")
    assert r.returncode == 0 and "model_fp32.xml" in r.stdout
    assert manifest(folder)["serving_only"]["removed"] == ["model.onnx", "model_deploy.pt", "model_fp32.bin",
                                                           "model_fp32.xml"]
    assert cli("verify", str(folder)).returncode == 0
    r = cli("slim", str(folder), "--keep", "bf16")  # a precision the folder does not have
    assert r.returncode == 2 and "no bf16 model to keep; present: int8" in r.stderr
    r = cli("slim", str(folder), "--keep", "int4")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_slim_refuses_a_changed_kept_file_and_removes_nothing(folder):
    """Slimming re-seals the manifest: it must never bless a file that no longer matches its digest."""
    data = bytearray((folder / "model_int8.bin").read_bytes())
    data[len(data) // 2] ^= 1
    (folder / "model_int8.bin").write_bytes(bytes(data))
    before = (folder / "parnet.json").read_bytes()
    r = cli("slim", str(folder))
    assert r.returncode == 2 and "model_int8.bin does not match its recorded sha256" in r.stderr
    assert "Traceback" not in r.stderr
    assert names(folder) == FULL and (folder / "parnet.json").read_bytes() == before


@pytest.mark.slow
def test_an_interrupted_slim_is_finished_by_running_it_again_and_foreign_files_stay(folder, full_folder):
    """The manifest is written first; a removal cut short leaves removed files behind, which verify names and a
    second slim removes. A file the manifest never recorded (the user's) is left alone."""
    assert cli("slim", str(folder)).returncode == 0
    shutil.copy(full_folder / "model_deploy.pt", folder / "model_deploy.pt")  # as if the unlink never happened
    (folder / "notes.txt").write_text("mine")
    v = cli("verify", str(folder))
    assert v.returncode == 2 and "model_deploy.pt is left over from an interrupted `parnet-cpu slim`" in v.stdout
    assert cli("slim", str(folder)).returncode == 0
    assert names(folder) == {"parnet.json", "model_int8.xml", "model_int8.bin", "notes.txt"}


def test_the_serving_only_field_is_checked_like_every_field(folder):
    """A sealed manifest whose serving_only contradicts its files (or has unknown keys) is refused at load."""
    from parnet_cpu.artifacts import ModelDir, ModelDirError, manifest_digest

    assert cli("slim", str(folder)).returncode == 0
    for change, said in [
        (lambda s: s["removed"].append("model_int8.xml"), "serving_only.removed lists model_int8.xml, which files"),
        (lambda s: s["precisions"].append("fp32"), "serving_only.precisions lists fp32, but files does not record"),
        (lambda s: s.update(note="x"), "serving_only.note is not a field"),
        (lambda s: s.update(removed=["weights.bin"]), "serving_only.removed[0] is 'weights.bin', expected one of"),
    ]:
        m = manifest(folder)
        change(m["serving_only"])
        m["manifest_sha256"] = manifest_digest(m)
        bad = folder.parent / "bad"
        shutil.rmtree(bad, ignore_errors=True)
        shutil.copytree(folder, bad)
        (bad / "parnet.json").write_text(json.dumps(m))
        with pytest.raises(ModelDirError, match=said.replace(".", r"\.").replace("[", r"\[")):
            ModelDir.open(bad)
    r = cli("slim", str(folder.parent / "nowhere"))
    assert r.returncode == 2 and "not a parnet-cpu model folder" in r.stderr


def test_slim_never_deletes_a_file_changed_since_it_was_recorded(folder):
    """A recorded file slim would remove (model_deploy.pt) whose content changed since export is someone's
    work: refused, nothing removed, the manifest as it was."""
    before = (folder / "parnet.json").read_bytes()
    with open(folder / "model_deploy.pt", "ab") as f:
        f.write(b"my own notes")
    res = cli("slim", str(folder))
    assert res.returncode == 2 and "model_deploy.pt changed since" in res.stderr and "Traceback" not in res.stderr
    assert (folder / "parnet.json").read_bytes() == before and names(folder) == FULL


@pytest.mark.slow
def test_bench_on_a_slim_folder_says_which_engines_need_the_removed_files(folder, tmp_path):
    """bench's torch and ONNX baselines build from model_deploy.pt (or model.onnx): on a serving-only folder
    those rows say so and the OpenVINO rows run (it ended in a CheckpointError traceback)."""
    from parnet_cpu.cli import main

    assert cli("slim", str(folder)).returncode == 0
    js = tmp_path / "b.json"
    assert main(["bench", "--model-dir", str(folder), "--engines", "ov-latency,torch-eager,ort-int8", "-b", "1",
                 "--rounds", "1", "-niter", "2", "-t", "0", "--warmup", "0", "--json", str(js)]) == 0
    rows = {r["engine"]: r for r in json.loads(js.read_text())["rows"]}
    assert "needs model_deploy.pt," in rows["torch-eager"]["error"] and "serving-only" in rows["torch-eager"]["error"]
    assert "needs model.onnx or model_deploy.pt" in rows["ort-int8"]["error"]
    assert "error" not in rows["ov-latency"] and rows["ov-latency"]["median_ms"] > 0
