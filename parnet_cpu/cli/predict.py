"""`parnet-cpu predict`: the top-k classes of every image in folders or files, one row per image, into
JSONL, CSV or Parquet (the logic is `parnet_cpu.predict`; torch-free, runs on the base install)."""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

from parnet_cpu.cli.common import add_json_arg, add_model_dir_arg, check_output_arg, sigterm_as_interrupt, write_json_arg
from parnet_cpu.options import arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify every image in folders or files into a .jsonl/.csv/.parquet file",
                       description="One row per image: its path and top-k labels, indices and probabilities, or "
                       "the reason it was skipped. Folders are read recursively (any layout). The output "
                       "appears whole when the run ends (Ctrl-C keeps the rows done so far; --resume "
                       "continues from them).")
    add_model_dir_arg(p)
    p.add_argument("--data", required=True, nargs="+", metavar="DIR|FILE", help="image folders and/or files")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="preds.jsonl, preds.csv or preds.parquet (Parquet needs pyarrow)")
    p.add_argument("--top-k", type=arg("top_k"), help="classes per image (default 5, or every class of a model "
                   "with fewer)")
    p.add_argument("--resume", action="store_true", help="keep the rows already in --out and do the rest")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--precision", choices=("fp32", "bf16", "int8"),
                   help="default: int8 if the folder has it, else fp32")
    p.add_argument("--batch-size", type=arg("batch_size"), default=32)
    p.add_argument("--workers", type=arg("workers"), help="decoding threads (default: usable CPUs)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_json_arg(p, "the run's summary (counts, time, files not read as images)")
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="compute the rows on Ray Data (the 'ray' extra): decoding in Ray tasks, inference in "
                   "--actors leased runtimes; ADDRESS: a Ray cluster (auto, HOST:PORT, ray://...), or none to start "
                   "a local one. The same rows and output; the images must be at the same paths on every node")
    p.add_argument("--actors", type=arg("workers"), default=1,
                   help="with --ray: runtimes in the actor pool, each on its share of one node's cores (default 1)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from parnet_cpu.artifacts import ModelDirError
    from parnet_cpu.cli import CliError
    from parnet_cpu.predict import PredictError, output_format, predict_folder
    from parnet_cpu.runtime import Runtime
    from parnet_cpu.runtime.cores import CoreSpecError

    if args.resume and args.overwrite:
        raise CliError("--resume keeps the rows in --out and --overwrite replaces them: pass one")
    check_output_arg(args, "json", "predict")
    try:
        output_format(args.out)  # a missing pyarrow is said before the model loads
        if args.ray is not None:
            rt = _ray_predictor(args)
        else:
            rt = Runtime(args.model, precision=args.precision, max_batch=args.batch_size)
    except (ModelDirError, CoreSpecError, PredictError) as exc:
        raise CliError(str(exc)) from None
    try:
        with sigterm_as_interrupt():
            summary = predict_folder(rt, args.data, args.out, top_k=args.top_k, batch_size=args.batch_size,
                                     workers=args.workers, resume=args.resume, overwrite=args.overwrite,
                                     progress=not args.quiet, top_k_name="--top-k")
    except (PredictError, ValueError) as exc:
        raise CliError(str(exc)) from None
    finally:
        rt.close()
    print(summary.line())
    write_json_arg(args, "predict", {**asdict(summary), "images_per_s": summary.images_per_s})
    if summary.interrupted or summary.error:
        print(f"parnet-cpu predict: {'interrupted' if summary.interrupted else 'stopped: ' + summary.error}; the "
              f"rows done so far are in {summary.out}: rerun with --resume to continue", file=sys.stderr)
        return 130 if summary.interrupted else 1
    return 0


def _ray_predictor(args: argparse.Namespace):
    """`--ray [ADDRESS]`: what `predict_folder` takes instead of a Runtime to compute the same rows on Ray
    Data (`parnet_cpu.ray`, imported only here); connected (or a local cluster started) until closed."""
    from parnet_cpu.cli import CliError

    try:
        from parnet_cpu.ray.batch import RayPredictor
    except ImportError as exc:
        raise CliError(f"--ray needs the 'ray' extra ({exc.name} is missing): pip install 'parnet-cpu[ray]'") from None
    try:
        return RayPredictor(args.model, address=None if args.ray == "local" else args.ray, actors=args.actors,
                            precision=args.precision, progress=not args.quiet)
    except (ValueError, ConnectionError) as exc:
        raise CliError(str(exc)) from None
