"""Logits -> the k most probable classes: the one ranking that `Runtime.classify`, the public `Batcher`,
`parnet-cpu predict` and the server's `/v1/classify` all answer with (pure numpy, torch-free)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["NonFiniteLogitsError", "TopK", "check_top_k", "softmax_top_k"]


class NonFiniteLogitsError(ValueError):
    """The model gave NaN or infinite logits: no ranking of them means anything, so none is given."""


@dataclass(frozen=True)
class TopK:
    """The k best classes of one image, most probable first (softmax over all classes)."""

    indices: tuple[int, ...]
    labels: tuple[str | None, ...]  # None where the model folder names no classes
    probabilities: tuple[float, ...]

    @property
    def label(self) -> str | None:
        """The best class's name."""
        return self.labels[0]

    @property
    def index(self) -> int:
        """The best class's index."""
        return self.indices[0]

    def predictions(self) -> list[dict]:
        """As `/v1/classify` answers: [{"index", "label", "probability"}, ...]."""
        return [{"index": i, "label": lab, "probability": p}
                for i, lab, p in zip(self.indices, self.labels, self.probabilities)]

    def to_dict(self) -> dict:
        return {"labels": list(self.labels), "indices": list(self.indices), "probabilities": list(self.probabilities)}


DEFAULT_TOP_K = 5


def check_top_k(k: int | None, num_classes: int, name: str = "top_k") -> int:
    """The `top_k` to use: None (not given) is DEFAULT_TOP_K or every class when the model has fewer (a
    2-class model is not an error by default); anything else must be an integer in 1..num_classes (callers
    check before spending work). `name` is how the caller's user spells it (`--top-k` on the CLI)."""
    if k is None:
        return min(DEFAULT_TOP_K, num_classes)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= num_classes:
        raise ValueError(f"{name} must be an integer in 1..{num_classes} (the model has {num_classes} classes), "
                         f"got {k!r}")
    return int(k)


def softmax_top_k(logits: np.ndarray, k: int, class_names: Sequence[str] | None = None) -> list[TopK]:
    """One `TopK` per row of (N, classes) logits (a single row may be 1-D). Softmax in float64; ties
    rank the lower index first. Non-finite logits raise `NonFiniteLogitsError`."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim == 1:
        z = z[None]
    if z.ndim != 2 or z.shape[1] < 1:
        raise ValueError(f"expected logits of shape (N, classes), got {tuple(np.shape(logits))}")
    check_top_k(k, z.shape[1])
    bad = ~np.isfinite(z).all(axis=1)
    if bad.any():
        raise NonFiniteLogitsError(f"the model produced non-finite logits (NaN or infinity) for image(s) "
                                   f"{np.flatnonzero(bad)[:10].tolist()}; no answer is given")
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    order = np.argsort(-p, axis=1, kind="stable")[:, :int(k)]
    out = []
    for row, idx in zip(p, order):
        ids = tuple(int(i) for i in idx)
        out.append(TopK(ids, tuple(class_names[i] for i in ids) if class_names else (None,) * len(ids),
                        tuple(float(row[i]) for i in ids)))
    return out
