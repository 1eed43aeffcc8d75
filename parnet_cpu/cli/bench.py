"""`parnet-cpu bench`: multi-stream runtime vs single-graph engines on the same cores."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def cores_per_stream_arg(text: str):
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("cores per stream must be at least 1")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    from parnet_cpu.bench import ENGINES

    p = sub.add_parser("bench", help="benchmark the multi-stream runtime against single-graph engines",
                       description="Latency (p50/p90/p99) and throughput of every engine on the same cores.")
    p.add_argument("--model", required=True, help="model folder (export or quantize output)")
    p.add_argument("--cores-per-stream", type=cores_per_stream_arg, default="auto",
                   help="physical cores per stream, or auto (proportional to stream cost; default)")
    p.add_argument("--cores", help="explicit groups, one per stream, separated by ':' e.g. 0-7:8-15:16-23")
    p.add_argument("--sweep", help="comma-separated cores-per-stream values to sweep (for the plot)")
    p.add_argument("--use-smt", action="store_true", help="also use SMT siblings")
    p.add_argument("--precision", choices=("fp32", "bf16", "int8"), help="default: int8 if present, else fp32")
    p.add_argument("--batches", default="1,8", help="batch sizes (default 1,8)")
    p.add_argument("--engines", help=f"subset of {','.join(ENGINES)} (default: the first five, plus torch-int8/"
                                     "ipex-int8 when the model folder has their INT8 artifact)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--min-seconds", type=float, default=0.2, help="minimum measuring time per row")
    p.add_argument("--cost-model", action="store_true",
                   help="also time every stage at 1..N threads and predict 16/32/56-core latency")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--plot", metavar="PNG", help="write latency/throughput vs cores per stream as PNG")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from parnet_cpu.artifacts import ModelDirError, write_json
    from parnet_cpu.bench import ENGINES, BenchConfig, format_cost_model, format_table, plot, run_bench
    from parnet_cpu.cli import CliError
    from parnet_cpu.runtime.cores import CoreSpecError, parse_groups

    engines = tuple(e.strip() for e in args.engines.split(",") if e.strip()) if args.engines else None
    unknown = sorted(set(engines or ()) - set(ENGINES))
    if unknown:
        raise CliError(f"unknown engines {unknown}; choose from {', '.join(ENGINES)}")
    try:
        batches = tuple(int(b) for b in args.batches.split(","))
        sweep = [cores_per_stream_arg(v) for v in args.sweep.split(",")] if args.sweep else [args.cores_per_stream]
        cores = parse_groups(args.cores) if args.cores else None
    except (ValueError, argparse.ArgumentTypeError, CoreSpecError) as exc:
        raise CliError(str(exc)) from None
    cfg = BenchConfig(batches=batches, warmup=args.warmup, iters=args.iters, min_seconds=args.min_seconds,
                      engines=engines)
    results = []
    try:
        for cps in sweep:
            res = run_bench(args.model, cps, cores, args.precision, cfg, use_smt=args.use_smt,
                            with_cost_model=args.cost_model)
            print(format_table(res))
            if res["cost_model"]:
                print(format_cost_model(res["cost_model"]))
            results.append(res)
    except (ModelDirError, CoreSpecError) as exc:
        raise CliError(str(exc)) from None
    if args.json:
        write_json(Path(args.json), results[0] if len(results) == 1 else {"sweep": results})
    if args.plot:
        plot(results, Path(args.plot))
    return 0
