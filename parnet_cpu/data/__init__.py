"""Image-folder datasets, decoding and evaluation preprocessing for calibration / evaluation.

Torch-free on purpose (numpy + Pillow + stdlib, tqdm optional): also used by the serving runtime.

Typical use::

    from parnet_cpu.data import PreprocessConfig, detect_layout, iter_batches, DecodeReport

    ds = detect_layout("/data/imagenet/val")          # auto-detects the layout, labels = sorted-synset index
    calib, holdout = ds.split(calib_size=300, seed=0)
    report = DecodeReport()
    for batch in iter_batches(holdout.samples, PreprocessConfig(), batch_size=64, report=report):
        ...  # batch.images (N,3,224,224) float32, batch.labels (N,) int64, batch.paths
    print(report.summary())
"""
from .layouts import (
    IMAGE_EXTENSIONS,
    LAYOUTS,
    Dataset,
    DatasetError,
    DatasetWarning,
    bundled_calibration_dir,
    count_images,
    detect_layout,
    imagenet_class_names,
    imagenet_synsets,
    imagenet_val_labels,
    is_image_file,
    list_images,
    load_devkit_mapping,
    match_model_classes,
    read_classes_file,
    split_calibration_holdout,
    synset_to_index,
)
from .loader import Batch, BatchLoader, DecodeReport, default_num_workers, iter_batches, load_paths, take
from .preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    IMAGE_FORMATS,
    INTERPOLATIONS,
    ImageDecodeError,
    ImageTooLargeError,
    PreprocessConfig,
    center_crop,
    decode_image,
    load_and_preprocess,
    load_image,
    preprocess,
    resize_shorter_side,
)

__all__ = [
    "IMAGE_EXTENSIONS", "LAYOUTS", "Dataset", "DatasetError", "DatasetWarning", "bundled_calibration_dir",
    "count_images", "detect_layout", "imagenet_class_names", "imagenet_synsets", "imagenet_val_labels",
    "is_image_file", "list_images", "load_devkit_mapping", "match_model_classes", "read_classes_file", "split_calibration_holdout", "synset_to_index",
    "Batch", "BatchLoader", "DecodeReport", "default_num_workers", "iter_batches", "load_paths", "take",
    "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_FORMATS", "INTERPOLATIONS", "ImageDecodeError", "ImageTooLargeError", "PreprocessConfig",
    "center_crop", "decode_image", "load_and_preprocess", "load_image", "preprocess", "resize_shorter_side",
]
