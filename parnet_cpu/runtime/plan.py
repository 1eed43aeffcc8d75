"""Which stages run on which CPUs: the plan of a `Runtime`, and `plan="auto"`'s cached choice.

A plan is either the single graph on one set of CPUs, or ParNet's stream stages on their own core groups
(one worker each) with the stem and the tail on their union. `make_plan` lays it out; `PlanCache` keeps,
in the model folder, which of the two measured faster on this machine, these CPUs, this precision and
these weights, so later starts skip the measurement. Running a plan is `runtime.Runtime`'s job.

Group sizes follow each stream group's MACs counted from the IR (`macs.op_macs`: a Convolution's weights
are [C_out, C_in, kH, kW], so one output costs C_in*kH*kW MACs; GroupConvolution C_in/G*kH*kW), so the most
expensive stream gets the most cores (a count that ignored C_in once did the opposite).
"""
from __future__ import annotations

import json
import platform
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

from parnet_cpu.artifacts import ModelDir
from parnet_cpu.outputs import sha256_file, write_json
from parnet_cpu.runtime.cores import (
    CoreSpecError,
    place_stream_groups,
    proportional_sizes,
    socket_domains,
    validate_groups,
)
from parnet_cpu.runtime.engine import cache_root
from parnet_cpu.runtime.leases import available_cores, no_free_cores_message, plan_groups
from parnet_cpu.runtime.macs import model_macs
from parnet_cpu.runtime.partition import (
    NUM_STREAMS,
    RECOMPUTE_STAGES,
    SHARE_STAGES,
    SINGLE_STAGES,
    STREAM_STAGES,
    Stage,
)
from parnet_cpu.system.cpuinfo import describe_machine, format_cpu_list
from parnet_cpu.system.load import QUIET_LOAD

PLAN_CACHE = "plan_cache.json"
PLAN_KINDS = ("multistream", "single")


class PlanWorker(NamedTuple):
    """One worker of a plan: its name, the CPUs it is pinned to, and the stages it runs (in order)."""

    name: str
    cpus: list[int]
    stages: tuple[Stage, ...]


@dataclass
class Plan:
    """Which stages run on which CPUs."""

    kind: str  # "multistream" | "single"
    workers: list[PlanWorker]
    inits1: str = "recompute"
    reason: str = ""

    @property
    def cpus(self) -> list[int]:
        return sorted({c for w in self.workers for c in w.cpus})

    def worker_cpus(self, name: str) -> list[int]:
        return next((w.cpus for w in self.workers if w.name == name), [])

    def describe(self) -> dict:
        return {"kind": self.kind, "inits1": self.inits1, "reason": self.reason,
                "workers": [{"name": w.name, "cpus": format_cpu_list(w.cpus), "stages": [s.name for s in w.stages]}
                            for w in self.workers]}


def single_plan(cpus: list[int], inits1: str, reason: str) -> Plan:
    """The whole graph as one stage on `cpus`."""
    return Plan("single", [PlanWorker("model", cpus, SINGLE_STAGES)], inits1, reason)


def make_plan(md: ModelDir, ir_path: Path, cores_per_stream: int | str | None, cores: list[list[int]] | None,
              use_smt: bool, inits1: str, kind: str, share: bool = False) -> Plan:
    """Core groups for the streams (explicit, fixed size, or in proportion to cost) and the stage layout.
    Without explicit `cores`, only cores no other Runtime holds (all usable ones with `share`)."""
    stages = SHARE_STAGES if inits1 == "share" else RECOMPUTE_STAGES
    if kind == "single":
        if cores:
            validate_groups(cores)  # a CPU that does not exist fails here, not in a worker after a timeout
            cpus = sorted({c for g in cores for c in g})
        elif isinstance(cores_per_stream, int):
            cpus = sorted(c for g in plan_groups(NUM_STREAMS, cores_per_stream, use_smt, share=share) for c in g)
        else:
            cpus = sorted(c for core in available_cores(use_smt, share=share) for c in core)
        if not cpus:
            raise CoreSpecError(no_free_cores_message())
        return single_plan(cpus, inits1, "single graph on all given cores")
    if cores:
        if len(cores) != NUM_STREAMS:
            raise CoreSpecError(f"--cores needs {NUM_STREAMS} groups (one per stream), got {len(cores)}")
        validate_groups(cores)
        groups, reason = [sorted(g) for g in cores], "explicit core groups"
    elif isinstance(cores_per_stream, int):
        groups = plan_groups(NUM_STREAMS, cores_per_stream, use_smt, share=share)
        reason = f"{cores_per_stream} cores per stream"
    else:
        total = len(available_cores(use_smt, share=share))
        if total < NUM_STREAMS:
            raise CoreSpecError(f"multi-stream needs at least {NUM_STREAMS} physical cores, {total} usable")
        sizes, costs = stream_group_sizes(ir_path, stages, total)
        groups = plan_groups(NUM_STREAMS, sizes, use_smt, share=share)
        reason = f"cores in proportion to stream cost (MACs {', '.join(f'{c / 1e6:.0f}M' for c in costs)})"
    union = sorted({c for g in groups for c in g})
    by_name = {s.name: s for s in stages}
    workers = [PlanWorker("stem+tail", union, (by_name["stem"], by_name["tail"])),
               PlanWorker("stream1", groups[0], (by_name["stream1"],)),
               PlanWorker("stream2", groups[1], tuple(by_name[n] for n in ("inits1", "stream2") if n in by_name)),
               PlanWorker("stream3", groups[2], (by_name["stream3"],))]
    return Plan("multistream", workers, inits1, reason)


# ---------------------------------------------------------------------------------------- plan="auto" cache

class PlanCacheWarning(UserWarning):
    """plan_cache.json could not be read; it is ignored and rewritten."""


def read_plan_cache(path: Path) -> tuple[dict, bool]:
    """(cache, corrupt): a torn or foreign file is ignored with a warning instead of failing every start."""
    if not path.is_file():
        return {}, False
    try:
        cache = json.loads(path.read_text())
        if not isinstance(cache, dict):
            raise ValueError(f"expected a JSON object, got {type(cache).__name__}")
        return cache, False
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        warnings.warn(f"{path}: unreadable plan cache ({exc}); ignoring it (it will be rewritten)", PlanCacheWarning,
                      stacklevel=4)
        return {}, True


def machine_id() -> str:
    """This machine's identity for the plan cache: /etc/machine-id where there is one, else the host name."""
    try:
        return Path("/etc/machine-id").read_text().strip() or platform.node()
    except OSError:
        return platform.node()


def plan_cache_entry(choice: str, multi_s: float, single_s: float, cpus: list[int], load_before: dict,
                     load_after: dict) -> dict:
    """What a cached decision records: the timings, and when, where and under what load they were taken."""
    return {"choice": choice, "multistream_ms": multi_s * 1e3, "single_ms": single_s * 1e3,
            "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(), "machine_id": machine_id(),
            "cpus": cpus, "other_load_before": {str(c): round(v, 3) for c, v in load_before.items()},
            "other_load_after": {str(c): round(v, 3) for c, v in load_after.items()}}


@dataclass
class AutoChoice:
    """`plan="auto"`'s verdict on one measurement: the faster kind, and whether it may be cached."""

    choice: str  # "multistream" | "single"
    entry: dict | None  # what to cache; None: decides this start only
    note: str  # "" or why it was not cached


def choose(multi_s: float, single_s: float, cpus: list[int], load_before: dict, load_after: dict,
           shared: bool) -> AutoChoice:
    """Multi-stream only if it measured faster. A measurement taken while other work kept those CPUs busy
    (or on shared cores) decides this start only and is not cached."""
    choice = "multistream" if multi_s < single_s else "single"
    busy = max([*load_before.values(), *load_after.values()], default=0.0)
    cacheable = busy <= QUIET_LOAD and not shared
    if cacheable:
        return AutoChoice(choice, plan_cache_entry(choice, multi_s, single_s, cpus, load_before, load_after), "")
    why = "shared cores" if shared else f"CPUs busy with other work, load {busy:.2f}"
    return AutoChoice(choice, None, f" (not cached: {why})")


class PlanCache:
    """plan_cache.json in a model folder: key (machine, CPUs, precision, weights, OpenVINO) -> choice."""

    def __init__(self, model_dir: ModelDir) -> None:
        self.model_dir = model_dir
        shipped = model_dir.path / PLAN_CACHE
        # a read-only folder (KServe, docker -v ...:ro): the user cache, as the compiled models (engine.cache_root)
        self.path = (cache_root(model_dir) or model_dir.path) / PLAN_CACHE
        self.entries, self.corrupt = read_plan_cache(self.path)
        if self.path != shipped:  # what the folder was shipped with still counts
            self.entries = {**read_plan_cache(shipped)[0], **self.entries}

    def key(self, cpus: list[int], precision: str, ir_path: Path) -> str:
        import openvino as ov

        info = describe_machine(query_openvino=False)
        digest = sha256_file(self.model_dir.path / ir_path.with_suffix(".bin").name)[:16]
        return json.dumps([info.model_name, cpus, precision, digest, ov.get_version(), machine_id()])

    def lookup(self, key: str) -> dict | None:
        """The cached entry for `key`, if it holds a valid choice."""
        entry = self.entries.get(key)
        return entry if isinstance(entry, dict) and entry.get("choice") in PLAN_KINDS else None

    def record(self, key: str, entry: dict | None) -> None:
        """Store `entry` (None: nothing to store, but a corrupt file is still rewritten)."""
        if entry is not None:
            self.entries[key] = entry
        if entry is not None or self.corrupt:
            try:
                write_json(self.path, self.entries)
            except OSError:
                pass  # read-only model folder: decide again next time


# ----------------------------------------------------------------------------- stream costs


def stage_macs(ir_path: str | Path, stages: Sequence[Stage]) -> dict[str, float]:
    """MACs per image of each stage (convolutions and the classifier), counted on the cut subgraph."""
    from parnet_cpu.runtime.partition import cut_stage

    return {stage.name: model_macs(cut_stage(ir_path, stage)) for stage in stages}


def stream_costs(macs: dict[str, float]) -> list[float]:
    """Work of the three stream groups. With a shared `inits1` stage (SHARE_STAGES) stream 2's group
    computes it; with RECOMPUTE_STAGES it is already inside the stream2 and stream3 stages."""
    return [macs["stream1"], macs["stream2"] + macs.get("inits1", 0.0), macs["stream3"]]


def stream_group_sizes(ir_path: str | Path, stages: Sequence[Stage], total: int) -> tuple[list[int], list[float]]:
    """(cores per stream group, MACs per stream group) for `total` physical cores, sizes in proportion
    to the MACs (largest remainder, at least one core each)."""
    macs = stage_macs(ir_path, [s for s in stages if s.name in STREAM_STAGES or s.name == "inits1"])
    costs = stream_costs(macs)
    return proportional_sizes(costs, total), costs


# ----------------------------------------------------------------------------- sizing by predicted time


def time_balanced_sizes(group_time: Callable[[int, int], float], n_groups: int, total: int) -> list[int]:
    """Cores per group (each at least one, `total` in all) that minimise the slowest group's predicted time
    `group_time(i, cores)`: the streams run side by side, so the slowest one is the critical path (stem and
    tail run on the union, whatever the split). Exhaustive over the splits (n_groups is 3: ~total^2/2 of
    them), from a table of each group's time at 1..total cores; ties go to the smaller total time."""
    if total < n_groups:
        raise CoreSpecError(f"{n_groups} groups need at least {n_groups} cores, {total} given")
    table = [[group_time(i, n) for n in range(1, total - n_groups + 2)] for i in range(n_groups)]

    def splits(k: int, left: int):
        if k == 1:
            yield (left,)
            return
        for n in range(1, left - k + 2):
            for rest in splits(k - 1, left - n):
                yield (n, *rest)

    best = min(splits(n_groups, total),
               key=lambda s: (max(table[i][n - 1] for i, n in enumerate(s)), sum(table[i][n - 1] for i, n in enumerate(s))))
    return list(best)


def time_balanced_groups(info, costs: Sequence[float], group_time: Callable[[int, int], float], use_smt: bool = False,
                         include_efficiency: bool = False) -> list[list[int]]:
    """Stream groups sized by predicted time: `place_stream_groups` decides which socket each group goes on
    (never across one), then each socket's cores are split between its groups by `time_balanced_sizes`,
    consecutive cores in stream order."""
    placed = place_stream_groups(info, costs, use_smt, include_efficiency, group_time)
    groups: list[list[int]] = [[] for _ in costs]
    for cores in socket_domains(info, use_smt, include_efficiency):
        here = {c for core in cores for c in core}
        members = [i for i, g in enumerate(placed) if g and g[0] in here]
        if not members:
            continue
        sizes = time_balanced_sizes(lambda j, n: group_time(members[j], n), len(members), len(cores))
        start = 0
        for i, n in zip(members, sizes):
            groups[i] = sorted(c for core in cores[start:start + n] for c in core)
            start += n
    return groups
