"""A small, deterministic CPU trainer for ParNet classifiers (torch).

Inputs are uint8 arrays already at the model's input size, shape (N, C, S, S), produced with the
*same* Pillow resize/crop as evaluation (:func:`images_to_model_size`), so a model trained here sees
exactly the pixels the generic evaluation preprocessing (``parnet_cpu.data.preprocess``) gives it.
Normalisation uses the same float32 ``x * scale + offset`` as that preprocessing.

Recipe: SGD (Nesterov momentum) or AdamW, linear warmup then cosine decay per step, label smoothing,
an exponential moving average (EMA) of the weights (BN statistics included) that is what gets
evaluated and saved, random crop (zero padding) + horizontal flip augmentation.

Checkpoints use our own format (:func:`parnet_cpu.models.checkpoint.save_checkpoint`):
``state_dict`` holds the EMA weights (what ``load_checkpoint`` loads and what you evaluate);
``train_state`` holds what resuming needs (raw weights, optimizer, schedule step, EMA counter,
history, the training configuration), all tensors and plain types so ``weights_only`` loading works.
:func:`export_checkpoint` writes the slim file without ``train_state``.
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from parnet_cpu.outputs import atomic_write
from parnet_cpu.system.cpuinfo import describe_machine, machine_summary

__all__ = [
    "TrainConfig",
    "ModelEma",
    "TrainingError",
    "evaluate",
    "export_checkpoint",
    "fashion_mnist_arrays",
    "image_folder_arrays",
    "images_to_model_size",
    "lr_at",
    "machine_description",
    "normalizer",
    "train",
]


class TrainingError(ValueError):
    """Bad training input or an unusable checkpoint for resuming; the message says what to fix."""


@dataclass
class TrainConfig:
    epochs: int = 15
    batch_size: int = 128
    optimizer: str = "sgd"            # "sgd" (Nesterov momentum) or "adamw"
    lr: float = 0.1                   # peak learning rate (after warmup)
    momentum: float = 0.9
    weight_decay: float = 5e-4        # not applied to BN parameters and biases
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.0         # cosine floor, as a fraction of lr
    label_smoothing: float = 0.1
    ema_decay: float = 0.999
    crop_padding: int = 2             # random crop after zero padding by this many pixels (0: off)
    hflip: bool = True
    seed: int = 0
    num_threads: int | None = None    # None: os.cpu_count()
    eval_batch_size: int = 500
    checkpoint: str | None = None     # written after every epoch (and used by resume)
    resume: bool = False
    max_steps_per_epoch: int | None = None  # for quick tests
    bf16: bool = False                # bf16 autocast for forward/backward (weights, optimizer, EMA stay fp32)
    progress: bool = True
    extra: dict = field(default_factory=dict)  # stored with the checkpoint (e.g. the data source)

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adamw"):
            raise TrainingError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise TrainingError("epochs and batch_size must be >= 1")
        if self.lr <= 0:
            raise TrainingError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise TrainingError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.crop_padding < 0:
            raise TrainingError("crop_padding must be >= 0")

    def resume_relevant(self) -> dict:
        """Settings that must not change when resuming (they define the optimisation trajectory)."""
        keep = ("batch_size", "optimizer", "lr", "momentum", "weight_decay", "warmup_epochs", "min_lr_ratio",
                "label_smoothing", "ema_decay", "crop_padding", "hflip", "seed", "bf16")
        return {k: getattr(self, k) for k in keep}


# --------------------------------------------------------------------------------------------
# data: resize exactly like evaluation, normalise exactly like evaluation


def images_to_model_size(images: np.ndarray, input_size: int, crop_pct: float = 1.0,
                         interpolation: str = "bilinear") -> np.ndarray:
    """(N, H, W) or (N, H, W, C) uint8 -> (N, C, S, S) uint8 with the evaluation geometry.

    Uses the generic preprocessing's own Pillow functions (shorter side to floor(S/crop_pct),
    centre crop S), so a PNG of the image evaluated by ``parnet_cpu.data`` gets identical pixels.
    """
    from PIL import Image

    from parnet_cpu.data.preprocess import PreprocessConfig, center_crop, resize_shorter_side

    pc = PreprocessConfig(input_size=input_size, crop_pct=crop_pct, interpolation=interpolation,
                          mean=(0.5,), std=(0.5,), channels=1)
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise TrainingError(f"expected uint8 (N, H, W[, C]) images, got {images.dtype} {images.shape}")
    channels = 1 if images.ndim == 3 else images.shape[3]
    out = np.empty((len(images), channels, input_size, input_size), dtype=np.uint8)
    mode = "L" if channels == 1 else "RGB"
    for i, im in enumerate(images):
        img = Image.fromarray(im, mode)
        img = center_crop(resize_shorter_side(img, pc.resize_size, pc.resample), input_size)
        a = np.asarray(img, dtype=np.uint8)
        out[i] = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return out


def fashion_mnist_arrays(cfg, root: str | None = None, split: str = "train",
                         limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``split`` ('train' or 'test') as (uint8 (N,1,S,S), int64 labels) for model config ``cfg``."""
    from parnet_cpu.data.fmnist import find_fashion_mnist, read_idx

    if cfg.in_chans != 1:
        raise TrainingError(f"Fashion-MNIST is grayscale: the model needs in_chans=1 (has {cfg.in_chans})")
    paths = find_fashion_mnist(root)
    images = read_idx(paths[f"{split}_images"])
    labels = read_idx(paths[f"{split}_labels"]).astype(np.int64)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images_to_model_size(images, cfg.input_size, cfg.crop_pct, cfg.interpolation), labels


def image_folder_arrays(root: str | os.PathLike[str], cfg, limit: int | None = None,
                        progress: bool = False) -> tuple[np.ndarray, np.ndarray, tuple[str, ...] | None]:
    """A labelled image folder (any layout ``parnet_cpu.data.detect_layout`` knows) as uint8 arrays.

    Decoding, grayscale/RGB conversion, resize and crop are those of evaluation. Returns
    (images (N, C, S, S) uint8, labels int64, class names or None).
    """
    from parnet_cpu.data import detect_layout, load_image
    from parnet_cpu.data.preprocess import PreprocessConfig, center_crop, resize_shorter_side

    ds = detect_layout(root)
    if not ds.has_labels:
        raise TrainingError(f"{root} has no labels (layout {ds.layout}); training needs a labelled folder")
    samples = ds.samples[:limit] if limit else ds.samples
    pc = PreprocessConfig(input_size=cfg.input_size, crop_pct=cfg.crop_pct,
                          interpolation=cfg.interpolation, mean=(0.5,), std=(0.5,), channels=1)
    out = np.empty((len(samples), cfg.in_chans, cfg.input_size, cfg.input_size), dtype=np.uint8)
    labels = np.empty(len(samples), dtype=np.int64)
    it = samples
    if progress:
        from tqdm import tqdm

        it = tqdm(samples, desc="decode", unit="img", leave=False)
    for i, (path, lab) in enumerate(it):
        img = load_image(path, exif_transpose=pc.exif_transpose, alpha_background=pc.alpha_background)
        img = img.convert("L") if cfg.in_chans == 1 else img.convert("RGB")
        img = center_crop(resize_shorter_side(img, pc.resize_size, pc.resample), cfg.input_size)
        a = np.asarray(img, dtype=np.uint8)
        out[i] = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        labels[i] = lab
    return out, labels, ds.class_names


def normalizer(mean: Sequence[float], std: Sequence[float], channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, offset) float32 (1, C, 1, 1) with the same arithmetic as ``PreprocessConfig``."""
    from parnet_cpu.data.preprocess import PreprocessConfig

    pc = PreprocessConfig(mean=tuple(mean), std=tuple(std), channels=channels)
    return torch.from_numpy(pc.scale.copy())[None], torch.from_numpy(pc.offset.copy())[None]


def _to_float(x_u8: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    x = x_u8.to(torch.float32) * scale
    return x + offset


def _augment(x: torch.Tensor, pad: int, hflip: bool, g: torch.Generator) -> torch.Tensor:
    """Random crop of the zero-padded batch (per-sample offsets) and random horizontal flip (uint8)."""
    n, c, h, w = x.shape
    if pad > 0:
        xp = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=g)
        rows = (dy[:, None] + torch.arange(h)[None]).view(n, 1, h, 1).expand(n, c, h, w + 2 * pad)
        xp = torch.gather(xp, 2, rows)
        cols = (dx[:, None] + torch.arange(w)[None]).view(n, 1, 1, w).expand(n, c, h, w)
        x = torch.gather(xp, 3, cols)
    if hflip:
        flip = torch.rand(n, generator=g) < 0.5
        x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    return x


# --------------------------------------------------------------------------------------------
# EMA, schedule, evaluation


class ModelEma:
    """EMA of every floating-point entry of the state dict (parameters and BN statistics).

    The decay ramps up as min(decay, (1 + n) / (10 + n)) over the first updates, so early weights
    do not dominate short runs.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        src = model.state_dict()
        for k, v in self.module.state_dict().items():
            if v.dtype.is_floating_point:
                v.mul_(d).add_(src[k].detach(), alpha=1.0 - d)
            else:
                v.copy_(src[k])


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr_ratio: float = 0.0) -> float:
    """Linear warmup from ~0 to base_lr over warmup_steps, then cosine to base_lr*min_lr_ratio."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    t = min(max(t, 0.0), 1.0)
    floor = base_lr * min_lr_ratio
    return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


@torch.no_grad()
def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray | None = None, mean=None, std=None,
             batch_size: int = 500) -> tuple[float | None, np.ndarray]:
    """Top-1 accuracy in percent (None without labels) and the predictions, FP32, eval mode."""
    cfg = getattr(model, "cfg", None)
    mean = mean if mean is not None else cfg.mean
    std = std if std is not None else cfg.std
    scale, offset = normalizer(mean, std, images.shape[1])
    was_training = model.training
    model.eval()
    preds = np.empty(len(images), dtype=np.int64)
    try:
        for i in range(0, len(images), batch_size):
            x = _to_float(torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])), scale, offset)
            preds[i:i + len(x)] = model(x).argmax(1).numpy()
    finally:
        model.train(was_training)
    acc = None if labels is None else float((preds == np.asarray(labels)).mean() * 100.0)
    return acc, preds


# --------------------------------------------------------------------------------------------
# checkpoints


def machine_description() -> dict:
    """`system.cpuinfo.machine_summary` plus the torch side (version, threads)."""
    return {**machine_summary(describe_machine(query_openvino=False)), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__}


def _save(path: Path, ema: ModelEma, model: nn.Module, opt: torch.optim.Optimizer, cfg: TrainConfig,
          epoch: int, step: int, total_steps: int, warmup_steps: int, history: list[dict], arch: str | None) -> None:
    from parnet_cpu.models.checkpoint import save_checkpoint

    train_state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": {"step": step, "total_steps": total_steps, "warmup_steps": warmup_steps, "base_lr": cfg.lr},
        "ema_updates": ema.updates,
        "train_config": {k: v for k, v in asdict(cfg).items() if k != "extra"},
        "history": history,
    }
    metric = history[-1].get("val_top1_ema") if history else None
    save_checkpoint(ema.module, path, arch=arch, epoch=epoch, ema=True, metric=metric, train_state=train_state,
                    **({"extra": cfg.extra} if cfg.extra else {}))


def export_checkpoint(src: str | os.PathLike[str], dst: str | os.PathLike[str] | IO[bytes], **metadata) -> Path | None:
    """Slim copy of a training checkpoint: the EMA weights (fp32, training form) + config, no optimizer.
    `dst`: a path (written atomically) or an open binary file (the CLI's checked output, `cli.common.output_arg`)."""
    from parnet_cpu.models.checkpoint import read_checkpoint

    obj = read_checkpoint(src)
    if "train_state" not in obj:
        raise TrainingError(f"{src} is not a parnet-cpu training checkpoint (no train_state)")
    sd = {k: v.detach().clone().to(torch.float32) if v.dtype.is_floating_point else v.clone()
          for k, v in obj["state_dict"].items()}
    history = obj["train_state"].get("history") or []
    out = {"format": obj["format"], "state_dict": sd, "config": obj["config"], "arch": obj.get("arch"),
           "epoch": obj.get("epoch"), "ema": True, "metric": obj.get("metric"),
           "train_config": obj["train_state"].get("train_config"), **metadata}
    if history:
        out["history"] = history
    if hasattr(dst, "write"):
        torch.save(out, dst)
        return None
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(dst, "wb") as f:
        torch.save(out, f)
    return dst


# --------------------------------------------------------------------------------------------
# training


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _check_arrays(name: str, arrays, in_chans: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = arrays
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (in_chans, size, size):
        raise TrainingError(f"{name} images must be uint8 (N, {in_chans}, {size}, {size}), "
                            f"got {images.dtype} {images.shape}")
    if labels.shape != (len(images),):
        raise TrainingError(f"{name}: {len(images)} images but labels of shape {labels.shape}")
    if len(images) == 0:
        raise TrainingError(f"{name} set is empty")
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64))


def train(model: nn.Module, train_arrays, val_arrays=None, config: TrainConfig | None = None,
          log: Callable[[str], None] | None = print, arch: str | None = None) -> list[dict]:
    """Train ``model`` in place on (uint8 images (N,C,S,S), labels) and return the per-epoch history.

    After the call ``model`` holds the EMA weights (the ones evaluated and saved). With
    ``config.checkpoint`` a checkpoint is written after every epoch; with ``config.resume`` training
    continues from it (same settings required), at the epoch after the last completed one.
    """
    cfg = config or TrainConfig()
    if getattr(model, "is_deploy", False):
        raise TrainingError("train the training form of the model, not a reparameterized one")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.num_threads or os.cpu_count() or 1)
    try:
        return _train(model, train_arrays, val_arrays, cfg, log or (lambda _msg: None), arch)
    finally:
        torch.set_num_threads(previous_threads)


def _train(model: nn.Module, train_arrays, val_arrays, cfg: TrainConfig, log: Callable[[str], None],
           arch: str | None) -> list[dict]:
    mcfg = model.cfg
    x_train, y_train = _check_arrays("training", train_arrays, mcfg.in_chans, mcfg.input_size)
    if int(y_train.min()) < 0 or int(y_train.max()) >= mcfg.num_classes:
        raise TrainingError(f"labels must lie in 0..{mcfg.num_classes - 1}, found {int(y_train.min())}.."
                            f"{int(y_train.max())}")
    if val_arrays is not None:
        x_val, y_val = _check_arrays("validation", val_arrays, mcfg.in_chans, mcfg.input_size)
        x_val_np, y_val_np = x_val.numpy(), y_val.numpy()
    scale, offset = normalizer(mcfg.mean, mcfg.std, mcfg.in_chans)

    n = len(x_train)
    steps_per_epoch = n // cfg.batch_size if n >= cfg.batch_size else 1  # drop the last partial batch
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))

    model.train()
    groups = _param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999))
    ema = ModelEma(model, cfg.ema_decay)
    history: list[dict] = []
    start_epoch, step = 0, 0

    ckpt = Path(cfg.checkpoint) if cfg.checkpoint else None
    if cfg.resume:
        if ckpt is None or not ckpt.is_file():
            raise TrainingError(f"--resume: no checkpoint to resume from at {ckpt}")
        start_epoch, step, history = _resume(ckpt, model, ema, opt, cfg, steps_per_epoch, total_steps)
        log(f"resumed from {ckpt}: {start_epoch} epoch(s) done, step {step}/{total_steps}")
        if start_epoch >= cfg.epochs:
            log("nothing to do: the checkpoint already completed every epoch")
            _copy_into(model, ema.module)
            model.eval()
            return history

    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=g)
        model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        bar = range(steps_per_epoch)
        pbar = None
        if cfg.progress:
            from tqdm import tqdm

            pbar = tqdm(bar, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="it", leave=False, dynamic_ncols=True)
            bar = pbar
        for i in bar:
            idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            xb = _augment(x_train[idx], cfg.crop_padding, cfg.hflip, g)
            xb = _to_float(xb, scale, offset)
            yb = y_train[idx]
            lr = lr_at(step, total_steps, warmup_steps, cfg.lr, cfg.min_lr_ratio)
            for group in opt.param_groups:
                group["lr"] = lr
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                logits = model(xb)
            loss = criterion(logits.float(), yb)
            if not torch.isfinite(loss):
                raise TrainingError(f"loss became {loss.item()} at epoch {epoch + 1}, step {i}: lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema.update(model)
            step += 1
            b = len(yb)
            loss_sum += loss.item() * b
            correct += int((logits.argmax(1) == yb).sum())
            seen += b
            if pbar is not None and (i % 10 == 0 or i == steps_per_epoch - 1):
                pbar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{100.0 * correct / seen:.2f}", lr=f"{lr:.4f}")
        if pbar is not None:
            pbar.close()
        train_s = time.perf_counter() - t0
        rec = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_top1": 100.0 * correct / seen,
               "lr": lr, "steps": step, "train_seconds": round(train_s, 2)}
        if val_arrays is not None:
            rec["val_top1_ema"], _ = evaluate(ema.module, x_val_np, y_val_np, mcfg.mean, mcfg.std, cfg.eval_batch_size)
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        history.append(rec)
        if ckpt is not None:
            _save(ckpt, ema, model, opt, cfg, epoch + 1, step, total_steps, warmup_steps, history, arch)
        log(f"epoch {epoch + 1}/{cfg.epochs}: loss {rec['train_loss']:.4f}  train top-1 {rec['train_top1']:.2f}%"
            + (f"  val top-1 (EMA) {rec['val_top1_ema']:.2f}%" if "val_top1_ema" in rec else "")
            + f"  lr {lr:.5f}  {rec['seconds']:.1f} s" + ("  (checkpoint saved)" if ckpt is not None else ""))

    _copy_into(model, ema.module)
    model.eval()
    return history


def _copy_into(model: nn.Module, src: nn.Module) -> None:
    model.load_state_dict(src.state_dict(), strict=True)


def _resume(path: Path, model: nn.Module, ema: ModelEma, opt: torch.optim.Optimizer, cfg: TrainConfig,
            steps_per_epoch: int, total_steps: int) -> tuple[int, int, list[dict]]:
    from parnet_cpu.models.checkpoint import CheckpointError, check_state_dict, read_checkpoint

    try:
        obj = read_checkpoint(path)
    except CheckpointError as exc:
        raise TrainingError(str(exc)) from None
    ts = obj.get("train_state")
    if not isinstance(ts, dict):
        raise TrainingError(f"{path} holds no training state (not written by `parnet-cpu train`?); cannot resume")
    if obj.get("config") != model.cfg.to_dict():
        raise TrainingError(f"{path} was trained with another model configuration: {obj.get('config')}")
    saved = ts.get("train_config", {})
    now = cfg.resume_relevant()
    defaults = TrainConfig().resume_relevant()  # settings added later: older checkpoints used the default
    diff = {k: (saved.get(k, defaults[k]), v) for k, v in now.items() if saved.get(k, defaults[k]) != v}
    if diff:
        raise TrainingError(f"cannot resume {path} with different settings (saved, now): {diff}")
    sched = ts["scheduler"]
    if sched["total_steps"] != total_steps:
        raise TrainingError(f"{path}: schedule of {sched['total_steps']} steps, now {total_steps} "
                            "(different --epochs or training-set size); cannot resume")
    try:
        check_state_dict(model, ts["model"])
        check_state_dict(ema.module, obj["state_dict"])
    except CheckpointError as exc:
        raise TrainingError(str(exc)) from None
    model.load_state_dict(ts["model"], strict=True)
    ema.module.load_state_dict(obj["state_dict"], strict=True)
    ema.updates = int(ts["ema_updates"])
    opt.load_state_dict(ts["optimizer"])
    epoch = int(obj["epoch"])
    step = int(sched["step"])
    if step != epoch * steps_per_epoch:
        raise TrainingError(f"{path}: step {step} does not match {epoch} epochs of {steps_per_epoch} steps")
    return epoch, step, list(ts.get("history", []))
