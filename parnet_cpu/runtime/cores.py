"""Core groups for the multi-stream runtime: sizing, validation and a per-process claim registry.

Groups are made of physical cores (first SMT sibling only unless `use_smt`), NUMA node by node,
efficiency cores excluded, and never more than the cgroup CPU quota allows (all via
`parnet_cpu.system.cpuinfo.usable_physical_cores`). Two runtimes in one process get disjoint cores or
a clear error: models sharing cores is the most common cause of collapsed CPU latency.
"""
from __future__ import annotations

import threading
from typing import Sequence

from parnet_cpu.system.cpuinfo import describe_machine, format_cpu_list, parse_cpu_list, usable_physical_cores


class CoreSpecError(ValueError):
    """A core request that cannot be satisfied; the message says what is available."""


_claimed: set[int] = set()
_claim_lock = threading.Lock()


def available_cores(use_smt: bool = False, info=None) -> list[list[int]]:
    """Usable physical cores (each a list of logical CPUs) not claimed by another Runtime here."""
    info = info or describe_machine(query_openvino=False)
    with _claim_lock:
        cores = [c for c in usable_physical_cores(info, use_smt=use_smt) if not set(c) & _claimed]
    return cores


def no_free_cores_message() -> str:
    info = describe_machine(query_openvino=False)
    with _claim_lock:
        claimed = sorted(_claimed)
    return (f"no free core for this runtime: this process may use CPUs {format_cpu_list(info.usable_cpus)}"
            + (f", and {format_cpu_list(claimed)} are already used by another Runtime in this process"
               if claimed else ""))


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


def plan_groups(n_groups: int, cores_per_group: Sequence[int] | int, use_smt: bool = False,
                info=None) -> list[list[int]]:
    """Consecutive physical cores (NUMA-ordered) for each group: `cores_per_group` cores each."""
    sizes = [cores_per_group] * n_groups if isinstance(cores_per_group, int) else list(cores_per_group)
    if any(s < 1 for s in sizes):
        raise CoreSpecError("each group needs at least one core")
    cores = available_cores(use_smt, info)
    need = sum(sizes)
    if need > len(cores):
        raise CoreSpecError(f"asked for {need} physical cores ({' + '.join(map(str, sizes))}) but this process "
                            f"may use {len(cores)} ({format_cpu_list([c for core in cores for c in core]) or 'none'})"
                            " after affinity, cgroup quota and other runtimes' claims")
    groups, i = [], 0
    for s in sizes:
        groups.append(sorted(c for core in cores[i:i + s] for c in core))
        i += s
    return groups


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


class CoreClaim:
    """Holds a set of CPUs for one Runtime until released."""

    def __init__(self, cpus: set[int], exclusive: bool = True) -> None:
        self.cpus = set(cpus) if exclusive else set()
        with _claim_lock:
            taken = self.cpus & _claimed
            if taken:
                raise CoreSpecError(f"CPUs {format_cpu_list(sorted(taken))} are already used by another Runtime "
                                    "in this process; give each model its own cores (or close the other Runtime)")
            _claimed.update(self.cpus)

    def release(self) -> None:
        with _claim_lock:
            _claimed.difference_update(self.cpus)
        self.cpus = set()
