"""Image-folder dataset layouts with automatic detection (stdlib + numpy only, no torch).

Supported layouts (``Dataset.layout``):

``class_folders``
    ``root/<class>/.../*.JPEG`` (torchvision ImageFolder). If the folder names are ILSVRC2012
    synsets (``n01440764``...), the label is the index in the fixed sorted list of the 1000
    ILSVRC2012 synsets (``assets/imagenet_synsets.txt``), never the position among the folders
    present, so a partial copy keeps correct labels. Folders that are not ILSVRC2012 synsets are
    then ignored (warned). Otherwise the classes are the sorted folder names, or the order given
    by an optional ``root/classes.txt`` (one name per line).
``devkit_ground_truth``
    flat folder + ``ILSVRC2012_validation_ground_truth.txt`` (devkit): line *i* is the 1-based
    ``ILSVRC2012_ID`` of ``ILSVRC2012_val_{i:08d}.*``. Those IDs follow the devkit's ``meta.mat``
    order, NOT the sorted-synset index (devkit ID 490 = n01751748 "sea snake" = index 65). The
    ID -> synset mapping is taken from a ``map_clsloc.txt`` next to the file (``WNID ID name``
    lines, ILSVRC2017 CLS-LOC devkit) if present; otherwise it is derived by joining the file with
    the shipped per-image validation labels (``assets/imagenet_val_labels.txt``) and checking the
    result is a consistent one-to-one mapping; a file that does not match is rejected.
``caffe_val_txt``
    flat folder + Caffe-style ``val.txt`` (``<file name> <sorted-synset index>`` per line).
``kaggle_loc_csv``
    flat folder + Kaggle ``LOC_val_solution.csv`` (``ImageId,PredictionString``; the first token of
    ``PredictionString`` is the synset).
``imagenet_val_filenames``
    flat folder of images with their original names ``ILSVRC2012_val_XXXXXXXX.*`` and no label
    file: labels come from ``assets/imagenet_val_labels.txt``.
``unlabelled``
    flat folder of images, no labels (calibration only).

Label files are looked up in ``root`` (or passed as ``label_file=``). Image matching against label
files is case-insensitive and falls back to the file stem, so re-encoded copies (``.png``) match.
Images without a label in a labelled layout are excluded from ``samples`` and listed in
``Dataset.unlabelled_images`` (warned); label entries without an image are counted in
``Dataset.missing_images`` (warned).
"""
from __future__ import annotations

import csv
import functools
import hashlib
import os
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = [
    "IMAGE_EXTENSIONS",
    "LAYOUTS",
    "Dataset",
    "DatasetError",
    "DatasetWarning",
    "Sample",
    "bundled_calibration_dir",
    "count_images",
    "detect_layout",
    "imagenet_class_names",
    "imagenet_synsets",
    "imagenet_val_labels",
    "is_image_file",
    "list_images",
    "load_devkit_mapping",
    "match_model_classes",
    "split_calibration_holdout",
    "synset_to_index",
]

# File names listed as images; whether a file is one is decided on its decoded format (preprocess.IMAGE_FORMATS).
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})
LAYOUTS: tuple[str, ...] = (
    "class_folders", "devkit_ground_truth", "caffe_val_txt", "kaggle_loc_csv",
    "imagenet_val_filenames", "unlabelled",
)
NUM_IMAGENET_CLASSES = 1000
NUM_IMAGENET_VAL = 50000

DEVKIT_GT_NAME = "ILSVRC2012_validation_ground_truth.txt"
DEVKIT_MAP_NAME = "map_clsloc.txt"
KAGGLE_CSV_NAME = "LOC_val_solution.csv"
CAFFE_VAL_NAME = "val.txt"
CLASSES_TXT_NAME = "classes.txt"

_ASSETS = Path(__file__).resolve().parent.parent / "assets"
_VAL_NAME_RE = re.compile(r"^ILSVRC2012_val_(\d{8})$", re.IGNORECASE)
_SYNSET_RE = re.compile(r"^n\d{8}$")

Sample = tuple[Path, int | None]


class DatasetError(ValueError):
    """The dataset folder or its label file cannot be used; the message names the path."""


class DatasetWarning(UserWarning):
    """Something in the dataset was skipped (unlabelled images, label entries without image...)."""


# --------------------------------------------------------------------------------------------
# shipped ImageNet metadata
# --------------------------------------------------------------------------------------------

def _read_asset_lines(name: str) -> list[str]:
    path = _ASSETS / name
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"package asset missing: {path} (broken install?)") from None
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


@functools.lru_cache(maxsize=None)
def imagenet_synsets() -> tuple[str, ...]:
    """The 1000 ILSVRC2012 synsets in sorted order; index = model output index."""
    syn = tuple(_read_asset_lines("imagenet_synsets.txt"))
    if len(syn) != NUM_IMAGENET_CLASSES or list(syn) != sorted(syn) or len(set(syn)) != len(syn):
        raise RuntimeError("assets/imagenet_synsets.txt is corrupt (expected 1000 sorted unique synsets)")
    return syn


@functools.lru_cache(maxsize=None)
def imagenet_class_names() -> tuple[str, ...]:
    """Short human-readable name of each class, in sorted-synset order."""
    names = tuple(_read_asset_lines("imagenet_class_names.txt"))
    if len(names) != NUM_IMAGENET_CLASSES:
        raise RuntimeError("assets/imagenet_class_names.txt is corrupt (expected 1000 lines)")
    return names


@functools.lru_cache(maxsize=None)
def synset_to_index() -> dict[str, int]:
    return {s: i for i, s in enumerate(imagenet_synsets())}


@functools.lru_cache(maxsize=None)
def imagenet_val_labels() -> np.ndarray:
    """Sorted-synset label of ILSVRC2012_val_{i:08d} at position i-1 (read-only int16, 50000)."""
    arr = np.array([int(x) for x in _read_asset_lines("imagenet_val_labels.txt")], dtype=np.int16)
    if arr.shape != (NUM_IMAGENET_VAL,) or arr.min() < 0 or arr.max() >= NUM_IMAGENET_CLASSES:
        raise RuntimeError("assets/imagenet_val_labels.txt is corrupt (expected 50000 labels in 0..999)")
    arr.setflags(write=False)
    return arr


def bundled_calibration_dir() -> Path | None:
    """The 24 freely licensed photos shipped as package data (``calibration/sample`` in a checkout
    links to them), so an installed wheel can calibrate and run the demo without any dataset."""
    p = Path(__file__).resolve().parents[1] / "assets" / "calibration_sample"
    return p if p.is_dir() else None


# --------------------------------------------------------------------------------------------
# file listing
# --------------------------------------------------------------------------------------------

def is_image_file(path: str | os.PathLike[str]) -> bool:
    name = os.path.basename(os.fspath(path))
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _dir_key(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """(device, inode) of a directory, following links; None if it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _skip_reason(entry: os.DirEntry) -> str:
    if entry.name.startswith("."):
        return "hidden"
    try:
        if entry.is_file():
            return f"not an image file name (images: {', '.join(sorted(IMAGE_EXTENSIONS))})"
    except OSError:
        pass
    return "broken link or not a regular file"


def list_images(folder: str | os.PathLike[str], recursive: bool = False, *,
                skipped: list[tuple[str, str]] | None = None,
                visited: set[tuple[int, int]] | None = None) -> list[Path]:
    """Image files (by extension, hidden files skipped) under ``folder``, sorted by relative path.

    The recursive walk follows symbolic links but enters each directory once, by (device, inode): a link
    loop neither repeats images nor recurses forever. ``visited`` seeds the directories counted as read
    already (e.g. the other class folders, so a link to one is not read twice). Every entry not taken is
    appended to ``skipped`` as ``(path, reason)``."""
    folder = Path(folder)
    skip = skipped if skipped is not None else []
    out: list[Path] = []
    if not recursive:
        with os.scandir(folder) as it:
            for e in sorted(it, key=lambda e: e.name):
                if is_image_file(e.name) and e.is_file():
                    out.append(Path(e.path))
                elif not e.is_dir():
                    skip.append((e.path, _skip_reason(e)))
        return out
    seen = set(visited or ())
    key = _dir_key(folder)
    if key is not None:
        seen.add(key)
    stack = [folder]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            skip.append((str(d), f"cannot list folder: {exc.strerror or exc}"))
            continue
        subdirs: list[Path] = []
        for e in entries:
            if e.name.startswith("."):
                skip.append((e.path, "hidden"))
            elif e.is_dir():
                key = _dir_key(e.path)
                if key in seen:
                    skip.append((e.path, "folder already read (symbolic link loop or second link to it)"))
                elif key is None:
                    skip.append((e.path, "cannot read folder"))
                else:
                    seen.add(key)
                    subdirs.append(Path(e.path))
            elif is_image_file(e.name) and e.is_file():
                out.append(Path(e.path))
            else:
                skip.append((e.path, _skip_reason(e)))
        stack.extend(reversed(subdirs))
    out.sort(key=lambda p: p.relative_to(folder).as_posix())
    return out


def count_images(folder: str | os.PathLike[str], recursive: bool = True) -> int:
    """Number of image files under ``folder`` (no decoding)."""
    return len(list_images(folder, recursive=recursive))


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------

@dataclass
class Dataset:
    root: Path
    layout: str
    samples: list[tuple[Path, int | None]]
    classes: tuple[str, ...] | None = None        # class ids: synsets or folder names
    class_names: tuple[str, ...] | None = None    # human-readable names (same order)
    label_space: str | None = None                # "imagenet1k" | "folders" | None
    label_file: Path | None = None
    unlabelled_images: list[Path] = field(default_factory=list)
    missing_images: int = 0                       # label entries whose image is absent
    missing_examples: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    label_mapping: dict[str, int] | None = None   # class folder name -> label index used
    skipped_files: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) not read as images

    @property
    def has_labels(self) -> bool:
        return self.layout != "unlabelled"

    @property
    def num_classes(self) -> int | None:
        return None if self.classes is None else len(self.classes)

    @property
    def paths(self) -> list[Path]:
        return [p for p, _ in self.samples]

    @property
    def labels(self) -> list[int | None]:
        return [lab for _, lab in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def label_map(self) -> dict[str, int | None]:
        """``{file name: label}`` (convenient for comparisons)."""
        return {p.name: lab for p, lab in self.samples}

    def with_samples(self, samples: Sequence[tuple[Path, int | None]]) -> "Dataset":
        return replace(self, samples=list(samples), unlabelled_images=list(self.unlabelled_images),
                       missing_examples=list(self.missing_examples), notes=list(self.notes),
                       label_mapping=None if self.label_mapping is None else dict(self.label_mapping),
                       skipped_files=list(self.skipped_files))

    def split(self, calib_size: int, seed: int = 0) -> tuple["Dataset", "Dataset"]:
        """Deterministic disjoint (calibration, held-out) split; see :func:`split_calibration_holdout`."""
        calib, hold = split_calibration_holdout(self.samples, calib_size, seed)
        return self.with_samples(calib), self.with_samples(hold)

    def summary(self) -> str:
        s = f"{self.root}: layout={self.layout}, {len(self.samples)} images"
        if self.num_classes is not None:
            s += f", {self.num_classes} classes ({self.label_space})"
        if self.label_file is not None:
            s += f", labels from {self.label_file.name}"
        if self.unlabelled_images:
            s += f", {len(self.unlabelled_images)} images without label skipped"
        if self.missing_images:
            s += f", {self.missing_images} labelled images absent"
        if self.skipped_files:
            s += f", {len(self.skipped_files)} other files skipped (skipped_files)"
        return s


def split_calibration_holdout(
    samples: Sequence[tuple[Path, int | None]], calib_size: int, seed: int = 0,
) -> tuple[list[tuple[Path, int | None]], list[tuple[Path, int | None]]]:
    """Split into a calibration subset of ``calib_size`` and the disjoint held-out rest.

    Deterministic and independent of the input order and of the machine: each sample is ranked by
    a BLAKE2 hash of ``(seed, parent folder name, file name)``; the ``calib_size`` lowest go to
    calibration (in hash order, i.e. shuffled), the others keep their input order. Not stratified.
    """
    if calib_size < 0:
        raise ValueError(f"calib_size must be >= 0, got {calib_size}")
    n = len(samples)
    if calib_size > n:
        warnings.warn(f"calib_size={calib_size} > {n} available samples; all go to calibration, "
                      "nothing is held out", DatasetWarning, stacklevel=2)
        calib_size = n

    def key(i: int) -> tuple[bytes, int]:
        p = Path(samples[i][0])
        h = hashlib.blake2b(f"{seed}\0{p.parent.name}/{p.name}".encode(), digest_size=16).digest()
        return h, i

    order = sorted(range(n), key=key)
    chosen = set(order[:calib_size])
    calib = [samples[i] for i in order[:calib_size]]
    hold = [samples[i] for i in range(n) if i not in chosen]
    return calib, hold


# --------------------------------------------------------------------------------------------
# detection
# --------------------------------------------------------------------------------------------

def _warn(ds_notes: list[str], msg: str) -> None:
    ds_notes.append(msg)
    warnings.warn(msg, DatasetWarning, stacklevel=3)


def _find_file(folder: Path, name: str) -> Path | None:
    """Case-insensitive lookup of ``name`` directly inside ``folder``."""
    exact = folder / name
    if exact.is_file():
        return exact
    low = name.lower()
    try:
        with os.scandir(folder) as it:
            for e in it:
                if e.name.lower() == low and e.is_file():
                    return Path(e.path)
    except OSError:
        pass
    return None


LABEL_FILE_NAMES = frozenset(n.lower() for n in (KAGGLE_CSV_NAME, DEVKIT_GT_NAME, DEVKIT_MAP_NAME, CAFFE_VAL_NAME,
                                                 CLASSES_TXT_NAME))


def detect_layout(root: str | os.PathLike[str], label_file: str | os.PathLike[str] | None = None) -> Dataset:
    """Inspect ``root`` and return a :class:`Dataset` (see the module docstring for the layouts).

    ``label_file`` forces a flat labelled layout with that file (type chosen by its name:
    ``*.csv`` -> Kaggle, ``*ground_truth*`` -> devkit, other text -> Caffe ``val.txt``); use it when
    the label file lives elsewhere (e.g. the Kaggle CSV four levels above ``CLS-LOC/val``).
    Priority when several label files sit in ``root``: Kaggle CSV > devkit > ``val.txt``.

    Every file or folder not read as an image is listed in ``Dataset.skipped_files`` with its reason
    (warned, unless all are hidden); label files are not listed."""
    skipped: list[tuple[str, str]] = []
    ds = _detect_layout(root, label_file, skipped)
    used = {ds.label_file.name.lower()} if ds.label_file is not None else set()
    ds.skipped_files = [(p, why) for p, why in skipped
                        if not (Path(p).parent == ds.root and Path(p).name.lower() in LABEL_FILE_NAMES | used)]
    shown = [(p, why) for p, why in ds.skipped_files if why != "hidden"]
    if shown:
        _warn(ds.notes, f"{ds.root}: {len(shown)} files or folders not read as images (first: {shown[0][0]}: "
                        f"{shown[0][1]}); all are listed in skipped_files")
    return ds


def _detect_layout(root: str | os.PathLike[str], label_file: str | os.PathLike[str] | None,
                   skipped: list[tuple[str, str]]) -> Dataset:
    """detect_layout without the skipped-file bookkeeping."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DatasetError(f"dataset folder not found: {root}")
    if not root.is_dir():
        raise DatasetError(f"dataset path is not a folder: {root}")
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as exc:
        raise DatasetError(f"cannot list dataset folder {root}: {exc}") from None
    visible = [e for e in entries if not e.name.startswith(".")]
    if not visible:
        raise DatasetError(f"dataset folder is empty: {root}")
    flat_images = [Path(e.path) for e in visible if is_image_file(e.name) and e.is_file()]
    skipped.extend((e.path, _skip_reason(e)) for e in entries
                   if e.name.startswith(".") or not (e.is_dir() or is_image_file(e.name) and e.is_file()))
    seen = {_dir_key(root)}
    subdirs = []  # each folder once: a link to the root or to another class folder is not a class
    for e in visible:
        if e.is_dir():
            key = _dir_key(e.path)
            if key is None or key in seen:
                skipped.append((e.path, "folder already read (symbolic link loop or second link to it)"
                                if key else "cannot read folder"))
            else:
                seen.add(key)
                subdirs.append(Path(e.path))

    if label_file is not None:
        lf = Path(label_file).expanduser()
        if not lf.is_file():
            raise DatasetError(f"label file not found: {lf}")
        if not flat_images:
            raise DatasetError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) directly in {root} "
                               f"(label file {lf.name} needs a flat folder of images)")
        return _flat_labelled(root, flat_images, lf, _label_file_kind(lf))

    if flat_images:
        found = [(kind, _find_file(root, name)) for kind, name in (
            ("kaggle", KAGGLE_CSV_NAME), ("devkit", DEVKIT_GT_NAME), ("caffe", CAFFE_VAL_NAME))]
        found = [(k, p) for k, p in found if p is not None]
        if found:
            ds = _flat_labelled(root, flat_images, found[0][1], found[0][0])
            for _, p in found[1:]:
                ds.notes.append(f"{p.name} ignored ({found[0][1].name} takes precedence)")
            return ds

    seen.discard(None)
    class_dirs = [(d, list_images(d, recursive=True, skipped=skipped, visited=seen)) for d in subdirs]
    class_dirs_with_images = [(d, imgs) for d, imgs in class_dirs if imgs]
    if class_dirs_with_images:
        return _class_folders(root, class_dirs, flat_images)

    if not flat_images:
        raise DatasetError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {root} "
                           "or in its sub-folders")

    if any(_VAL_NAME_RE.match(p.stem) for p in flat_images):
        return _imagenet_val_filenames(root, flat_images)

    return Dataset(root=root, layout="unlabelled", samples=[(p, None) for p in flat_images])


def _label_file_kind(lf: Path) -> str:
    name = lf.name.lower()
    if name.endswith(".csv"):
        return "kaggle"
    if "ground_truth" in name:
        return "devkit"
    return "caffe"


# ----------------------------------------------------------------------------- class folders

def _class_folders(root: Path, class_dirs: list[tuple[Path, list[Path]]], flat_images: list[Path]) -> Dataset:
    notes: list[str] = []
    s2i = synset_to_index()
    with_images = [(d, imgs) for d, imgs in class_dirs if imgs]
    n_syn = sum(1 for d, _ in with_images if d.name in s2i)
    samples: list[tuple[Path, int | None]] = []
    unlabelled: list[Path] = list(flat_images)
    classes_txt = _find_file(root, CLASSES_TXT_NAME)

    if n_syn and classes_txt is None:  # ImageNet synset folders: fixed sorted-synset label space
        for d, imgs in with_images:
            if d.name in s2i:
                samples.extend((p, s2i[d.name]) for p in imgs)
            else:
                unlabelled.extend(imgs)
                _warn(notes, f"{d}: folder name is not an ILSVRC2012 synset; its {len(imgs)} images are ignored")
        ds = Dataset(root=root, layout="class_folders", samples=samples, classes=imagenet_synsets(),
                     class_names=imagenet_class_names(), label_space="imagenet1k", notes=notes)
    else:  # a classes.txt says the label order (even over synset names: a fine-tune on a subset)
        if classes_txt is not None:
            classes = read_classes_file(classes_txt)
            label_file: Path | None = classes_txt
        else:
            classes = tuple(sorted(d.name for d, _ in class_dirs))  # empty ones too: they keep their index
            label_file = None
        idx = {c: i for i, c in enumerate(classes)}
        for d, imgs in with_images:
            if d.name in idx:
                samples.extend((p, idx[d.name]) for p in imgs)
            else:
                unlabelled.extend(imgs)
                _warn(notes, f"{d}: folder not listed in {classes_txt}; its {len(imgs)} images are ignored")
        ds = Dataset(root=root, layout="class_folders", samples=samples, classes=classes, class_names=classes,
                     label_space="folders", label_file=label_file, notes=notes)
    synsets = ds.label_space == "imagenet1k"
    ds.label_mapping = {c: i for i, c in enumerate(ds.classes)} if not synsets else \
        {d.name: s2i[d.name] for d, _ in class_dirs if d.name in s2i}
    empty = [d.name for d, imgs in class_dirs if not imgs]
    if empty and not synsets:
        _warn(notes, f"{len(empty)} class folders hold no images and keep their label index: {', '.join(empty[:5])}"
                     + (" ..." if len(empty) > 5 else ""))
    elif empty:
        notes.append(f"{len(empty)} sub-folders without images ignored: {', '.join(empty[:5])}"
                     + (" ..." if len(empty) > 5 else ""))
    if flat_images:
        _warn(notes, f"{root}: {len(flat_images)} images directly in the root of a class-folder dataset have no "
                     "class and are ignored")
    ds.unlabelled_images = unlabelled
    if not samples:
        raise DatasetError(f"no labelled images in {root}: none of its image sub-folders is a known class")
    return ds


def match_model_classes(ds: Dataset, class_names: Sequence[str] | None) -> Dataset:
    """Labels in the model's class order when the class folders are named by class name.

    Folder labels otherwise follow the sorted folder names (or classes.txt), which need not be the order
    the model predicts in. When any folder name is one of the model's class names, every folder must be
    one (else :class:`DatasetError` listing the others) and takes the model's index for its name."""
    if ds.label_space not in ("folders", "imagenet1k") or not class_names or not ds.label_mapping:
        return ds
    index = {name: i for i, name in enumerate(class_names)}
    folders = list(ds.label_mapping)
    matched = [f for f in folders if f in index]
    if ds.label_space == "imagenet1k" and (not matched or tuple(class_names) == imagenet_synsets()):
        return ds  # synset folders keep the sorted-synset index unless the model names its classes by synset
    if not matched:
        ds.notes.append("class folder names are not the model's class names: labels are the folders' positions "
                        + ("in classes.txt" if ds.label_file is not None else "in sorted order"))
        return ds
    unknown = [f for f in folders if f not in index]
    if unknown:
        names = ", ".join(repr(n) for n in class_names[:30]) + (", ..." if len(class_names) > 30 else "")
        raise DatasetError(f"{ds.root}: class folders {unknown[:20]} are not among the model's class names "
                           f"({names}), while {matched[:5]} are; rename the folders to the model's class names")
    remap = {ds.label_mapping[f]: index[f] for f in folders}
    out = ds.with_samples([(p, None if lab is None else remap[lab]) for p, lab in ds.samples])
    out.classes = out.class_names = tuple(class_names)
    out.label_mapping = {f: index[f] for f in folders}
    out.notes.append("class folders matched to the model's class names")
    return out


def read_classes_file(path: str | os.PathLike[str]) -> tuple[str, ...]:
    """A classes file (classes.txt, `--classes FILE`): one name per line, in label order; blank lines and
    # comments skipped; empty, duplicated or unreadable is a DatasetError."""
    path = Path(path)
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read the class names ({exc})") from None
    classes = tuple(ln for ln in lines if ln and not ln.startswith("#"))
    if not classes:
        raise DatasetError(f"{path} lists no classes")
    dup = sorted({c for c in classes if classes.count(c) > 1})
    if dup:
        raise DatasetError(f"{path}: duplicate class names {dup[:5]}")
    return classes


# ----------------------------------------------------------------------------- flat + labels

class _ImageIndex:
    """Case-insensitive lookup of flat images by file name, then by stem."""

    def __init__(self, images: list[Path]) -> None:
        self.by_name = {p.name.lower(): p for p in images}
        self.by_stem: dict[str, Path] = {}
        self.ambiguous_stems: set[str] = set()
        for p in images:
            s = p.stem.lower()
            if s in self.by_stem:
                self.ambiguous_stems.add(s)
            else:
                self.by_stem[s] = p

    def get(self, ref: str) -> Path | None:
        ref = ref.strip().replace("\\", "/")
        base = ref.rsplit("/", 1)[-1].lower()
        p = self.by_name.get(base)
        if p is not None:
            return p
        stem = base.rsplit(".", 1)[0] if "." in base else base
        if stem in self.ambiguous_stems:
            return None
        return self.by_stem.get(stem)


def _flat_labelled(root: Path, images: list[Path], label_file: Path, kind: str) -> Dataset:
    parse = {"kaggle": ("kaggle_loc_csv", _parse_kaggle_csv), "devkit": ("devkit_ground_truth", _parse_devkit)}
    layout, parser = parse.get(kind, ("caffe_val_txt", _parse_caffe))
    try:
        labels = parser(label_file, images)
    except UnicodeDecodeError:
        raise DatasetError(f"{label_file} is not a text label file (it does not decode as UTF-8); expected a "
                           "Kaggle CSV, devkit ground truth or Caffe val.txt") from None
    notes: list[str] = []
    entries, missing = labels
    samples = [(p, entries[p]) for p in images if p in entries]
    unlabelled = [p for p in images if p not in entries]
    ds = Dataset(root=root, layout=layout, samples=samples, classes=imagenet_synsets(),
                 class_names=imagenet_class_names(), label_space="imagenet1k", label_file=label_file,
                 unlabelled_images=unlabelled, missing_images=len(missing), missing_examples=missing[:5],
                 notes=notes)
    if unlabelled:
        _warn(notes, f"{root}: {len(unlabelled)} of {len(images)} images have no entry in {label_file.name} "
                     f"and are ignored (e.g. {unlabelled[0].name})")
    if missing:
        _warn(notes, f"{label_file}: {len(missing)} labelled images are not in {root} "
                     f"(e.g. {missing[0]}); evaluating on the {len(samples)} present")
    if not samples:
        raise DatasetError(f"no image in {root} matches an entry of {label_file}")
    _cross_check_val_labels(ds)
    return ds


def _cross_check_val_labels(ds: Dataset) -> None:
    """Warn when a label file disagrees with the shipped labels for original val file names."""
    val = imagenet_val_labels()
    n = bad = 0
    for p, lab in ds.samples:
        m = _VAL_NAME_RE.match(p.stem)
        if m and 1 <= int(m.group(1)) <= NUM_IMAGENET_VAL:
            n += 1
            bad += int(val[int(m.group(1)) - 1] != lab)
    if bad:
        _warn(ds.notes, f"{ds.label_file}: {bad} of {n} labels differ from the official ILSVRC2012 validation "
                        "labels for those file names (different label convention, e.g. devkit IDs used "
                        "as indices?)")


def _parse_caffe(path: Path, images: list[Path]) -> tuple[dict[Path, int], list[str]]:
    index = _ImageIndex(images)
    entries: dict[Path, int] = {}
    missing: list[str] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(None, 1)
            if len(parts) != 2:
                raise DatasetError(f"{path}:{lineno}: expected '<file name> <class index>', got {line!r}")
            try:
                lab = int(parts[1])
            except ValueError:
                raise DatasetError(f"{path}:{lineno}: class index is not an integer: {parts[1]!r}") from None
            if not 0 <= lab < NUM_IMAGENET_CLASSES:
                raise DatasetError(f"{path}:{lineno}: class index {lab} outside 0..{NUM_IMAGENET_CLASSES - 1} "
                                   "(val.txt must hold 0-based sorted-synset indices)")
            p = index.get(parts[0])
            if p is None:
                missing.append(parts[0])
            else:
                entries[p] = lab
    return entries, missing


def _parse_kaggle_csv(path: Path, images: list[Path]) -> tuple[dict[Path, int], list[str]]:
    index = _ImageIndex(images)
    s2i = synset_to_index()
    entries: dict[Path, int] = {}
    missing: list[str] = []
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
            raise DatasetError(f"{path}: expected header 'ImageId,PredictionString', got {header!r}")
        for lineno, row in enumerate(reader, 2):
            if not row or not row[0].strip():
                continue
            tokens = row[1].split() if len(row) > 1 else []
            if not tokens:
                raise DatasetError(f"{path}:{lineno}: empty PredictionString for {row[0]!r}")
            syn = tokens[0]
            if syn not in s2i:
                raise DatasetError(f"{path}:{lineno}: {syn!r} is not an ILSVRC2012 synset")
            p = index.get(row[0])
            if p is None:
                missing.append(row[0].strip())
            else:
                entries[p] = s2i[syn]
    return entries, missing


def load_devkit_mapping(path: str | os.PathLike[str]) -> dict[int, int]:
    """Parse a devkit ``map_clsloc.txt`` (``WNID ILSVRC2012_ID name``) -> {devkit ID: sorted index}."""
    path = Path(path)
    s2i = synset_to_index()
    out: dict[int, int] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2 or not _SYNSET_RE.match(parts[0]):
                raise DatasetError(f"{path}:{lineno}: expected 'WNID ILSVRC2012_ID name', got {line.strip()!r}")
            if parts[0] not in s2i:
                raise DatasetError(f"{path}:{lineno}: {parts[0]} is not an ILSVRC2012 synset")
            try:
                dev_id = int(parts[1])
            except ValueError:
                raise DatasetError(f"{path}:{lineno}: ILSVRC2012_ID is not an integer: {parts[1]!r}") from None
            if dev_id in out:
                raise DatasetError(f"{path}:{lineno}: ILSVRC2012_ID {dev_id} listed twice")
            out[dev_id] = s2i[parts[0]]
    if len(set(out.values())) != len(out):
        raise DatasetError(f"{path}: a synset is listed under two ILSVRC2012_IDs")
    if not out:
        raise DatasetError(f"{path} is empty")
    return out


def _devkit_missing_mapping_message(gt: Path, detail: str) -> str:
    meta = _find_file(gt.parent, "meta.mat")
    msg = (f"{gt}: {detail}. The devkit ground truth uses ILSVRC2012_ID numbers in the devkit's meta.mat order, "
           "which are NOT the sorted-synset class indices the model predicts (e.g. devkit ID 490 = n01751748 "
           "'sea snake' = index 65), and no ILSVRC2012_ID -> synset mapping is shipped with parnet-cpu. "
           f"Put the devkit's {DEVKIT_MAP_NAME} (lines 'WNID ILSVRC2012_ID name', from the ILSVRC2017 CLS-LOC "
           "devkit) next to the ground-truth file, or label the images another way (synset class folders, "
           f"{KAGGLE_CSV_NAME}, Caffe val.txt with sorted-synset indices, or the original ILSVRC2012_val_* file "
           "names without any label file).")
    if meta is not None:
        msg += (f" ({meta} is present but .mat files are not read here; export it to {DEVKIT_MAP_NAME}, e.g. with "
                "scipy.io.loadmat: for each synset with ILSVRC2012_ID <= 1000 write 'WNID ID words'.)")
    return msg


def _parse_devkit(path: Path, images: list[Path]) -> tuple[dict[Path, int], list[str]]:
    ids: list[int] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                v = int(line)
            except ValueError:
                raise DatasetError(f"{path}:{lineno}: expected one ILSVRC2012_ID per line, got {line!r}") from None
            if not 1 <= v <= NUM_IMAGENET_CLASSES:
                raise DatasetError(f"{path}:{lineno}: ILSVRC2012_ID {v} outside 1..{NUM_IMAGENET_CLASSES}")
            if len(ids) != lineno - 1:
                raise DatasetError(f"{path}:{lineno}: blank line inside the file (line i must label "
                                   "ILSVRC2012_val_{i:08d})")
            ids.append(v)
    if not ids:
        raise DatasetError(f"{path} is empty")

    map_file = _find_file(path.parent, DEVKIT_MAP_NAME)
    if map_file is None and path.parent != images[0].parent:
        map_file = _find_file(images[0].parent, DEVKIT_MAP_NAME)
    if map_file is not None:
        mapping = load_devkit_mapping(map_file)
        unknown = sorted(set(ids) - set(mapping))
        if unknown:
            raise DatasetError(f"{path}: ILSVRC2012_IDs {unknown[:5]} are not in {map_file}")
    else:
        mapping = _derive_devkit_mapping(path, ids)

    entries: dict[Path, int] = {}
    present: set[int] = set()
    for p in images:
        m = _VAL_NAME_RE.match(p.stem)
        if not m:
            continue
        i = int(m.group(1))
        if 1 <= i <= len(ids):
            entries[p] = mapping[ids[i - 1]]
            present.add(i)
    missing = [f"ILSVRC2012_val_{i:08d}" for i in range(1, len(ids) + 1) if i not in present]
    return entries, missing


def _derive_devkit_mapping(path: Path, ids: list[int]) -> dict[int, int]:
    """ILSVRC2012_ID -> sorted index, by joining the file with the shipped per-image val labels."""
    val = imagenet_val_labels()
    n = min(len(ids), NUM_IMAGENET_VAL)
    mapping: dict[int, int] = {}
    for i in range(n):
        lab = int(val[i])
        prev = mapping.setdefault(ids[i], lab)
        if prev != lab:
            raise DatasetError(_devkit_missing_mapping_message(
                path, f"line {i + 1} (ILSVRC2012_ID {ids[i]}) disagrees with the official ILSVRC2012 validation "
                      "labels at an earlier line, so the file is not the ILSVRC2012 devkit ground truth and the "
                      "ID mapping cannot be derived from it"))
    inverse: dict[int, int] = {}
    for dev_id, lab in mapping.items():
        if inverse.setdefault(lab, dev_id) != dev_id:
            raise DatasetError(_devkit_missing_mapping_message(
                path, f"two ILSVRC2012_IDs ({inverse[lab]}, {dev_id}) map to the same class, so the file is not "
                      "the ILSVRC2012 devkit ground truth"))
    extra = sorted(set(ids[n:]) - set(mapping))
    if extra:
        raise DatasetError(_devkit_missing_mapping_message(
            path, f"ILSVRC2012_IDs {extra[:5]} after line {NUM_IMAGENET_VAL} never occur in the first "
                  f"{NUM_IMAGENET_VAL} lines"))
    return mapping


# ----------------------------------------------------------------------------- original names

def _imagenet_val_filenames(root: Path, images: list[Path]) -> Dataset:
    val = imagenet_val_labels()
    samples: list[tuple[Path, int | None]] = []
    unlabelled: list[Path] = []
    for p in images:
        m = _VAL_NAME_RE.match(p.stem)
        i = int(m.group(1)) if m else 0
        if 1 <= i <= NUM_IMAGENET_VAL:
            samples.append((p, int(val[i - 1])))
        else:
            unlabelled.append(p)
    notes: list[str] = ["labels from the shipped ILSVRC2012 validation labels (original file names)"]
    ds = Dataset(root=root, layout="imagenet_val_filenames", samples=samples, classes=imagenet_synsets(),
                 class_names=imagenet_class_names(), label_space="imagenet1k", unlabelled_images=unlabelled,
                 notes=notes)
    if unlabelled:
        _warn(notes, f"{root}: {len(unlabelled)} images are not named ILSVRC2012_val_00000001..00050000 and have "
                     f"no label; they are ignored (e.g. {unlabelled[0].name})")
    return ds
