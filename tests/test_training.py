"""Training: IDX reader, trainer (loss decreases, exact resume), `dataset export-idx`, `train` CLI, and the
shipped reference model `parnet_fmnist` (its recorded accuracy on Fashion-MNIST test images 0..999)."""
from __future__ import annotations

import argparse
import gzip
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from parnet_cpu.data.fmnist import (FASHION_MNIST_CLASSES, FASHION_MNIST_FOLDERS, IdxError, find_fashion_mnist,
                                     read_idx, write_idx)

ASSETS = Path(__file__).resolve().parents[1] / "parnet_cpu" / "assets"
SHIPPED_PT = ASSETS / "parnet_fmnist.pt"
SHIPPED_JSON = ASSETS / "parnet_fmnist.json"


def _fmnist_paths():
    try:
        return find_fashion_mnist()
    except FileNotFoundError:
        return None


def _require_fmnist():
    """The Fashion-MNIST IDX files, or skip locally / fail under CI (which installs the Debian package)."""
    paths = _fmnist_paths()
    if paths is None:
        msg = ("Fashion-MNIST IDX files not found: `apt-get install dataset-fashion-mnist` (or set "
               "PARNET_FMNIST_DIR); the CI installs it, so this check must run there")
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return paths


def _cli(module, argv: list[str]) -> int:
    """Run one of our sub-command modules through its own `register` (independent of cli.COMMANDS)."""
    parser = argparse.ArgumentParser(prog="parnet-cpu")
    sub = parser.add_subparsers(dest="command", required=True)
    module.register(sub)
    args = parser.parse_args(argv)
    return int(args.handler(args) or 0)


def _tiny_cfg(num_classes: int = 10):
    from parnet_cpu.models.parnet import ParNetConfig

    return ParNetConfig(planes=(8, 16, 16, 32), num_blocks=(2, 2, 2, 1), num_classes=num_classes, in_chans=1,
                        input_size=32, stem_stride=1, activation="silu", crop_pct=1.0,
                        interpolation="bilinear", mean=(0.2860,), std=(0.3530,))


# ------------------------------------------------------------------------------------------- IDX


def test_read_idx_plain_gz_and_handwritten(tmp_path):
    arr = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    for name in ("a-idx3-ubyte", "a-idx3-ubyte.gz"):
        out = read_idx(write_idx(tmp_path / name, arr))
        assert out.dtype == np.uint8 and out.shape == (3, 4, 5) and np.array_equal(out, arr)
    # a file written by hand (big-endian int32 labels, 1-D), gzip-compressed under a plain name
    raw = struct.pack(">HBBI", 0, 0x0C, 1, 3) + struct.pack(">3i", 7, -1, 70000)
    (tmp_path / "labels").write_bytes(gzip.compress(raw))
    lab = read_idx(tmp_path / "labels")
    assert lab.dtype == np.int32 and lab.tolist() == [7, -1, 70000]


@pytest.mark.parametrize("payload, message", [
    (b"\x00\x00\x08\x03\x00\x00\x00\x02\x00\x00\x00\x02\x00\x00\x00\x02" + b"\x01" * 7, "truncated"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x02" + b"\x01" * 3, "trailing data"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 16, "not an IDX file"),
    (b"\x00\x00\x07\x01\x00\x00\x00\x01\x00", "not an IDX file"),
    (b"\x00\x00\x08\x03\x00\x00", "truncated header"),
    (b"\x00\x00", "too short"),
    (b"\x1f\x8b\x08\x00garbage", "corrupt gzip"),
])
def test_read_idx_corrupt_files_give_clear_errors(tmp_path, payload, message):
    p = tmp_path / "bad-idx"
    p.write_bytes(payload)
    with pytest.raises(IdxError, match=message) as info:
        read_idx(p)
    assert str(p) in str(info.value)


def test_read_idx_missing_and_find_fashion_mnist(tmp_path, monkeypatch):
    with pytest.raises(IdxError, match="not found"):
        read_idx(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        find_fashion_mnist(tmp_path)
    # $PARNET_FMNIST_DIR with plain and .gz files
    for stem, arr in (("train-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8)),
                      ("train-labels-idx1-ubyte.gz", np.zeros(2, np.uint8)),
                      ("t10k-images-idx3-ubyte.gz", np.zeros((1, 28, 28), np.uint8)),
                      ("t10k-labels-idx1-ubyte", np.zeros(1, np.uint8))):
        write_idx(tmp_path / stem, arr)
    monkeypatch.setenv("PARNET_FMNIST_DIR", str(tmp_path))
    found = find_fashion_mnist()
    assert found["train_labels"].name == "train-labels-idx1-ubyte.gz"
    assert found["test_images"].parent == tmp_path


# ------------------------------------------------------------------------------------------- trainer


def _small_training_set():
    """A few hundred real Fashion-MNIST images, else the shipped photos (grayscale 32x32, synthetic labels)."""
    from parnet_cpu.training.trainer import images_to_model_size

    paths = _fmnist_paths()
    if paths is not None:
        images = read_idx(paths["train_images"])[:256]
        labels = read_idx(paths["train_labels"])[:256].astype(np.int64)
        return images_to_model_size(images, 32), labels, 10
    from PIL import Image

    from parnet_cpu.data import bundled_calibration_dir, list_images

    folder = bundled_calibration_dir()
    assert folder is not None, "calibration/sample is missing from the checkout"
    files = list_images(folder)
    images = np.stack([np.asarray(Image.open(f).convert("L").resize((32, 32), Image.Resampling.BILINEAR))
                       for f in files])[:, None]
    labels = np.arange(len(files), dtype=np.int64) % 4
    return images, labels, 4


@pytest.fixture(scope="module")
def small_set():
    return _small_training_set()


def _train_cfg(tmp_path, **kw):
    from parnet_cpu.training.trainer import TrainConfig

    base = dict(epochs=3, batch_size=32, lr=0.05, warmup_epochs=0.5, seed=1, num_threads=1, progress=False,
                ema_decay=0.9, checkpoint=str(tmp_path / "run.pt"))
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.slow
def test_trainer_loss_decreases_and_checkpoint_is_weights_only(tmp_path, small_set):
    import torch

    from parnet_cpu.models.checkpoint import load_checkpoint, read_checkpoint
    from parnet_cpu.models.parnet import build_model
    from parnet_cpu.training.trainer import evaluate, export_checkpoint, train

    images, labels, k = small_set
    torch.manual_seed(0)
    model = build_model(_tiny_cfg(k))
    threads = torch.get_num_threads()
    history = train(model, (images, labels), (images[:64], labels[:64]), _train_cfg(tmp_path, epochs=4), log=None)
    assert torch.get_num_threads() == threads  # restored
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[-1]["train_loss"] < 0.9 * history[0]["train_loss"], history
    assert not model.training
    # the model now holds the EMA weights, which are what the checkpoint's state_dict holds
    obj = read_checkpoint(tmp_path / "run.pt")  # torch.load(weights_only=True)
    assert obj["epoch"] == 4 and obj["ema"] is True and obj["config"] == model.cfg.to_dict()
    assert set(obj["train_state"]) >= {"model", "optimizer", "scheduler", "ema_updates", "history"}
    assert all(torch.equal(v, model.state_dict()[k2]) for k2, v in obj["state_dict"].items())
    acc, _ = evaluate(model, images[:64], labels[:64])
    assert acc == pytest.approx(history[-1]["val_top1_ema"])
    # slim export: same weights, no training state, loads strictly
    slim = export_checkpoint(tmp_path / "run.pt", tmp_path / "slim.pt")
    assert "train_state" not in read_checkpoint(slim)
    assert slim.stat().st_size < (tmp_path / "run.pt").stat().st_size
    fresh = build_model(_tiny_cfg(k))
    load_checkpoint(fresh, slim)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


class _Interrupt(Exception):
    pass


@pytest.mark.slow
def test_resume_continues_at_the_right_epoch_and_matches_an_uninterrupted_run(tmp_path, small_set):
    import torch

    from parnet_cpu.models.parnet import build_model
    from parnet_cpu.training.trainer import TrainingError, train

    images, labels, k = small_set
    images, labels = images[:128], labels[:128]

    def fresh():
        torch.manual_seed(0)
        return build_model(_tiny_cfg(k))

    (tmp_path / "a").mkdir()
    full = fresh()
    h_full = train(full, (images, labels), None, _train_cfg(tmp_path / "a", epochs=3), log=None)

    def stop_after_epoch_2(msg: str) -> None:
        if msg.startswith("epoch 2/3"):
            raise _Interrupt

    cfg_b = _train_cfg(tmp_path, epochs=3)
    with pytest.raises(_Interrupt):
        train(fresh(), (images, labels), None, cfg_b, log=stop_after_epoch_2)
    messages: list[str] = []
    resumed = build_model(_tiny_cfg(k))  # different random init: everything must come from the checkpoint
    h_res = train(resumed, (images, labels), None, _train_cfg(tmp_path, epochs=3, resume=True), log=messages.append)
    assert messages[0].startswith("resumed from") and "2 epoch(s) done" in messages[0]
    assert [m.split(":")[0] for m in messages[1:]] == ["epoch 3/3"]
    assert [h["epoch"] for h in h_res] == [1, 2, 3]
    assert h_res[-1]["train_loss"] == pytest.approx(h_full[-1]["train_loss"], rel=1e-5)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name
    # a finished run resumes to nothing; changed settings are refused
    again = build_model(_tiny_cfg(k))
    assert len(train(again, (images, labels), None, _train_cfg(tmp_path, epochs=3, resume=True), log=None)) == 3
    with pytest.raises(TrainingError, match="different settings"):
        train(build_model(_tiny_cfg(k)), (images, labels), None,
              _train_cfg(tmp_path, epochs=3, resume=True, lr=0.2), log=None)
    with pytest.raises(TrainingError, match="no checkpoint"):
        train(build_model(_tiny_cfg(k)), (images, labels), None,
              _train_cfg(tmp_path, checkpoint=str(tmp_path / "absent.pt"), resume=True), log=None)


def test_augmentation_keeps_shape_and_pixels():
    import torch

    from parnet_cpu.training.trainer import _augment

    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.uint8).view(2, 1, 6, 6)
    g = torch.Generator().manual_seed(0)
    y = _augment(x, 2, True, g)
    assert y.shape == x.shape and y.dtype == torch.uint8
    assert torch.equal(_augment(x, 0, False, g), x)
    # every output pixel is an input pixel of the same image or zero padding
    for i in range(2):
        assert set(y[i].flatten().tolist()) <= set(x[i].flatten().tolist()) | {0}


# ------------------------------------------------------------------------------------------- export-idx


def test_export_idx_layout_counts_and_classes_txt(tmp_path, capsys):
    from parnet_cpu.cli import CliError
    from parnet_cpu.cli import dataset as dataset_cli
    from parnet_cpu.data import detect_layout

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (37, 28, 28), dtype=np.uint8)
    labels = np.array([i % 10 if i < 30 else 9 for i in range(37)], dtype=np.uint8)  # 3 each, class 9: 10
    write_idx(tmp_path / "img-idx3-ubyte.gz", images)
    write_idx(tmp_path / "lab-idx1-ubyte", labels)
    out = tmp_path / "folder"
    assert _cli(dataset_cli, ["dataset", "export-idx", "--images", str(tmp_path / "img-idx3-ubyte.gz"),
                              "--labels", str(tmp_path / "lab-idx1-ubyte"), "--out", str(out), "--quiet"]) == 0
    classes = (out / "classes.txt").read_text().split()
    assert classes == list(FASHION_MNIST_FOLDERS) == sorted(FASHION_MNIST_FOLDERS)
    assert classes[0] == "0_tshirt-top" and classes[9] == "9_ankle-boot"
    counts = {d.name: len(list(d.iterdir())) for d in out.iterdir() if d.is_dir()}
    assert counts == {f: (10 if i == 9 else 3) for i, f in enumerate(FASHION_MNIST_FOLDERS)}
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(out / "9_ankle-boot" / "00033.png")), images[33])
    ds = detect_layout(out)
    assert ds.layout == "class_folders" and len(ds) == 37
    assert {p.name: lab for p, lab in ds.samples} == {f"{i:05d}.png": int(labels[i]) for i in range(37)}
    # --flat --limit: unlabelled calibration folder
    flat = tmp_path / "flat"
    _cli(dataset_cli, ["dataset", "export-idx", "--images", str(tmp_path / "img-idx3-ubyte.gz"), "--flat",
                       "--limit", "5", "--out", str(flat), "--quiet"])
    assert sorted(p.name for p in flat.iterdir()) == [f"{i:05d}.png" for i in range(5)]
    assert detect_layout(flat).layout == "unlabelled"
    # errors: non-empty output, labels out of range, missing labels
    with pytest.raises(CliError, match="not an empty folder"):
        _cli(dataset_cli, ["dataset", "export-idx", "--images", str(tmp_path / "img-idx3-ubyte.gz"), "--flat",
                           "--out", str(flat)])
    write_idx(tmp_path / "bad-labels", np.full(37, 12, np.uint8))
    with pytest.raises(CliError, match="class names"):
        _cli(dataset_cli, ["dataset", "export-idx", "--images", str(tmp_path / "img-idx3-ubyte.gz"),
                           "--labels", str(tmp_path / "bad-labels"), "--out", str(tmp_path / "o2")])
    with pytest.raises(CliError, match="--labels is required"):
        _cli(dataset_cli, ["dataset", "export-idx", "--images", str(tmp_path / "img-idx3-ubyte.gz"),
                           "--out", str(tmp_path / "o3")])


@pytest.mark.slow
def test_train_cli_on_an_image_folder_then_resume(tmp_path, small_set, capsys):
    """`train --data DIR` end to end (tiny model, 2 steps), report written, --resume of a finished run."""
    from PIL import Image

    from parnet_cpu.cli import CliError
    from parnet_cpu.cli import train as train_cli
    from parnet_cpu.models.checkpoint import read_checkpoint

    images, labels, k = small_set
    data = tmp_path / "data"
    n = min(40, len(images))
    for i in range(n):
        d = data / f"c{int(labels[i])}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i, 0]).save(d / f"{i:03d}.png")
    argv = ["train", "--data", str(data), "--model", "parnet_cifar10", "--planes", "8,16,16,32", "--blocks",
            "2,2,2,1", "--in-chans", "1", "--epochs", "1", "--batch-size", "16", "--max-steps", "2", "--threads", "1",
            "--out", str(tmp_path / "t.pt"), "--report", str(tmp_path / "r.json"), "--quiet"]
    assert _cli(train_cli, argv) == 0
    obj = read_checkpoint(tmp_path / "t.pt")
    n_classes = len({int(v) for v in labels[:n]})
    assert obj["config"]["num_classes"] == n_classes and obj["config"]["in_chans"] == 1
    assert list(obj["config"]["class_names"]) == sorted(f"c{int(v)}" for v in set(labels[:n].tolist()))
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["seed"] == 0 and report["machine"]["torch_threads"] == 1 and len(report["history"]) == 1
    assert _cli(train_cli, argv + ["--resume"]) == 0
    assert "nothing to do" in capsys.readouterr().err
    with pytest.raises(CliError, match="apt-get install dataset-fashion-mnist"):
        _cli(train_cli, ["train", "--data", "fmnist", "--model", "parnet_cifar10", "--in-chans", "1",
                         "--fmnist-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "x.pt")])


# ------------------------------------------------------------------------------------------- shipped model


def _shipped():
    import torch

    from parnet_cpu.models.checkpoint import load_checkpoint, read_checkpoint
    from parnet_cpu.models.parnet import ParNetConfig, build_model

    assert SHIPPED_PT.is_file() and SHIPPED_JSON.is_file()
    obj = read_checkpoint(SHIPPED_PT)
    model = build_model(ParNetConfig.from_dict(obj["config"]))
    load_checkpoint(model, SHIPPED_PT)  # strict: every key, every shape
    meta = json.loads(SHIPPED_JSON.read_text())
    assert all(v.dtype == torch.float32 for v in obj["state_dict"].values() if v.dtype.is_floating_point)
    return obj, model, meta


def test_shipped_checkpoint_is_small_strict_and_matches_the_registry():
    from parnet_cpu.models.parnet import MODEL_CONFIGS

    obj, model, meta = _shipped()
    assert SHIPPED_PT.stat().st_size < 3 * 2 ** 20
    assert "train_state" not in obj and "optimizer" not in obj
    cfg = model.cfg
    assert (cfg.in_chans, cfg.input_size, cfg.num_classes, cfg.activation) == (1, 32, 10, "silu")
    assert cfg.class_names == FASHION_MNIST_CLASSES
    assert not model.is_deploy  # training form: users reparameterize it themselves
    assert meta["checkpoint"]["bytes"] == SHIPPED_PT.stat().st_size
    assert meta["command"].startswith("parnet-cpu train --data fmnist --model parnet_fmnist")
    assert meta["fp32_test_images"] == 10000 and meta["fp32_test_top1"] >= 92.0
    if "parnet_fmnist" in MODEL_CONFIGS:
        assert MODEL_CONFIGS["parnet_fmnist"] == cfg
        assert MODEL_CONFIGS["parnet_fmnist"].class_names == FASHION_MNIST_CLASSES


@pytest.mark.slow
def test_shipped_checkpoint_accuracy_on_test_images_0_to_999_equals_the_record():
    from parnet_cpu.training.trainer import fashion_mnist_arrays, evaluate

    _require_fmnist()
    _, model, meta = _shipped()
    images, labels = fashion_mnist_arrays(model.cfg, split="test", limit=1000)
    acc, preds = evaluate(model, images, labels)
    assert int((preds == labels).sum()) == meta["fp32_test_first1000_correct"], (acc, meta["fp32_test_first1000_top1"])
    assert acc == pytest.approx(meta["fp32_test_first1000_top1"], abs=1e-9)


def test_training_inputs_equal_the_generic_evaluation_preprocessing(tmp_path):
    """PNG export + parnet_cpu.data preprocessing gives bit-identical inputs to what the trainer used."""
    from parnet_cpu.cli import dataset as dataset_cli
    from parnet_cpu.data import PreprocessConfig, detect_layout, load_and_preprocess
    from parnet_cpu.training.trainer import _to_float, fashion_mnist_arrays, normalizer

    paths = _require_fmnist()
    import torch

    from parnet_cpu.models.checkpoint import read_checkpoint
    from parnet_cpu.models.parnet import ParNetConfig

    cfg = ParNetConfig.from_dict(read_checkpoint(SHIPPED_PT)["config"])
    out = tmp_path / "png"
    _cli(dataset_cli, ["dataset", "export-idx", "--images", str(paths["test_images"]), "--labels",
                       str(paths["test_labels"]), "--out", str(out), "--limit", "20", "--quiet"])
    ds = detect_layout(out)
    pc = PreprocessConfig(input_size=cfg.input_size, crop_pct=cfg.crop_pct,
                          interpolation=cfg.interpolation, mean=cfg.mean, std=cfg.std, channels=cfg.in_chans)
    images, labels = fashion_mnist_arrays(cfg, split="test", limit=20)
    scale, offset = normalizer(cfg.mean, cfg.std, cfg.in_chans)
    ours = _to_float(torch.from_numpy(images), scale, offset).numpy()
    for path, lab in ds.samples:
        i = int(path.stem)
        assert lab == labels[i]
        assert np.array_equal(load_and_preprocess(path, pc), ours[i]), path
