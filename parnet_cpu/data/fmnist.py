"""Fashion-MNIST in one place (torch-free: numpy, Pillow when writing images): its facts (label order, the
folder names that sort in label order, normalisation statistics), the IDX reader and writer, where Debian
installs the files, and the image-folder writers (`write_image_folder`; `prepare_fmnist`, the calibration and
test folders of the demo and the quantization benchmarks). Read by the model registry (`parnet_fmnist`), the
trainer, `parnet-cpu dataset export-idx` and the benchmarks.

IDX layout: 2 zero bytes, a type byte (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
0x0E float64), a byte with the number of dimensions, then one big-endian uint32 per dimension, then
the data in C order, big-endian. Files may be gzip-compressed (``.gz``, detected by content).
"""
from __future__ import annotations

import gzip
import os
import shutil
import struct
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_FOLDERS",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "FMNIST_ENV",
    "DEBIAN_FMNIST_DIR",
    "IdxError",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "prepare_fmnist",
    "read_idx",
    "write_idx",
    "write_image_folder",
]

# Fashion-MNIST, label order of the dataset (0..9)
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# ImageFolder names that sort in label order (and are safe file names)
FASHION_MNIST_FOLDERS: tuple[str, ...] = (
    "0_tshirt-top", "1_trouser", "2_pullover", "3_dress", "4_coat",
    "5_sandal", "6_shirt", "7_sneaker", "8_bag", "9_ankle-boot",
)
# mean/std of the training images in [0, 1]
FASHION_MNIST_MEAN: tuple[float, ...] = (0.2860,)
FASHION_MNIST_STD: tuple[float, ...] = (0.3530,)

FMNIST_ENV = "PARNET_FMNIST_DIR"
DEBIAN_FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_CODES = {np.dtype(v).newbyteorder("=").str.lstrip("<>|="): k for k, v in _DTYPES.items()}


class IdxError(ValueError):
    """An IDX file is missing, corrupt or truncated; the message names the file."""


def _read_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            head = fh.read(2)
            fh.seek(0)
            if head == b"\x1f\x8b":
                try:
                    with gzip.GzipFile(fileobj=fh) as gz:
                        return gz.read()
                except (OSError, EOFError) as exc:
                    raise IdxError(f"{path}: corrupt gzip data ({type(exc).__name__}: {exc})") from None
            return fh.read()
    except FileNotFoundError:
        raise IdxError(f"IDX file not found: {path}") from None
    except IsADirectoryError:
        raise IdxError(f"{path} is a folder, not an IDX file") from None


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a native-endian numpy array.

    Raises :class:`IdxError` with the file name for a missing file, a bad magic number, an unknown
    type code, or a size that does not match the header (truncated or trailing data).
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise IdxError(f"{path}: too short for an IDX header ({len(data)} bytes)")
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or code not in _DTYPES:
        raise IdxError(f"{path}: not an IDX file (magic bytes {data[:4].hex()}; expected 0000 + type code "
                       f"{'/'.join(f'{c:02x}' for c in _DTYPES)} + number of dimensions)")
    if ndim == 0:
        raise IdxError(f"{path}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IdxError(f"{path}: truncated header (needs {header} bytes for {ndim} dimensions, file has {len(data)})")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_DTYPES[code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    got = len(data) - header
    if got != expected:
        what = "truncated" if got < expected else "has trailing data"
        raise IdxError(f"{path}: {what}: header says shape {tuple(dims)} ({expected} data bytes), "
                       f"file holds {got} data bytes")
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | os.PathLike[str], arr: np.ndarray, compress: bool | None = None) -> Path:
    """Write ``arr`` as an IDX file (gzip when ``compress`` or when the name ends in ``.gz``)."""
    path = Path(path)
    arr = np.ascontiguousarray(arr)
    key = arr.dtype.newbyteorder("=").str.lstrip("<>|=")
    if key not in _CODES:
        raise ValueError(f"dtype {arr.dtype} has no IDX type code")
    if arr.ndim == 0 or arr.ndim > 255:
        raise ValueError("IDX needs 1..255 dimensions")
    code = _CODES[key]
    payload = struct.pack(">HBB", 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    payload += arr.astype(np.dtype(_DTYPES[code]), copy=False).tobytes()
    if compress is None:
        compress = path.suffix == ".gz"
    if compress:
        payload = gzip.compress(payload, mtime=0)
    path.write_bytes(payload)
    return path


def _locate(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        p = folder / name
        if p.is_file():
            return p
    return None


def find_fashion_mnist(root: str | os.PathLike[str] | None = None) -> dict[str, Path]:
    """Paths of the four Fashion-MNIST IDX files: ``train_images``, ``train_labels``, ``test_images``,
    ``test_labels``.

    Searched in order: ``root`` (if given, and only there), ``$PARNET_FMNIST_DIR``, the Debian
    package's ``/usr/share/datasets/fashion-mnist``. Plain or ``.gz`` files are accepted.
    """
    if root is not None:
        candidates = [Path(root).expanduser()]
    else:
        candidates = []
        env = os.environ.get(FMNIST_ENV)
        if env:
            candidates.append(Path(env).expanduser())
        candidates.append(DEBIAN_FMNIST_DIR)
    tried = []
    for folder in candidates:
        found = {key: _locate(folder, stem) for key, stem in _FILES.items()}
        if all(found.values()):
            return found  # type: ignore[return-value]
        missing = [_FILES[k] for k, v in found.items() if v is None]
        tried.append(f"{folder} (missing {', '.join(missing)}{'' if folder.is_dir() else '; folder absent'})")
    raise FileNotFoundError(
        "Fashion-MNIST IDX files not found. Install them with `apt-get install dataset-fashion-mnist` "
        f"(Debian/Ubuntu, to {DEBIAN_FMNIST_DIR}), or point ${FMNIST_ENV} at a folder holding "
        f"{', '.join(s + '[.gz]' for s in _FILES.values())}. Looked in: " + "; ".join(tried))


def load_fashion_mnist(root: str | os.PathLike[str] | None = None) -> dict[str, np.ndarray]:
    """The four arrays: images uint8 (N, 28, 28), labels uint8 (N,), checked for consistency."""
    paths = find_fashion_mnist(root)
    out = {k: read_idx(p) for k, p in paths.items()}
    for split in ("train", "test"):
        im, lab = out[f"{split}_images"], out[f"{split}_labels"]
        if im.ndim != 3 or lab.ndim != 1 or len(im) != len(lab) or im.dtype != np.uint8:
            raise IdxError(f"Fashion-MNIST {split} files do not fit together: images {im.dtype}{im.shape}, "
                           f"labels {lab.dtype}{lab.shape}")
        if lab.size and int(lab.max()) >= len(FASHION_MNIST_CLASSES):
            raise IdxError(f"{paths[f'{split}_labels']}: label {int(lab.max())} outside 0..9")
    return out


def write_image_folder(images: np.ndarray, labels: np.ndarray | None, out: str | os.PathLike[str],
                       folders: Sequence[str], fmt: str = "png", progress: bool = False) -> list[int]:
    """Write uint8 images losslessly: class folders `out/<folder>/<index>.<fmt>` plus `classes.txt`
    (label order), or, with `labels=None`, one flat unlabelled folder. Returns images per class."""
    from PIL import Image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(len(images) - 1)))
    if labels is not None:
        for f in folders:
            (out / f).mkdir(exist_ok=True)
        (out / "classes.txt").write_text("\n".join(folders) + "\n", encoding="utf-8")
    it = range(len(images))
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="export", unit="img", leave=False)
    counts = [0] * len(folders)
    mode = "L" if images.ndim == 3 else "RGB"
    for i in it:
        name = f"{i:0{width}d}.{fmt}"
        if labels is None:
            dst = out / name
        else:
            lab = int(labels[i])
            counts[lab] += 1
            dst = out / folders[lab] / name
        Image.fromarray(images[i], mode).save(dst)
    return counts


def prepare_fmnist(folder: str | os.PathLike[str], calib_count: int = 300, test_limit: int | None = None,
                   log: Callable[[str], object] | None = None) -> tuple[Path, Path]:
    """The first `calib_count` training images (one flat folder, in dataset order) and the first `test_limit`
    labelled test images (class folders; None: all), written once under `folder` as `calib_<n>/` and
    `test_<n|all>/` and reused when complete. FileNotFoundError without the dataset (`find_fashion_mnist`)."""
    folder = Path(folder)
    data = load_fashion_mnist()
    n_calib = min(calib_count, len(data["train_images"]))
    n_test = len(data["test_images"]) if test_limit is None else min(test_limit, len(data["test_images"]))
    calib, test = folder / f"calib_{n_calib}", folder / f"test_{test_limit or 'all'}"
    if sum(1 for _ in calib.glob("*.png")) != n_calib:
        shutil.rmtree(calib, ignore_errors=True)
        write_image_folder(data["train_images"][:n_calib], None, calib, FASHION_MNIST_FOLDERS)
    if not (test / "classes.txt").is_file() or sum(1 for _ in test.rglob("*.png")) != n_test:
        shutil.rmtree(test, ignore_errors=True)
        write_image_folder(data["test_images"][:n_test], data["test_labels"][:n_test], test, FASHION_MNIST_FOLDERS)
    if log is not None:
        log(f"data: {n_calib} calibration images (training set) and {n_test} test images written under {folder}")
    return calib, test
