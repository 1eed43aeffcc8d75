"""Tests for parnet_cpu.data: layouts, labels, preprocessing, decoding edge cases, loader, split."""
from __future__ import annotations

import math
import random
import shutil
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from parnet_cpu.data import (
    Dataset,
    DatasetError,
    DatasetWarning,
    DecodeReport,
    ImageDecodeError,
    PreprocessConfig,
    bundled_calibration_dir,
    center_crop,
    count_images,
    detect_layout,
    imagenet_class_names,
    imagenet_synsets,
    imagenet_val_labels,
    iter_batches,
    load_and_preprocess,
    load_devkit_mapping,
    load_image,
    preprocess,
    resize_shorter_side,
    split_calibration_holdout,
    synset_to_index,
    take,
)

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO / "calibration" / "sample"
PHOTOS = sorted(SAMPLE_DIR.glob("*.jpg"))
SEA_SNAKE = "n01751748"  # devkit ILSVRC2012_ID 490, sorted-synset index 65


# ----------------------------------------------------------------------------- shipped assets

def test_calibration_sample_shipped():
    assert bundled_calibration_dir() == SAMPLE_DIR.resolve()
    assert 20 <= len(PHOTOS) <= 30
    assert sum(p.stat().st_size for p in PHOTOS) < 2 * 1024 * 1024
    modes = set()
    for p in PHOTOS:
        with Image.open(p) as im:
            assert im.format == "JPEG"
            assert 150 <= min(im.size) <= 260
            modes.add(im.mode)
    assert modes == {"RGB", "L"}  # colour and at least one grayscale
    assert (REPO / "calibration" / "README.md").is_file()
    ds = detect_layout(SAMPLE_DIR)
    assert ds.layout == "unlabelled" and not ds.has_labels and len(ds) == len(PHOTOS)


def test_synset_assets_sorted_mapping():
    syn = imagenet_synsets()
    assert len(syn) == 1000 and list(syn) == sorted(syn) and len(set(syn)) == 1000
    s2i = synset_to_index()
    assert s2i["n01440764"] == 0
    assert s2i["n15075141"] == 999
    assert s2i[SEA_SNAKE] == 65
    names = imagenet_class_names()
    assert len(names) == 1000 and names[0] == "tench" and names[65] == "sea snake"
    val = imagenet_val_labels()
    assert val.shape == (50000,)
    assert list(val[:5]) == [65, 970, 230, 809, 516]  # ILSVRC2012_val_00000001..5
    assert np.bincount(val, minlength=1000).tolist() == [50] * 1000


# ----------------------------------------------------------------------------- layouts

def _expected() -> dict[str, int]:
    """Photo k is stored as ILSVRC2012_val_{k+1:08d}.JPEG with its official label."""
    val = imagenet_val_labels()
    return {f"ILSVRC2012_val_{k + 1:08d}.JPEG": int(val[k]) for k in range(len(PHOTOS))}


def _flat_copy(dst: Path) -> Path:
    dst.mkdir(parents=True)
    for k, src in enumerate(PHOTOS):
        shutil.copyfile(src, dst / f"ILSVRC2012_val_{k + 1:08d}.JPEG")
    return dst


def _devkit_ids() -> list[int]:
    """A stand-in devkit numbering: a fixed permutation of 1..1000 with the real 490 -> sea snake."""
    ids = list(range(1, 1001))
    random.Random(1234).shuffle(ids)
    j = ids.index(490)
    ids[65], ids[j] = ids[j], ids[65]
    return ids  # ids[sorted index] = ILSVRC2012_ID


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, Dataset]:
    base = tmp_path_factory.mktemp("layouts")
    exp = _expected()
    syn = imagenet_synsets()
    out: dict[str, Dataset] = {}

    cls = base / "class_folders"
    for k, src in enumerate(PHOTOS):
        name = f"ILSVRC2012_val_{k + 1:08d}.JPEG"
        d = cls / syn[exp[name]]
        d.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, d / name)
    out["class_folders"] = detect_layout(cls)

    ids = _devkit_ids()
    val = imagenet_val_labels()
    dk = _flat_copy(base / "devkit")
    (dk / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{ids[v]}\n" for v in val))
    with pytest.warns(DatasetWarning, match="not in"):  # 49976 listed images are absent
        out["devkit_ground_truth"] = detect_layout(dk)

    dkm = _flat_copy(base / "devkit_map")
    (dkm / "ILSVRC2012_validation_ground_truth.txt").write_text(
        "".join(f"{ids[val[k]]}\n" for k in range(len(PHOTOS))))
    (dkm / "map_clsloc.txt").write_text("".join(f"{syn[i]} {ids[i]} class_{i}\n" for i in range(1000)))
    out["devkit_map"] = detect_layout(dkm)

    kg = _flat_copy(base / "kaggle")
    rows = [f"{Path(n).stem},{syn[lab]} 10 20 200 220 {syn[lab]} 5 5 50 50" for n, lab in exp.items()]
    (kg / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    out["kaggle_loc_csv"] = detect_layout(kg)

    cf = _flat_copy(base / "caffe")
    (cf / "val.txt").write_text("".join(f"{n} {lab}\n" for n, lab in exp.items()))
    out["caffe_val_txt"] = detect_layout(cf)

    out["imagenet_val_filenames"] = detect_layout(_flat_copy(base / "orig_names"))
    return out


@pytest.mark.parametrize("key, layout", [
    ("class_folders", "class_folders"),
    ("devkit_ground_truth", "devkit_ground_truth"),
    ("devkit_map", "devkit_ground_truth"),
    ("kaggle_loc_csv", "kaggle_loc_csv"),
    ("caffe_val_txt", "caffe_val_txt"),
    ("imagenet_val_filenames", "imagenet_val_filenames"),
])
def test_all_labelled_layouts_agree(layouts, key, layout):
    ds = layouts[key]
    assert ds.layout == layout
    assert ds.has_labels and ds.num_classes == 1000 and ds.label_space == "imagenet1k"
    assert ds.label_map() == _expected()
    assert not ds.unlabelled_images
    # the devkit-ID trap: val_00000001 is "sea snake", devkit ID 490, sorted index 65
    assert ds.label_map()["ILSVRC2012_val_00000001.JPEG"] == 65
    assert ds.classes[65] == SEA_SNAKE


def test_devkit_counts_absent_images(layouts):
    assert layouts["devkit_ground_truth"].missing_images == 50000 - len(PHOTOS)
    assert layouts["devkit_map"].missing_images == 0


def test_devkit_mapping_file_and_trap(tmp_path):
    ids = _devkit_ids()
    syn = imagenet_synsets()
    mp = tmp_path / "map_clsloc.txt"
    mp.write_text("".join(f"{syn[i]} {ids[i]} x\n" for i in range(1000)))
    m = load_devkit_mapping(mp)
    assert m[490] == 65 and len(m) == 1000


def test_devkit_without_usable_mapping_is_rejected(tmp_path):
    d = _flat_copy(tmp_path / "dk")
    rng = random.Random(0)
    (d / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{rng.randint(1, 1000)}\n" for _ in range(5000)))
    with pytest.raises(DatasetError, match="map_clsloc.txt") as ei:
        detect_layout(d)
    assert "490" in str(ei.value) and str(d) in str(ei.value)


def test_partial_synset_folders_keep_global_indices(tmp_path):
    for syn in ("n15075141", "n01440764"):
        (tmp_path / syn).mkdir()
        shutil.copyfile(PHOTOS[0], tmp_path / syn / "a.jpg")
    (tmp_path / "n01440764" / "sub").mkdir()
    shutil.copyfile(PHOTOS[1], tmp_path / "n01440764" / "sub" / "b.JPG")
    ds = detect_layout(tmp_path)
    assert ds.layout == "class_folders" and ds.num_classes == 1000
    assert [(p.relative_to(tmp_path).as_posix(), lab) for p, lab in ds.samples] == [
        ("n01440764/a.jpg", 0), ("n01440764/sub/b.JPG", 0), ("n15075141/a.jpg", 999)]


def test_non_synset_folder_next_to_synsets_is_ignored(tmp_path):
    for name in ("n01440764", "misc"):
        (tmp_path / name).mkdir()
        shutil.copyfile(PHOTOS[0], tmp_path / name / "a.jpg")
    with pytest.warns(DatasetWarning, match="not an ILSVRC2012 synset"):
        ds = detect_layout(tmp_path)
    assert ds.labels == [0] and len(ds.unlabelled_images) == 1


def test_generic_class_folders_sorted_and_classes_txt(tmp_path):
    for name, k in (("dogs", 0), ("cats", 1), ("birds", 2)):
        (tmp_path / name).mkdir()
        shutil.copyfile(PHOTOS[k], tmp_path / name / f"{name}.png")
    ds = detect_layout(tmp_path)
    assert ds.classes == ("birds", "cats", "dogs") and ds.label_space == "folders"
    assert ds.label_map() == {"birds.png": 0, "cats.png": 1, "dogs.png": 2}
    (tmp_path / "classes.txt").write_text("dogs\ncats\nbirds\n")
    ds = detect_layout(tmp_path)
    assert ds.classes == ("dogs", "cats", "birds")
    assert ds.label_map() == {"birds.png": 2, "cats.png": 1, "dogs.png": 0}


def test_unlabelled_flat_folder(tmp_path):
    for k in range(3):
        shutil.copyfile(PHOTOS[k], tmp_path / f"photo_{k}.JPEG")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".hidden.jpg").write_bytes(b"")
    ds = detect_layout(tmp_path)
    assert ds.layout == "unlabelled" and not ds.has_labels and ds.num_classes is None
    assert [p.name for p in ds.paths] == ["photo_0.JPEG", "photo_1.JPEG", "photo_2.JPEG"]
    assert ds.labels == [None] * 3
    assert count_images(tmp_path) == 3


def test_images_without_label_and_labels_without_image(tmp_path):
    d = _flat_copy(tmp_path / "kg")
    exp = _expected()
    syn = imagenet_synsets()
    names = list(exp)
    rows = [f"{Path(n).stem},{syn[exp[n]]} 1 2 3 4" for n in names[1:]] + ["ILSVRC2012_val_00049999,n01440764 1 2 3 4"]
    (d / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows))
    with pytest.warns(DatasetWarning) as rec:
        ds = detect_layout(d)
    msgs = " | ".join(str(w.message) for w in rec)
    assert "no entry" in msgs and "not in" in msgs
    assert [p.name for p in ds.unlabelled_images] == [names[0]]
    assert ds.missing_images == 1 and ds.missing_examples == ["ILSVRC2012_val_00049999"]
    assert len(ds) == len(names) - 1


def test_explicit_label_file_elsewhere(tmp_path):
    d = _flat_copy(tmp_path / "ILSVRC" / "Data" / "CLS-LOC" / "val")
    exp = _expected()
    syn = imagenet_synsets()
    csv_path = tmp_path / "LOC_val_solution.csv"
    csv_path.write_text("ImageId,PredictionString\n" + "".join(f"{Path(n).stem},{syn[l]} 1 2 3 4\n" for n, l in exp.items()))
    ds = detect_layout(d, label_file=csv_path)
    assert ds.layout == "kaggle_loc_csv" and ds.label_map() == exp


def test_caffe_val_txt_rejects_out_of_range(tmp_path):
    d = _flat_copy(tmp_path / "c")
    (d / "val.txt").write_text("ILSVRC2012_val_00000001.JPEG 1000\n")
    with pytest.raises(DatasetError, match="outside 0..999"):
        detect_layout(d)


def test_dataset_errors(tmp_path):
    with pytest.raises(DatasetError, match="not found") as ei:
        detect_layout(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(ei.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="empty"):
        detect_layout(empty)
    noimg = tmp_path / "noimg"
    (noimg / "sub").mkdir(parents=True)
    (noimg / "readme.txt").write_text("hi")
    (noimg / "sub" / "data.csv").write_text("1,2")
    with pytest.raises(DatasetError, match="no image files") as ei:
        detect_layout(noimg)
    assert str(noimg) in str(ei.value)
    f = tmp_path / "file.jpg"
    f.write_bytes(b"x")
    with pytest.raises(DatasetError, match="not a folder"):
        detect_layout(f)
    assert issubclass(DatasetError, ValueError)


# ----------------------------------------------------------------------------- split / take

def test_split_is_disjoint_and_deterministic(layouts):
    ds = layouts["class_folders"]
    calib, hold = split_calibration_holdout(ds.samples, 10, seed=0)
    assert len(calib) == 10 and len(hold) == len(ds) - 10
    assert not {p for p, _ in calib} & {p for p, _ in hold}
    assert sorted(calib + hold) == sorted(ds.samples)
    assert split_calibration_holdout(ds.samples, 10, seed=0) == (calib, hold)
    shuffled = list(ds.samples)
    random.Random(5).shuffle(shuffled)
    assert split_calibration_holdout(shuffled, 10, seed=0)[0] == calib  # order-independent choice
    assert split_calibration_holdout(ds.samples, 10, seed=1)[0] != calib
    assert [s for s in ds.samples if s in hold] == hold  # hold-out keeps input order
    c2, h2 = ds.split(10, seed=0)
    assert c2.samples == calib and h2.samples == hold and c2.layout == ds.layout
    with pytest.warns(DatasetWarning):
        c3, h3 = split_calibration_holdout(ds.samples, 1000)
    assert len(c3) == len(ds) and h3 == []


def test_take_warns_when_short():
    assert take([1, 2, 3], 2) == [1, 2]
    with pytest.warns(UserWarning, match="only 3"):
        assert take([1, 2, 3], 5) == [1, 2, 3]


# ----------------------------------------------------------------------------- preprocessing

def test_config_defaults_and_validation():
    cfg = PreprocessConfig()
    assert (cfg.input_size, cfg.crop_pct, cfg.interpolation, cfg.channels) == (224, 0.875, "bicubic", 3)
    assert cfg.mean == (0.485, 0.456, 0.406) and cfg.std == (0.229, 0.224, 0.225)
    assert cfg.resize_size == 256
    assert PreprocessConfig(input_size=192, crop_pct=0.9).resize_size == math.floor(192 / 0.9) == 213
    assert PreprocessConfig(crop_pct=1.0).resize_size == 224
    assert PreprocessConfig.from_dict(cfg.to_dict()) == cfg
    g = PreprocessConfig(channels=1)
    assert g.mean == pytest.approx((0.449,)) and g.std == pytest.approx((0.226,))
    for bad in (dict(interpolation="cubic"), dict(crop_pct=0), dict(channels=2), dict(std=(0, 1, 1))):
        with pytest.raises(ValueError):
            PreprocessConfig(**bad)
    for name in ("bilinear", "nearest", "lanczos", "BICUBIC"):
        PreprocessConfig(interpolation=name)


def test_normalisation_exact_on_constant_colour():
    rgb = (10, 128, 250)
    img = Image.new("RGB", (300, 200), rgb)
    out = preprocess(img)
    assert out.shape == (3, 224, 224) and out.dtype == np.float32 and out.flags.c_contiguous
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    expected = (np.array(rgb) / 255.0 - mean) / std
    for c in range(3):
        np.testing.assert_allclose(out[c], expected[c], rtol=0, atol=1e-6)


def test_resize_rule_shorter_side():
    img = Image.new("RGB", (500, 375))
    assert resize_shorter_side(img, 256).size == (int(256 * 500 / 375), 256) == (341, 256)
    assert resize_shorter_side(img.transpose(Image.Transpose.ROTATE_90), 256).size == (256, 341)
    assert resize_shorter_side(Image.new("RGB", (1000, 999)), 256).size == (256, 256)  # long side truncated
    assert center_crop(Image.new("RGB", (341, 256)), 224).size == (224, 224)


def _reference(img: Image.Image, resample, size=224, resize=256) -> np.ndarray:
    w, h = img.size
    nw, nh = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
    r = img.resize((nw, nh), resample)
    top, left = int(round((nh - size) / 2)), int(round((nw - size) / 2))
    a = np.asarray(r.crop((left, top, left + size, top + size)), dtype=np.float64) / 255.0
    return ((a - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]).transpose(2, 0, 1)


def test_bicubic_default_matches_reference():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (301, 457, 3), dtype=np.uint8))
    out = preprocess(img, PreprocessConfig())
    np.testing.assert_allclose(out, _reference(img, Image.Resampling.BICUBIC), atol=2e-6)
    assert np.abs(out - _reference(img, Image.Resampling.BILINEAR)).max() > 0.1
    out_bl = preprocess(img, PreprocessConfig(interpolation="bilinear"))
    np.testing.assert_allclose(out_bl, _reference(img, Image.Resampling.BILINEAR), atol=2e-6)


def test_grayscale_input_and_grayscale_model():
    gray = next(p for p in PHOTOS if Image.open(p).mode == "L")
    img = load_image(gray)
    assert img.mode == "L"
    out = preprocess(img)
    assert out.shape == (3, 224, 224)
    np.testing.assert_array_equal(out, preprocess(img.convert("RGB")))  # L kept as L is exact
    g = preprocess(img, PreprocessConfig(channels=1))
    assert g.shape == (1, 224, 224) and g.dtype == np.float32


# ----------------------------------------------------------------------------- decoding edge cases

def _png16_rgb(path: Path, arr: np.ndarray) -> None:
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in arr)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def edge_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("edge")
    yy, xx = np.mgrid[0:120, 0:160]
    smooth = np.stack([xx * 255 // 159, yy * 255 // 119, np.full_like(xx, 90)], -1).astype(np.uint8)
    Image.fromarray(smooth).convert("CMYK").save(d / "a_cmyk.jpg", quality=95)
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[:, :20] = (255, 0, 0, 255)     # opaque red | fully transparent black
    rgba[:, 20:30, 3] = 0
    rgba[:, 30:] = (0, 0, 255, 128)     # half-transparent blue
    Image.fromarray(rgba, "RGBA").save(d / "b_alpha.png")
    pal = Image.new("P", (30, 30), 0)
    pal.putpalette([0, 200, 0, 200, 0, 200] + [0] * 762)
    pal.paste(1, (0, 0, 15, 30))
    pal.save(d / "c_palette.png")
    pal.save(d / "d_palette_transparent.png", transparency=0)
    Image.fromarray(np.array([[0, 1000, 32896, 65535]] * 4, dtype=np.uint16)).save(d / "e_gray16.png")
    _png16_rgb(d / "f_rgb16.png", np.array([[[0xFFFF, 0x8080, 0x0000]] * 4] * 4, dtype=np.uint16))
    rot = Image.new("RGB", (60, 30), (255, 0, 0))
    rot.paste((0, 0, 255), (30, 0, 60, 30))  # left half red, right half blue (as stored)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    rot.save(d / "g_exif_rot6.jpg", quality=95, exif=exif)
    data = PHOTOS[0].read_bytes()
    (d / "h_truncated.jpg").write_bytes(data[: int(len(data) * 0.6)])
    (d / "i_empty.jpg").write_bytes(b"")
    (d / "j_not_an_image.jpg").write_text("this is not a JPEG\n" * 10)
    shutil.copyfile(PHOTOS[1], d / "k_ok.jpg")
    return d


BAD = {"h_truncated.jpg": "truncated", "i_empty.jpg": "empty file", "j_not_an_image.jpg": "not a recognised image"}


def test_loading_does_not_enable_truncated_images():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_cmyk_jpeg(edge_dir):
    img = load_image(edge_dir / "a_cmyk.jpg")
    assert img.mode == "RGB" and img.size == (160, 120)
    yy, xx = np.mgrid[0:120, 0:160]
    ref = np.stack([xx * 255 // 159, yy * 255 // 119, np.full_like(xx, 90)], -1)
    assert np.abs(np.asarray(img, dtype=int) - ref).mean() < 4


def test_png_alpha_composited_on_white(edge_dir):
    a = np.asarray(load_image(edge_dir / "b_alpha.png"))
    assert a.shape == (40, 40, 3)
    assert tuple(a[5, 5]) == (255, 0, 0)
    assert tuple(a[5, 25]) == (255, 255, 255)
    assert abs(int(a[5, 35, 0]) - 127) <= 1 and a[5, 35, 2] == 255  # 50 % blue over white
    dropped = np.asarray(load_image(edge_dir / "b_alpha.png", alpha_background=None))
    assert tuple(dropped[5, 25]) == (0, 0, 0)


def test_palette_png(edge_dir):
    a = np.asarray(load_image(edge_dir / "c_palette.png"))
    assert tuple(a[0, 0]) == (200, 0, 200) and tuple(a[0, 29]) == (0, 200, 0)
    t = np.asarray(load_image(edge_dir / "d_palette_transparent.png"))
    assert tuple(t[0, 0]) == (200, 0, 200) and tuple(t[0, 29]) == (255, 255, 255)


def test_16bit_png(edge_dir):
    g = load_image(edge_dir / "e_gray16.png")
    assert g.mode == "L"
    assert np.asarray(g)[0].tolist() == [0, 4, 128, 255]  # scaled, not clipped
    c = load_image(edge_dir / "f_rgb16.png")
    assert c.mode == "RGB" and tuple(np.asarray(c)[0, 0]) == (255, 128, 0)
    assert load_and_preprocess(edge_dir / "e_gray16.png").shape == (3, 224, 224)


def test_exif_orientation_applied(edge_dir):
    img = load_image(edge_dir / "g_exif_rot6.jpg")
    assert img.size == (30, 60)  # rotated to portrait
    a = np.asarray(img, dtype=int)
    assert a[5, 15, 0] > 200 and a[5, 15, 2] < 60   # top = stored left half = red
    assert a[55, 15, 2] > 200 and a[55, 15, 0] < 60  # bottom = blue
    assert load_image(edge_dir / "g_exif_rot6.jpg", exif_transpose=False).size == (60, 30)
    assert preprocess(img).shape == (3, 224, 224)


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_files_raise_decode_error(edge_dir, name):
    with pytest.raises(ImageDecodeError) as ei:
        load_image(edge_dir / name)
    assert BAD[name] in ei.value.reason
    assert ei.value.path == str(edge_dir / name)


def test_missing_file_is_decode_error(tmp_path):
    with pytest.raises(ImageDecodeError, match="not found"):
        load_image(tmp_path / "nope.jpg")


# ----------------------------------------------------------------------------- loader

def test_loader_skips_and_reports_in_order(edge_dir):
    ds = detect_layout(edge_dir)
    assert ds.layout == "unlabelled" and len(ds) == 11
    report = DecodeReport()
    with pytest.warns(UserWarning, match="skipped 3 undecodable"):
        batches = list(iter_batches(ds.samples, batch_size=3, num_workers=3, prefetch=2, report=report))
    paths = [p for b in batches for p in b.paths]
    good = [str(p) for p in ds.paths if p.name not in BAD]
    assert paths == good
    assert [len(b) for b in batches] == [3, 3, 2]
    assert all(b.labels is None and b.images.shape[1:] == (3, 224, 224) for b in batches)
    assert [Path(p).name for p, _ in report.failures] == sorted(BAD)
    assert report.decoded == 8 and report.failed == 3 and report.attempted == 11 and report.short


def test_loader_order_labels_and_values(layouts):
    ds = layouts["kaggle_loc_csv"]
    report = DecodeReport()
    batches = list(iter_batches(ds.samples, PreprocessConfig(), batch_size=5, num_workers=4, progress=True,
                                desc="test", report=report))
    assert [p for b in batches for p in b.paths] == [str(p) for p in ds.paths]
    assert np.concatenate([b.labels for b in batches]).tolist() == ds.labels
    assert np.concatenate([b.indices for b in batches]).tolist() == list(range(len(ds)))
    assert report.decoded == len(ds) and not report.failures and not report.short
    np.testing.assert_array_equal(batches[1].images[2], load_and_preprocess(ds.paths[7]))


def test_loader_limit_replaces_failures_and_flags_shortage(edge_dir):
    files = sorted(edge_dir.iterdir())
    report = DecodeReport()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = [p for b in iter_batches(files, batch_size=4, limit=8, report=report) for p in b.paths]
    assert len(got) == 8 and report.decoded == 8 and not report.exhausted
    report2 = DecodeReport()
    with pytest.warns(UserWarning) as rec:
        n = sum(len(b) for b in iter_batches(files, batch_size=4, limit=10, report=report2))
    assert any("only 8 decodable" in str(w.message) for w in rec)
    assert n == 8 and report2.exhausted and report2.short


def test_loader_early_stop_and_empty():
    assert list(iter_batches([], batch_size=4)) == []
    it = iter_batches([(p, 1) for p in PHOTOS], batch_size=2, num_workers=2)
    first = next(it)
    assert first.labels.tolist() == [1, 1]
    it.close()  # shuts the pool down without error


# ----------------------------------------------------------------------------- boundary

def test_data_package_is_torch_free():
    code = ("import sys, parnet_cpu.data as d; d.detect_layout(d.bundled_calibration_dir()); "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'openvino', 'nncf')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
