"""Training (torch) and the Fashion-MNIST IDX reader (numpy only).

``parnet_cpu.training.idx`` has no torch dependency; the trainer is imported lazily so that
``from parnet_cpu.training import read_idx`` works on a serving install without torch.
"""
from __future__ import annotations

from .idx import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_FOLDERS,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    IdxError,
    find_fashion_mnist,
    load_fashion_mnist,
    read_idx,
    write_idx,
)

_TRAINER_NAMES = ("TrainConfig", "ModelEma", "TrainingError", "evaluate", "export_checkpoint",
                  "fashion_mnist_arrays", "image_folder_arrays", "images_to_model_size", "train")

__all__ = ["FASHION_MNIST_CLASSES", "FASHION_MNIST_FOLDERS", "FASHION_MNIST_MEAN", "FASHION_MNIST_STD",
           "IdxError", "find_fashion_mnist", "load_fashion_mnist", "read_idx", "write_idx", *_TRAINER_NAMES]


def __getattr__(name: str):
    if name in _TRAINER_NAMES:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
