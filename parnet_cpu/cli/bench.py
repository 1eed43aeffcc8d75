"""`parnet-cpu bench`: multi-stream runtime vs single-graph engines on the same cores."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from parnet_cpu.bench.quiet import add_quiet_args
from parnet_cpu.cli.common import (add_json_arg, add_model_dir_arg, add_overwrite_arg, check_output_arg,
                                   check_output_clash, output_arg, write_json_arg, write_report_arg)
from parnet_cpu.options import arg, arg_list


cores_per_stream_arg = arg("cores_per_stream")  # also --cores-per-stream of serve


def newest_model_dir(where: Path = Path(".")) -> Path | None:
    """The most recently written model folder directly under `where` (what `bench` uses without --model-dir)."""
    from parnet_cpu.artifacts import MANIFEST

    found = [d for d in where.iterdir() if d.is_dir() and (d / MANIFEST).is_file()] if where.is_dir() else []
    return max(found, key=lambda d: (d / MANIFEST).stat().st_mtime, default=None)


def check_cores_feasible(sweep: list, cores, use_smt: bool) -> None:
    """Refuse an explicit core request this machine cannot meet before any engine starts (it would
    otherwise run every other engine for minutes and report the failure as a table row)."""
    from parnet_cpu.runtime.cores import CoreSpecError, validate_groups
    from parnet_cpu.runtime.leases import available_cores, plan_groups
    from parnet_cpu.runtime.partition import NUM_STREAMS

    if cores:
        validate_groups(cores)
        return
    for cps in sweep:
        if isinstance(cps, int):
            try:
                plan_groups(NUM_STREAMS, cps, use_smt)
            except CoreSpecError as exc:
                usable = len(available_cores(use_smt))
                largest = (f"the largest valid --cores-per-stream here is {usable // NUM_STREAMS}" if usable >= NUM_STREAMS else
                           "multi-stream needs at least 3 cores: use --cores to give overlapping groups, or "
                           "--engines without multistream")
                raise CoreSpecError(f"--cores-per-stream {cps}: {exc}; {usable} usable physical cores, "
                                    f"{largest}") from None


def restrict_to_threads(threads: int, use_smt: bool) -> list[int]:
    """benchmark_app's `-nthreads N` here: narrow this process (and so every engine, pinned child and Runtime
    it starts, which all take their CPUs from the affinity) to the first N free physical cores (N logical CPUs
    with --use-smt), so every engine runs N threads on the same N CPUs. Returns the CPUs."""
    from parnet_cpu.runtime.cores import CoreSpecError
    from parnet_cpu.runtime.leases import available_cores

    cores = available_cores(use_smt)
    cpus = [c for core in cores for c in core] if use_smt else [core[0] for core in cores]
    if threads > len(cpus):
        unit = "logical CPUs" if use_smt else "physical cores"
        raise CoreSpecError(f"-nthreads {threads}: this process may use {len(cpus)} free {unit} here; "
                            f"ask for at most {len(cpus)}")
    chosen = sorted(cpus[:threads])
    os.sched_setaffinity(0, chosen)
    for tid in os.listdir("/proc/self/task"):  # threads started earlier (imports' pools) keep their own mask
        try:
            os.sched_setaffinity(int(tid), chosen)
        except (OSError, ValueError):
            pass  # a thread that ended meanwhile
    return chosen


def register(sub: argparse._SubParsersAction) -> None:
    from parnet_cpu.bench import ENGINES

    p = sub.add_parser("bench", help="benchmark the multi-stream runtime against single-graph engines",
                       description="Latency (p50/p90/p99) and throughput of every engine on the same cores.")
    add_model_dir_arg(p, required=False, extra_help="; default: the newest one in the current directory")
    p.add_argument("--cores-per-stream", type=cores_per_stream_arg, default="auto",
                   help="physical cores per stream, or auto (proportional to stream cost; default)")
    p.add_argument("--cores", help="explicit groups, one per stream, separated by ':' e.g. 0-7:8-15:16-23")
    p.add_argument("--sweep", type=arg_list("cores_per_stream"),
                   help="comma-separated cores-per-stream values to sweep (for the plot)")
    p.add_argument("--use-smt", action="store_true", help="also use SMT siblings")
    p.add_argument("--threads", "-nthreads", type=arg("threads"),
                   help="run every engine on the first N free physical cores, one thread each (benchmark_app's "
                        "-nthreads; default: every free core; not with --cores)")
    p.add_argument("--precision", choices=("fp32", "bf16", "int8"), help="default: int8 if present, else fp32")
    p.add_argument("--batches", "-b", type=arg_list("batch_size"), default="1,8",
                   help="batch sizes (default 1,8; -b as in benchmark_app)")
    p.add_argument("--engines", help=f"subset of {','.join(ENGINES)} (default: the first six, plus a "
                                     "backend's INT8 engine when the model folder has its INT8 artifact)")
    p.add_argument("--warmup", type=arg("warmup"), default=2)
    p.add_argument("--iters", "-niter", type=arg("iters"), default=10,
                   help="at least this many timed calls per row (default 10)")
    p.add_argument("--min-seconds", "-t", type=arg("min_seconds"), default=0.2,
                   help="minimum measuring time per row in seconds (benchmark_app's -t; default 0.2)")
    p.add_argument("--rounds", type=arg("rounds"), default=5,
                   help="engines are timed in alternating rounds (A B C A B C ...), --iters and --min-seconds "
                        "split over them; ratios are taken within a round (default 5)")
    p.add_argument("--calib", metavar="DIR", help="images ort-int8 calibrates on (default: the shipped photos; "
                   "give the folder the model folder's INT8 was calibrated on for a like-for-like comparison)")
    p.add_argument("--cost-model", action="store_true", help=argparse.SUPPRESS)  # retired: says so (run)
    add_json_arg(p, "the results")
    p.add_argument("--report-folder", "-report_folder", metavar="DIR",
                   help="write benchmark_report.json (benchmark_app's sections cmd_options, configuration_setup, "
                        "execution_results, one entry per engine and batch) and parnet_bench.json (this tool's "
                        "own JSON) into DIR")
    add_quiet_args(p)
    add_overwrite_arg(p, "an existing --json or --plot file")
    p.add_argument("--plot", metavar="PNG", help="write latency/throughput vs cores per stream as PNG")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from parnet_cpu.artifacts import ModelDirError
    from parnet_cpu.bench import ENGINES, BenchConfig, format_table, plot, run_bench
    from parnet_cpu.bench.quiet import NotQuietError, refuse
    from parnet_cpu.cli import CliError
    from parnet_cpu.runtime.cores import CoreSpecError, parse_groups

    if args.cost_model:
        raise CliError("bench --cost-model was retired: `parnet-cpu plan --model-dir DIR [--cpus N]` predicts both "
                       "plans on bigger machines with the per-layer cost model (the project's one prediction model)")
    engines = tuple(e.strip() for e in args.engines.split(",") if e.strip()) if args.engines else None
    unknown = sorted(set(engines or ()) - set(ENGINES))
    if unknown:
        raise CliError(f"unknown engines {unknown}; choose from {', '.join(ENGINES)}")
    try:
        batches = tuple(args.batches)  # checked by the flag's type
        sweep = list(args.sweep) if args.sweep else [args.cores_per_stream]
        cores = parse_groups(args.cores) if args.cores else None
        if args.threads is not None:
            if cores:
                raise CliError("-nthreads and --cores both choose the CPUs: give one of them")
            restrict_to_threads(args.threads, args.use_smt)
    except (ValueError, argparse.ArgumentTypeError, CoreSpecError) as exc:
        raise CliError(str(exc)) from None
    cfg = BenchConfig(batches=batches, warmup=args.warmup, iters=args.iters, min_seconds=args.min_seconds,
                      engines=engines, require_quiet=args.require_quiet, quiet_wait_s=args.quiet_wait,
                      rounds=args.rounds, calib_dir=args.calib)
    if args.model is None:
        found = newest_model_dir()
        if found is None:
            raise CliError("no --model-dir given and no model folder in the current directory; create one with "
                           "`parnet-cpu quantize --calib DIR` or `parnet-cpu export`, or pass --model-dir DIR")
        print(f"bench: using {found} (the newest model folder here; --model-dir DIR to choose)")
        args.model = str(found)
    try:
        if not engines or "multistream" in engines or "auto" in engines:
            check_cores_feasible(sweep, cores, args.use_smt)
    except CoreSpecError as exc:
        raise CliError(str(exc)) from None
    if args.report_folder:  # an output folder: created now, so a --json or --plot inside it is checked like any
        for dest in ("json", "plot"):
            check_output_clash(args, dest)  # (not one of its own files: said before anything is created)
        try:
            Path(args.report_folder).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CliError(f"--report-folder {args.report_folder}: {exc.strerror or exc}") from None
    for dest, kind in (("json", "bench"), ("plot", None)):
        check_output_arg(args, dest, kind)  # before the measuring
    results = []
    try:
        for cps in sweep:
            res = run_bench(args.model, cps, cores, args.precision, cfg, use_smt=args.use_smt)
            print(format_table(res))
            results.append(res)
    except (ModelDirError, CoreSpecError) as exc:
        raise CliError(str(exc)) from None
    except NotQuietError as exc:
        return refuse("bench", exc)
    payload = results[0] if len(results) == 1 else {"sweep": results}
    write_json_arg(args, "bench", payload)
    if args.report_folder:
        from parnet_cpu.outputs import own_report_kind
        from parnet_cpu.bench.report import benchmark_app_report

        folder = Path(args.report_folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            options = {k: v for k, v in vars(args).items() if k != "handler"}
            # each a checked single-file output; benchmark_app's format has no room for our stamp, so its file
            # is ours to replace when the parnet_bench.json beside it is (the pair is written together)
            own = own_report_kind(folder / "parnet_bench.json") == "bench"
            app = argparse.Namespace(**{**vars(args), "report_folder": str(folder / "benchmark_report.json"),
                                        "overwrite": args.overwrite or own})
            with output_arg(app, "report_folder") as f:
                f.write(json.dumps(benchmark_app_report(results, options), indent=2, sort_keys=True, default=str))
            write_report_arg(argparse.Namespace(**{**vars(args), "report_folder": str(folder / "parnet_bench.json")}),
                             "report_folder", "bench", payload)
        except OSError as exc:
            raise CliError(f"--report-folder {folder}: {exc}") from None
        print(f"wrote {folder / 'benchmark_report.json'} and {folder / 'parnet_bench.json'}")
    if args.plot:
        with output_arg(args, "plot", mode="wb") as f:
            plot(results, f)  # matplotlib writes PNG to a file object
    if args.require_quiet and not all(res["machine_was_quiet"] for res in results):
        return refuse("bench", NotQuietError("other work used the measured CPUs during the run (see other_load in "
                                             "the JSON); the numbers above are marked and not valid"))
    failed = [r for res in results for r in res["rows"] if "error" in r]
    if failed and len(failed) == sum(len(res["rows"]) for res in results):
        print("parnet-cpu bench: error: every engine failed (see the table)", file=sys.stderr)
        return 1
    return 0
