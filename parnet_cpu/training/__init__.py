"""Training (torch): the small CPU trainer, imported lazily. The Fashion-MNIST reader it uses is torch-free
and lives in `parnet_cpu.data.fmnist`."""
from __future__ import annotations

_TRAINER_NAMES = ("TrainConfig", "ModelEma", "TrainingError", "evaluate", "export_checkpoint",
                  "fashion_mnist_arrays", "image_folder_arrays", "images_to_model_size", "train")

__all__ = [*_TRAINER_NAMES]


def __getattr__(name: str):
    if name in _TRAINER_NAMES:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
