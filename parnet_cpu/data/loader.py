"""Batched, order-preserving, multi-threaded image loading (numpy + Pillow only, no torch).

Decoding and resizing run in a thread pool (Pillow releases the GIL in JPEG/PNG decoding and in
``resize``; the numpy normalisation releases it too), with at most ``prefetch`` images in flight,
so memory stays bounded whatever the dataset size. Batches come out in sample order. A file that
cannot be decoded is skipped, counted and recorded in a :class:`DecodeReport`.
"""
from __future__ import annotations

import os
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np

from .preprocess import ImageDecodeError, PreprocessConfig, load_and_preprocess

__all__ = [
    "Batch",
    "BatchLoader",
    "DecodeReport",
    "default_num_workers",
    "iter_batches",
    "load_paths",
    "take",
]

SampleLike = Union[tuple[Union[str, os.PathLike], Union[int, None]], str, os.PathLike]


@dataclass
class Batch:
    images: np.ndarray            # (N, C, H, W) float32
    labels: np.ndarray | None     # (N,) int64, -1 = unknown (only if some samples are unlabelled); None if none labelled
    paths: list[str]
    indices: np.ndarray           # (N,) positions of these images in the input sample list

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass
class DecodeReport:
    """Filled while iterating: what was attempted, decoded and skipped (in sample order)."""

    attempted: int = 0
    decoded: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)   # (path, reason)
    requested: int | None = None      # ``limit`` asked for, if any
    available: int = 0                # samples given to the loader
    exhausted: bool = False           # ran out of samples before reaching ``limit``

    @property
    def failed(self) -> int:
        return len(self.failures)

    @property
    def short(self) -> bool:
        """True when fewer images were decoded than requested (``limit``, else all samples)."""
        return self.decoded < (self.available if self.requested is None else self.requested)

    def summary(self) -> str:
        s = f"decoded {self.decoded} of {self.attempted} images"
        if self.requested is not None:
            s += f" (requested {self.requested}, {self.available} available)"
        if self.failures:
            s += f", skipped {self.failed} undecodable (first: {self.failures[0][0]}: {self.failures[0][1]})"
        return s


def default_num_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(n, 32))


def _normalise(samples: Sequence[SampleLike]) -> list[tuple[str, int | None]]:
    out: list[tuple[str, int | None]] = []
    for s in samples:
        if isinstance(s, tuple):
            path, lab = s
            out.append((os.fspath(path), None if lab is None else int(lab)))
        else:
            out.append((os.fspath(s), None))
    return out


def take(samples: Sequence[SampleLike], n: int | None) -> list:
    """The first ``n`` samples (all if ``n`` is None); warns when fewer than ``n`` exist."""
    items = list(samples)
    if n is None:
        return items
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n > len(items):
        warnings.warn(f"asked for {n} samples but only {len(items)} are available; using {len(items)}",
                      UserWarning, stacklevel=2)
    return items[:n]


class BatchLoader:
    """Iterable of :class:`Batch`; ``loader.report`` is updated as batches are produced.

    ``limit``: stop after that many images were *decoded* (undecodable files are replaced by the
    next samples); the report flags ``exhausted`` and a warning is issued if fewer were found.
    ``prefetch``: max images decoded ahead (in flight); default ``max(batch_size, 2 * workers)``.
    Each iteration restarts from the first sample and resets the report.
    """

    def __init__(
        self,
        samples: Sequence[SampleLike],
        cfg: PreprocessConfig | None = None,
        batch_size: int = 32,
        num_workers: int | None = None,
        *,
        progress: bool = False,
        desc: str = "images",
        limit: int | None = None,
        prefetch: int | None = None,
        drop_last: bool = False,
        report: DecodeReport | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        self.items = _normalise(samples)
        self.cfg = cfg or PreprocessConfig()
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers) if num_workers else default_num_workers()
        self.progress = progress
        self.desc = desc
        self.limit = limit
        self.prefetch = max(1, int(prefetch)) if prefetch else max(self.batch_size, 2 * self.num_workers)
        self.drop_last = drop_last
        self.report = report if report is not None else DecodeReport()

    def __len__(self) -> int:
        """Upper bound on the number of batches (exact when every file decodes)."""
        n = len(self.items) if self.limit is None else min(self.limit, len(self.items))
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        return self._run()

    def _run(self) -> Iterator[Batch]:
        items, cfg, bs = self.items, self.cfg, self.batch_size
        rep = self.report
        rep.attempted, rep.decoded, rep.exhausted = 0, 0, False
        rep.failures.clear()
        rep.requested, rep.available = self.limit, len(items)
        target = len(items) if self.limit is None else min(self.limit, len(items))
        if self.limit is not None and self.limit > len(items):
            warnings.warn(f"{self.desc}: asked for {self.limit} images but only {len(items)} samples are available",
                          UserWarning, stacklevel=3)
        n_labelled = sum(lab is not None for _, lab in items)
        with_labels = n_labelled > 0
        if target == 0:
            return

        bar = _make_bar(self.progress, target, self.desc)
        pool = ThreadPoolExecutor(max_workers=self.num_workers, thread_name_prefix="parnet-decode")
        pending: deque[tuple[int, Future]] = deque()
        next_i = 0

        def fill() -> None:
            nonlocal next_i
            while next_i < len(items) and len(pending) < self.prefetch:
                pending.append((next_i, pool.submit(load_and_preprocess, items[next_i][0], cfg)))
                next_i += 1

        images = np.empty((bs,) + cfg.output_shape, dtype=np.float32)
        labels: list[int] = []
        paths: list[str] = []
        idx: list[int] = []
        try:
            fill()
            while pending and rep.decoded < target:
                i, fut = pending.popleft()
                path, lab = items[i]
                rep.attempted += 1
                try:
                    arr = fut.result()
                except ImageDecodeError as exc:
                    rep.failures.append((path, exc.reason))
                    fill()
                    continue
                images[len(paths)] = arr
                labels.append(-1 if lab is None else lab)
                paths.append(path)
                idx.append(i)
                rep.decoded += 1
                if bar is not None:
                    bar.update(1)
                if len(paths) == bs:
                    yield self._batch(images, labels, paths, idx, with_labels)
                    images = np.empty((bs,) + cfg.output_shape, dtype=np.float32)
                    labels, paths, idx = [], [], []
                fill()
            if paths and not self.drop_last:
                yield self._batch(images[: len(paths)], labels, paths, idx, with_labels)
            if self.limit is not None and rep.decoded < self.limit:
                rep.exhausted = True
                warnings.warn(f"{self.desc}: only {rep.decoded} decodable images (requested {self.limit}; "
                              f"{rep.failed} undecodable skipped)", UserWarning, stacklevel=3)
            if rep.failures:
                warnings.warn(f"{self.desc}: skipped {rep.failed} undecodable file(s), first {rep.failures[0][0]}: "
                              f"{rep.failures[0][1]}", UserWarning, stacklevel=3)
        finally:
            for _, fut in pending:
                fut.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
            if bar is not None:
                bar.close()

    @staticmethod
    def _batch(images: np.ndarray, labels: list[int], paths: list[str], idx: list[int], with_labels: bool) -> Batch:
        return Batch(
            images=images,
            labels=np.asarray(labels, dtype=np.int64) if with_labels else None,
            paths=paths,
            indices=np.asarray(idx, dtype=np.int64),
        )


def iter_batches(
    samples: Sequence[SampleLike],
    cfg: PreprocessConfig | None = None,
    batch_size: int = 32,
    num_workers: int | None = None,
    progress: bool = False,
    desc: str = "images",
    *,
    limit: int | None = None,
    prefetch: int | None = None,
    drop_last: bool = False,
    report: DecodeReport | None = None,
) -> Iterator[Batch]:
    """Yield :class:`Batch` es of preprocessed images in sample order (see :class:`BatchLoader`).

    ``samples``: ``(path, label|None)`` pairs (e.g. ``Dataset.samples``) or bare paths. Pass a
    :class:`DecodeReport` as ``report`` to see skipped files and counts while/after iterating.
    """
    return iter(BatchLoader(samples, cfg, batch_size, num_workers, progress=progress, desc=desc, limit=limit,
                            prefetch=prefetch, drop_last=drop_last, report=report))


def _make_bar(progress: bool, total: int, desc: str):
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional for the torch-free runtime
        return None
    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True)


def load_paths(paths: Sequence[str | Path], cfg: PreprocessConfig | None = None) -> np.ndarray:
    """Decode a few files synchronously into one (N, C, H, W) array (raises on the first failure)."""
    cfg = cfg or PreprocessConfig()
    out = np.empty((len(paths),) + cfg.output_shape, dtype=np.float32)
    for k, p in enumerate(paths):
        load_and_preprocess(p, cfg, out[k])
    return out
