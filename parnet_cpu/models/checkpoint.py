"""Checkpoint loading: the authors' `.pth.tar` training checkpoints and our own files.

Security: everything goes through `torch.load(..., weights_only=True)`. The authors' files also hold
their training arguments as an `argparse.Namespace`, which the restricted unpickler refuses; exactly
that one class is allow-listed, and there is no fallback to an unrestricted load.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from parnet_cpu.outputs import atomic_write, sha256_file

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
    if not isinstance(sd, Mapping):
        where = next((f"'{k}'" for k in ("state_dict_ema", "state_dict") if k in obj and obj[k] is sd), "the file")
        raise CheckpointError(f"not a state dict: {where} holds a {type(sd).__name__}, expected a mapping of "
                              "parameter names to tensors")
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
    common = sorted(set(sd) & set(expected))
    # a float parameter or buffer must arrive as finite floats: an integer tensor would be cast silently and
    # a NaN/Inf weight gives garbage (num_batches_tracked and other integer buffers are not checked)
    non_float = [f"{k}: {str(sd[k].dtype).removeprefix('torch.')}" for k in common
                 if expected[k].is_floating_point() and not sd[k].is_floating_point()]
    non_finite = [k for k in common if expected[k].is_floating_point() and sd[k].is_floating_point()
                  and not bool(torch.isfinite(sd[k]).all())]
    if missing or unexpected or mis_shaped or non_float or non_finite:
        parts = []
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", mis_shaped),
                             ("non-float weights", non_float), ("non-finite (NaN/Inf) weights", non_finite)):
            if items:
                shown = ", ".join(items[:20]) + (f", ... ({len(items)} in all)" if len(items) > 20 else "")
                parts.append(f"{title} ({len(items)}): {shown}")
        raise CheckpointError("checkpoint does not match the model:\n  " + "\n  ".join(parts))


# Configuration fields a checkpoint's weights were trained for; a model built otherwise gives wrong answers
# (activation) or cannot hold the weights. Each with the command-line flag that sets it.
ARCH_FIELDS: dict[str, str] = {"activation": "--activation", "planes": "--planes", "num_blocks": "--blocks",
                               "num_classes": "--num-classes", "in_chans": "--in-chans",
                               "stem_stride": "--stem-stride"}


def config_conflicts(saved: Mapping, model_cfg: Mapping) -> list[str]:
    """Fields of ARCH_FIELDS where a checkpoint's stored configuration and the model's differ, described."""
    def norm(v):
        return tuple(v) if isinstance(v, (list, tuple)) else v

    return [f"{k}: checkpoint {norm(saved[k])!r}, model {norm(model_cfg[k])!r} ({flag})"
            for k, flag in ARCH_FIELDS.items() if k in saved and k in model_cfg and norm(saved[k]) != norm(model_cfg[k])]


def load_checkpoint(model: nn.Module, path: str | Path, use_ema: bool = False) -> dict:
    """Load weights strictly into `model`; returns a small description (hash, source, arch).

    Our checkpoints carry the configuration they were trained with; a model configured otherwise (e.g.
    ReLU for a SiLU-trained checkpoint, which loads without a shape error) is refused, naming both."""
    obj = read_checkpoint(path)
    cfg = getattr(model, "cfg", None)
    saved = obj.get("config")
    conflicts = config_conflicts(saved, cfg.to_dict()) if isinstance(saved, Mapping) and cfg is not None else []
    conflict_text = (f"{path} was saved for another configuration than the model's:\n  " + "\n  ".join(conflicts)
                     + "\nset the model's configuration to the checkpoint's") if conflicts else ""
    sd = extract_state_dict(obj, use_ema)
    try:
        check_state_dict(model, sd)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}\n{conflict_text}".rstrip()) from None
    if conflicts:  # e.g. the activation: the weights fit, the answers would be wrong
        raise CheckpointError(conflict_text)
    model.load_state_dict(sd, strict=True)
    return {"path": str(path), "sha256": sha256_file(path), "arch": obj.get("arch"),
            "epoch": obj.get("epoch"), "ema": bool(use_ema)}


def save_checkpoint(model: nn.Module, path: str | Path, **extra) -> None:
    """Our own format: weights + architecture config, loadable with weights_only=True."""
    cfg = getattr(model, "cfg", None)
    obj = {"format": OUR_FORMAT, "state_dict": model.state_dict(),
           "config": cfg.to_dict() if cfg is not None else None, **extra}
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)
