"""Any image a caller holds -> the model's input tensor, by the one set of decoding rules.

`Runtime.preprocess`, `Runtime.classify` and the public `Batcher` take encoded bytes (an upload), a path, a
PIL image or a uint8 array; bytes and paths go through `load_and_preprocess` exactly as the server's
uploads and `eval`'s files do (same formats allow-list, EXIF, alpha, truncation, pixel limit). A PIL image
or an array is already decoded: it gets the same EXIF orientation and pixel limit, and an unusual mode
(alpha, palette, CMYK, 16-bit...) is re-encoded losslessly and decoded by those same rules, so the answer
for an image never depends on how the caller happened to hold it.
"""
from __future__ import annotations

import io
import os
from typing import Sequence, Union

import numpy as np
from PIL import Image, ImageOps

from .preprocess import ImageDecodeError, PreprocessConfig, load_and_preprocess, plan_preprocess, preprocess

__all__ = ["MAX_IMAGE_PIXELS", "ImageInput", "preprocess_batch", "preprocess_input"]

# Decoded-size limit (decompression bombs): the server's default (`serve --max-image-pixels`) and the
# embedding API's.
MAX_IMAGE_PIXELS = 40_000_000

ImageInput = Union[bytes, bytearray, memoryview, str, os.PathLike, Image.Image, np.ndarray]

_EXIF_ORIENTATION = 0x0112


def preprocess_input(image: ImageInput, cfg: PreprocessConfig, out: np.ndarray | None = None, *,
                     max_pixels: int | None = MAX_IMAGE_PIXELS, name: str | None = None) -> np.ndarray:
    """One image -> float32 (C, H, W) for `cfg`. Encoded bytes, a path, a PIL image, or a uint8 array
    (H, W) / (H, W, 1|2|3|4) in RGB(A) order (OpenCV's BGR: reverse the last axis first). Undecodable
    input raises `ImageDecodeError` naming it; more than `max_pixels` pixels `ImageTooLargeError`."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return load_and_preprocess(image, cfg, out, name=name or "<bytes>", max_pixels=max_pixels)
    if isinstance(image, (str, os.PathLike)):
        return load_and_preprocess(image, cfg, out, name=name, max_pixels=max_pixels)
    if isinstance(image, np.ndarray):
        return _from_pil(_array_image(image, name or "<array>"), cfg, out, max_pixels, name or "<array>")
    if isinstance(image, Image.Image):
        return _from_pil(image, cfg, out, max_pixels, name or "<PIL image>")
    raise TypeError(f"an image is encoded bytes, a path, a PIL image or a uint8 array, got {type(image).__name__}")


def preprocess_batch(images: ImageInput | Sequence[ImageInput] | np.ndarray, cfg: PreprocessConfig, *,
                     max_pixels: int | None = MAX_IMAGE_PIXELS) -> np.ndarray:
    """(N, C, H, W) float32 from a float array (already preprocessed: returned as it is, (C, H, W) gets a
    batch axis), one image (see `preprocess_input`), or a sequence of images."""
    if isinstance(images, np.ndarray) and np.issubdtype(images.dtype, np.floating):
        return images[None] if images.ndim == 3 else images
    if isinstance(images, (bytes, bytearray, memoryview, str, os.PathLike, Image.Image, np.ndarray)):
        images = [images]
    items = list(images)
    if not items:
        raise ValueError("no images given")
    out = np.empty((len(items), *cfg.output_shape), np.float32)
    for i, item in enumerate(items):
        preprocess_input(item, cfg, out[i], max_pixels=max_pixels,
                         name=None if isinstance(item, (str, os.PathLike)) else f"<image {i}>")
    return out


def _array_image(arr: np.ndarray, name: str) -> Image.Image:
    if arr.dtype != np.uint8:
        raise ValueError(f"{name}: an image array must be uint8 (H, W[, C]) pixels, got {arr.dtype} "
                         f"{arr.shape} (a float array is an already preprocessed batch: pass it to infer)")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (2, 3, 4)) or 0 in arr.shape:
        raise ValueError(f"{name}: an image array is (H, W) or (H, W, 1|2|3|4) uint8, got shape {arr.shape}")
    mode = "L" if arr.ndim == 2 else {2: "LA", 3: "RGB", 4: "RGBA"}[arr.shape[2]]
    return Image.fromarray(np.ascontiguousarray(arr), mode)


def _from_pil(img: Image.Image, cfg: PreprocessConfig, out: np.ndarray | None, max_pixels: int | None,
              name: str) -> np.ndarray:
    plan_preprocess(img.size, img.mode, cfg, name=name, max_pixels=max_pixels)  # bounded before load()
    try:
        img.load()  # a lazily opened file: decode it now (errors name the image)
        if cfg.exif_transpose and img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
            img = ImageOps.exif_transpose(img)
    except Exception as exc:
        raise ImageDecodeError(name, f"{type(exc).__name__}: {exc}") from None
    if img.mode in ("RGB", "L"):
        try:
            return preprocess(img, cfg, out, max_pixels=max_pixels, name=name)
        except ImageDecodeError:
            raise
        except Exception as exc:
            raise ImageDecodeError(name, f"preprocessing failed: {type(exc).__name__}: {exc}") from None
    # Alpha, palette, CMYK, 16-bit, float...: the decoder's mode rules, through a lossless re-encoding
    # (a mode no lossless format stores, such as PA, goes through RGBA, as the decoder converts it)
    for fmt, im in (("PNG", img), ("TIFF", img), ("PNG", None)):
        buf = io.BytesIO()
        try:
            (im or img.convert("RGBA")).save(buf, fmt)
        except Exception:
            continue
        return load_and_preprocess(buf.getvalue(), cfg, out, name=name, max_pixels=max_pixels)
    raise ImageDecodeError(name, f"unsupported image mode {img.mode!r}")
