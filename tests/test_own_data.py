"""Your own data and model (issue 15): a fine-tune on a few ImageNet classes, a label file kept outside the
image folder, and preprocessing that is not the variant's. Real CLI processes, real photos, real model folders."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from parnet_cpu.data import bundled_calibration_dir

pytestmark = pytest.mark.slow  # fine-tunes and quantizes real folders

PHOTOS = sorted(bundled_calibration_dir().glob("*.jpg"))
NARROW_ARGS = ["--planes", "16,32,64,128", "--blocks", "5,6,6,1", "--input-size", "64"]
# three real ILSVRC2012 synsets; the fine-tune's output order is NOT their sorted order
SYNSETS = ["n01484850", "n01440764", "n01443537"]


def cli(*args, cwd=None, ok=True):
    out = subprocess.run([sys.executable, "-m", "parnet_cpu", *map(str, args)], capture_output=True, text=True,
                         timeout=300, cwd=cwd, env={**os.environ, "PYTHONPATH": os.getcwd()})
    if ok:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def synset_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("own") / "val"
    for i, syn in enumerate(sorted(SYNSETS)):
        (root / syn).mkdir(parents=True)
        for p in PHOTOS[3 * i: 3 * i + 3]:
            shutil.copy(p, root / syn / p.name)
    return root


def test_fine_tune_on_a_few_synsets_uses_its_own_class_order(synset_folder, tmp_path):
    classes = tmp_path / "classes.txt"
    classes.write_text("# my fine-tune, output order\n" + "\n".join(SYNSETS) + "\n")
    cli("export", "--model", "parnet_s", *NARROW_ARGS, "--classes", classes, "--out", tmp_path / "ft")
    manifest = json.loads((tmp_path / "ft" / "parnet.json").read_text())
    assert manifest["config"]["num_classes"] == 3 and manifest["config"]["class_names"] == SYNSETS
    # folder commands name the folder --model-dir (--model, the old name, still works below)
    cli("eval", "--model-dir", tmp_path / "ft", "--data", synset_folder, "--json", tmp_path / "r.json", "--quiet")
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["label_mapping"] == {s: SYNSETS.index(s) for s in SYNSETS}  # the model's order, not sorted
    assert result["labelled"] == 9

    # the same 3-class model without its class names: the synset labels (0..999) cannot fit; the error says how
    cli("export", "--model", "parnet_s", *NARROW_ARGS, "--num-classes", "3", "--out", tmp_path / "nonames")
    out = cli("eval", "--model-dir", tmp_path / "nonames", "--data", synset_folder, ok=False)
    assert out.returncode == 2 and "--classes FILE" in out.stderr and "Traceback" not in out.stderr

    # ... or a classes.txt in the data folder names the label order
    data = tmp_path / "with_txt"
    shutil.copytree(synset_folder, data)
    (data / "classes.txt").write_text("\n".join(SYNSETS) + "\n")
    cli("eval", "--model-dir", tmp_path / "nonames", "--data", data, "--json", tmp_path / "r2.json", "--quiet")
    assert json.loads((tmp_path / "r2.json").read_text())["label_mapping"] == {s: SYNSETS.index(s) for s in SYNSETS}

    # a model folder given where a variant name is expected: told which flag takes what
    out = cli("export", "--model", tmp_path / "ft", "--out", tmp_path / "again", ok=False)
    assert out.returncode == 2 and "--model-dir" in out.stderr and "Traceback" not in out.stderr

    # a folder that is not one of the model's classes is an error that lists it
    extra = tmp_path / "extra_val"
    shutil.copytree(synset_folder, extra)
    (extra / "n01491361").mkdir()
    shutil.copy(PHOTOS[-1], extra / "n01491361" / PHOTOS[-1].name)
    out = cli("eval", "--model-dir", tmp_path / "ft", "--data", extra, ok=False)
    assert out.returncode == 2 and "n01491361" in out.stderr


def test_label_file_outside_the_image_folder(tmp_path):
    flat = tmp_path / "images"
    flat.mkdir()
    for p in PHOTOS[:6]:
        shutil.copy(p, flat / p.name)
    labels = tmp_path / "elsewhere" / "val.txt"  # Caffe format: <file name> <sorted-synset index>
    labels.parent.mkdir()
    labels.write_text("".join(f"{p.name} {i * 100}\n" for i, p in enumerate(PHOTOS[:6])))
    cli("export", "--model", "parnet_s", *NARROW_ARGS, "--out", tmp_path / "m")
    out = cli("eval", "--model-dir", tmp_path / "m", "--data", flat, ok=False)
    assert out.returncode == 2 and "no labels" in out.stderr  # not found by itself...
    cli("eval", "--model-dir", tmp_path / "m", "--data", flat, "--labels", labels, "--json", tmp_path / "r.json",
        "--quiet")  # ...named, it is used
    out = cli("eval", "--model-dir", tmp_path / "m", "--data", flat, "--labels", PHOTOS[0], ok=False)  # not a text file
    assert out.returncode == 2 and "not a text label file" in out.stderr and "Traceback" not in out.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["labelled"] == 6 and result["label_file"] == str(labels) and result["layout"] == "caffe_val_txt"
    from datetime import datetime

    assert result["report"] == "eval" and result["schema"] == 1
    assert datetime.fromisoformat(result["created"]).utcoffset() is not None  # time-zone aware


def test_custom_normalisation_is_stored_and_used(tmp_path):
    import parnet_cpu

    cli("export", "--model", "parnet_s", *NARROW_ARGS, "--out", tmp_path / "default")
    cli("export", "--model", "parnet_s", *NARROW_ARGS, "--mean", "0.5,0.4,0.3", "--std", "0.25,0.2,0.1",
        "--out", tmp_path / "custom")
    cli("export", "--model", "parnet_s", *NARROW_ARGS, "--crop-pct", "1.0", "--interpolation", "bilinear",
        "--out", tmp_path / "nocrop")
    cfg = json.loads((tmp_path / "custom" / "parnet.json").read_text())["config"]
    assert cfg["mean"] == [0.5, 0.4, 0.3] and cfg["std"] == [0.25, 0.2, 0.1]
    cfg = json.loads((tmp_path / "nocrop" / "parnet.json").read_text())["config"]
    assert cfg["crop_pct"] == 1.0 and cfg["interpolation"] == "bilinear"

    a, _ = parnet_cpu.load_images(PHOTOS[:2], tmp_path / "default")
    b, _ = parnet_cpu.load_images(PHOTOS[:2], tmp_path / "custom")
    c, _ = parnet_cpu.load_images(PHOTOS[:2], tmp_path / "nocrop")
    m0, s0 = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    m1, s1 = np.array([0.5, 0.4, 0.3]), np.array([0.25, 0.2, 0.1])
    pixels = a * s0[:, None, None] + m0[:, None, None]  # the same 0-1 pixels under both normalisations
    np.testing.assert_allclose(b, (pixels - m1[:, None, None]) / s1[:, None, None], atol=1e-5)
    assert c.shape == a.shape and np.abs(c - a).mean() > 0.01  # no crop, another filter: other pixels

    for bad, why in ((["--mean", "0.5,0.5"], "needs 3 value"), (["--std", "0,1,1"], "positive"),
                     (["--crop-pct", "1.5"], "[0.1, 1]"), (["--interpolation", "cubic"], "invalid choice")):
        out = cli("export", "--model", "parnet_s", *NARROW_ARGS, *bad, "--out", tmp_path / "bad", ok=False)
        assert out.returncode == 2 and why in out.stderr and "Traceback" not in out.stderr, (bad, out.stderr)
        assert not Path(tmp_path / "bad").exists()


def test_quantize_reads_a_label_file_outside_the_calibration_folder(tmp_path):
    flat = tmp_path / "images"
    flat.mkdir()
    for p in PHOTOS[:8]:
        shutil.copy(p, flat / p.name)
    labels = tmp_path / "val.txt"
    labels.write_text("".join(f"{p.name} {i}\n" for i, p in enumerate(PHOTOS[:8])))
    cli("quantize", "--model", "parnet_s", *NARROW_ARGS, "--calib", flat, "--labels", labels, "--subset-size", 4,
        "--out", tmp_path / "q", "--quiet")
    report = json.loads((tmp_path / "q" / "report.json").read_text())
    assert report["data"]["layout"] == "caffe_val_txt" and report["data"]["labelled"]
    assert report["evaluation"]["held_out_images"] == 4 and "top1" in report["evaluation"]["fp32"]
