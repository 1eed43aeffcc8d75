"""Model folders that cannot lie (issue 17 item 4): digests and manifest-vs-IR checks at every load.

Each broken folder is a real copy of a quantized model folder with one real defect (a flipped byte, a
truncated file, INT8 and FP32 files swapped, a manifest that disagrees with its IR, a missing field);
`verify`, `Runtime`, `eval` and `serve` must each refuse it with an error that names the defect.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from conftest import NARROW, randomize_bn

pytestmark = pytest.mark.slow  # its module fixture quantizes a model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    import torch

    from parnet_cpu.models.parnet import create_model
    from parnet_cpu.quantization.ptq import QuantizeOptions, quantize_to_dir

    torch.manual_seed(0)
    model = create_model("parnet_s", **NARROW)
    randomize_bn(model)
    out = tmp_path_factory.mktemp("verify") / "good"
    quantize_to_dir(model, {"model": "narrow"}, REPO / "calibration" / "sample", out,
                    QuantizeOptions(subset_size=16, progress=False, eval_limit=0), log=lambda *a: None)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Three photos under ImageNet validation file names: labelled by the shipped table."""
    d = tmp_path_factory.mktemp("val")
    for i in range(1, 4):
        shutil.copy(REPO / "calibration" / "sample" / "astronaut.jpg", d / f"ILSVRC2012_val_{i:08d}.JPEG")
    return d


def manifest(folder: Path) -> dict:
    return json.loads((folder / "parnet.json").read_text())


def edit_manifest(folder: Path, change) -> None:
    """Edit the manifest and record the edit in its content digest (as a deliberate `verify --stamp` would, minus
    its IR check), so what is tested is the check behind the digest: the IR against the manifest. An edit whose
    digest was not recorded is refused before that (tests/test_guards_manifest.py)."""
    from parnet_cpu.artifacts import manifest_digest

    m = manifest(folder)
    change(m)
    if "manifest_sha256" in m:
        m["manifest_sha256"] = manifest_digest(m)
    (folder / "parnet.json").write_text(json.dumps(m))


def flip_byte(folder: Path) -> None:
    p = folder / "model_int8.bin"
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0x01
    p.write_bytes(bytes(b))


def truncate(folder: Path) -> None:
    p = folder / "model_fp32.bin"
    p.write_bytes(p.read_bytes()[:-4096])


def swap_int8_fp32(folder: Path) -> None:
    for ext in ("xml", "bin"):
        a, b = folder / f"model_int8.{ext}", folder / f"model_fp32.{ext}"
        tmp = folder / "swap.tmp"
        a.rename(tmp)
        b.rename(a)
        tmp.rename(b)


def unstamp(m: dict) -> None:
    m.pop("files", None)
    m.pop("schema", None)
    m.pop("manifest_sha256", None)


# (defect, precision loaded, expected words in every refusal)
DEFECTS = {
    "flipped_byte": (flip_byte, "int8", "model_int8.bin does not match its recorded sha256"),
    "truncated": (truncate, "fp32", "model_fp32.bin is"),
    "swapped_int8_fp32": (swap_int8_fp32, "int8", "model_int8.bin is"),
    "swapped_unstamped": (lambda f: (swap_int8_fp32(f), edit_manifest(f, unstamp)), "int8",
                          "it declares schema 1, whose manifests do not cover their own content"),
    "wrong_class_count": (lambda f: edit_manifest(f, lambda m: m["config"].update(num_classes=10)), "int8",
                          "predicts 1000 classes, but parnet.json says config.num_classes = 10"),
    "class_names_count": (lambda f: edit_manifest(f, lambda m: m["config"].update(class_names=["a", "b", "c"])),
                          "int8", "config.class_names has 3 entries but config.num_classes is 1000"),
    "wrong_input_size": (lambda f: edit_manifest(f, lambda m: m["config"].update(input_size=32)), "int8",
                         "but parnet.json says (N, 3, 32, 32)"),
    "missing_field": (lambda f: edit_manifest(f, lambda m: m["config"].pop("mean")), "int8", "config.mean is missing"),
    "mistyped_field": (lambda f: edit_manifest(f, lambda m: m["config"].update(in_chans="3")), "int8",
                       "config.in_chans is '3', expected int"),
}


@pytest.fixture(params=sorted(DEFECTS))
def broken(request, good, tmp_path) -> tuple[Path, str, str]:
    folder = tmp_path / request.param
    shutil.copytree(good, folder)
    make, precision, words = DEFECTS[request.param]
    make(folder)
    return folder, precision, words


def test_good_folder_passes_everywhere(good, data, capsys):
    from parnet_cpu.cli import main

    m = manifest(good)
    assert m["schema"] == 3
    assert set(m["files"]) == {"model_fp32.xml", "model_fp32.bin", "model_int8.xml", "model_int8.bin",
                               "model_deploy.pt"}
    assert main(["verify", str(good)]) == 0
    out = capsys.readouterr().out
    assert "int8 IR" in out and "result        ok" in out
    assert main(["eval", "--model-dir", str(good), "--data", str(data), "--quiet"]) == 0


def test_defect_is_refused_by_verify_runtime_eval_and_serve(broken, data, capsys):
    from parnet_cpu.artifacts import ModelDirError
    from parnet_cpu.cli import main
    from parnet_cpu.runtime import Runtime

    folder, precision, words = broken
    assert main(["verify", str(folder)]) == 2
    captured = capsys.readouterr()
    assert words in captured.out + captured.err

    with pytest.raises(ModelDirError) as exc:
        Runtime(folder, precision=precision, plan="single")
    assert words in str(exc.value)

    assert main(["eval", "--model-dir", str(folder), "--data", str(data), "--precision", precision, "--quiet"]) == 2
    assert words in capsys.readouterr().err

    assert main(["serve", "--model-dir", str(folder), "--port", "0", "--precision", precision, "--plan", "single"]) == 2
    assert words in capsys.readouterr().err


def test_unstamped_folder_is_refused_until_stamped_on_purpose(good, tmp_path, capsys):
    """A folder from an older parnet-cpu (no digests) is no longer loaded with a warning: it is refused until
    `verify --stamp` records its content, which it does only when the IRs pass their checks."""
    from parnet_cpu.artifacts import ManifestSealError, ModelDir
    from parnet_cpu.cli import main

    folder = tmp_path / "old"
    shutil.copytree(good, folder)
    edit_manifest(folder, unstamp)
    with pytest.raises(ManifestSealError, match="verify --stamp"):
        ModelDir.open(folder)
    assert main(["verify", str(folder)]) == 2
    assert "verify --stamp" in capsys.readouterr().out
    assert main(["verify", "--stamp", str(folder)]) == 0
    assert manifest(folder)["files"] == manifest(good)["files"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ModelDir.open(folder).ir_path("int8")
    flip_byte(folder)  # stamping does not bless a file changed afterwards, nor re-stamp over it
    assert main(["verify", "--stamp", str(folder)]) == 2
    assert "refusing to re-stamp" in capsys.readouterr().err


def test_served_metadata_carries_preprocessing(good):
    """`open_runtime` answers one real inference before it returns (the server reports ready after it);
    the v2 model metadata tells clients how to preprocess."""
    from parnet_cpu.serve.app import ServeConfig, open_runtime
    from parnet_cpu.serve.v2 import ModelInfo

    rt = open_runtime(ServeConfig(model=str(good), plan="single", precision="fp32"))
    try:
        assert rt.stats.summary()["model"]["count"] >= 1  # the start-up inference ran through the whole model
        meta = json.loads(ModelInfo.from_runtime("parnet", rt).metadata_json)
    finally:
        rt.close()
    pre = meta["parameters"]["preprocessing"]
    cfg = manifest(good)["config"]
    assert pre["mean"] == pytest.approx(cfg["mean"]) and pre["std"] == pytest.approx(cfg["std"])
    assert pre["center_crop"] == cfg["input_size"] and pre["layout"] == "NCHW"
    assert pre["resize_shorter_side"] == int(np.floor(cfg["input_size"] / cfg["crop_pct"]))


def test_digest_cost_is_small(good):
    """Digests are checked once per file state per process: a second open of the same files is free."""
    import time

    from parnet_cpu.artifacts import ModelDir

    md = ModelDir.open(good)
    md.ir_path("int8")
    t0 = time.perf_counter()
    for _ in range(20):
        ModelDir.open(good).ir_path("int8")
    assert (time.perf_counter() - t0) / 20 < 0.05


def test_atomic_write_replaces_whole_files_or_nothing(tmp_path):
    """The one atomic file write (JSON, checkpoints): the old file stays whole when writing fails, and no
    temporary file is left behind either way."""
    from parnet_cpu.outputs import atomic_write, write_json

    target = tmp_path / "x.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(target) as f:
            f.write('{"a": ')
            raise RuntimeError("boom")
    assert json.loads(target.read_text()) == {"a": 1}
    with atomic_write(tmp_path / "w.bin", "wb") as f:
        f.write(b"\0\1")
    assert (tmp_path / "w.bin").read_bytes() == b"\0\1" and oct((tmp_path / "w.bin").stat().st_mode & 0o777) == "0o644"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.bin", "x.json"]
