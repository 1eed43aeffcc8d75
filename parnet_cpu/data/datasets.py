"""Facts about the public datasets this project names: label order and normalisation statistics.

One definition, read by the model registry (`parnet_fmnist`), the trainer and the IDX tools. The ImageNet
mean/std live with the preprocessing (`preprocess.IMAGENET_MEAN` / `IMAGENET_STD`), its default.
"""
from __future__ import annotations

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
