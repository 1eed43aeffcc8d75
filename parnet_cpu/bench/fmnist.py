"""Fashion-MNIST as image folders for the accuracy comparisons (the demo's accuracy half,
benchmarks/matrix_unit.py): 300 training images to calibrate with, the first N test images to evaluate on.
Reads Debian's `dataset-fashion-mnist` through the torch-free IDX reader; FileNotFoundError without it."""
from __future__ import annotations

from pathlib import Path


def prepare_fmnist(folder: Path, test_limit: int | None, log) -> tuple[Path, Path]:
    from parnet_cpu.training.idx import FASHION_MNIST_FOLDERS, load_fashion_mnist, write_image_folder

    data = load_fashion_mnist()
    calib, test = folder / "calib", folder / "test"
    if not calib.is_dir():
        write_image_folder(data["train_images"][:300], None, calib, FASHION_MNIST_FOLDERS)
    n = len(data["test_images"]) if test_limit is None else min(test_limit, len(data["test_images"]))
    if not (test / "classes.txt").is_file() or sum(1 for _ in test.rglob("*.png")) != n:
        import shutil

        shutil.rmtree(test, ignore_errors=True)
        write_image_folder(data["test_images"][:n], data["test_labels"][:n], test, FASHION_MNIST_FOLDERS)
    log(f"data: 300 calibration images (training set) and {n} test images written under {folder}")
    return calib, test
