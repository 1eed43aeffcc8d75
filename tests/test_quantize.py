"""`parnet-cpu quantize` / `eval` end to end on a narrow ParNet and the shipped photographs."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import NARROW
from parnet_cpu.cli import main
from parnet_cpu.data import imagenet_synsets, imagenet_val_labels, load_and_preprocess
from parnet_cpu.artifacts import ModelDir
from parnet_cpu.models.checkpoint import save_checkpoint
from parnet_cpu.models.parnet import create_model
from parnet_cpu.runtime.engine import CompileOptions, compile_model

pytestmark = pytest.mark.slow  # NNCF quantization end to end

REPO = Path(__file__).resolve().parents[1]
PHOTOS = sorted((REPO / "calibration" / "sample").glob("*.jpg"))
NARROW_ARGS = ["--model", "parnet_s", "--planes", "16,32,64,128", "--input-size", "64"]
SUBSET = 10


def val_name(k: int) -> str:
    return f"ILSVRC2012_val_{k + 1:08d}.JPEG"


def truth() -> dict[str, int]:
    val = imagenet_val_labels()
    return {val_name(k): int(val[k]) for k in range(len(PHOTOS))}


def write_layout(root: Path, layout: str) -> Path:
    """The same photos as ImageNet validation images, in one of the supported layouts."""
    syn = imagenet_synsets()
    for k, src in enumerate(PHOTOS):
        name = val_name(k)
        folder = root / syn[truth()[name]] if layout == "class_folders" else root
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, folder / (f"photo_{k:02d}.jpg" if layout == "unlabelled" else name))
    if layout == "kaggle":
        rows = [f"{Path(n).stem},{syn[lab]} 1 2 30 40" for n, lab in truth().items()]
        (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "narrow.pt"
    save_checkpoint(create_model("parnet_s", **NARROW), path)
    return path


def own_logits(ir: Path, precision: str, files: list[Path], md: ModelDir) -> np.ndarray:
    compiled = compile_model(ir, CompileOptions(precision=precision))
    pcfg = md.preprocess_config()
    return np.concatenate([compiled(load_and_preprocess(f, pcfg)[None])[0] for f in files])


@pytest.mark.parametrize("layout", ["class_folders", "kaggle", "unlabelled"])
def test_quantize_report_matches_independent_computation(tmp_path, checkpoint, layout, capsys):
    data = write_layout(tmp_path / "data", layout)
    out = tmp_path / "out"
    rc = main(["quantize", *NARROW_ARGS, "--checkpoint", str(checkpoint), "--calib", str(data), "--out", str(out),
               "--subset-size", str(SUBSET), "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "Statistics collection" not in captured.out + captured.err  # --quiet silences NNCF's bars too
    report = json.loads((out / "report.json").read_text())
    md = ModelDir.open(out)
    assert md.precisions == ["fp32", "int8"]
    assert report["checkpoint"]["sha256"] and not report["random_weights"]
    assert report["calibration"]["decoded"] == SUBSET and report["calibration"]["skipped"] == []
    assert set(report["seconds"]) >= {"read_data", "reparameterize", "export_fp32", "quantize", "evaluate"}
    # precisions read back from the compiled INT8 model: with the default ignored scope (se, stem) the SE
    # gate convs and the first conv stay float (f32, or bf16 where the CPU has it: the leftovers
    # default), every other conv runs an int8 (u8/i8) kernel
    from parnet_cpu.runtime.engine import float_leftovers

    leftover = float_leftovers("int8")
    convs = [l for l in report["runtime_precision"]["int8"]["layers"] if l["type"] == "Convolution"]
    floats = {l["name"] for l in convs if l["precision"] == leftover}
    ints = {l["name"] for l in convs if l["precision"] in ("u8", "i8")}
    assert floats | ints == {l["name"] for l in convs} and len(ints) >= 20
    assert all(".se.conv" in n or ".inits.0.0.conv" in n for n in floats)
    assert any(".inits.0.0.conv" in n for n in floats) and not any(".se." in n for n in ints)

    calib = {Path(f).name for f in report["calibration"]["files"]}
    all_files = sorted(p for p in data.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    held = [p for p in all_files if p.name not in calib]
    assert len(calib) == SUBSET and len(held) == len(PHOTOS) - SUBSET
    ev = report["evaluation"]
    assert ev["held_out_images"] == len(held)
    # recompute fidelity with our own loop over the held-out files (order-independent metrics)
    fp32 = own_logits(md.ir_path("fp32"), "fp32", held, md)
    int8 = own_logits(md.ir_path("int8"), "int8", held, md)
    agree = 100.0 * np.mean(fp32.argmax(1) == int8.argmax(1))
    sqnr = 10 * np.log10(np.sum(fp32.astype(np.float64) ** 2) / np.sum((fp32.astype(np.float64) - int8) ** 2))
    assert ev["int8_vs_fp32"]["top1_agreement"] == pytest.approx(agree)
    assert ev["int8_vs_fp32"]["sqnr_db"] == pytest.approx(sqnr, abs=0.05)
    if layout == "unlabelled":
        assert "top1" not in ev["fp32"]
    else:
        labels = np.array([truth()[p.name] for p in held])
        assert ev["fp32"]["top1"] == pytest.approx(100.0 * np.mean(fp32.argmax(1) == labels))
        assert ev["int8"]["top1"] == pytest.approx(100.0 * np.mean(int8.argmax(1) == labels))
        top5 = (np.argsort(-int8, axis=1)[:, :5] == labels[:, None]).any(1).mean() * 100
        assert ev["int8"]["top5"] == pytest.approx(top5)
        # eval on the same folder agrees with our own computation over all images
        res = tmp_path / "eval.json"
        assert main(["eval", "--model-dir", str(out), "--data", str(data), "--precision", "int8", "--json", str(res),
                     "--quiet"]) == 0
        got = json.loads(res.read_text())
        all_labels = np.array([truth()[p.name] for p in all_files])
        all_int8 = own_logits(md.ir_path("int8"), "int8", all_files, md)
        assert got["top1"] == pytest.approx(100.0 * np.mean(all_int8.argmax(1) == all_labels))
        assert sum(r["images"] for r in got["per_class"]) == len(all_files)


def test_corrupt_images_are_skipped_counted_and_named(tmp_path, checkpoint):
    data = write_layout(tmp_path / "data", "unlabelled")
    (data / "broken.jpg").write_bytes(PHOTOS[0].read_bytes()[:2000])
    (data / "notes.jpg").write_text("this is not an image")
    out = tmp_path / "out"
    assert main(["quantize", *NARROW_ARGS, "--checkpoint", str(checkpoint), "--calib", str(data), "--out", str(out),
                 "--subset-size", "30", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    skipped = {Path(p).name for p, _ in report["calibration"]["skipped"]}
    assert skipped == {"broken.jpg", "notes.jpg"}
    assert report["calibration"]["decoded"] == len(PHOTOS)


def test_bad_inputs_give_clear_errors_and_leave_nothing(tmp_path, checkpoint, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    data = write_layout(tmp_path / "data", "class_folders")
    bad_ckpt = tmp_path / "bad.pth.tar"
    bad_ckpt.write_bytes(b"\x00garbage")
    cases = [
        (["--checkpoint", str(checkpoint), "--calib", str(empty)], "folder is empty"),
        (["--checkpoint", str(checkpoint), "--calib", str(tmp_path / "missing")], "folder not found"),
        (["--checkpoint", str(bad_ckpt), "--calib", str(data)], "cannot read checkpoint"),
        (["--num-classes", "10", "--calib", str(data)], "1000 classes"),
    ]
    for extra, message in cases:
        out = tmp_path / "out"
        assert main(["quantize", *NARROW_ARGS, *extra, "--out", str(out), "--quiet"]) == 2
        assert message in capsys.readouterr().err.lower()
        assert not out.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_eval_errors(tmp_path, capsys):
    data = write_layout(tmp_path / "data", "unlabelled")
    assert main(["eval", "--model-dir", str(tmp_path), "--data", str(data)]) == 2
    assert "not a parnet-cpu model folder" in capsys.readouterr().err
