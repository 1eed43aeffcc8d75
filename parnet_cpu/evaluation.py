"""Accuracy and fidelity metrics, and running compiled models over an image folder (torch-free)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from parnet_cpu.data import DecodeReport, PreprocessConfig, iter_batches


@dataclass
class Outputs:
    """Logits of one or several models on the same decoded images, in sample order."""

    logits: dict[str, np.ndarray]
    labels: np.ndarray | None
    paths: list[str]
    report: DecodeReport = field(default_factory=DecodeReport)


def run_models(models: Mapping[str, object], samples: Sequence, pcfg: PreprocessConfig, batch_size: int = 32,
               num_workers: int | None = None, progress: bool = False, desc: str = "evaluate") -> Outputs:
    """Decode each image once and feed it to every compiled model (callables: batch -> [logits])."""
    report = DecodeReport()
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in models}
    labels: list[np.ndarray] = []
    paths: list[str] = []
    for batch in iter_batches(samples, pcfg, batch_size, num_workers, progress=progress, desc=desc, report=report):
        for name, compiled in models.items():
            chunks[name].append(np.asarray(compiled(batch.images)[0], dtype=np.float32))
        if batch.labels is not None:
            labels.append(batch.labels)
        paths.extend(batch.paths)
    logits = {name: (np.concatenate(c) if c else np.zeros((0, 0), np.float32)) for name, c in chunks.items()}
    lab = np.concatenate(labels) if labels else None
    return Outputs(logits, lab, paths, report)


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    """Percentage of images whose label is among the k highest logits (labels < 0 are ignored)."""
    valid = labels >= 0
    if not valid.any():
        return float("nan")
    k = min(k, logits.shape[1])
    topk = np.argpartition(-logits[valid], k - 1, axis=1)[:, :k]
    return float(100.0 * (topk == labels[valid, None]).any(axis=1).mean())


def top1_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Percentage of images for which two models predict the same class."""
    return float(100.0 * (a.argmax(1) == b.argmax(1)).mean()) if len(a) else float("nan")


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of `test` against `reference`, in dB (higher is better)."""
    ref = reference.astype(np.float64)
    noise = float(np.sum((ref - test.astype(np.float64)) ** 2))
    signal = float(np.sum(ref ** 2))
    return float("inf") if noise == 0 else float(10.0 * np.log10(signal / noise))


def per_class(logits: np.ndarray, labels: np.ndarray, class_names: Sequence[str] | None) -> list[dict]:
    """Per-class image counts and top-1 hits (only classes that occur)."""
    pred = logits.argmax(1)
    rows = []
    for c in np.unique(labels[labels >= 0]):
        mask = labels == c
        rows.append({"class": int(c), "name": class_names[c] if class_names and c < len(class_names) else str(c),
                     "images": int(mask.sum()), "top1_correct": int((pred[mask] == c).sum()),
                     "top1": float(100.0 * (pred[mask] == c).mean())})
    return rows


def accuracy_summary(logits: np.ndarray, labels: np.ndarray | None, class_names: Sequence[str] | None = None) -> dict:
    if labels is None or not (labels >= 0).any():
        return {"images": int(len(logits)), "labelled": 0}
    return {"images": int(len(logits)), "labelled": int((labels >= 0).sum()),
            "top1": topk_accuracy(logits, labels, 1), "top5": topk_accuracy(logits, labels, 5),
            "per_class": per_class(logits, labels, class_names)}


def fidelity_summary(reference: np.ndarray, test: np.ndarray, labels: np.ndarray | None) -> dict:
    """How closely `test` (e.g. INT8) follows `reference` (FP32) on the same images."""
    out = {"top1_agreement": top1_agreement(reference, test), "sqnr_db": sqnr_db(reference, test),
           "prediction_flips": int((reference.argmax(1) != test.argmax(1)).sum())}
    if labels is not None:
        ok_ref, ok_test = reference.argmax(1) == labels, test.argmax(1) == labels
        out["fixed_by_test"] = int((~ok_ref & ok_test).sum())
        out["broken_by_test"] = int((ok_ref & ~ok_test).sum())
    return out
