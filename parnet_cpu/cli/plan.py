"""`parnet-cpu plan`: what the multi-stream runtime would do on a machine with N cores (this one, a
simulated one, or a captured /proc + /sys tree), and what the cost model predicts there."""
from __future__ import annotations

import argparse
import json
import os

from parnet_cpu.bench.quiet import add_quiet_args
from parnet_cpu.cli.common import add_json_arg, add_model_dir_arg, add_overwrite_arg, check_output_arg, write_json_arg
from parnet_cpu.options import arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="core groups, their MACs and predicted latency on a machine of N cores",
                       description="Plan the multi-stream runtime for a machine this one may not be: core groups per "
                       "stream (never across a socket, no SMT siblings or efficiency cores unless asked), each "
                       "group's MACs, and the cost model's latency for the multi-stream and single-graph plans at "
                       "batch 1 and 8, with the plan `auto` would choose. The cost model is fitted on a 1-thread "
                       "profile measured here (or read with --fit): a first-order prediction, not a measurement.")
    add_model_dir_arg(p)
    p.add_argument("--precision", choices=("int8", "bf16", "fp32"), help="default: int8 if present, else fp32")
    p.add_argument("--cpus", type=arg("cpus"), metavar="N", help="physical cores of a simulated machine (with --machine: "
                   "use only its first N usable physical cores); default: this machine")
    p.add_argument("--sockets", type=arg("sockets"), default=1, metavar="S", help="sockets (NUMA nodes) of the simulated machine")
    p.add_argument("--machine", metavar="DIR", help="a captured machine: a folder holding proc/cpuinfo and "
                   "sys/devices/system/... (such as tests/data/machines/xeon-spr-2s)")
    p.add_argument("--smt", action="store_true", help="also use SMT siblings (default: one thread per core)")
    p.add_argument("--efficiency-cores", action="store_true", help="also use hybrid efficiency cores")
    p.add_argument("--fit", metavar="FILE", help="cost model from an earlier `plan --json` (skips the profiling)")
    p.add_argument("--no-latency", action="store_true", help="groups and MACs only: no profiling, no latency")
    p.add_argument("--handover-ms", type=arg("handover_ms"), default=None,
                   help="cost of the stem->streams->tail->caller messages per call (default: 3 x the parent-worker "
                        "message round trip measured here, or the one recorded in --fit)")
    add_json_arg(p, "the plan (and the fitted cost model)")
    add_quiet_args(p)
    add_overwrite_arg(p, "an existing --json file")
    p.set_defaults(handler=run)


def target_machine(args):
    """The MachineInfo to plan for: captured tree, simulated machine, or this machine."""
    from parnet_cpu.cli import CliError
    from parnet_cpu.runtime.cores import CoreSpecError, simulated_machine
    from parnet_cpu.system.cpuinfo import describe_machine, usable_physical_cores

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


SCAN_CORES = tuple(range(8, 113, 8))  # the core counts of the break-even scan (single-socket machines)
HANDOVERS_PER_CALL = 3  # stem -> streams -> tail -> caller: three parent<->worker message round trips


def measured_handover(md, precision: str) -> tuple[float, str]:
    """The hand-over term: HANDOVERS_PER_CALL x the parent<->worker message round trip measured on this
    machine (`Runtime.message_round_trip_ms`, the single graph in a worker pinned to one CPU)."""
    from parnet_cpu.runtime.runtime import Runtime

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return 0.0, "not measured (one CPU: a Runtime here runs in-process, without messages): 0"
    with Runtime(md.path, precision=precision, plan="single", cores=[[cpus[-1]]], share=True) as rt:
        rtt = rt.message_round_trip_ms()
    return HANDOVERS_PER_CALL * rtt, (f"{HANDOVERS_PER_CALL} x the measured parent-worker message round trip "
                                      f"({rtt:.3f} ms, Runtime.message_round_trip_ms on this machine)")


def make_report(args) -> dict:
    from parnet_cpu.artifacts import ModelDir, ModelDirError
    from parnet_cpu.cli import CliError
    from parnet_cpu.runtime.cores import CoreSpecError, place_stream_groups, single_graph_cores
    from parnet_cpu.perf.costmodel import (break_even, fit_layer_model, predict_plan, profile_stages,
                                           scan_core_counts, stage_ms)
    from parnet_cpu.runtime.partition import RECOMPUTE_STAGES
    from parnet_cpu.runtime.plan import stage_macs, stream_costs, time_balanced_groups
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
    model, handover, handover_source = None, args.handover_ms, "--handover-ms"
    if args.fit:
        try:
            fitted = json.loads(open(args.fit).read())
            model = fitted["cost_model"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CliError(f"--fit {args.fit}: not a `plan --json` file with a cost model ({exc})") from None
        if handover is None and isinstance(fitted.get("handover_ms"), (int, float)):
            handover, handover_source = fitted["handover_ms"], f"{fitted.get('handover_source', 'measured')} (--fit)"
    elif not args.no_latency:
        from parnet_cpu.bench.quiet import LoadWatch

        watch = LoadWatch(sorted(os.sched_getaffinity(0)), args.require_quiet, args.quiet_wait, "profiling").settle()
        model = fit_layer_model(profile_stages(md.path, precision, 1, (1, 8)), 0.0)
        if handover is None:
            handover, handover_source = measured_handover(md, precision)
        model["other_load"] = watch.finish()
        watch.check()
    if handover is None:
        handover, handover_source = 0.0, "not needed (no latency prediction)"
    group_time = None
    if model is not None:
        group_time = lambda i, n: stage_ms(model["stages"][f"stream{i + 1}"]["1"], n, model["sync_ms"])  # noqa: E731
    try:
        mac_groups = place_stream_groups(info, costs, args.smt, args.efficiency_cores)
        groups = (time_balanced_groups(info, costs, group_time, args.smt, args.efficiency_cores) if model is not None
                  else mac_groups)
    except CoreSpecError as exc:
        raise CliError(str(exc)) from None
    socket_of = {c: core.socket for core in info.cores for c in core.cpus}
    single = single_graph_cores(info, args.smt, args.efficiency_cores)

    def describe(gs):
        return [{"stream": i + 1, "gmacs": costs[i] / 1e9, "threads": len(g), "cpus": format_cpu_list(g),
                 "sockets": sorted({socket_of[c] for c in g})} for i, g in enumerate(gs)]

    report = {
        "machine": {"cpu": info.model_name, "source": info.root, "sockets": info.sockets,
                    "physical_cores": info.physical_cores, "usable_cpus": format_cpu_list(info.usable_cpus)},
        "model": str(md.path), "precision": precision, "use_smt": args.smt,
        "stage_gmacs": {k: v / 1e9 for k, v in macs.items()},
        "sizing": "predicted time" if model is not None else "MACs",
        "groups": describe(groups), "mac_groups": describe(mac_groups),
        # the groups as the runtime takes them (the runtime's own auto split follows MACs; these follow time)
        "cores_arg": ":".join(format_cpu_list(g) for g in groups),
        "single_graph": {"threads": len(single), "cpus": format_cpu_list(single)},
        "predictions": None, "handover_ms": handover, "handover_source": handover_source,
    }
    if model is not None:
        def predict(gs):
            union = len({c for g in gs for c in g})
            return [predict_plan(model, b, [len(g) for g in gs], union, len(single), handover) for b in (1, 8)]

        report["predictions"] = predict(groups)
        report["predictions_mac_split"] = predict(mac_groups)
        scan = scan_core_counts(model, costs, SCAN_CORES, (1, 8), handover)
        report["scan"] = scan
        report["break_even_cores"] = {k: break_even(scan, k) for k in scan[0] if k.startswith("ratio_")}
        report["cost_model"] = model
        report["caveat"] = ("predicted, not measured: per-layer model fitted on 1 thread of this machine "
                            "(perf/costmodel.py); memory bandwidth and clock changes are not modelled")
    return report


def format_report(r: dict) -> str:
    m = r["machine"]
    lines = [f"{m['cpu']} ({m['source']}): {m['physical_cores']} physical cores, {m['sockets']} socket(s); "
             f"{r['precision']} model {r['model']}"]
    splits = [("time", r["groups"], r["predictions"]), ("MAC", r["mac_groups"], r.get("predictions_mac_split"))] \
        if r["predictions"] else [("MAC", r["groups"], None)]
    for label, groups, preds in splits:
        lines.append(f"  groups sized by {label}:" if r["predictions"] else "  groups sized by MACs:")
        for g in groups:
            lines.append(f"    stream {g['stream']}: {g['threads']:>3} threads on CPUs {g['cpus']:<14} socket "
                         f"{','.join(map(str, g['sockets']))}  {g['gmacs']:.3f} GMACs")
        for p in preds or []:
            lines.append(f"    batch {p['batch']}: predicted multi-stream {p['multistream_ms']:.2f} ms (streams "
                         f"{'/'.join(f'{t:.2f}' for t in p['stream_ms'])}), single graph {p['single_ms']:.2f} ms "
                         f"(ratio {p['ratio_multi_vs_single']:.2f}) -> auto would choose {p['auto_would_choose']}")
    if r.get("cores_arg"):
        lines.append(f"  to run the first groups above: --cores {r['cores_arg']} (serve, bench; Runtime(cores=...)); "
                     "without it the runtime sizes groups by MACs")
    lines.append(f"  single graph: {r['single_graph']['threads']} threads on CPUs {r['single_graph']['cpus']}")
    if r["predictions"]:
        lines.append(f"  hand-over {r['handover_ms']:.3f} ms per call: {r['handover_source']}")
        lines.append("  predicted multi-stream/single ratio on single-socket machines (groups by MACs | by time):")
        lines.append(f"    {'cores':>5} {'b1 MAC':>7} {'b1 time':>8} {'b8 MAC':>7} {'b8 time':>8}  time groups")
        for s in r["scan"]:
            lines.append(f"    {s['cores']:>5} {s['ratio_macs_b1']:>7.3f} {s['ratio_time_b1']:>8.3f} "
                         f"{s['ratio_macs_b8']:>7.3f} {s['ratio_time_b8']:>8.3f}  {'/'.join(map(str, s['groups']['time']))}")
        be = r["break_even_cores"]
        lines.append("    break-even (first core count with ratio < 1): " + ", ".join(
            f"{k.removeprefix('ratio_').replace('_b', ' batch ')} {v if v is not None else 'none up to 112'}"
            for k, v in be.items()))
        lines.append(f"  ({r['caveat']})")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from parnet_cpu.bench.quiet import NotQuietError, refuse

    check_output_arg(args, "json", "plan")  # before the profiling
    try:
        report = make_report(args)
    except NotQuietError as exc:
        return refuse("plan", exc)
    print(format_report(report))
    write_json_arg(args, "plan", report)
    return 0
