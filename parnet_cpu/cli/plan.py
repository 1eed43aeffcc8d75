"""`parnet-cpu plan`: what the multi-stream runtime would do on a machine with N cores (this one, a
simulated one, or a captured /proc + /sys tree), and what the cost model predicts there."""
from __future__ import annotations

import argparse
import json

from parnet_cpu.bench.quiet import add_quiet_args
from parnet_cpu.cli.common import add_model_dir_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="core groups, their MACs and predicted latency on a machine of N cores",
                       description="Plan the multi-stream runtime for a machine this one may not be: core groups per "
                       "stream (never across a socket, no SMT siblings or efficiency cores unless asked), each "
                       "group's MACs, and the cost model's latency for the multi-stream and single-graph plans at "
                       "batch 1 and 8, with the plan `auto` would choose. The cost model is fitted on a 1-thread "
                       "profile measured here (or read with --fit): a first-order prediction, not a measurement.")
    add_model_dir_arg(p)
    p.add_argument("--precision", choices=("int8", "bf16", "fp32"), help="default: int8 if present, else fp32")
    p.add_argument("--cpus", type=int, metavar="N", help="physical cores of a simulated machine (with --machine: "
                   "use only its first N usable physical cores); default: this machine")
    p.add_argument("--sockets", type=int, default=1, metavar="S", help="sockets (NUMA nodes) of the simulated machine")
    p.add_argument("--machine", metavar="DIR", help="a captured machine: a folder holding proc/cpuinfo and "
                   "sys/devices/system/... (such as tests/data/machines/xeon-spr-2s)")
    p.add_argument("--smt", action="store_true", help="also use SMT siblings (default: one thread per core)")
    p.add_argument("--efficiency-cores", action="store_true", help="also use hybrid efficiency cores")
    p.add_argument("--fit", metavar="FILE", help="cost model from an earlier `plan --json` (skips the profiling)")
    p.add_argument("--no-latency", action="store_true", help="groups and MACs only: no profiling, no latency")
    p.add_argument("--handover-ms", type=float, default=0.3,
                   help="assumed cost of the stem->streams->tail messages per call (default 0.3 ms)")
    p.add_argument("--json", metavar="FILE", help="also write the plan (and the fitted cost model) as JSON")
    add_quiet_args(p)
    p.set_defaults(handler=run)


def target_machine(args):
    """The MachineInfo to plan for: captured tree, simulated machine, or this machine."""
    from parnet_cpu.cli import CliError
    from parnet_cpu.runtime.cores import CoreSpecError, simulated_machine
    from parnet_cpu.system.cpuinfo import describe_machine, usable_physical_cores

    if args.cpus is not None and args.cpus < 1:
        raise CliError("--cpus must be at least 1")
    if args.machine:
        try:
            info = describe_machine(args.machine, query_openvino=False)
        except ValueError as exc:
            raise CliError(str(exc)) from None
        if args.cpus is not None:
            cores = [c for core in usable_physical_cores(info, use_smt=True, include_efficiency=True)[:args.cpus]
                     for c in core]
            info = describe_machine(args.machine, query_openvino=False, pid_affinity=set(cores))
        return info
    if args.cpus is not None:
        try:
            return simulated_machine(args.cpus, args.sockets, threads_per_core=2)
        except CoreSpecError as exc:
            raise CliError(str(exc)) from None
    return describe_machine(query_openvino=False)


def make_report(args) -> dict:
    from parnet_cpu.artifacts import ModelDir, ModelDirError
    from parnet_cpu.cli import CliError
    from parnet_cpu.runtime.cores import CoreSpecError, place_stream_groups, single_graph_cores
    from parnet_cpu.runtime.costmodel import fit_layer_model, predict_plan, profile_stages, stage_ms
    from parnet_cpu.runtime.partition import RECOMPUTE_STAGES
    from parnet_cpu.runtime.plan import stage_macs, stream_costs
    from parnet_cpu.system.cpuinfo import format_cpu_list

    info = target_machine(args)
    try:
        md = ModelDir.open(args.model)
        precision = args.precision or md.default_precision
        ir = md.ir_path(precision)
    except ModelDirError as exc:
        raise CliError(str(exc)) from None
    macs = stage_macs(ir, RECOMPUTE_STAGES)
    costs = stream_costs(macs)
    model = None
    if args.fit:
        try:
            model = json.loads(open(args.fit).read())["cost_model"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CliError(f"--fit {args.fit}: not a `plan --json` file with a cost model ({exc})") from None
    elif not args.no_latency:
        import os

        from parnet_cpu.bench.quiet import LoadWatch

        watch = LoadWatch(sorted(os.sched_getaffinity(0)), args.require_quiet, args.quiet_wait, "profiling").settle()
        model = fit_layer_model(profile_stages(md.path, precision, 1, (1, 8)), 0.0)
        model["other_load"] = watch.finish()
        watch.check()
    group_time = None
    if model is not None:
        group_time = lambda i, n: stage_ms(model["stages"][f"stream{i + 1}"]["1"], n, model["sync_ms"])  # noqa: E731
    try:
        groups = place_stream_groups(info, costs, args.smt, args.efficiency_cores, group_time)
    except CoreSpecError as exc:
        raise CliError(str(exc)) from None
    socket_of = {c: core.socket for core in info.cores for c in core.cpus}
    single = single_graph_cores(info, args.smt, args.efficiency_cores)
    report = {
        "machine": {"cpu": info.model_name, "source": info.root, "sockets": info.sockets,
                    "physical_cores": info.physical_cores, "usable_cpus": format_cpu_list(info.usable_cpus)},
        "model": str(md.path), "precision": precision, "use_smt": args.smt,
        "stage_gmacs": {k: v / 1e9 for k, v in macs.items()},
        "groups": [{"stream": i + 1, "gmacs": costs[i] / 1e9, "threads": len(g), "cpus": format_cpu_list(g),
                    "sockets": sorted({socket_of[c] for c in g})} for i, g in enumerate(groups)],
        "single_graph": {"threads": len(single), "cpus": format_cpu_list(single)},
        "predictions": None, "handover_ms": args.handover_ms,
    }
    if model is not None:
        union = len({c for g in groups for c in g})
        report["predictions"] = [predict_plan(model, b, [len(g) for g in groups], union, len(single), args.handover_ms)
                                 for b in (1, 8)]
        report["cost_model"] = model
        report["caveat"] = ("predicted, not measured: per-layer model fitted on 1 thread of this machine "
                            "(runtime/costmodel.py); memory bandwidth and clock changes are not modelled")
    return report


def format_report(r: dict) -> str:
    m = r["machine"]
    lines = [f"{m['cpu']} ({m['source']}): {m['physical_cores']} physical cores, {m['sockets']} socket(s); "
             f"{r['precision']} model {r['model']}"]
    for g in r["groups"]:
        lines.append(f"  stream {g['stream']}: {g['threads']:>3} threads on CPUs {g['cpus']:<14} socket "
                     f"{','.join(map(str, g['sockets']))}  {g['gmacs']:.3f} GMACs")
    lines.append(f"  single graph: {r['single_graph']['threads']} threads on CPUs {r['single_graph']['cpus']}")
    for p in r["predictions"] or []:
        lines.append(f"  batch {p['batch']}: predicted multi-stream {p['multistream_ms']:.2f} ms, single graph "
                     f"{p['single_ms']:.2f} ms (ratio {p['ratio_multi_vs_single']:.2f}) -> auto would choose "
                     f"{p['auto_would_choose']}")
    if r["predictions"]:
        lines.append(f"  ({r['caveat']})")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from parnet_cpu.bench.quiet import NotQuietError, refuse

    try:
        report = make_report(args)
    except NotQuietError as exc:
        return refuse("plan", exc)
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0
