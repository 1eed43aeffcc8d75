"""`parnet-cpu quantize`: INT8 post-training quantization with a fidelity report."""
from __future__ import annotations

import argparse
import json
import os

from parnet_cpu.cli.common import add_model_args, check_out_arg, model_from_args, sigterm_as_interrupt
from parnet_cpu.options import arg
from parnet_cpu.quantization.base import QuantizeOptions, backend_class, backend_names, backends_help


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="INT8 post-training quantization (OpenVINO + NNCF) on an image folder",
                       description="Reparameterize, calibrate on real images, write FP32 + INT8 IR and report.json.")
    add_model_args(p)
    p.add_argument("--calib", required=True, help="image folder (ImageNet class folders, devkit/Kaggle/Caffe "
                   "label files, or unlabelled images)")
    p.add_argument("--labels", metavar="FILE", help="a label file kept outside --calib: Kaggle LOC_val_solution.csv, "
                   "devkit ILSVRC2012_validation_ground_truth.txt or Caffe val.txt (type read from its name)")
    p.add_argument("--out", help="output model folder (default: ./<model>-int8, e.g. ./parnet_s-int8)")
    p.add_argument("--backend", choices=backend_names(), default=QuantizeOptions.backend, help=backends_help())
    p.add_argument("--subset-size", type=arg("subset_size"), default=300, help="calibration images (default: 300)")
    p.add_argument("--preset", choices=("performance", "mixed"), default="mixed",
                   help="performance: symmetric activations; mixed: asymmetric activations (default: mixed)")
    p.add_argument("--fast-bias-correction", dest="fast_bias_correction", action="store_true", default=False,
                   help="fast bias correction (quicker, lower fidelity)")
    p.add_argument("--bias-correction", dest="fast_bias_correction", action="store_false",
                   help="full bias correction (default)")
    p.add_argument("--ignored-scope", action="append", metavar="PATTERN",
                   help="keep matching layers in float: a regex on node names, or se | stem | head | fusion; "
                        "repeatable; default: se and stem; 'none' quantizes everything")
    p.add_argument("--int8-leftovers", choices=("auto", "bf16", "f32"),
                   help="precision of the ops the INT8 model keeps in float, for the evaluation and the profile in "
                        "report.json (and, through PARNET_CPU_INT8_LEFTOVERS, every later compile); default auto: "
                        "bf16 where the CPU has it, else f32 (f32 with the default --ignored-scope: the defaults "
                        "before issue 14)")
    p.add_argument("--max-drop", type=arg("max_drop"),
                   help="accuracy-controlled PTQ: max top-1 drop in points (needs labels)")
    p.add_argument("--eval-limit", type=arg("eval_limit"), default=5000,
                   help="held-out images to evaluate (0: all; default 5000)")
    p.add_argument("--batch-size", type=arg("batch_size"), default=32)
    p.add_argument("--workers", type=arg("workers"), help="image decoding threads")
    p.add_argument("--seed", type=arg("seed"), default=0, help="calibration/held-out split seed")
    p.add_argument("--overwrite", action="store_true", help="replace an output folder written by parnet-cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from parnet_cpu.cli import CliError

    with sigterm_as_interrupt():
        if not os.path.isdir(args.calib):  # said first: nothing else matters until the data is there
            raise CliError(f"--calib {args.calib}: " + ("is a file; give the folder of calibration images"
                                                         if os.path.exists(args.calib) else "folder not found"))
        if args.out is None:
            args.out = default_out(args.model)
            print(f"writing the model folder to ./{args.out} (choose another with --out)")
        check_out_arg(args.out, args.overwrite, args)
        from parnet_cpu.outputs import output_lock

        with output_lock(args.out):  # a second run to the same --out is refused now, not overwritten later
            return _run(args)


def default_out(model: str) -> str:
    """./<model>-int8: a name that says what is inside, next to where the user typed the command."""
    return f"{model}-int8"


def _run(args: argparse.Namespace) -> int:
    """The job itself (the output folder was checked already)."""
    from parnet_cpu.artifacts import ModelDirError
    from parnet_cpu.cli import CliError
    from parnet_cpu.data import DatasetError
    from parnet_cpu.outputs import OutputError
    from parnet_cpu.quantization.ptq import QuantizationError, quantize_to_dir
    from parnet_cpu.runtime.engine import LEFTOVERS_ENV

    model, source = model_from_args(args)
    if args.int8_leftovers:
        os.environ[LEFTOVERS_ENV] = args.int8_leftovers  # this process's compiles: evaluation and the profile
    # the backend's ignored-scope policy (OpenVINO: se + stem by default; torch/IPEX: none)
    ignored = backend_class(args.backend).resolve_ignored_scope(args.ignored_scope)
    opts = QuantizeOptions(subset_size=args.subset_size, preset=args.preset,
                           fast_bias_correction=args.fast_bias_correction, ignored_scope=ignored,
                           max_drop=args.max_drop, eval_limit=args.eval_limit or None, batch_size=args.batch_size,
                           seed=args.seed, num_workers=args.workers, progress=not args.quiet, backend=args.backend)
    try:
        report = quantize_to_dir(model, source, args.calib, args.out, opts, overwrite=args.overwrite,
                                 label_file=args.labels,
                                 log=(lambda *a: None) if args.quiet else print)
    except (DatasetError, QuantizationError, ModelDirError, OutputError) as exc:
        raise CliError(str(exc)) from None
    print(format_report(report))
    print(f"wrote {args.out}/ ({report['backend']} backend; report.json)")
    return 0


def format_report(r: dict) -> str:
    cal = r["calibration"]
    lines = [f"calibration: {cal['decoded']} images decoded, {len(cal['skipped'])} skipped"
             + (f" ({', '.join(p for p, _ in cal['skipped'][:3])}...)" if cal["skipped"] else "")]
    ev = r.get("evaluation")
    if ev:
        f = ev["int8_vs_fp32"]
        lines.append(f"held-out images: {ev['held_out_images']}; INT8 vs FP32 top-1 agreement {f['top1_agreement']:.2f}%, "
                     f"SQNR {f['sqnr_db']:.1f} dB")
        if "top1" in ev["fp32"]:
            lines.append(f"top-1  FP32 {ev['fp32']['top1']:.2f}%  INT8 {ev['int8']['top1']:.2f}%   "
                         f"top-5  FP32 {ev['fp32']['top5']:.2f}%  INT8 {ev['int8']['top5']:.2f}%")
    counts = r["runtime_precision"]["int8"]["counts"]
    conv = {k: v for k, v in counts.items() if k.lower().startswith(("convolution", "fullyconnected", "conv2d", "linear", "ipex::llga"))}
    lines.append("INT8 model compute layers (type:precision:kernel): " + json.dumps(conv))
    lines.append("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in r["seconds"].items()))
    if r["random_weights"]:
        lines.append("NOTE: random weights - accuracy figures are meaningless; speed figures are valid.")
    return "\n".join(lines)
