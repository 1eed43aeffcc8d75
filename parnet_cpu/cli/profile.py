"""`parnet-cpu profile`: per-layer and per-kernel time of a model folder from OpenVINO's own counters."""
from __future__ import annotations

import argparse
import os

from parnet_cpu.bench.quiet import add_quiet_args
from parnet_cpu.cli.common import (STDOUT, add_json_arg, add_model_dir_arg, add_overwrite_arg, check_output_arg,
                                   write_json_arg)
from parnet_cpu.options import arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="per-layer time, kernels (AMX/VNNI/AVX2), matrix-unit share, GMAC/s vs peak",
                       description="Compile a model folder's IR as the Runtime does, with OpenVINO's per-node "
                       "performance counters on, and report where the time goes: per layer, per op class and per "
                       "kernel, the share on the matrix unit (AMX) and on VNNI/int8 kernels, reorders and precision "
                       "conversions, and achieved GMAC/s against the CPU's peak.")
    add_model_dir_arg(p)
    p.add_argument("--precision", choices=("int8", "bf16", "fp32"), help="default: int8 if present, else fp32")
    p.add_argument("--batch", type=arg("batch_size"), default=8, help="images per inference (default 8)")
    p.add_argument("--plan", choices=("single", "multistream"), default="single",
                   help="single: the whole graph; multistream: each stage of the multi-stream plan in turn")
    p.add_argument("--iters", type=arg("iters"), default=10, help="profiled inferences (counters summed; default 10)")
    p.add_argument("--threads", type=arg("threads"), help="inference threads (default: every usable physical core)")
    p.add_argument("--int8-leftovers", choices=("auto", "bf16", "f32"),
                   help="precision of the ops an INT8 IR keeps in float (default auto: bf16 where the CPU has it)")
    p.add_argument("--top", type=arg("top"), default=25, help="slowest layers listed in the table (default 25)")
    add_json_arg(p, "the full profile (every layer)")
    add_overwrite_arg(p, "an existing --json file")
    add_quiet_args(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from parnet_cpu.artifacts import ModelDirError
    from parnet_cpu.bench.quiet import LoadWatch, NotQuietError, refuse
    from parnet_cpu.cli import CliError
    from parnet_cpu.perf.profile import format_table, profile_model

    check_output_arg(args, "json", "profile")  # before the profiling
    try:
        watch = LoadWatch(sorted(os.sched_getaffinity(0)), args.require_quiet, args.quiet_wait, "profile").settle()
        report = profile_model(args.model, args.precision, args.batch, args.plan, args.iters, args.threads,
                               args.int8_leftovers)
    except (ModelDirError, ValueError) as exc:
        raise CliError(str(exc)) from None
    except NotQuietError as exc:
        return refuse("profile", exc)
    report["other_load"] = watch.finish()
    report["machine_was_quiet"] = watch.quiet
    print(format_table(report, args.top))
    write_json_arg(args, "profile", report)
    if args.json not in (None, STDOUT):
        print(f"wrote {args.json}")
    try:
        watch.check()
    except NotQuietError as exc:
        return refuse("profile", exc)
    return 0
