"""Checkpoint loading: the authors' `.pth.tar` training checkpoints and our own files.

Security: everything goes through `torch.load(..., weights_only=True)`. The authors' files also hold
their training arguments as an `argparse.Namespace`, which the restricted unpickler refuses; exactly
that one class is allow-listed, and there is no fallback to an unrestricted load.
"""
from __future__ import annotations

import argparse
import hashlib
import re
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

# The one place where the authors' module names map to ours (their blocks wrap a RepVGGBlock in `.block`).
_AUTHOR_TO_OURS: tuple[tuple[re.Pattern, str], ...] = tuple(
    (re.compile(pattern), repl)
    for pattern, repl in (
        (r"\.block\.rbr_dense\.", ".dense."),
        (r"\.block\.rbr_1x1\.1\.", ".pointwise."),  # stride 2: Sequential(AvgPool2d, conv_bn)
        (r"\.block\.rbr_1x1\.", ".pointwise."),
        (r"\.block\.rbr_identity\.", ".identity_bn."),
        (r"\.block\.se\.cvsig\.conv\.", ".se.conv."),
    )
)

OUR_FORMAT = "parnet-cpu/1"


class CheckpointError(ValueError):
    """The checkpoint cannot be read or does not fit the model; the message names the keys."""


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def map_author_key(key: str) -> str:
    """Authors' state-dict key -> ours. Keys already in our naming pass through unchanged."""
    if key.startswith("module."):
        key = key[len("module."):]
    for pattern, repl in _AUTHOR_TO_OURS:
        key = pattern.sub(repl, key)
    return key


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint file safely into a plain dict (no model needed)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt zip, truncated file, disallowed global, ...
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}".strip()) from exc
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict, found {type(obj).__name__}")
    return dict(obj)


def extract_state_dict(obj: Mapping, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """Pick the weights out of an authors' training checkpoint, our file, or a bare state dict."""
    if use_ema:
        if "state_dict_ema" not in obj:
            raise CheckpointError("use_ema=True but the checkpoint has no 'state_dict_ema'")
        sd = obj["state_dict_ema"]
    elif "state_dict" in obj:
        sd = obj["state_dict"]
    elif "state_dict_ema" in obj:
        sd = obj["state_dict_ema"]
    else:
        sd = obj
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"not a state dict: non-tensor entries {bad[:5]}")
    return {map_author_key(k): v for k, v in sd.items()}


def check_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> None:
    """Strict comparison of keys and shapes, with an error that lists every problem."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    mis_shaped = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in sorted(set(sd) & set(expected)) if sd[k].shape != expected[k].shape]
    if missing or unexpected or mis_shaped:
        parts = []
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", mis_shaped)):
            if items:
                shown = ", ".join(items[:20]) + (f", ... ({len(items)} in all)" if len(items) > 20 else "")
                parts.append(f"{title} ({len(items)}): {shown}")
        raise CheckpointError("checkpoint does not match the model:\n  " + "\n  ".join(parts))


def load_checkpoint(model: nn.Module, path: str | Path, use_ema: bool = False) -> dict:
    """Load weights strictly into `model`; returns a small description (hash, source, arch)."""
    obj = read_checkpoint(path)
    sd = extract_state_dict(obj, use_ema)
    check_state_dict(model, sd)
    model.load_state_dict(sd, strict=True)
    return {"path": str(path), "sha256": file_sha256(path), "arch": obj.get("arch"),
            "epoch": obj.get("epoch"), "ema": bool(use_ema)}


def save_checkpoint(model: nn.Module, path: str | Path, **extra) -> None:
    """Our own format: weights + architecture config, loadable with weights_only=True."""
    cfg = getattr(model, "cfg", None)
    obj = {"format": OUR_FORMAT, "state_dict": model.state_dict(),
           "config": cfg.to_dict() if cfg is not None else None, **extra}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)
