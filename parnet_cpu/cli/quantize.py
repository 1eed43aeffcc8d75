"""`parnet-cpu quantize`: INT8 post-training quantization with a fidelity report."""
from __future__ import annotations

import argparse
import json
import os

from parnet_cpu.cli.common import (add_json_arg, add_model_args, check_out_arg, check_output_arg, model_from_args,
                                   sigterm_as_interrupt, write_json_arg)
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
    drop = p.add_mutually_exclusive_group()
    drop.add_argument("--max-drop-points", type=arg("max_drop_points"), metavar="POINTS",
                      help="accuracy-controlled PTQ (needs labels): max top-1 drop in points, e.g. 1 (= NNCF's "
                           "max_drop 0.01)")
    drop.add_argument("--max-drop-fraction", type=arg("max_drop"), metavar="FRACTION",
                      help="the same in NNCF's unit: a fraction, e.g. 0.01 (= 1 point)")
    p.add_argument("--max-drop", action=UnitlessMaxDrop, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--eval-limit", type=arg("eval_limit"), default=5000,
                   help="held-out images to evaluate (0: all; default 5000)")
    p.add_argument("--batch-size", type=arg("batch_size"), default=32)
    p.add_argument("--workers", type=arg("workers"), help="image decoding threads")
    p.add_argument("--seed", type=arg("seed"), default=0, help="calibration/held-out split seed")
    p.add_argument("--overwrite", action="store_true", help="replace an output folder written by parnet-cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_json_arg(p, "the report (what OUT/report.json holds)")
    p.set_defaults(handler=run)


class UnitlessMaxDrop(argparse.Action):
    """`--max-drop N` is refused: it took top-1 points here while NNCF's max_drop is a fraction (0.01 = 1 point),
    so a bare number is misread by one reader or the other. Registered, not just absent: argparse would
    otherwise take `--max-drop` as an abbreviation of --max-drop-points or --max-drop-fraction."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            n = float(values)
            spellings = f"--max-drop-points {values} (top-1 points) or --max-drop-fraction {n / 100:g} (NNCF's unit)"
        except (TypeError, ValueError):
            spellings = "--max-drop-points 1 (top-1 points) or --max-drop-fraction 0.01 (NNCF's unit)"
        parser.error(f"{option_string} {values}: say the unit, NNCF's max_drop is a fraction (0.01 = 1 point) and "
                     f"this flag took points: {spellings}")


def max_drop_fraction(args: argparse.Namespace) -> float | None:
    """QuantizeOptions.max_drop (NNCF's fraction) from whichever of the two unit-named flags was given."""
    if args.max_drop_points is not None:
        return args.max_drop_points / 100.0
    return args.max_drop_fraction


def run(args: argparse.Namespace) -> int:
    from parnet_cpu.cli import CliError

    with sigterm_as_interrupt():
        check_output_arg(args, "json", "quantize")  # a usage error like a bad flag: before the data is looked at
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
                           max_drop=max_drop_fraction(args), eval_limit=args.eval_limit or None, batch_size=args.batch_size,
                           seed=args.seed, num_workers=args.workers, progress=not args.quiet, backend=args.backend)
    try:
        report = quantize_to_dir(model, source, args.calib, args.out, opts, overwrite=args.overwrite,
                                 label_file=args.labels,
                                 log=(lambda *a: None) if args.quiet else print)
    except (DatasetError, QuantizationError, ModelDirError, OutputError) as exc:
        raise CliError(str(exc)) from None
    print(format_report(report))
    print(f"wrote {args.out}/ ({report['backend']} backend; report.json)")
    write_json_arg(args, "quantize", report)
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
