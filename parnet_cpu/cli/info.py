"""`parnet-cpu info`: what this machine offers for inference (topology, limits, ISA, OpenVINO)."""
from __future__ import annotations

import argparse
import os
from dataclasses import asdict
from pathlib import Path

from parnet_cpu.cli import CliError
from parnet_cpu.cli.common import add_json_arg, json_to_stdout, write_json_arg


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info",
        help="describe the CPUs: sockets/NUMA/cores, usable CPUs and quota, ISA and int8 kernels",
        description="Describe this machine's CPUs as the multi-stream runtime sees them: sockets, NUMA "
        "nodes, physical cores and SMT siblings, hybrid core types, the CPUs this process may use "
        "(affinity, cgroup cpuset and CPU quota), ISA flags and which int8 kernels OpenVINO will use.",
    )
    add_json_arg(parser, "the full description")
    # Advanced: read a captured tree (proc/cpuinfo, sys/devices/system/..., sys/fs/cgroup/...) instead of
    # the live machine; used by the tests and to reproduce a support ticket.
    # (default None: the live machine, "/", which is no input a --json FILE could lie inside)
    parser.add_argument("--root", metavar="DIR", help=argparse.SUPPRESS)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from parnet_cpu.system.cpuinfo import describe_machine

    root = Path(args.root or "/")
    if not root.is_dir():
        raise CliError(f"--root {args.root}: not a directory")
    try:
        info = describe_machine(root)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    leases = live_leases() if info.live else None
    if not json_to_stdout(args):
        print(format_report(info))
        if leases is not None:
            print(format_leases(leases))
    write_json_arg(args, "info", info.to_dict() | ({"leases": leases} if leases is not None else {})
                   | ({"int8_float_leftovers": _leftovers(info)} if info.live else {}))
    return 0


def live_leases() -> list[dict]:
    """Cores leased right now by runtimes on this machine (see `parnet_cpu.runtime.leases`)."""
    from parnet_cpu.runtime.cores import CoreSpecError
    from parnet_cpu.runtime.leases import current_leases

    try:
        return [asdict(lease) for lease in current_leases()]
    except CoreSpecError as exc:  # an unsafe or unusable lease folder: said in the report, the facts still shown
        return [{"error": str(exc)}]


def format_leases(leases: list[dict]) -> str:
    from parnet_cpu.runtime.leases import lease_dir

    if leases and "error" in leases[0]:
        return f"Core leases        cannot be read: {leases[0]['error']}"
    if not leases:
        return f"Core leases        none ({lease_dir()})"
    return "\n".join([f"Core leases        {len(leases)} ({lease_dir()})"]
                     + [f"  CPU {l['cpu']:<4} {l['mode']:<9} pid {l['pid']}  since {l['since']}  {l['command']}"
                        for l in leases])


def _leftovers(info) -> str:
    """Precision INT8 models will run their float leftovers (stem, SE gates, pooling) in on this CPU."""
    from parnet_cpu.runtime.engine import LEFTOVERS_ENV, default_leftovers

    chosen = os.environ.get(LEFTOVERS_ENV, "auto")
    return default_leftovers(info.isa, os.environ.get("ONEDNN_MAX_CPU_ISA")) if chosen == "auto" else chosen


def _leftovers_note(info) -> str:
    from parnet_cpu.runtime.engine import LEFTOVERS_ENV

    why = (f"{LEFTOVERS_ENV}={os.environ[LEFTOVERS_ENV]}" if os.environ.get(LEFTOVERS_ENV, "auto") != "auto"
           else "auto: bf16 where the CPU has AVX512_BF16 or AMX-BF16")
    return f"{_leftovers(info)} ({why}; opt out with {LEFTOVERS_ENV}=f32 or --int8-leftovers f32)"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def format_report(info) -> str:  # info: MachineInfo (import kept lazy)
    """A short aligned report, like a condensed `lscpu`."""
    from parnet_cpu.system.cpuinfo import format_cpu_list

    rows: list[tuple[str, str]] = []
    model = info.model_name or "unknown"
    ids = [f"family {info.cpu_family}", f"model {info.cpu_model}", f"stepping {info.stepping}"]
    rows.append(("Model", f"{model} ({info.vendor or '?'}, {', '.join(ids)})"))
    rows.append((
        "Topology",
        f"{_count(info.sockets, 'socket')}, {_count(len(info.numa_nodes), 'NUMA node')}, "
        f"{_count(info.physical_cores, 'core')}, "
        f"{_count(info.logical_cpus, 'thread')} ({info.threads_per_core} per core, from {info.topology_source})",
    ))
    usable = format_cpu_list(info.usable_cpus) or "none"
    rows.append(("Usable CPUs", f"{len(info.usable_cpus)} of {info.logical_cpus}: {usable}"))
    if info.cgroup_cpuset is not None and set(info.cgroup_cpuset) != set(info.online_cpus):
        rows.append(("cgroup cpuset", format_cpu_list(info.cgroup_cpuset)))
    if info.cpu_quota is None:
        rows.append(("CPU quota", "none"))
    else:
        q = info.cpu_quota
        rows.append((
            "CPU quota",
            f"{q.cpus:g} CPUs ({q.quota_us}/{q.period_us} us, {q.source}) -> budget {info.cpu_budget} CPUs",
        ))
    for node in info.numa_nodes:
        rows.append((f"NUMA node {node.node}", format_cpu_list(node.cpus) or "(no CPUs)"))
    if info.hybrid:
        for kind, cpus in info.core_types.items():
            n = sum(1 for c in info.cores if c.core_type == kind)
            freqs = [c.max_freq_mhz for c in info.cores if c.core_type == kind and c.max_freq_mhz]
            freq = f", up to {max(freqs):.0f} MHz" if freqs else ""
            rows.append((f"{kind.capitalize()} cores", f"{n} ({format_cpu_list(cpus)}{freq})"))
    else:
        rows.append(("Core types", "uniform (not hybrid)"))
    flags = [f"{k} {_yes(v)}" for k, v in info.isa.items()]
    rows.append(("ISA flags", "  ".join(flags[:5])))
    rows.append(("", "  ".join(flags[5:])))
    rows.append(("ISA level", info.isa_level))
    rows.append(("int8 kernels", f"{info.int8_kernels} ({info.int8_kernels_note})"))
    rows.append(("INT8 float ops", _leftovers_note(info)))
    if info.openvino is not None:
        ov = info.openvino
        rows.append(("OpenVINO", f"{ov.version}: {ov.full_device_name}"))
        rows.append(("OV capabilities", ", ".join(ov.optimization_capabilities) or "none"))
    else:
        rows.append(("OpenVINO", "not queried (captured tree)" if not info.live else "not available"))
    if info.psutil_logical is not None:
        rows.append(("psutil", f"{info.psutil_logical} logical, {info.psutil_physical} physical"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines += [f"warning: {w}" for w in info.warnings]
    return "\n".join(lines)
