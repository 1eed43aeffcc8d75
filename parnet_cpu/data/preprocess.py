"""Image decoding and ImageNet-style evaluation preprocessing (numpy + Pillow only, no torch).

Evaluation transform (the ParNet authors' / timm / torchvision ImageNet protocol):

1. decode to RGB (see :func:`load_image` for how unusual files are handled);
2. resize so the *shorter* side is ``floor(input_size / crop_pct)`` (256 for 224 / 0.875),
   keeping the aspect ratio; the longer side is ``int(R * long / short)`` (truncated), exactly as
   ``torchvision.transforms.Resize(int)`` computes it; Pillow filter ``interpolation`` (bicubic);
3. centre-crop ``input_size`` x ``input_size`` (offsets ``round((dim - S) / 2)`` like torchvision);
4. scale to [0, 1], normalise with ``mean`` / ``std``, return float32 ``(C, H, W)``.

Steps 2-3 run in Pillow on the decoded image (the same code path torchvision uses for PIL images),
so outputs match a torchvision ``Resize/CenterCrop/ToTensor/Normalize`` pipeline up to float32
rounding of the normalisation (< 1e-6).
"""
from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, BinaryIO, Mapping, Sequence, Union

import numpy as np
from PIL import Image, ImageFile, ImageOps

__all__ = [
    "IMAGE_FORMATS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INTERPOLATIONS",
    "ImageDecodeError",
    "ImageTooLargeError",
    "PreprocessConfig",
    "PreprocessPlan",
    "decode_limit",
    "decode_image",
    "load_image",
    "load_and_preprocess",
    "max_plan_bytes",
    "plan_image",
    "plan_preprocess",
    "preprocess",
    "resize_shorter_side",
    "center_crop",
]

# The one allow-list of image formats, for calibration, evaluation and the server alike, checked on the
# decoded content (never the file name): Pillow tries only these decoders, so e.g. EPS/PostScript content
# in a ".png" never reaches Ghostscript. JPEG includes camera MPO files; GIF and multi-frame TIFF/WebP
# give their first frame.
IMAGE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "BMP", "WEBP", "TIFF", "GIF")

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

INTERPOLATIONS: dict[str, Image.Resampling] = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


class ImageDecodeError(Exception):
    """A file could not be decoded into an image (corrupt, truncated, empty, not an image...)."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot decode image {self.path}: {reason}")

    def __reduce__(self):  # keep picklable (used across process pools by callers)
        return (type(self), (self.path, self.reason))


class ImageTooLargeError(ImageDecodeError):
    """An image larger than the caller's pixel limit, or than Pillow's decompression-bomb limit
    (the server answers it with HTTP 413)."""


@dataclass(frozen=True)
class PreprocessConfig:
    """Evaluation preprocessing parameters.

    ``mean``/``std`` need ``channels`` values, or a single value (broadcast). For ``channels=1``
    with the 3-value RGB defaults, the averages (0.449, 0.226) are used. Grayscale conversion for
    ``channels=1`` uses Pillow's ITU-R 601-2 luma (``convert("L")``).

    ``exif_transpose``: apply the EXIF orientation tag (what a viewer shows). torchvision's
    ``ImageFolder`` loader does *not* do this; set False to reproduce it bit-for-bit on the rare
    ImageNet files that carry an orientation tag.

    ``alpha_background``: images with transparency are composited onto this RGB colour (white by
    default, what browsers/viewers show); ``None`` drops the alpha channel like torchvision's
    ``convert("RGB")`` (colour under fully transparent pixels is then whatever the file stores,
    often black).

    ``reducing_gap``: passed to ``PIL.Image.resize``; ``None`` (default) = exact filtering, a value
    such as 3.0 speeds up large downscales at a small accuracy cost.
    """

    input_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    channels: int = 3
    exif_transpose: bool = True
    alpha_background: tuple[int, int, int] | None = (255, 255, 255)
    reducing_gap: float | None = None

    # derived, precomputed once (not part of equality / repr)
    scale: np.ndarray = field(init=False, repr=False, compare=False, hash=False)
    offset: np.ndarray = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        for name in ("input_size", "crop_pct"):  # NaN, inf, None or a string: a ValueError, never a crash later
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                    or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if int(self.input_size) != self.input_size or self.input_size < 1:
            raise ValueError(f"input_size must be a positive integer, got {self.input_size!r}")
        set_(self, "input_size", int(self.input_size))
        if not (0.0 < float(self.crop_pct) <= 1.0):
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct!r}")
        set_(self, "crop_pct", float(self.crop_pct))
        interp = str(self.interpolation).lower()
        if interp not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {self.interpolation!r}")
        set_(self, "interpolation", interp)
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels!r}")
        mean = _per_channel(self.mean, self.channels, "mean")
        std = _per_channel(self.std, self.channels, "std")
        if not all(math.isfinite(m) and 0.0 <= m <= 1.0 for m in mean):  # a mean of 0-1 pixel values lies in [0, 1]
            raise ValueError(f"mean values must be finite and in [0, 1] (pixel means on the 0-1 scale), got {mean}")
        if not all(math.isfinite(s) and s > 0 for s in std):
            raise ValueError(f"std values must be finite and > 0, got {std}")
        set_(self, "mean", mean)
        set_(self, "std", std)
        if self.alpha_background is not None:
            bg = tuple(int(v) for v in self.alpha_background)
            if len(bg) != 3 or any(not 0 <= v <= 255 for v in bg):
                raise ValueError(f"alpha_background must be an (R, G, B) tuple of 0..255 or None, got {self.alpha_background!r}")
            set_(self, "alpha_background", bg)
        m = np.asarray(mean, dtype=np.float64).reshape(-1, 1, 1)
        s = np.asarray(std, dtype=np.float64).reshape(-1, 1, 1)
        # out = (x / 255 - mean) / std = x * scale + offset
        scale = (1.0 / (255.0 * s)).astype(np.float32)
        offset = (-m / s).astype(np.float32)
        scale.setflags(write=False)
        offset.setflags(write=False)
        set_(self, "scale", scale)
        set_(self, "offset", offset)

    @property
    def resize_size(self) -> int:
        """Shorter-side length before the centre crop: ``floor(input_size / crop_pct)``."""
        return int(math.floor(self.input_size / self.crop_pct))

    @property
    def resample(self) -> Image.Resampling:
        return INTERPOLATIONS[self.interpolation]

    @property
    def output_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.input_size, self.input_size)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            if not f.init:
                continue
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PreprocessConfig":
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown PreprocessConfig keys: {unknown} (known: {sorted(known)})")
        kw = dict(d)
        for k in ("mean", "std", "alpha_background"):
            if kw.get(k) is not None:
                kw[k] = tuple(kw[k])
        return cls(**kw)


def _per_channel(values: Sequence[float] | float, channels: int, name: str) -> tuple[float, ...]:
    vals = (float(values),) if isinstance(values, (int, float)) else tuple(float(v) for v in values)
    if len(vals) == channels:
        return vals
    if len(vals) == 1:
        return vals * channels
    if channels == 1 and len(vals) == 3:
        return (sum(vals) / 3.0,)
    raise ValueError(f"{name} must have {channels} value(s) (or 1), got {len(vals)}: {vals}")


# --------------------------------------------------------------------------------------------
# the bounded-preprocessing plan
# --------------------------------------------------------------------------------------------

# Extra bytes per pixel that `_to_rgb_or_l` holds while turning a decoded mode into RGB/L (numpy copies,
# converted images, alpha band, composite); other modes (CMYK, YCbCr, ...) take one RGB conversion (4).
_CONVERT_BYTES: dict[str, int] = {"RGB": 0, "L": 0, "1": 1, "I": 13, "F": 9, "P": 13, "PA": 13,
                                  "RGBA": 9, "LA": 9, "RGBa": 13, "La": 13}
# Decoder working memory per pixel beyond the image buffer: a progressive JPEG keeps every DCT coefficient
# (2 bytes per sample, 3 samples).
_DECODER_BYTES: dict[str, int] = {"JPEG": 6}
_GREY_MODES = ("1", "L", "I", "F")


def _pixel_bytes(mode: str) -> int:
    """Bytes Pillow stores per pixel: 1 for L/P/1, 2 for 16-bit, 4 for everything else (RGB is padded)."""
    if mode in ("1", "L", "P"):
        return 1
    return 2 if mode.startswith("I;16") else 4


def decode_limit(max_pixels: int | None) -> int:
    """The pixel limit every buffer of a decode is held to: the caller's ``max_pixels`` (``serve
    --max-image-pixels``), else Pillow's own decompression-bomb limit (``2 * Image.MAX_IMAGE_PIXELS``, what
    ``Image.open`` refuses), else 40 M. One knob for the decoded image, each intermediate and so the aspect
    ratio. No bound scales with a config value: a small ``crop_pct`` (a huge resize size) or a large
    ``input_size`` makes its intermediates refused, never larger."""
    if max_pixels is not None:
        return int(max_pixels)
    pillow = Image.MAX_IMAGE_PIXELS
    return 2 * int(pillow) if pillow else 40_000_000


@dataclass(frozen=True)
class PreprocessPlan:
    """What decoding and preprocessing one image will allocate, worked out from its header: each step as
    ``(step, width, height, bytes)``. Every buffer is at most ``limit`` pixels (else no plan exists)."""

    name: str
    size: tuple[int, int]
    mode: str
    limit: int
    steps: tuple[tuple[str, int, int, int], ...]

    @property
    def bytes(self) -> int:
        """Upper estimate of the memory the decode holds at its peak (every step's buffer summed)."""
        return sum(step[3] for step in self.steps)


def _ratio(x: float) -> str:
    return f"{x:.1f}".removesuffix(".0")


def _resized_size(w: int, h: int, size: int, limit: int, name: str) -> tuple[int, int]:
    """The shorter-side resize's output size (torchvision ``Resize(int)`` rule), refused over the pixel
    ``limit``: it grows with the aspect ratio (a 40000x1 image resized to 256 becomes 10240000x256) and with
    the resize size (``input_size / crop_pct``), so this bounds both."""
    rw, rh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    if rw * rh > limit:
        most = (f"aspect ratio at most {_ratio(limit / (size * size))}:1 at this resize size"
                if size * size <= limit else f"even a square image's {size}x{size} resize is over the limit: "
                                               f"the model's preprocessing needs at least {size * size} pixels")
        raise ImageTooLargeError(
            name, f"resize: the shorter-side resize of a {w}x{h} image (aspect ratio "
                  f"{_ratio(max(w, h) / min(w, h))}:1) to {size} px would make a {rw}x{rh} intermediate of "
                  f"{rw * rh} pixels, more than the limit of {limit} ({most})")
    return rw, rh


def plan_preprocess(size: tuple[int, int], mode: str, cfg: PreprocessConfig | None = None, *,
                    name: str = "<bytes>", max_pixels: int | None = None, fmt: str | None = None,
                    exif_transpose: bool = True, decoded: bool = False) -> PreprocessPlan:
    """The bounded plan for an image of ``size`` (w, h) and Pillow ``mode`` (both from its header, before
    any pixel is decoded): the decoded image, the mode conversion, and with ``cfg`` the shorter-side resize
    (whose output grows with the aspect ratio: a 40000x1 image becomes 10240000x256), the crop and the
    output. Any buffer over :func:`decode_limit` raises :class:`ImageTooLargeError` naming the step and the
    numbers. ``decoded=True``: the image is already in memory (only the preprocessing steps are planned)."""
    w, h = int(size[0]), int(size[1])
    limit = decode_limit(max_pixels)
    if w < 1 or h < 1:
        raise ImageDecodeError(name, f"image of {w}x{h} pixels has no pixels")
    n = w * h
    if n > limit:
        raise ImageTooLargeError(name, f"decode: image of {w}x{h} pixels is larger than the limit of {limit} "
                                       f"({n} pixels)")
    steps: list[tuple[str, int, int, int]] = []
    out_bpp = 1 if mode in _GREY_MODES or mode.startswith("I;16") else 4
    if not decoded:
        pb = _pixel_bytes(mode)
        conv = 7 if mode.startswith("I;16") else _CONVERT_BYTES.get(mode, 4)
        steps.append(("decode", w, h, n * (pb + _DECODER_BYTES.get(fmt or "", 0))))
        if exif_transpose:
            steps.append(("exif orientation", w, h, n * pb))
        if conv:
            steps.append((f"convert {mode}", w, h, n * conv))
    elif mode not in ("RGB", "L"):
        out_bpp = 4
        steps.append((f"convert {mode}", w, h, n * 4))
    if cfg is None:
        return PreprocessPlan(name, (w, h), mode, limit, tuple(steps))
    if cfg.channels == 1:
        if out_bpp != 1:
            steps.append(("convert L", w, h, n))
        out_bpp = 1
    rw, rh = _resized_size(w, h, cfg.resize_size, limit, name)
    if (rw, rh) != (w, h):
        steps.append(("resize (first pass)", rw, h, rw * h * out_bpp))
        steps.append(("resize", rw, rh, rw * rh * out_bpp))
    s = cfg.input_size
    steps.append(("crop", s, s, s * s * (out_bpp + cfg.channels + 4 * cfg.channels)))
    for step, sw, sh, _ in steps:  # every buffer, whatever the config: the one bound of the plan
        if sw * sh > limit:
            raise ImageTooLargeError(name, f"{step}: a {sw}x{sh} buffer of {sw * sh} pixels for a {w}x{h} image "
                                           f"is more than the limit of {limit}")
    return PreprocessPlan(name, (w, h), mode, limit, tuple(steps))


def max_plan_bytes(cfg: PreprocessConfig | None = None, max_pixels: int | None = None) -> int:
    """The largest :attr:`PreprocessPlan.bytes` of any image the limits allow (a square image at the pixel
    limit in the costliest mode, or the thinnest image the resize allows): what one decode may hold.
    Raises :class:`ImageTooLargeError` when no image at all fits (the config's resize of a square image is
    over the limit): a server would refuse every upload, so it says so at start."""
    limit = decode_limit(max_pixels)
    side = math.isqrt(limit)
    shapes = [(side, side)]
    if cfg is not None:
        r = cfg.resize_size
        if r * r > limit:
            raise ImageTooLargeError("of any size", f"resize: this preprocessing resizes every image to at least "
                                     f"{r}x{r} = {r * r} pixels (input_size {cfg.input_size} / crop_pct "
                                     f"{cfg.crop_pct}), more than the limit of {limit}: no image fits")
        shapes.append((1, limit // (r * r)))
    return max(plan_preprocess(shape, mode, cfg, max_pixels=limit, fmt=fmt).bytes
               for shape in shapes for mode in (*_CONVERT_BYTES, "I;16", "CMYK") for fmt in (None, *_DECODER_BYTES))


# --------------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------------

def _refuse_truncated_loading(name: str) -> None:
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise ImageDecodeError(
            name, "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process; truncated images would be "
            "silently accepted. Reset it to False before loading evaluation/calibration data.")


ImageSource = Union[bytes, bytearray, memoryview, BinaryIO]


def decode_image(
    source: ImageSource,
    *,
    name: str = "<bytes>",
    max_pixels: int | None = None,
    exif_transpose: bool = True,
    alpha_background: tuple[int, int, int] | None = (255, 255, 255),
    cfg: PreprocessConfig | None = None,
) -> Image.Image:
    """Decode image bytes (or a binary file object) fully into an ``"RGB"`` or ``"L"`` image: the one set of
    decoding rules for files (:func:`load_image`), calibration/evaluation data and the server's uploads.

    Handling (documented decisions):

    * EXIF orientation is applied (``ImageOps.exif_transpose``) unless ``exif_transpose=False``;
      a broken EXIF block is ignored (image kept as stored) rather than rejecting the file.
    * CMYK (incl. Adobe inverted CMYK JPEGs) -> RGB with Pillow's conversion; embedded ICC
      profiles are ignored (as torchvision does).
    * ``L``/``1`` (grayscale / bilevel) -> ``"L"``; the caller replicates it to 3 channels.
    * 16-bit grayscale (``I;16*``, and ``I``, assumed to hold 16-bit data) -> ``"L"`` scaled
      by 255/65535 with rounding (Pillow's own ``convert`` would clip at 255). 16-bit RGB PNGs are
      reduced to 8 bits by Pillow's decoder. ``F`` (float) is assumed to be in [0, 1].
    * Palette images -> RGB (via RGBA when the palette has transparency).
    * Alpha (``RGBA``/``LA``/``PA``/palette transparency) is composited onto ``alpha_background``
      (white); ``alpha_background=None`` drops alpha instead (torchvision behaviour).
    * Only the formats of :data:`IMAGE_FORMATS`, recognised by content; any other file (PPM, ICO, EPS,
      ... whatever its extension) is refused with the list of accepted formats.
    * Multi-frame files (GIF, TIFF, WebP, ...): first frame.
    * Before any pixel is decoded, :func:`plan_preprocess` bounds the work from the header: an image of
      more than ``max_pixels`` pixels (default: Pillow's decompression-bomb limit), or, given the ``cfg``
      it will be preprocessed with, one whose resize intermediate would exceed it (extreme aspect ratio),
      raises :class:`ImageTooLargeError`; so does one Pillow refuses as a decompression bomb.
    * Truncated or corrupt data raise :class:`ImageDecodeError` (``name`` is the path it names).
      ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is never set by this package; if some other code set it to
      True, truncated JPEGs would decode with a grey lower part, so this function refuses to run then.
    * Empty data and non-images raise :class:`ImageDecodeError`.
    """
    _refuse_truncated_loading(name)
    img, _ = _open_planned(source, name, cfg, max_pixels, exif_transpose)
    try:
        img.load()
    except Exception as exc:
        raise _decode_error(name, exc) from None
    if exif_transpose:
        try:
            ImageOps.exif_transpose(img, in_place=True)
        except Exception:
            pass  # unreadable EXIF: keep the stored orientation
    try:
        return _to_rgb_or_l(img, alpha_background)
    except ImageDecodeError:
        raise
    except Exception as exc:
        raise ImageDecodeError(name, f"unsupported image mode {img.mode!r}: {_reason(exc)}") from None


def plan_image(source: ImageSource, cfg: PreprocessConfig | None = None, *, name: str = "<bytes>",
               max_pixels: int | None = None) -> PreprocessPlan:
    """The bounded plan (:func:`plan_preprocess`) of encoded image data from its header alone, nothing
    decoded, with :func:`decode_image`'s refusals: lets a caller reserve the memory a decode will need
    before it starts (the server's decode budget)."""
    exif = cfg.exif_transpose if cfg is not None else True
    img, plan = _open_planned(source, name, cfg, max_pixels, exif)
    img.close()
    return plan


def _open_planned(source: ImageSource, name: str, cfg: PreprocessConfig | None, max_pixels: int | None,
                  exif_transpose: bool) -> tuple[Image.Image, PreprocessPlan]:
    """Open ``source`` (the header only: allowed formats, by content) and plan its decode and preprocessing
    before any pixel is decoded; the one place uploads and files are refused for size."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if not len(source):
            raise ImageDecodeError(name, "empty file (0 bytes)")
        source = io.BytesIO(source)
    try:
        img = Image.open(source, formats=IMAGE_FORMATS)
        return img, plan_preprocess(img.size, img.mode, cfg, name=name, max_pixels=max_pixels, fmt=img.format,
                                    exif_transpose=exif_transpose)
    except Exception as exc:
        raise _decode_error(name, exc) from None


def _decode_error(name: str, exc: Exception) -> ImageDecodeError:
    """What Pillow raised while opening or decoding, as this package's error (the plan's pass through)."""
    if isinstance(exc, ImageDecodeError):  # the plan's refusals (ImageTooLargeError among them)
        return exc
    if isinstance(exc, Image.DecompressionBombError):
        return ImageTooLargeError(name, f"image too large: {exc}")
    return ImageDecodeError(name, _reason(exc))  # PIL raises OSError, SyntaxError, ValueError, struct.error...


def load_image(
    path: str | os.PathLike[str],
    *,
    exif_transpose: bool = True,
    alpha_background: tuple[int, int, int] | None = (255, 255, 255),
    max_pixels: int | None = None,
    cfg: PreprocessConfig | None = None,
) -> Image.Image:
    """Decode the file at ``path`` fully and return an ``"RGB"`` or ``"L"`` (grayscale source) image, by
    the rules (and the bounded plan) of :func:`decode_image`; missing and empty files raise
    :class:`ImageDecodeError`."""
    p = os.fspath(path)
    _refuse_truncated_loading(p)
    try:
        size = os.stat(p).st_size
    except FileNotFoundError:
        raise ImageDecodeError(p, "file not found") from None
    except OSError as exc:
        raise ImageDecodeError(p, f"cannot stat file: {exc}") from None
    if size == 0:
        raise ImageDecodeError(p, "empty file (0 bytes)")
    try:
        fh = open(p, "rb")
    except OSError as exc:
        raise ImageDecodeError(p, _reason(exc)) from None
    with fh:
        return decode_image(fh, name=p, max_pixels=max_pixels, exif_transpose=exif_transpose,
                            alpha_background=alpha_background, cfg=cfg)


def _reason(exc: BaseException) -> str:
    msg = str(exc).strip()
    name = type(exc).__name__
    if name == "UnidentifiedImageError":
        return f"not a recognised image file (accepted formats: {', '.join(IMAGE_FORMATS)})"
    text = f"{name}: {msg}" if msg else name
    if "truncated" in msg or "broken data stream" in msg or "premature end" in msg.lower():
        return f"truncated or corrupt image data ({text})"
    return text


def _to_rgb_or_l(img: Image.Image, background: tuple[int, int, int] | None) -> Image.Image:
    mode = img.mode
    if mode in ("RGB", "L"):
        return img
    if mode == "1":
        return img.convert("L")
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img)
        if arr.dtype.kind == "i":  # mode I: 32-bit signed
            arr = np.clip(arr, 0, 65535)
        wide = arr.astype(np.uint32)  # (v * 255 + 32767) // 65535 <= 16744192: exact in uint32, in place
        wide *= 255
        wide += 32767
        wide //= 65535
        return Image.fromarray(wide.astype(np.uint8), "L")
    if mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float32))  # a writable copy
        np.clip(arr, 0.0, 1.0, out=arr)
        arr *= np.float32(255.0)
        np.rint(arr, out=arr)
        return Image.fromarray(arr.astype(np.uint8), "L")
    if mode == "P":
        if "transparency" in img.info:
            img = img.convert("RGBA")
            mode = "RGBA"
        else:
            return img.convert("RGB")
    if mode == "PA":
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "RGBa", "LA", "La"):
        base = "L" if mode in ("LA", "La") else "RGB"
        if mode in ("RGBa", "La"):  # premultiplied: un-premultiply first
            img = img.convert("RGBA" if base == "RGB" else "LA")
        if background is None:
            return img.convert(base)
        alpha = img.getchannel("A")
        if base == "L" and len(set(background)) != 1:
            base = "RGB"  # coloured background: result is no longer grey
        fill = background if base == "RGB" else background[0]
        out = Image.new(base, img.size, fill)
        out.paste(img.convert(base), (0, 0), alpha)
        return out
    # CMYK, YCbCr, RGBX, LAB, HSV, I;16 variants handled above; Pillow raises for impossible ones
    return img.convert("RGB")


# --------------------------------------------------------------------------------------------
# geometric transform + normalisation
# --------------------------------------------------------------------------------------------

def resize_shorter_side(
    img: Image.Image, size: int, resample: Image.Resampling = Image.Resampling.BICUBIC,
    reducing_gap: float | None = None, *, max_pixels: int | None = None, name: str = "<PIL image>",
) -> Image.Image:
    """Resize so the shorter side is ``size`` (torchvision ``Resize(int)`` size rule); an output over
    ``max_pixels`` (:func:`decode_limit`) raises :class:`ImageTooLargeError` before it is allocated."""
    w, h = img.size
    new_w, new_h = _resized_size(w, h, size, decode_limit(max_pixels), name)
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), resample, reducing_gap=reducing_gap)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Centre crop ``size`` x ``size`` with torchvision's offset rule (pads with 0 if smaller)."""
    w, h = img.size
    if w < size or h < size:  # torchvision pads with zeros before cropping
        padded = Image.new(img.mode, (max(w, size), max(h, size)), 0)
        padded.paste(img, ((max(w, size) - w) // 2, (max(h, size) - h) // 2))
        img, (w, h) = padded, padded.size
    if (w, h) == (size, size):
        return img
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def preprocess(img: Image.Image, cfg: PreprocessConfig | None = None, out: np.ndarray | None = None, *,
               max_pixels: int | None = None, name: str = "<PIL image>") -> np.ndarray:
    """Resize/crop/normalise a decoded image into a float32 ``(C, S, S)`` array.

    ``out`` may be a preallocated float32 array of shape ``cfg.output_shape`` (e.g. a batch slot). Before
    anything is converted or resized, :func:`plan_preprocess` holds every intermediate to
    ``max_pixels`` (:func:`decode_limit`): an extreme aspect ratio raises :class:`ImageTooLargeError`.
    """
    cfg = cfg or DEFAULT_CONFIG
    plan_preprocess(img.size, img.mode, cfg, name=name, max_pixels=max_pixels, decoded=True)
    if cfg.channels == 1:
        if img.mode != "L":
            img = img.convert("L")
    elif img.mode not in ("RGB", "L"):
        img = img.convert("RGB")  # L stays L (cheaper resize) and is replicated below: exact
    img = resize_shorter_side(img, cfg.resize_size, cfg.resample, cfg.reducing_gap, max_pixels=max_pixels,
                              name=name)
    img = center_crop(img, cfg.input_size)
    arr = np.asarray(img, dtype=np.uint8)
    src = arr[None, :, :] if arr.ndim == 2 else arr.transpose(2, 0, 1)  # (1|3, S, S) view
    if out is None:
        out = np.empty(cfg.output_shape, dtype=np.float32)
    elif out.shape != cfg.output_shape or out.dtype != np.float32:
        raise ValueError(f"out must be float32 {cfg.output_shape}, got {out.dtype} {out.shape}")
    np.multiply(src, cfg.scale, out=out, casting="unsafe")  # broadcasts L over 3 channels
    out += cfg.offset
    return out


def load_and_preprocess(source: str | os.PathLike[str] | ImageSource, cfg: PreprocessConfig | None = None,
                        out: np.ndarray | None = None, *, name: str | None = None,
                        max_pixels: int | None = None) -> np.ndarray:
    """``preprocess(load_image(path))`` (or of :func:`decode_image` for bytes or a binary file object, named
    ``name`` in errors) honouring the config's EXIF / alpha options. The whole decode and preprocessing is
    planned from the header first (:func:`plan_preprocess`): a refusal allocates nothing."""
    cfg = cfg or DEFAULT_CONFIG
    if isinstance(source, (str, os.PathLike)):
        name = name or os.fspath(source)
        img = load_image(source, exif_transpose=cfg.exif_transpose, alpha_background=cfg.alpha_background,
                         max_pixels=max_pixels, cfg=cfg)
    else:
        name = name or "<bytes>"
        img = decode_image(source, name=name, max_pixels=max_pixels, exif_transpose=cfg.exif_transpose,
                           alpha_background=cfg.alpha_background, cfg=cfg)
    try:
        return preprocess(img, cfg, out, max_pixels=max_pixels, name=name)
    except ImageDecodeError:
        raise
    except Exception as exc:  # e.g. a 0-pixel-wide image that Pillow decoded
        raise ImageDecodeError(name, f"preprocessing failed: {_reason(exc)}") from None


DEFAULT_CONFIG = PreprocessConfig()
