"""The documented Python entry points that write and feed model folders.

`export` and `quantize` take a model (or a registered variant name) and folders, not internal
dictionaries, so a script does what the `parnet-cpu export` / `quantize` commands do. `load_images`
turns image files or a folder into the preprocessed batch a `Runtime` of that model folder expects.
The first two need the full install (torch, NNCF); `load_images` is torch-free like the runtime.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from parnet_cpu.options import check_fields

PathLike = str | os.PathLike


def _model_and_source(model, checkpoint: PathLike | None):
    """A training-form ParNet and the provenance recorded in the model folder."""
    from parnet_cpu.models.parnet import create_model

    if isinstance(model, str):
        name = model
        model = create_model(name, checkpoint_path=str(checkpoint) if checkpoint else None)
        return model, {"model": name, "config": model.cfg.to_dict(),
                       "checkpoint": {"path": str(checkpoint)} if checkpoint else None}
    if checkpoint is not None:
        raise ValueError("checkpoint= goes with a variant name; load weights into a module yourself "
                         "(parnet_cpu.load_checkpoint) before passing it")
    return model, {"model": "python-api", "config": model.cfg.to_dict(), "checkpoint": None}


def export(model, out_dir: PathLike, *, checkpoint: PathLike | None = None, onnx: bool = False,
           overwrite: bool = False) -> Path:
    """Reparameterize `model` (a ParNet module or a variant name such as "parnet_s") and write a model
    folder with the FP32 OpenVINO IR (and ONNX with `onnx=True`). Returns the folder."""
    from parnet_cpu.export import export_model_dir

    model, source = _model_and_source(model, checkpoint)
    return export_model_dir(model, out_dir, source, onnx=onnx, overwrite=overwrite)


def quantize(model, calib_dir: PathLike, out_dir: PathLike, *, checkpoint: PathLike | None = None,
             overwrite: bool = False, log: Callable[[str], None] | None = None, **options) -> dict:
    """INT8 post-training quantization, as `parnet-cpu quantize`: calibrate `model` (a ParNet module or a
    variant name) on the images in `calib_dir` and write a model folder with FP32 and INT8 IRs and
    report.json. `options` are the fields of `QuantizeOptions` (subset_size, preset, backend, ...).
    Returns the report (the same dict as OUT/report.json)."""
    from parnet_cpu.quantization.ptq import QuantizeOptions, quantize_to_dir

    valid = {f.name for f in dataclasses.fields(QuantizeOptions)}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise TypeError(f"unknown quantize option(s) {unknown}; valid: {', '.join(sorted(valid))}")
    if isinstance(options.get("ignored_scope"), list):
        options["ignored_scope"] = tuple(options["ignored_scope"])
    opts = QuantizeOptions(**options)
    check_fields(opts)  # subset_size, batch_size, max_drop, ...: the ranges of the quantize flags (options.py)
    model, source = _model_and_source(model, checkpoint)
    return quantize_to_dir(model, source, calib_dir, out_dir, opts, overwrite=overwrite,
                           log=log or (lambda *_: None))


def load_images(images: PathLike | Sequence[PathLike], model_dir: PathLike) -> tuple[np.ndarray, list[Path]]:
    """Decode and preprocess image files (or every image under a folder, sorted by path) the way the
    model folder's manifest says (resize, crop, mean/std, channels). Returns the (N, C, H, W) float32
    batch for `Runtime.infer` and the paths in the same order; an undecodable file is an error that
    names it."""
    from parnet_cpu.artifacts import ModelDir
    from parnet_cpu.data import list_images
    from parnet_cpu.data.loader import load_paths

    if isinstance(images, (str, os.PathLike)) and Path(images).is_dir():
        paths = list_images(images, recursive=True)
        if not paths:
            raise ValueError(f"no image files under {images}")
    elif isinstance(images, (str, os.PathLike)):
        paths = [Path(images)]
    else:
        paths = [Path(p) for p in images]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"not a file: {', '.join(missing[:5])}")
    return load_paths(paths, ModelDir.open(model_dir).preprocess_config()), paths
