"""Issue 11, data trust (classes 1, 2, 4, 5, 10, 12): no lost user data, no silently wrong labels.

Real files, real symlinks, real subprocesses and real signals; tiny models so each test takes seconds.
Each test name carries the class it holds (c1, c2, ...); docs/reliability.md points here.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from parnet_cpu.cli import main

REPO = Path(__file__).resolve().parents[1]
PHOTOS = sorted((REPO / "calibration" / "sample").glob("*.jpg"))
TINY_CFG = dict(planes=(8, 16, 32, 64), num_blocks=(2, 2, 2, 1), input_size=32, num_classes=4)
TINY = ["--model", "parnet_s", "--planes", "8,16,32,64", "--blocks", "2,2,2,1", "--input-size", "32",
        "--num-classes", "4"]
TMP_PREFIX = ".parnet-cpu-tmp-"


def cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`parnet-cpu ARGS` as a real process (what a user or a script runs)."""
    return subprocess.run([sys.executable, "-m", "parnet_cpu", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def photos_into(folder: Path, n: int = len(PHOTOS), start: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        src = PHOTOS[(start + k) % len(PHOTOS)]
        shutil.copyfile(src, folder / f"{start + k:02d}_{src.name}")
    return folder


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    from parnet_cpu.models.checkpoint import save_checkpoint
    from parnet_cpu.models.parnet import create_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(create_model("parnet_s", **TINY_CFG), path)
    return path


@pytest.fixture(scope="module")
def fmnist_dir(tmp_path_factory) -> Path:
    """Model folder of the shipped reference model (it has class names)."""
    out = tmp_path_factory.mktemp("fm") / "model"
    assert main(["export", "--model", "parnet_fmnist", "--out", str(out)]) == 0
    return out


# ------------------------------------------------------------------------------------------------ class 1

@pytest.mark.slow
def test_c1_overwrite_refuses_foreign_folder_and_keeps_own(tmp_path, tiny_ckpt, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    rc = main(["export", *TINY, "--checkpoint", str(tiny_ckpt), "--out", str(foreign), "--overwrite"])
    assert rc == 2 and "not a parnet-cpu model folder" in capsys.readouterr().err
    assert (foreign / "thesis.tex").read_text() == "years of work"
    # a folder this tool wrote is replaced; an empty folder is filled; nothing hidden stays behind
    own = tmp_path / "model"
    assert main(["export", *TINY, "--checkpoint", str(tiny_ckpt), "--out", str(own)]) == 0
    assert main(["export", *TINY, "--checkpoint", str(tiny_ckpt), "--out", str(own), "--overwrite"]) == 0
    assert (own / "parnet.json").is_file() and hidden(tmp_path) == []


def test_c1_out_that_is_or_holds_or_sits_in_calib_is_refused(tmp_path, tiny_ckpt):
    calib = photos_into(tmp_path / "data" / "calib", 6)
    before = sorted(p.name for p in calib.iterdir())
    for out in (calib, calib / "model", tmp_path / "data"):
        r = cli("quantize", *TINY, "--checkpoint", str(tiny_ckpt), "--calib", str(calib), "--out", str(out),
                "--overwrite", "--subset-size", "4", "--quiet")
        assert r.returncode == 2, (out, r.stderr)
        assert "--calib" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert sorted(p.name for p in calib.iterdir()) == before  # the images are all still there
    assert hidden(tmp_path) == [] and hidden(tmp_path / "data") == []


def test_c1_out_that_is_a_file_dot_or_parent_is_refused(tmp_path, tiny_ckpt, monkeypatch, capsys):
    report = tmp_path / "results.csv"
    report.write_text("a,b\n1,2\n")
    assert main(["export", *TINY, "--checkpoint", str(tiny_ckpt), "--out", str(report), "--overwrite"]) == 2
    assert "is a file" in capsys.readouterr().err
    assert report.read_text() == "a,b\n1,2\n" and hidden(tmp_path) == []
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for out in (".", "..", str(work), "./"):
        assert main(["export", *TINY, "--checkpoint", str(tiny_ckpt), "--out", out, "--overwrite"]) == 2, out
        assert "current directory" in capsys.readouterr().err
    assert list(work.iterdir()) == [] and hidden(tmp_path) == []


def test_c1_unwritable_out_is_refused_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "plain-file"
    blocker.write_text("x")
    probe = Path("/sys/parnet-cpu-probe")
    try:
        probe.mkdir()
        probe.rmdir()
        sys_writable = True
    except OSError:
        sys_writable = False
    outs = [blocker / "model"] + ([] if sys_writable else [probe / "model"])
    for out in outs:
        # the checkpoint does not exist: the output check must come first (before the model is even built)
        assert main(["export", "--model", "parnet_s", "--checkpoint", str(tmp_path / "absent.pt"),
                     "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "cannot write" in err and "checkpoint" not in err, err
    assert blocker.read_text() == "x"


# ------------------------------------------------------------------------------------------------ class 2

def _start_quantize(tmp_path: Path, ckpt: Path, out: Path) -> subprocess.Popen:
    calib = photos_into(tmp_path / "calib", 24)
    return subprocess.Popen([sys.executable, "-m", "parnet_cpu", "quantize", *TINY, "--checkpoint", str(ckpt),
                             "--calib", str(calib), "--out", str(out), "--subset-size", "16", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _has_files(folder: Path) -> bool:
    try:
        return any(folder.iterdir())
    except OSError:  # not a folder, or gone meanwhile
        return False


def _wait_for_temp(proc: subprocess.Popen, parent: Path, timeout: float = 120) -> str:
    """Name of the hidden folder the run writes its model into, once the first file is in it."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        names = [n for n in hidden(parent) if _has_files(parent / n)]
        if names:
            return names[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    raise AssertionError("no temporary folder appeared")


@pytest.mark.slow
def test_c2_sigterm_during_quantize_removes_its_temp_folder(tmp_path, tiny_ckpt):
    parent = tmp_path / "models"
    parent.mkdir()
    proc = _start_quantize(tmp_path, tiny_ckpt, parent / "int8")
    try:
        name = _wait_for_temp(proc, parent)
        assert name.startswith(TMP_PREFIX + f"{proc.pid}-"), name  # recognisable: tool prefix and owner pid
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, (proc.returncode, err)
    assert list(parent.iterdir()) == []  # neither a temporary nor a half-written model


@pytest.mark.slow
def test_c2_stale_temp_of_a_dead_run_is_removed_by_the_next(tmp_path, tiny_ckpt):
    parent = tmp_path / "models"
    parent.mkdir()
    proc = _start_quantize(tmp_path, tiny_ckpt, parent / "int8")
    try:
        stale = _wait_for_temp(proc, parent)
        proc.kill()  # a crash: nothing can clean up
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert stale in hidden(parent) and stale.startswith(TMP_PREFIX), stale
    _, host, _ = stale[len(TMP_PREFIX):].split("-", 2)  # .parnet-cpu-tmp-<pid>-<host tag>-<random>
    live = parent / f"{TMP_PREFIX}{os.getpid()}-{host}-live"  # a run still in progress (this process)
    live.mkdir()
    foreign = [parent / ".parnet-cpu-tmp-notes", parent / ".int8.abc123"]  # not ours by name
    for f in foreign:
        f.mkdir()
    assert main(["export", *TINY, "--checkpoint", str(tiny_ckpt), "--out", str(parent / "fp32")]) == 0
    assert stale not in hidden(parent)
    assert live.is_dir() and all(f.is_dir() for f in foreign)


# ------------------------------------------------------------------------------------------------ class 4

def test_c4_empty_class_folder_keeps_its_index(tmp_path):
    from parnet_cpu.data import DatasetWarning, detect_layout

    for name in ("apple", "banana", "cherry"):
        (tmp_path / name).mkdir()
    photos_into(tmp_path / "apple", 2)
    photos_into(tmp_path / "cherry", 2, start=2)
    with pytest.warns(DatasetWarning, match="banana"):
        ds = detect_layout(tmp_path)
    assert ds.classes == ("apple", "banana", "cherry")
    assert ds.label_mapping == {"apple": 0, "banana": 1, "cherry": 2}
    assert sorted({lab for p, lab in ds.samples if p.parent.name == "cherry"}) == [2]


def _class_name_folders(root: Path, names: tuple[str, ...]) -> Path:
    for k, name in enumerate(names):
        photos_into(root / name, 2, start=2 * k)
    return root


def test_c4_folders_named_by_class_name_use_the_models_indices(tmp_path, fmnist_dir, capsys):
    data = _class_name_folders(tmp_path / "data", ("Trouser", "Sneaker", "Bag"))
    res = tmp_path / "eval.json"
    assert main(["eval", "--model-dir", str(fmnist_dir), "--data", str(data), "--precision", "fp32", "--json", str(res),
                 "--quiet"]) == 0
    got = json.loads(res.read_text())
    # alphabetical order would give Bag 0, Sneaker 1, Trouser 2; the model's classes are 1, 7, 8
    assert got["label_mapping"] == {"Bag": 8, "Sneaker": 7, "Trouser": 1}
    assert {r["class"]: r["name"] for r in got["per_class"]} == {1: "Trouser", 7: "Sneaker", 8: "Bag"}
    # a folder that is not one of the model's classes (a typo) is an error naming it
    (data / "Sandals").mkdir()
    photos_into(data / "Sandals", 1)
    capsys.readouterr()
    assert main(["eval", "--model-dir", str(fmnist_dir), "--data", str(data), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Sandals" in err and "Sandal" in err


@pytest.mark.slow
def test_c4_quantize_report_records_the_folder_to_index_mapping(tmp_path):
    data = _class_name_folders(tmp_path / "data", ("Coat", "Bag", "Dress"))
    (data / "Shirt").mkdir()  # empty: keeps its index, with a warning
    out = tmp_path / "out"
    assert main(["quantize", "--model", "parnet_fmnist", "--calib", str(data), "--out", str(out),
                 "--subset-size", "3", "--fast-bias-correction", "--quiet"]) == 0
    data_rep = json.loads((out / "report.json").read_text())["data"]
    assert data_rep["label_mapping"] == {"Bag": 8, "Coat": 4, "Dress": 3, "Shirt": 6}
    assert any("Shirt" in n for n in data_rep["notes"])


# ------------------------------------------------------------------------------------------------ class 5

@pytest.mark.slow
def test_c5_checkpoint_config_conflicting_with_command_line_is_an_error(tmp_path, capsys):
    from parnet_cpu.models.checkpoint import save_checkpoint
    from parnet_cpu.models.parnet import create_model

    ckpt = tmp_path / "silu.pt"
    save_checkpoint(create_model("parnet_s", activation="silu", **TINY_CFG), ckpt)
    for extra in ([], ["--activation", "relu"]):  # the default (relu) or an explicit one
        assert main(["export", *TINY, *extra, "--checkpoint", str(ckpt), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert "activation" in err and "'silu'" in err and "'relu'" in err, err
        assert not (tmp_path / "o").exists()
    assert main(["export", *TINY, "--activation", "silu", "--checkpoint", str(ckpt), "--out", str(tmp_path / "o")]) == 0


def test_c5_non_finite_or_non_float_weights_are_errors(tmp_path, capsys):
    from parnet_cpu.models.parnet import create_model

    model = create_model("parnet_s", **TINY_CFG)
    key = "head.fc.weight"
    for name, change in (("nan", lambda t: t.clone().fill_(float("nan"))), ("inf", lambda t: t.clone().fill_(float("inf"))),
                         ("int", lambda t: t.to(torch.int64))):
        sd = model.state_dict()
        sd[key] = change(sd[key])
        path = tmp_path / f"{name}.pt"
        torch.save({"state_dict": sd}, path)
        assert main(["export", *TINY, "--checkpoint", str(path), "--out", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert key in err and ("non-finite" in err if name != "int" else "int64" in err), err
        assert "num_batches_tracked" not in err  # integer buffers are integers on purpose


# ------------------------------------------------------------------------------------------------ class 10

_LIST = ("import json, sys; from parnet_cpu.data import detect_layout; ds = detect_layout(sys.argv[1]); "
         "print(json.dumps({'samples': [[str(p), l] for p, l in ds.samples], 'skipped': ds.skipped_files}))")


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


def test_c10_symlink_loops_neither_duplicate_images_nor_hang(tmp_path):
    root = tmp_path / "data"
    photos_into(root / "cats", 2)
    photos_into(root / "dogs" / "inner", 2, start=2)
    os.symlink("..", root / "cats" / "up")              # loop to the dataset root
    os.symlink("../..", root / "dogs" / "inner" / "up")  # loop two levels up
    os.symlink("../dogs", root / "cats" / "to-dogs")     # two folders linking each other
    os.symlink("../cats", root / "dogs" / "to-cats")
    r = subprocess.run([sys.executable, "-c", _LIST, str(root)], capture_output=True, text=True, timeout=120,
                       preexec_fn=_limit_memory)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout)
    names = sorted(Path(p).name for p, _ in got["samples"])
    assert len(names) == 4 and len(set(names)) == 4  # each image once
    labels = {Path(p).name: lab for p, lab in got["samples"]}
    assert {labels[n] for n in names if n.startswith(("00", "01"))} == {0}  # cats keep their own label
    reasons = {Path(p).name: why for p, why in got["skipped"]}
    assert {"up", "to-dogs", "to-cats"} <= set(reasons) and "already" in reasons["to-dogs"]


def _not_allowed_files(folder: Path) -> dict[str, bytes]:
    """Formats Pillow can read but the allow-list refuses, disguised by their extension."""
    import io

    img = Image.open(PHOTOS[0]).convert("RGB").resize((40, 30))
    ppm, ico = io.BytesIO(), io.BytesIO()
    img.save(ppm, "PPM")
    img.save(ico, "ICO")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto showpage\n%%EOF\n"
    return {"ppm.png": ppm.getvalue(), "ico.jpg": ico.getvalue(), "eps.png": eps}


def _allowed_files() -> dict[str, bytes]:
    import io

    img = Image.open(PHOTOS[0]).convert("RGB").resize((40, 30))
    out = {}
    for name, fmt, kw in (("still.gif", "GIF", {}), ("anim.gif", "GIF", {"save_all": True,
                          "append_images": [img.rotate(90)]}), ("pic.bmp", "BMP", {}), ("pic.tif", "TIFF", {}),
                          ("pic.webp", "WEBP", {}), ("png-named.jpg", "PNG", {})):
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        out[name] = buf.getvalue()
    return out


def test_c10_one_image_format_allow_list_on_decoded_content(tmp_path):
    from parnet_cpu.data import PreprocessConfig, detect_layout, iter_batches, DecodeReport
    from parnet_cpu.serve.app import decode_image_bytes
    from parnet_cpu.data import ImageDecodeError

    data = tmp_path / "calib"
    data.mkdir()
    bad, good = _not_allowed_files(data), _allowed_files()
    for name, blob in {**bad, **good}.items():
        (data / name).write_bytes(blob)
    (data / "readme.txt").write_text("not an image")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = detect_layout(data)
        report = DecodeReport()
        cfg = PreprocessConfig(input_size=32)
        decoded = [Path(p).name for b in iter_batches(ds.samples, cfg, 4, 1, report=report) for p in b.paths]
    assert sorted(decoded) == sorted(good)  # GIF (first frame), BMP, TIFF, WEBP, PNG whatever the extension
    failed = dict((Path(p).name, why) for p, why in report.failures)
    assert sorted(failed) == sorted(bad) and all("accepted" in why for why in failed.values()), failed
    assert dict((Path(p).name, why) for p, why in ds.skipped_files)["readme.txt"]
    # the server decodes with the same allow-list
    for name, blob in good.items():
        assert decode_image_bytes(blob, cfg, 10**7).shape == (1, 3, 32, 32), name
    for name, blob in bad.items():
        with pytest.raises(ImageDecodeError, match="accepted"):
            decode_image_bytes(blob, cfg, 10**7)


def test_one_decoder_for_files_uploads_and_file_objects(tmp_path):
    """`decode_image` is the one set of decoding rules: a path (load_image), bytes (the server's uploads) and a
    binary file object decode to the same pixels; an image over the pixel limit is ImageTooLargeError, which
    the server answers with 413."""
    import io

    import numpy as np

    from parnet_cpu.data import ImageDecodeError, ImageTooLargeError, PreprocessConfig, decode_image, load_image
    from parnet_cpu.serve.app import decode_image_bytes
    from parnet_cpu.serve.v2 import ApiError

    img = Image.new("RGBA", (40, 30), (10, 200, 30, 128))  # alpha: composited the same way everywhere
    buf = io.BytesIO()
    img.save(buf, "PNG")
    blob = buf.getvalue()
    path = tmp_path / "x.png"
    path.write_bytes(blob)
    ref = np.asarray(load_image(path))
    assert np.array_equal(np.asarray(decode_image(blob)), ref)
    with open(path, "rb") as fh:
        assert np.array_equal(np.asarray(decode_image(fh, name=str(path))), ref)
    with pytest.raises(ImageTooLargeError, match="40x30 pixels is larger than the limit of 1000"):
        decode_image(blob, max_pixels=1000)
    with pytest.raises(ImageTooLargeError, match="x.png"):
        load_image(path, max_pixels=1000)
    with pytest.raises(ImageDecodeError, match="empty file"):
        decode_image(b"")
    cfg = PreprocessConfig(input_size=32)
    # the limit holds every intermediate (issue 21): the 40x30 image is resized to 48x36 = 1728 pixels first
    assert decode_image_bytes(blob, cfg, 1728).shape == (1, 3, 32, 32)
    with pytest.raises(ApiError, match="48x36 intermediate of 1728 pixels"):
        decode_image_bytes(blob, cfg, 1727)
    with pytest.raises(ApiError) as err:
        decode_image_bytes(blob, cfg, 1000)
    assert err.value.status == 413 and "limit of 1000" in err.value.message


def test_c10_eval_json_names_every_skipped_file(tmp_path, fmnist_dir):
    data = _class_name_folders(tmp_path / "data", ("Trouser", "Bag"))
    (data / "Bag" / "notes.txt").write_text("x")
    (data / "Bag" / "bad.png").write_bytes(_not_allowed_files(data)["ppm.png"])
    (data / "Trouser" / "anim.gif").write_bytes(_allowed_files()["anim.gif"])
    res = tmp_path / "eval.json"
    assert main(["eval", "--model-dir", str(fmnist_dir), "--data", str(data), "--json", str(res), "--quiet"]) == 0
    got = json.loads(res.read_text())
    assert got["labelled"] == 5  # 4 photos + the GIF
    assert {Path(p).name for p, _ in got["skipped"]} == {"bad.png"}
    assert {Path(p).name for p, _ in got["skipped_files"]} == {"notes.txt"}


# ------------------------------------------------------------------------------------------------ class 12

def _exit_status(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's usage errors
        return int(exc.code)


def test_c12_bad_numbers_and_json_target_are_clear_errors_before_work(tmp_path, fmnist_dir, capsys):
    data = _class_name_folders(tmp_path / "data", ("Trouser", "Bag"))
    base = ["eval", "--model-dir", str(fmnist_dir), "--data", str(data), "--quiet"]
    for extra, message in ((["--batch-size", "0"], "--batch-size"), (["--workers", "-1"], "--workers"),
                           (["--limit", "-1"], "--limit"),
                           (["--json", str(tmp_path / "missing" / "r.json")], "missing")):
        assert _exit_status([*base, *extra]) == 2, extra
        out, err = capsys.readouterr()
        assert message in err and "top-1" not in out, (extra, err)  # refused before the evaluation ran
    assert _exit_status(["quantize", "--model", "parnet_fmnist", "--calib", str(data), "--out", str(tmp_path / "q"),
                         "--batch-size", "0"]) == 2
    assert "--batch-size" in capsys.readouterr().err and not (tmp_path / "q").exists()


def test_c12_no_decodable_calibration_image_is_a_clear_error(tmp_path, capsys):
    calib = tmp_path / "calib"
    calib.mkdir()
    (calib / "a.jpg").write_bytes(PHOTOS[0].read_bytes()[:500])
    (calib / "b.png").write_text("not a png")
    assert main(["quantize", "--model", "parnet_fmnist", "--calib", str(calib), "--out", str(tmp_path / "q"),
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no calibration image could be decoded" in err and "b.png" in err, err
    assert list(tmp_path.iterdir()) == [calib]


def test_c12_checkpoint_whose_state_dict_is_a_list(tmp_path, capsys):
    path = tmp_path / "list.pt"
    torch.save({"state_dict": [torch.zeros(2)]}, path)
    assert main(["export", *TINY, "--checkpoint", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "'state_dict' holds a list" in capsys.readouterr().err
