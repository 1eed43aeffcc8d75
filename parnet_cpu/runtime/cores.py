"""Core groups for the multi-stream runtime, pure: parsing, sizing, validation and socket placement.

Nothing here claims a core or reads a lease: the machine-wide leases, the free cores and the worker pools
are `parnet_cpu.runtime.leases`; what other work costs on a CPU is `parnet_cpu.system.load`. Groups are made
of physical cores (first SMT sibling only unless `use_smt`), NUMA node by node, efficiency cores excluded,
and never more than the cgroup CPU quota allows (`parnet_cpu.system.cpuinfo.usable_physical_cores`).
"""
from __future__ import annotations

from itertools import product
from typing import Sequence

from parnet_cpu.system.cpuinfo import describe_machine, format_cpu_list, parse_cpu_list, usable_physical_cores


class CoreSpecError(ValueError):
    """A core request that cannot be satisfied; the message says what is available."""


def parse_groups(spec: str) -> list[list[int]]:
    """'0-7,8-15,16-23' is ambiguous with cpu lists, so groups are separated by ':' or ';' ('0-7:8-15:16-23')
    or given one per `--cores` flag; inside a group the usual cpu-list syntax applies."""
    parts = [p for p in spec.replace(";", ":").split(":") if p.strip()]
    if not parts:
        raise CoreSpecError(f"empty core spec {spec!r}")
    try:
        return [parse_cpu_list(p) for p in parts]
    except ValueError as exc:
        raise CoreSpecError(f"bad core spec {spec!r}: {exc}") from None



def proportional_sizes(costs: Sequence[float], total: int) -> list[int]:
    """Split `total` cores in proportion to `costs` (largest remainder), at least one each."""
    if total < len(costs):
        raise CoreSpecError(f"{len(costs)} groups need at least {len(costs)} cores, {total} available")
    raw = [total * c / sum(costs) for c in costs]
    sizes = [max(1, int(r)) for r in raw]
    while sum(sizes) > total:
        sizes[max(range(len(sizes)), key=lambda i: sizes[i] - raw[i])] -= 1
    while sum(sizes) < total:
        sizes[max(range(len(sizes)), key=lambda i: raw[i] - sizes[i])] += 1
    return sizes


def validate_groups(groups: list[list[int]], info=None) -> None:
    info = info or describe_machine(query_openvino=False)
    usable = set(info.usable_cpus)
    for g in groups:
        if not g:
            raise CoreSpecError("empty core group")
        outside = sorted(set(g) - usable)
        if outside:
            raise CoreSpecError(f"CPUs {format_cpu_list(outside)} are not usable by this process "
                                f"(usable: {format_cpu_list(sorted(usable))})")


# --------------------------------------------------------------------------- topology planning (pure)
# For `parnet-cpu plan`: where the stream groups would go on a machine described by a MachineInfo (this
# one, a captured tree, or `simulated_machine`). No lease and no I/O: nothing here claims a core.


def simulated_machine(cores: int, sockets: int = 1, threads_per_core: int = 1, isa: dict[str, bool] | None = None,
                      model_name: str | None = None):
    """A machine this one may not be: `cores` physical cores split evenly over `sockets` sockets (one NUMA
    node each), logical CPUs numbered the way Linux numbers servers (first threads 0..cores-1, then the
    SMT siblings), every CPU usable, no cgroup quota."""
    from parnet_cpu.system.cpuinfo import Core, MachineInfo, NumaNode, int8_kernels, isa_level

    if cores < 1 or sockets < 1 or threads_per_core < 1:
        raise CoreSpecError("cores, sockets and threads per core must be positive")
    if cores % sockets:
        raise CoreSpecError(f"{cores} cores do not split evenly over {sockets} sockets")
    per_socket = cores // sockets
    core_list = [Core(socket=i // per_socket, core_id=i % per_socket, numa_node=i // per_socket,
                      cpus=[i + t * cores for t in range(threads_per_core)]) for i in range(cores)]
    online = list(range(cores * threads_per_core))
    nodes = [NumaNode(s, sorted(c for core in core_list if core.socket == s for c in core.cpus)) for s in range(sockets)]
    isa = dict(isa or {})
    kernels, note = int8_kernels(isa)
    return MachineInfo(root="<simulated>", live=False, model_name=model_name or f"simulated {cores}-core",
                       vendor=None, cpu_family=None, cpu_model=None, stepping=None, online_cpus=online,
                       sockets=sockets, numa_nodes=nodes, cores=core_list, hybrid=False, affinity=online,
                       cgroup_cpuset=None, usable_cpus=online, cpu_quota=None, cpu_budget=None, isa=isa,
                       isa_level=isa_level(isa), int8_kernels=kernels, int8_kernels_note=note,
                       topology_source="simulated")


def socket_domains(info, use_smt: bool = False, include_efficiency: bool = False) -> list[list[list[int]]]:
    """Usable physical cores (each a list of logical CPUs) grouped by socket, NUMA order inside each."""
    socket_of = {c: core.socket for core in info.cores for c in core.cpus}
    by_socket: dict[int, list[list[int]]] = {}
    for cpus in usable_physical_cores(info, use_smt=use_smt, include_efficiency=include_efficiency):
        by_socket.setdefault(socket_of[cpus[0]], []).append(cpus)
    return [by_socket[s] for s in sorted(by_socket)]


def place_stream_groups(info, costs: Sequence[float], use_smt: bool = False, include_efficiency: bool = False,
                        group_time=None) -> list[list[int]]:
    """Logical CPUs for each stream group (in the order of `costs`), never crossing a socket: every way of
    putting the groups on sockets is tried, each socket's cores are split between its groups in proportion
    to their costs, and among the placements that never give a costlier group fewer cores, the one with the
    smallest slowest group wins (`group_time(i, cores)`, default cost / cores; ties: fewer sockets, then
    lower socket numbers). SMT siblings only with `use_smt`,
    efficiency cores only with `include_efficiency` (or when nothing else is usable)."""
    domains = socket_domains(info, use_smt, include_efficiency)
    total = sum(len(d) for d in domains)
    if total < len(costs):
        raise CoreSpecError(f"{len(costs)} groups need at least {len(costs)} physical cores, {total} usable")
    group_time = group_time or (lambda i, n: costs[i] / n)
    best = None
    for assign in product(range(len(domains)), repeat=len(costs)):
        sizes = [0] * len(costs)
        ok = True
        for d, cores in enumerate(domains):
            members = [i for i, a in enumerate(assign) if a == d]
            if not members:
                continue
            if len(members) > len(cores):
                ok = False
                break
            for i, n in zip(members, proportional_sizes([costs[i] for i in members], len(cores))):
                sizes[i] = n
        if not ok or any(costs[i] < costs[j] and sizes[i] > sizes[j] for i in range(len(costs)) for j in range(len(costs))):
            continue  # more work never gets fewer cores (a cheap stream alone on a socket would)
        key = (max(group_time(i, n) for i, n in enumerate(sizes)), len(set(assign)), assign)
        if best is None or key < best[0]:
            best = (key, assign, sizes)
    if best is None:
        raise CoreSpecError(f"no placement of {len(costs)} groups on sockets of {[len(d) for d in domains]} cores "
                            "keeps every group inside one socket")
    _, assign, sizes = best
    groups: list[list[int]] = [[] for _ in costs]
    for d, cores in enumerate(domains):
        start = 0
        for i in (i for i, a in enumerate(assign) if a == d):  # consecutive cores, in stream order
            groups[i] = sorted(c for core in cores[start:start + sizes[i]] for c in core)
            start += sizes[i]
    return groups


def single_graph_cores(info, use_smt: bool = False, include_efficiency: bool = False) -> list[int]:
    """Where the single graph runs: the largest socket's usable cores (OpenVINO's LATENCY hint keeps one
    stream on one socket / NUMA node: crossing sockets costs more than it gains at batch 1)."""
    domains = socket_domains(info, use_smt, include_efficiency)
    return sorted(c for core in max(domains, key=len) for c in core) if domains else []
