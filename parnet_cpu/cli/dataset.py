"""`parnet-cpu dataset export-idx`: IDX files (MNIST / Fashion-MNIST format) -> image folder.

The class-folder layout (``DIR/<i>_<name>/<index>.png`` plus ``DIR/classes.txt`` in label order) is
what `parnet-cpu eval` / `quantize` read; ``--flat`` writes unlabelled images for calibration.
Images are written losslessly (PNG or BMP) and unchanged (28x28); the model's own preprocessing
resizes them at evaluation time, exactly as `parnet-cpu train` did.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from parnet_cpu.cli.common import add_json_arg, check_output_arg, write_json_arg
from parnet_cpu.options import arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dataset", help="dataset utilities (export IDX files to an image folder)")
    dsub = p.add_subparsers(dest="dataset_command", required=True, metavar="ACTION")
    e = dsub.add_parser("export-idx", help="write IDX images (e.g. Fashion-MNIST) as an image folder",
                        description="Write the images of an IDX file as PNG files: class folders named "
                                    "'<label>_<class name>' (sorting in label order) with classes.txt, or "
                                    "with --flat one unlabelled folder (calibration).")
    src = e.add_argument_group("source (either --images/--labels or --fmnist)")
    src.add_argument("--images", help="IDX image file (.gz accepted), shape (N, H, W) or (N, H, W, 3)")
    src.add_argument("--labels", help="IDX label file (not needed with --flat)")
    src.add_argument("--fmnist", choices=("train", "test"),
                     help="take both files of this Fashion-MNIST split from the installed dataset")
    e.add_argument("--out", required=True, metavar="DIR", help="output folder (must be empty or absent)")
    e.add_argument("--limit", type=arg("limit"), metavar="N", help="only the first N images")
    e.add_argument("--format", choices=("png", "bmp"), default="png", help="lossless image format (default png)")
    e.add_argument("--flat", action="store_true", help="one flat folder without labels (for calibration)")
    e.add_argument("--class-names", metavar="FILE",
                   help="one class name per line, in label order (default: the Fashion-MNIST classes)")
    e.add_argument("--quiet", action="store_true")
    add_json_arg(e, "what was written (folder, images, class folders and their counts)")
    e.set_defaults(handler=run_export_idx)


def folder_names(class_names) -> list[str]:
    """'<i>_<slug>' with i zero-padded so that the names sort in label order."""
    width = len(str(max(len(class_names) - 1, 0)))
    out = []
    for i, name in enumerate(class_names):
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "class"
        out.append(f"{i:0{width}d}_{slug}")
    return out


def run_export_idx(args: argparse.Namespace) -> int:
    import numpy as np

    from parnet_cpu.cli import CliError
    from parnet_cpu.data.fmnist import (FASHION_MNIST_CLASSES, FASHION_MNIST_FOLDERS, IdxError, find_fashion_mnist,
                                         read_idx, write_image_folder)

    check_output_arg(args, "json", "dataset")
    if args.fmnist:
        if args.images or args.labels:
            raise CliError("give either --fmnist or --images/--labels, not both")
        try:
            paths = find_fashion_mnist()
        except FileNotFoundError as exc:
            raise CliError(str(exc)) from None
        images_path, labels_path = paths[f"{args.fmnist}_images"], paths[f"{args.fmnist}_labels"]
    else:
        if not args.images:
            raise CliError("--images (or --fmnist) is required")
        if not args.labels and not args.flat:
            raise CliError("--labels is required for the class-folder layout (or use --flat)")
        images_path, labels_path = args.images, args.labels

    try:
        images = read_idx(images_path)
        labels = None if args.flat else read_idx(labels_path)
    except IdxError as exc:
        raise CliError(str(exc)) from None
    if images.dtype != np.uint8 or not (images.ndim == 3 or (images.ndim == 4 and images.shape[3] in (1, 3))):
        raise CliError(f"{images_path}: expected uint8 images of shape (N, H, W) or (N, H, W, 3), "
                       f"got {images.dtype} {images.shape}")
    if images.ndim == 4 and images.shape[3] == 1:
        images = images[..., 0]
    if labels is not None:
        if labels.ndim != 1 or len(labels) != len(images):
            raise CliError(f"{labels_path}: {labels.shape} labels for {len(images)} images")
        if labels.size and (int(labels.min()) < 0):
            raise CliError(f"{labels_path}: negative labels")
    n = len(images) if args.limit is None else min(args.limit, len(images))

    if args.class_names:
        try:
            names = [ln.strip() for ln in Path(args.class_names).read_text(encoding="utf-8").splitlines() if ln.strip()]
        except OSError as exc:
            raise CliError(f"cannot read --class-names: {exc}") from None
        folders = folder_names(names)
    else:
        names, folders = list(FASHION_MNIST_CLASSES), list(FASHION_MNIST_FOLDERS)
    if labels is not None and n and int(labels[:n].max()) >= len(folders):
        raise CliError(f"label {int(labels[:n].max())} but only {len(folders)} class names "
                       "(give --class-names FILE with one name per line)")

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CliError(f"{out} exists and is not an empty folder; choose a new --out")
    counts = write_image_folder(images[:n], None if labels is None else labels[:n], out, folders, args.format,
                                progress=not args.quiet)
    if labels is None:
        print(f"wrote {n} images to {out} (flat, unlabelled)")
    else:
        print(f"wrote {n} images to {out} in {len(folders)} class folders ("
              + ", ".join(f"{f}: {c}" for f, c in zip(folders, counts)) + "); classes.txt lists the label order")
    if not args.quiet and labels is not None and names != list(FASHION_MNIST_CLASSES):
        print("classes: " + ", ".join(names), file=sys.stderr)
    write_json_arg(args, "dataset", {"out": str(out), "images": n, "images_file": str(images_path),
                                     "labels_file": None if labels is None else str(labels_path),
                                     "format": args.format, "classes": None if labels is None else names,
                                     "class_folders": None if labels is None else dict(zip(folders, map(int, counts)))})
    return 0
