"""`parnet-cpu train`: train a ParNet on Fashion-MNIST (Debian IDX files) or a labelled image folder."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from parnet_cpu.cli import CliError
from parnet_cpu.cli.common import (add_json_arg, add_model_args, add_overwrite_arg, check_output_arg, model_from_args,
                                     output_arg, write_json_arg, write_report_arg)
from parnet_cpu.options import arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model (CPU) on Fashion-MNIST or a labelled image folder",
                       description="Train the training form of a ParNet with SGD/AdamW, cosine schedule, label "
                                   "smoothing and an EMA of the weights; the EMA weights are evaluated and saved. "
                                   "Inputs are resized/cropped exactly like `parnet-cpu eval` preprocesses them.")
    p.add_argument("--data", required=True,
                   help="'fmnist' (Fashion-MNIST IDX files from `apt-get install dataset-fashion-mnist` or "
                        "$PARNET_FMNIST_DIR; validates on its 10,000 test images) or a labelled image folder")
    p.add_argument("--val", metavar="DIR", help="labelled image folder to validate on (for --data DIR)")
    p.add_argument("--fmnist-dir", metavar="DIR", help="folder with the Fashion-MNIST IDX files (default: search)")
    add_model_args(p, default="parnet_fmnist")
    p.add_argument("--epochs", type=arg("epochs"), default=15)
    p.add_argument("--batch-size", type=arg("batch_size"), default=128)
    p.add_argument("--lr", type=arg("lr"), help="peak learning rate (default: 0.1 for sgd, 0.002 for adamw)")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    p.add_argument("--weight-decay", type=arg("weight_decay"), help="default: 5e-4 for sgd, 0.05 for adamw")
    p.add_argument("--warmup-epochs", type=arg("warmup_epochs"), default=1.0)
    p.add_argument("--label-smoothing", type=arg("label_smoothing"), default=0.1)
    p.add_argument("--ema-decay", type=arg("ema_decay"), default=0.999)
    p.add_argument("--crop-padding", type=arg("crop_padding"), default=2,
                   help="random-crop padding in pixels (0: no crop)")
    p.add_argument("--no-hflip", action="store_true", help="no random horizontal flips")
    p.add_argument("--bf16", action="store_true",
                   help="bf16 autocast for the forward/backward pass (fast on CPUs with AVX512-BF16/AMX; "
                        "weights, optimizer and EMA stay fp32); default: fp32 throughout")
    p.add_argument("--seed", type=arg("seed"), default=0)
    p.add_argument("--threads", type=arg("threads"), help="torch threads (default: all logical CPUs)")
    p.add_argument("--limit-train", type=arg("limit"), metavar="N", help="train on the first N training images only")
    p.add_argument("--limit-val", type=arg("limit"), metavar="N", help="validate on the first N validation images only")
    p.add_argument("--max-steps", type=arg("max_steps"), help=argparse.SUPPRESS)  # steps per epoch cap, for tests
    p.add_argument("--out", required=True, metavar="CKPT",
                   help="training checkpoint, rewritten after every epoch (EMA weights + resume state)")
    p.add_argument("--resume", action="store_true", help="continue from --out (same settings)")
    p.add_argument("--export", metavar="FILE", help="at the end, also write a slim checkpoint (EMA weights only)")
    p.add_argument("--report", metavar="JSON",
                   help="at the end, write a JSON report (command, seed, time, machine, accuracies)")
    add_overwrite_arg(p, "an existing --out, --export or --report file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_json_arg(p, "the report of --report")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from parnet_cpu.data import DatasetError, ImageDecodeError, detect_layout
    from parnet_cpu.models.parnet import MODEL_CONFIGS
    from parnet_cpu.data.fmnist import FASHION_MNIST_CLASSES, IdxError
    from parnet_cpu.training.trainer import (TrainConfig, TrainingError, evaluate, export_checkpoint,
                                             fashion_mnist_arrays, image_folder_arrays, machine_description, train)

    t_start = time.perf_counter()
    fmnist = args.data.lower() in ("fmnist", "fashion-mnist", "fashion_mnist")
    if args.model.lower().replace("-", "_") not in MODEL_CONFIGS:
        raise CliError(f"unknown model {args.model!r}; available: {', '.join(sorted(MODEL_CONFIGS))}")
    if args.resume and args.checkpoint:
        raise CliError("--resume continues from --out; do not combine it with --checkpoint")
    if args.resume and args.overwrite:
        raise CliError("--resume continues --out and --overwrite replaces it: pass one")
    check_outputs(args)
    try:
        if fmnist:
            if args.val:
                raise CliError("--val is for --data DIR; Fashion-MNIST validates on its own test images")
            model, _ = model_from_args(args, data_class_names=FASHION_MNIST_CLASSES, seed=args.seed, fresh=True)
            cfg = model.cfg
            if cfg.in_chans != 1 or cfg.num_classes != 10:
                raise CliError(f"Fashion-MNIST needs a 1-channel, 10-class model (have in_chans={cfg.in_chans}, "
                               f"num_classes={cfg.num_classes}): use --model parnet_fmnist or --in-chans 1 "
                               "--num-classes 10")
            print("preparing Fashion-MNIST (resize to the model input like evaluation does)...", file=sys.stderr)
            train_arrays = fashion_mnist_arrays(cfg, args.fmnist_dir, "train", args.limit_train)
            test_arrays = fashion_mnist_arrays(cfg, args.fmnist_dir, "test")
            val_arrays = tuple(a[:args.limit_val] for a in test_arrays) if args.limit_val else test_arrays
            source = {"data": "fashion-mnist", "train_images": len(train_arrays[0]), "val": "test split"}
        else:
            ds = detect_layout(args.data)
            model, _ = model_from_args(args, data_classes=ds.num_classes, data_class_names=ds.class_names,
                                       seed=args.seed, fresh=True)
            train_arrays = image_folder_arrays(args.data, model.cfg, args.limit_train, not args.quiet)[:2]
            val_arrays = None
            if args.val:
                val_arrays = image_folder_arrays(args.val, model.cfg, args.limit_val, not args.quiet)[:2]
            test_arrays = None
            source = {"data": str(args.data), "train_images": len(train_arrays[0]), "val": args.val}
    except (FileNotFoundError, IdxError, TrainingError, DatasetError, ImageDecodeError) as exc:
        raise CliError(str(exc)) from None

    sgd = args.optimizer == "sgd"
    try:
        tcfg = TrainConfig(
            epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer,
            lr=args.lr if args.lr is not None else (0.1 if sgd else 0.002),
            weight_decay=args.weight_decay if args.weight_decay is not None else (5e-4 if sgd else 0.05),
            warmup_epochs=args.warmup_epochs, label_smoothing=args.label_smoothing, ema_decay=args.ema_decay,
            crop_padding=args.crop_padding, hflip=not args.no_hflip, seed=args.seed, num_threads=args.threads,
            checkpoint=args.out, resume=args.resume, max_steps_per_epoch=args.max_steps, progress=not args.quiet,
            bf16=args.bf16,
            extra=source)
    except TrainingError as exc:
        raise CliError(str(exc)) from None
    print(f"training {args.model} ({sum(p.numel() for p in model.parameters()):,} parameters) on "
          f"{len(train_arrays[0]):,} images for {tcfg.epochs} epochs; checkpoint: {args.out}", file=sys.stderr)
    t_train = time.perf_counter()
    try:
        history = train(model, train_arrays, val_arrays, tcfg, log=lambda m: print(m, file=sys.stderr),
                        arch=args.model)
    except TrainingError as exc:
        raise CliError(str(exc)) from None
    train_seconds = time.perf_counter() - t_train

    result: dict = {}
    if test_arrays is not None:
        acc, preds = evaluate(model, *test_arrays)
        sub = float((preds[:1000] == test_arrays[1][:1000]).mean() * 100.0)
        result = {"fp32_test_top1": acc, "fp32_test_images": int(len(preds)),
                  "fp32_test_correct": int((preds == test_arrays[1]).sum()),
                  "fp32_test_first1000_top1": sub,
                  "fp32_test_first1000_correct": int((preds[:1000] == test_arrays[1][:1000]).sum())}
        print(f"FP32 (EMA) top-1 on the {len(preds):,} test images: {acc:.2f}%   on test images 0..999: {sub:.1f}%")
    elif history and "val_top1_ema" in history[-1]:
        print(f"FP32 (EMA) validation top-1: {history[-1]['val_top1_ema']:.2f}%")

    if args.export:
        from parnet_cpu.outputs import sha256_file

        with output_arg(args, "export", mode="wb") as f:
            export_checkpoint(args.out, f, **({"test_accuracy": result} if result else {}))
        print(f"wrote {args.export} (EMA weights, fp32, training form; sha256 {sha256_file(args.export)[:16]}...)")
    if args.report or args.json:
        from parnet_cpu.outputs import sha256_file

        shipped = Path(args.export) if args.export else Path(args.out)
        report = {
            "model": args.model,
            "command": "parnet-cpu " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["train"] else None,
            "seed": args.seed,
            "epochs": args.epochs,
            "train_config": {k: v for k, v in vars(tcfg).items() if k not in ("extra", "progress")},
            "training_wall_seconds": round(train_seconds, 1),
            "total_wall_seconds": round(time.perf_counter() - t_start, 1),
            "resumed": bool(args.resume),
            "machine": {**machine_description(), "torch_threads": tcfg.num_threads or os.cpu_count()},
            "data": source,
            **result,
            "config": model.cfg.to_dict(),
            "parameters": int(sum(p.numel() for p in model.parameters())),
            "checkpoint": {"file": shipped.name, "bytes": shipped.stat().st_size, "sha256": sha256_file(shipped)},
            "history": history,
        }
        if args.report:
            write_report_arg(args, "report", "train", report)
            print(f"wrote {args.report}")
        write_json_arg(args, "train", report)
    return 0


def check_outputs(args: argparse.Namespace) -> None:
    """Every output of `train`, before any work: none may be an input (the data, --val, --checkpoint,
    --classes) or another output, and an existing file is replaced only with --overwrite (--report: or when it
    is an earlier train report); with --resume, --out is the checkpoint to continue, so it may exist."""
    if args.resume:  # --out is read and rewritten: only its collisions with the other paths are checked
        check_output_arg(argparse.Namespace(**{**vars(args), "overwrite": True}), "out")
    else:
        check_output_arg(args, "out")
    check_output_arg(args, "export")
    check_output_arg(args, "report", "train")
    check_output_arg(args, "json", "train")
