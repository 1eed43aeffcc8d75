"""Rebuild ``calibration/sample/`` from images shipped inside scikit-image and scikit-learn.

    pip install scikit-image scikit-learn   # versions used: scikit-image 0.26.0, scikit-learn 1.9.1
    python calibration/make_sample.py       # writes calibration/sample/*.jpg and prints a table

Every output is a crop (or the full frame) of one source image, resized with Pillow's LANCZOS filter
so that its shorter side is 256 px (never upscaled), and written as a baseline JPEG (quality 90,
4:2:0, optimised Huffman tables, no EXIF/ICC metadata). The output is deterministic for a given
Pillow / libjpeg-turbo build; another build may produce slightly different bytes (same pixels up
to JPEG rounding). See calibration/README.md for the source and licence of every image.

Only images whose licence is stated as CC0 / public domain (scikit-image docstrings) or CC BY 2.0
(scikit-learn's datasets/images/README.txt) are used.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

from PIL import Image

SHORT_SIDE = 256
JPEG_QUALITY = 90

# (output name, source package, source file, crop box (left, top, right, bottom) or None for the full frame)
SPEC: list[tuple[str, str, str, tuple[int, int, int, int] | None]] = [
    # --- colour -----------------------------------------------------------------------------
    ("astronaut.jpg", "skimage", "astronaut.png", None),
    ("astronaut_portrait.jpg", "skimage", "astronaut.png", (80, 0, 400, 320)),
    ("astronaut_helmet.jpg", "skimage", "astronaut.png", (256, 256, 512, 512)),
    ("cat_chelsea.jpg", "skimage", "chelsea.png", None),
    ("cat_chelsea_face.jpg", "skimage", "chelsea.png", (60, 0, 360, 300)),
    ("coffee_cup.jpg", "skimage", "coffee.png", None),
    ("coffee_cup_closeup.jpg", "skimage", "coffee.png", (120, 0, 420, 300)),
    ("rocket_launch.jpg", "skimage", "rocket.jpg", None),
    ("rocket_launch_portrait.jpg", "skimage", "rocket.jpg", (170, 0, 426, 427)),
    ("hubble_deep_field.jpg", "skimage", "hubble_deep_field.jpg", None),
    ("hubble_deep_field_detail.jpg", "skimage", "hubble_deep_field.jpg", (0, 0, 400, 400)),
    ("retina_fundus.jpg", "skimage", "retina.jpg", None),
    ("retina_optic_disc.jpg", "skimage", "retina.jpg", (50, 380, 550, 880)),
    ("china_summer_palace.jpg", "sklearn", "china.jpg", None),
    ("china_pagoda_portrait.jpg", "sklearn", "china.jpg", (40, 0, 360, 427)),
    ("flower_dahlia.jpg", "sklearn", "flower.jpg", None),
    ("flower_dahlia_closeup.jpg", "sklearn", "flower.jpg", (126, 40, 426, 340)),
    # --- grayscale (stored as 8-bit single-channel JPEG) ------------------------------------
    ("cameraman_gray.jpg", "skimage", "camera.png", None),
    ("cameraman_tripod_gray_portrait.jpg", "skimage", "camera.png", (200, 0, 456, 512)),
    ("clock_motion_blur_gray.jpg", "skimage", "clock_motion.png", None),
    ("brick_wall_gray.jpg", "skimage", "brick.png", None),
    ("grass_gray.jpg", "skimage", "grass.png", None),
    ("gravel_gray.jpg", "skimage", "gravel.png", None),
    ("handwriting_gray.jpg", "skimage", "text.png", None),
]


def source_dirs() -> dict[str, pathlib.Path]:
    try:
        import skimage.data
        import sklearn.datasets
    except ImportError as exc:  # pragma: no cover - tooling script
        sys.exit(f"make_sample.py needs scikit-image and scikit-learn installed: {exc}")
    return {
        "skimage": pathlib.Path(skimage.data.__file__).parent,
        "sklearn": pathlib.Path(sklearn.datasets.__file__).parent / "images",
    }


def make_one(src: pathlib.Path, box: tuple[int, int, int, int] | None) -> Image.Image:
    with Image.open(src) as im:
        im.load()
        if im.mode not in ("RGB", "L"):
            im = im.convert("RGB")
        if box is not None:
            im = im.crop(box)
        w, h = im.size
        short = min(w, h)
        if short > SHORT_SIDE:
            scale = SHORT_SIDE / short
            size = (SHORT_SIDE, round(h * scale)) if w <= h else (round(w * scale), SHORT_SIDE)
            im = im.resize(size, Image.Resampling.LANCZOS)
        return im.copy()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).resolve().parent / "sample")
    args = ap.parse_args(argv)
    dirs = source_dirs()
    args.out.mkdir(parents=True, exist_ok=True)
    total = 0
    for name, pkg, fname, box in SPEC:
        src = dirs[pkg] / fname
        if not src.is_file():
            sys.exit(f"missing source image {src} (is {pkg} fully installed?)")
        im = make_one(src, box)
        dst = args.out / name
        im.save(dst, "JPEG", quality=JPEG_QUALITY, optimize=True, subsampling="4:2:0")
        size = dst.stat().st_size
        total += size
        print(f"{name:40s} {im.mode:3s} {im.size[0]:4d}x{im.size[1]:<4d} {size / 1024:6.1f} KiB  <- {pkg}:{fname} {box or 'full'}")
    print(f"{len(SPEC)} images, {total / 1024:.1f} KiB total in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
