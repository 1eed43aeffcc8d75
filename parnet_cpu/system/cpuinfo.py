"""CPU introspection from Linux's own files: topology, NUMA, hybrid core types, cgroup limits, ISA.

Why read /proc and /sys ourselves instead of asking a library: the multi-stream runtime pins one
inference stream per physical core, so it needs the exact sibling/NUMA/E-core layout *and* what this
process may actually use (affinity, cgroup cpuset and CPU quota), which no single library reports.
Everything is read relative to a `root` directory, so tests and support tickets can point
`describe_machine` at a captured tree instead of the live machine.

Torch-free on purpose (the runtime/server import it); OpenVINO and psutil are optional and imported
lazily. Containers often hide parts of /sys, so every reader returns None on a missing file and the
topology falls back from sysfs to /proc/cpuinfo's "physical id"/"core id" and then to one core per CPU.
"""
from __future__ import annotations

import functools
import math
import os
import platform
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from parnet_cpu.options import MAX_CPUS

# Our key -> the flag's name in /proc/cpuinfo. Only the ISA features that change inference kernels.
ISA_FLAGS: dict[str, str] = {
    "avx2": "avx2",
    "fma": "fma",
    "avx512f": "avx512f",
    "avx512_bw": "avx512bw",
    "avx512_vnni": "avx512_vnni",
    "avx_vnni": "avx_vnni",
    "avx512_bf16": "avx512_bf16",
    "amx_tile": "amx_tile",
    "amx_int8": "amx_int8",
    "amx_bf16": "amx_bf16",
}
# One-word summaries, best first.
ISA_LEVELS: tuple[str, ...] = ("amx", "avx512_vnni", "avx_vnni", "avx512", "avx2", "sse")

CORE_PERFORMANCE = "performance"  # Intel hybrid P-core (listed in /sys/devices/cpu_core/cpus)
CORE_EFFICIENCY = "efficiency"  # Intel hybrid E-core (listed in /sys/devices/cpu_atom/cpus)
CORE_STANDARD = "standard"  # every core of a non-hybrid CPU

TOPOLOGY_SYSFS = "sysfs"
TOPOLOGY_CPUINFO = "cpuinfo"
TOPOLOGY_FLAT = "flat"  # nothing known: each logical CPU counted as its own core

_SYS_CPU = "sys/devices/system/cpu"
_SYS_NODE = "sys/devices/system/node"
_CGROUP = "sys/fs/cgroup"
_CGROUP_V1_CPU_MOUNTS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")
_DEFAULT_CFS_PERIOD_US = 100_000


# --------------------------------------------------------------------------- result types


@dataclass
class Core:
    """One physical core: its logical CPUs (SMT siblings, ascending) and where it sits."""

    socket: int
    core_id: int
    cpus: list[int]
    die: int | None = None
    numa_node: int | None = None
    core_type: str = CORE_STANDARD
    max_freq_mhz: float | None = None


@dataclass
class NumaNode:
    node: int
    cpus: list[int]


@dataclass
class CpuQuota:
    """A cgroup CPU bandwidth limit: `quota_us` of CPU time per `period_us` (cpu.max / cfs_quota_us)."""

    quota_us: int
    period_us: int
    source: str  # the file it came from, relative to the root

    @property
    def cpus(self) -> float:
        return self.quota_us / self.period_us

    @property
    def budget(self) -> int:
        """Whole CPUs worth running threads on: floor(quota/period), at least 1. Rounding up runs more threads
        than the quota can feed (issue 17 reports p99 32 ms with 2 threads vs 8.6 ms with 1 under 1.5 CPUs)."""
        return max(1, math.floor(self.quota_us / self.period_us))


@dataclass
class OpenVinoInfo:
    version: str
    full_device_name: str | None
    optimization_capabilities: list[str]


@dataclass
class MachineInfo:
    """What `describe_machine` found. `to_dict()` is what `parnet-cpu info --json` prints."""

    root: str
    live: bool
    model_name: str | None
    vendor: str | None
    cpu_family: int | None
    cpu_model: int | None
    stepping: int | None
    online_cpus: list[int]
    sockets: int
    numa_nodes: list[NumaNode]
    cores: list[Core]
    hybrid: bool
    affinity: list[int]
    cgroup_cpuset: list[int] | None
    usable_cpus: list[int]
    cpu_quota: CpuQuota | None
    cpu_budget: int | None
    isa: dict[str, bool]
    isa_level: str
    int8_kernels: str
    int8_kernels_note: str
    topology_source: str
    openvino: OpenVinoInfo | None = None
    psutil_logical: int | None = None
    psutil_physical: int | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def logical_cpus(self) -> int:
        return len(self.online_cpus)

    @property
    def physical_cores(self) -> int:
        return len(self.cores)

    @property
    def threads_per_core(self) -> int:
        return max((len(c.cpus) for c in self.cores), default=1)

    @property
    def core_types(self) -> dict[str, list[int]]:
        """Core type -> its logical CPUs, e.g. {"performance": [0..15], "efficiency": [16..23]}."""
        out: dict[str, list[int]] = {}
        for core in self.cores:
            out.setdefault(core.core_type, []).extend(core.cpus)
        return {kind: sorted(cpus) for kind, cpus in out.items()}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["logical_cpus"] = self.logical_cpus
        d["physical_cores"] = self.physical_cores
        d["threads_per_core"] = self.threads_per_core
        d["core_types"] = self.core_types
        if self.cpu_quota is not None:
            d["cpu_quota"]["cpus"] = self.cpu_quota.cpus
        return d


# --------------------------------------------------------------------------- CPU lists


@functools.lru_cache(maxsize=1)
def cpu_id_limit() -> int:
    """One more than the largest CPU id a CPU list may name: `options.MAX_CPUS`, or more when this kernel's
    possible CPUs (/sys/devices/system/cpu/possible, its NR_CPUS as booted) reach further. Read once."""
    try:
        with open("/sys/devices/system/cpu/possible", encoding="ascii") as f:
            last = re.findall(r"[0-9]{1,7}", f.read(4096))
    except (OSError, ValueError):
        last = []
    return max(MAX_CPUS, int(last[-1]) + 1 if last else 0)


def parse_cpu_list(text: str) -> list[int]:
    """Parse the kernel's CPU list format ("0-3,8,10-11") into sorted unique CPU ids; "" -> [].
    Every id is checked against `cpu_id_limit()` before anything is expanded, and overlapping ranges are
    merged first, so the work and memory are bounded by that limit whatever the text says (a range
    "0-1000000000" is refused at once, not expanded into a billion-element set)."""
    text = text.strip()
    if not text:
        return []
    limit = cpu_id_limit()
    spans: list[tuple[int, int]] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*([0-9]+)\s*(?:-\s*([0-9]+)\s*)?", part, re.ASCII)
        if m is None:
            raise ValueError(f"invalid CPU list {_short(text)}: {_short(part)} is not 'N' or 'N-M'")
        ends = [m.group(1), m.group(2) or m.group(1)]
        if any(len(e) > 7 or int(e) >= limit for e in ends):  # length first: int() of 5000 digits is refused
            raise ValueError(f"invalid CPU list {_short(text)}: {_short(part.strip())} names a CPU beyond "
                             f"{limit - 1}, the largest CPU id there can be (MAX_CPUS {MAX_CPUS}, or this kernel's "
                             "possible CPUs if more)")
        lo, hi = int(ends[0]), int(ends[1])
        if hi < lo:
            raise ValueError(f"invalid CPU list {_short(text)}: range {_short(part)} is descending")
        spans.append((lo, hi))
    cpus: list[int] = []
    for lo, hi in sorted(spans):  # merged: repeated or overlapping ranges expand once
        start = max(lo, cpus[-1] + 1) if cpus else lo
        cpus.extend(range(start, hi + 1))
    return cpus


def _short(text: str) -> str:
    """`text` for a message, cut short (a refused CPU list may be megabytes long)."""
    return repr(text) if len(text) <= 60 else repr(text[:57]) + "..."


def format_cpu_list(cpus: Iterable[int]) -> str:
    """Inverse of `parse_cpu_list`: [0, 1, 2, 3, 8] -> "0-3,8" (the form taskset/cpuset accept)."""
    ids = sorted(set(cpus))
    if any(c < 0 for c in ids):
        raise ValueError(f"CPU ids must be >= 0, got {ids}")
    parts: list[str] = []
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        parts.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(parts)


# --------------------------------------------------------------------------- small file readers


def _read(root: Path, rel: str) -> str | None:
    """The stripped text of root/rel, or None when missing or unreadable (containers hide /sys)."""
    try:
        return (root / rel).read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None


def _read_int(root: Path, rel: str) -> int | None:
    text = _read(root, rel)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _read_cpu_list(root: Path, rel: str) -> list[int] | None:
    text = _read(root, rel)
    if text is None:
        return None
    try:
        return parse_cpu_list(text)
    except ValueError:
        return None


# --------------------------------------------------------------------------- /proc/cpuinfo


def parse_cpuinfo(text: str) -> list[dict[str, str]]:
    """Split /proc/cpuinfo into one {field: value} dict per processor block (values as raw strings)."""
    entries: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if current:
                entries.append(current)
                current = {}
            continue
        key, sep, value = line.partition(":")
        if sep:
            current[key.strip()] = value.strip()
    if current:
        entries.append(current)
    return [e for e in entries if "processor" in e]


def cpuinfo_flags(entries: list[dict[str, str]]) -> set[str]:
    """Flags every processor reports (intersection: a kernel must be usable on all cores)."""
    sets = [set(e["flags"].split()) for e in entries if "flags" in e]
    return set.intersection(*sets) if sets else set()


def isa_flags(flags: set[str]) -> dict[str, bool]:
    """Our inference-relevant ISA keys -> present in `flags`."""
    return {key: flag in flags for key, flag in ISA_FLAGS.items()}


def isa_level(isa: dict[str, bool]) -> str:
    """One-word summary of the best vector/matrix ISA, one of `ISA_LEVELS`."""
    if isa.get("amx_tile") and (isa.get("amx_int8") or isa.get("amx_bf16")):
        return "amx"
    if isa.get("avx512_vnni") and isa.get("avx512f"):
        return "avx512_vnni"
    if isa.get("avx_vnni"):
        return "avx_vnni"
    if isa.get("avx512f"):
        return "avx512"
    if isa.get("avx2"):
        return "avx2"
    return "sse"


def int8_kernels(isa: dict[str, bool]) -> tuple[str, str]:
    """Which int8 GEMM/conv kernels oneDNN (under OpenVINO) will pick: (short name, why)."""
    if isa.get("amx_tile") and isa.get("amx_int8"):
        return "AMX", "AMX-INT8 tile matrix multiply on the TMUL unit, AVX512-VNNI for the rest"
    if isa.get("avx512_vnni") and isa.get("avx512f"):
        return "AVX512-VNNI", "512-bit vpdpbusd u8s8 dot products"
    if isa.get("avx_vnni"):
        return "AVX-VNNI", "256-bit VEX vpdpbusd u8s8 dot products"
    if isa.get("avx512_bw"):
        return "AVX512BW", "no VNNI: int8 uses AVX512BW u8s8 dot products (vpmaddubsw+vpmaddwd)"
    if isa.get("avx2"):
        return "AVX2", "no VNNI: int8 uses AVX2 u8s8 dot products (vpmaddubsw+vpmaddwd)"
    return "SSE4.1", "no AVX2: int8 falls back to SSE4.1/reference kernels, may be slower than fp32"


def _first_int(entries: list[dict[str, str]], key: str) -> int | None:
    """An integer field of the first processor block ("cpu family", "model", ...), or None."""
    try:
        return int(entries[0][key], 0)
    except (IndexError, KeyError, ValueError):
        return None


# --------------------------------------------------------------------------- sysfs readers


def read_online_cpus(root: Path) -> list[int] | None:
    """CPUs the kernel has online (sys/devices/system/cpu/online)."""
    return _read_cpu_list(root, f"{_SYS_CPU}/online")


@dataclass(frozen=True)
class CpuTopology:
    """sysfs topology of one logical CPU."""

    cpu: int
    package: int
    core_id: int
    die: int | None
    siblings: tuple[int, ...] | None  # core_cpus_list (newer kernels) or thread_siblings_list


def read_cpu_topology(root: Path, cpu: int) -> CpuTopology | None:
    """sys/devices/system/cpu/cpuN/topology, or None when package/core ids are hidden."""
    base = f"{_SYS_CPU}/cpu{cpu}/topology"
    package = _read_int(root, f"{base}/physical_package_id")
    core_id = _read_int(root, f"{base}/core_id")
    if package is None or core_id is None:
        return None
    siblings = _read_cpu_list(root, f"{base}/core_cpus_list")
    if siblings is None:
        siblings = _read_cpu_list(root, f"{base}/thread_siblings_list")
    die = _read_int(root, f"{base}/die_id")
    return CpuTopology(
        cpu=cpu,
        package=max(package, 0),  # some hypervisors report -1
        core_id=core_id,
        die=die if die is not None and die >= 0 else None,
        siblings=tuple(siblings) if siblings else None,
    )


def read_max_freq_mhz(root: Path, cpu: int) -> float | None:
    """cpufreq's cpuinfo_max_freq (kHz) in MHz; often absent in VMs."""
    khz = _read_int(root, f"{_SYS_CPU}/cpu{cpu}/cpufreq/cpuinfo_max_freq")
    return khz / 1000.0 if khz else None


def read_numa_nodes(root: Path) -> dict[int, list[int]] | None:
    """NUMA node -> its CPUs, from sys/devices/system/node/nodeN/cpulist (None if hidden)."""
    base = root / _SYS_NODE
    try:
        names = [p.name for p in base.iterdir() if re.fullmatch(r"node\d+", p.name)]
    except OSError:
        return None
    nodes: dict[int, list[int]] = {}
    for name in names:
        cpus = _read_cpu_list(root, f"{_SYS_NODE}/{name}/cpulist")
        if cpus is not None:
            nodes[int(name[4:])] = cpus
    return dict(sorted(nodes.items())) if nodes else None


def read_hybrid_cpus(root: Path) -> dict[str, list[int]] | None:
    """Intel hybrid (Alder/Raptor Lake...): {"performance": P CPUs, "efficiency": E CPUs}, else None.

    The kernel registers a separate PMU per core type, and lists its CPUs in
    sys/devices/cpu_core/cpus (P-cores) and sys/devices/cpu_atom/cpus (E-cores).
    """
    p_cpus = _read_cpu_list(root, "sys/devices/cpu_core/cpus")
    e_cpus = _read_cpu_list(root, "sys/devices/cpu_atom/cpus")
    if p_cpus is None and e_cpus is None:
        return None
    return {CORE_PERFORMANCE: p_cpus or [], CORE_EFFICIENCY: e_cpus or []}


# --------------------------------------------------------------------------- cgroups


def parse_cpu_max(text: str) -> tuple[int, int] | None:
    """cgroup v2 cpu.max ("max 100000" or "150000 100000") -> (quota_us, period_us), None if unlimited."""
    parts = text.split()
    if not parts:
        raise ValueError("empty cpu.max")
    if parts[0] == "max":
        return None
    quota = int(parts[0])
    period = int(parts[1]) if len(parts) > 1 else _DEFAULT_CFS_PERIOD_US
    if quota <= 0 or period <= 0:
        raise ValueError(f"invalid cpu.max {text!r}")
    return quota, period


def read_proc_self_cgroup(root: Path) -> dict[str, str]:
    """proc/self/cgroup as {controller: path}; the v2 unified entry has controller ""."""
    text = _read(root, "proc/self/cgroup") or ""
    paths: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(","):
                paths.setdefault(controller, parts[2])
    return paths


def _cgroup_dirs(path: str) -> list[str]:
    """A cgroup path and its ancestors, leaf first, relative: "/a/b" -> ["a/b", "a", ""]."""
    parts = [p for p in path.strip().split("/") if p and p not in (".", "..")]
    return ["/".join(parts[:i]) for i in range(len(parts), -1, -1)]


def _join(*parts: str) -> str:
    return "/".join(p for p in parts if p)


def read_cgroup_cpu_quota(root: Path) -> CpuQuota | None:
    """The tightest CPU bandwidth limit on this process's cgroup and its ancestors (v2, then v1).

    In a container the namespace makes the container's own cgroup appear at sys/fs/cgroup, so the
    ancestor walk ends there; on a host it also catches a limit set on a parent slice.
    """
    cg = read_proc_self_cgroup(root)
    found: list[CpuQuota] = []
    for d in _cgroup_dirs(cg.get("", "/")):
        rel = _join(_CGROUP, d, "cpu.max")
        text = _read(root, rel)
        if text:
            try:
                parsed = parse_cpu_max(text)
            except ValueError:
                parsed = None
            if parsed:
                found.append(CpuQuota(parsed[0], parsed[1], rel))
    if not found:
        for mount in _CGROUP_V1_CPU_MOUNTS:
            for d in _cgroup_dirs(cg.get("cpu", "/")):
                rel = _join(_CGROUP, mount, d)
                quota = _read_int(root, f"{rel}/cpu.cfs_quota_us")
                period = _read_int(root, f"{rel}/cpu.cfs_period_us")
                if quota and quota > 0 and period and period > 0:
                    found.append(CpuQuota(quota, period, f"{rel}/cpu.cfs_quota_us"))
    return min(found, key=lambda q: q.cpus) if found else None


def read_cgroup_cpuset(root: Path) -> list[int] | None:
    """CPUs the cgroup cpuset allows (v2 cpuset.cpus.effective, v1 cpuset.effective_cpus), or None."""
    cg = read_proc_self_cgroup(root)
    candidates = [_join(_CGROUP, d, "cpuset.cpus.effective") for d in _cgroup_dirs(cg.get("", "/"))]
    for d in _cgroup_dirs(cg.get("cpuset", "/")):
        candidates += [
            _join(_CGROUP, "cpuset", d, "cpuset.effective_cpus"),
            _join(_CGROUP, "cpuset", d, "cpuset.cpus"),
        ]
    for rel in candidates:
        cpus = _read_cpu_list(root, rel)
        if cpus:  # an empty file means "not configured here"
            return cpus
    return None


# --------------------------------------------------------------------------- topology assembly


def _cores_from_sysfs(root: Path, online: list[int]) -> list[Core] | None:
    """Group online CPUs into cores by their sibling list (or package/die/core_id)."""
    online_set = set(online)
    groups: dict[tuple, Core] = {}
    for cpu in online:
        topo = read_cpu_topology(root, cpu)
        if topo is None:
            return None
        if topo.siblings:
            key: tuple = ("siblings",) + tuple(c for c in topo.siblings if c in online_set)
        else:
            key = ("ids", topo.package, topo.die, topo.core_id)
        core = groups.get(key)
        if core is None:
            groups[key] = Core(socket=topo.package, core_id=topo.core_id, cpus=[cpu], die=topo.die)
        elif cpu not in core.cpus:
            core.cpus.append(cpu)
    return list(groups.values())


def _cores_from_cpuinfo(entries: list[dict[str, str]], online: list[int]) -> list[Core] | None:
    """Group by /proc/cpuinfo's "physical id"/"core id" (hidden sysfs, e.g. some containers)."""
    by_cpu: dict[int, dict[str, str]] = {}
    for e in entries:
        if e.get("processor", "").isdigit():
            by_cpu[int(e["processor"])] = e
    groups: dict[tuple[int, int], Core] = {}
    for cpu in online:
        e = by_cpu.get(cpu)
        if e is None or not e.get("physical id", "").isdigit() or not e.get("core id", "").isdigit():
            return None
        key = (int(e["physical id"]), int(e["core id"]))
        if key in groups:
            groups[key].cpus.append(cpu)
        else:
            groups[key] = Core(socket=key[0], core_id=key[1], cpus=[cpu])
    return list(groups.values())


def _flat_cores(online: list[int]) -> list[Core]:
    """Last resort: each logical CPU is its own core on socket 0."""
    return [Core(socket=0, core_id=cpu, cpus=[cpu]) for cpu in online]


def _build_cores(
    root: Path, online: list[int], entries: list[dict[str, str]], warnings: list[str]
) -> tuple[list[Core], str]:
    cores = _cores_from_sysfs(root, online)
    source = TOPOLOGY_SYSFS
    if cores is None:
        cores = _cores_from_cpuinfo(entries, online)
        source = TOPOLOGY_CPUINFO
        if cores is not None:
            warnings.append("sysfs CPU topology hidden: cores taken from /proc/cpuinfo physical/core ids")
    if cores is None:
        cores = _flat_cores(online)
        source = TOPOLOGY_FLAT
        warnings.append("no CPU topology available: each logical CPU counted as one core")
        first = entries[0] if entries else {}
        siblings, per_package = first.get("siblings", ""), first.get("cpu cores", "")
        if siblings.isdigit() and per_package.isdigit() and int(siblings) > int(per_package):
            warnings.append(
                f"/proc/cpuinfo reports {siblings} threads for {per_package} cores per package: "
                "SMT siblings are counted as separate cores"
            )
    for core in cores:
        core.cpus.sort()
    return cores, source


def _is_live_root(root: Path) -> bool:
    try:
        return root.resolve() == Path("/").resolve()
    except OSError:
        return False


def query_openvino_cpu() -> tuple[OpenVinoInfo | None, str | None]:
    """What OpenVINO's CPU plugin reports, or (None, why) when OpenVINO is absent or fails."""
    try:
        import openvino as ov  # noqa: PLC0415 - optional and slow-ish, only for `info`
    except Exception as exc:  # ImportError, or a broken install
        return None, f"OpenVINO not available ({type(exc).__name__})"
    try:
        core = ov.Core()
        caps = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        name = core.get_property("CPU", "FULL_DEVICE_NAME")
        version = ov.get_version() if hasattr(ov, "get_version") else getattr(ov, "__version__", "?")
    except Exception as exc:
        return None, f"OpenVINO CPU plugin query failed: {exc}"
    info = OpenVinoInfo(
        version=str(version), full_device_name=str(name), optimization_capabilities=[str(c) for c in caps]
    )
    return info, None


def _psutil_counts() -> tuple[int | None, int | None]:
    try:
        import psutil  # noqa: PLC0415 - optional
    except ImportError:
        return None, None
    return psutil.cpu_count(logical=True), psutil.cpu_count(logical=False)


def describe_machine(
    root: str | Path = "/",
    *,
    pid_affinity: set[int] | None = None,
    query_openvino: bool = True,
) -> MachineInfo:
    """Describe the CPUs under `root` ("/" = this machine) and which of them this process may use.

    `pid_affinity` overrides the process affinity (default: os.sched_getaffinity(0) on the live
    machine, all online CPUs for a captured tree). OpenVINO and psutil are only asked on the live
    machine. Raises ValueError when `root` holds neither proc/cpuinfo nor a sysfs CPU list.
    """
    root_path = Path(root)
    live = _is_live_root(root_path)
    warnings: list[str] = []

    text = _read(root_path, "proc/cpuinfo")
    entries = parse_cpuinfo(text) if text else []
    if not entries:
        warnings.append("proc/cpuinfo unreadable: model and ISA flags unknown")

    online = read_online_cpus(root_path)
    if online is None:
        online = sorted(int(e["processor"]) for e in entries if e["processor"].isdigit())
        if not online and live:
            online = list(range(os.cpu_count() or 1))
        if online:
            warnings.append(f"{_SYS_CPU}/online unreadable: online CPUs taken from /proc/cpuinfo")
    if not online:
        raise ValueError(
            f"no CPU description under {str(root_path)!r}: "
            f"neither proc/cpuinfo nor {_SYS_CPU}/online is readable"
        )

    cores, topology_source = _build_cores(root_path, online, entries, warnings)

    nodes = read_numa_nodes(root_path)
    if nodes is None:
        nodes = {0: list(online)}
        warnings.append("NUMA information hidden: assuming a single node")
    cpu_node = {cpu: node for node, cpus in nodes.items() for cpu in cpus}

    hybrid_cpus = read_hybrid_cpus(root_path)
    p_set = set(hybrid_cpus[CORE_PERFORMANCE]) if hybrid_cpus else set()
    e_set = set(hybrid_cpus[CORE_EFFICIENCY]) if hybrid_cpus else set()
    for core in cores:
        core.numa_node = cpu_node.get(core.cpus[0])
        if e_set.intersection(core.cpus):
            core.core_type = CORE_EFFICIENCY
        elif p_set.intersection(core.cpus):
            core.core_type = CORE_PERFORMANCE
        freqs = [f for f in (read_max_freq_mhz(root_path, c) for c in core.cpus) if f]
        core.max_freq_mhz = max(freqs) if freqs else None
    cores.sort(key=lambda c: (c.numa_node if c.numa_node is not None else 1 << 30, c.cpus[0]))

    if pid_affinity is not None:
        affinity = sorted(pid_affinity)
    elif live and hasattr(os, "sched_getaffinity"):
        affinity = sorted(os.sched_getaffinity(0))
    else:
        affinity = list(online)
    cpuset = read_cgroup_cpuset(root_path)
    usable = sorted(set(online) & set(affinity) & (set(cpuset) if cpuset is not None else set(online)))
    if not usable:
        warnings.append("no usable CPU: affinity and cgroup cpuset do not intersect the online CPUs")
    quota = read_cgroup_cpu_quota(root_path)

    isa = isa_flags(cpuinfo_flags(entries))
    kernels, kernels_note = int8_kernels(isa)

    ov_info = None
    if query_openvino and live:
        ov_info, why = query_openvino_cpu()
        if why:
            warnings.append(why)
    logical, physical = _psutil_counts() if live else (None, None)

    first = entries[0] if entries else {}
    return MachineInfo(
        root=str(root_path),
        live=live,
        model_name=first.get("model name") or None,
        vendor=first.get("vendor_id") or None,
        cpu_family=_first_int(entries, "cpu family"),
        cpu_model=_first_int(entries, "model"),
        stepping=_first_int(entries, "stepping"),
        online_cpus=list(online),
        sockets=len({c.socket for c in cores}),
        numa_nodes=[NumaNode(node=n, cpus=cpus) for n, cpus in nodes.items()],
        cores=cores,
        hybrid=hybrid_cpus is not None and bool(e_set),
        affinity=affinity,
        cgroup_cpuset=cpuset,
        usable_cpus=usable,
        cpu_quota=quota,
        cpu_budget=quota.budget if quota is not None else None,
        isa=isa,
        isa_level=isa_level(isa),
        int8_kernels=kernels,
        int8_kernels_note=kernels_note,
        topology_source=topology_source,
        openvino=ov_info,
        psutil_logical=logical,
        psutil_physical=physical,
        warnings=warnings,
    )


def machine_summary(info: MachineInfo | None = None) -> dict[str, Any]:
    """The machine a figure was measured on, in the few fields every report records (bench, demo, train,
    plan): CPU model, ISA level, sockets, physical and logical CPUs, the CPUs this process may use, the
    OpenVINO version (when `info` asked OpenVINO), Python and the OS. `info` defaults to `describe_machine()`."""
    info = info or describe_machine()
    return {"cpu": info.model_name or platform.processor() or platform.machine(), "isa_level": info.isa_level,
            "sockets": info.sockets, "physical_cores": info.physical_cores, "logical_cpus": info.logical_cpus,
            "usable_cpus": list(info.usable_cpus), "openvino": info.openvino.version if info.openvino else None,
            "python": platform.python_version(), "system": platform.system()}


# --------------------------------------------------------------------------- placement helpers


def usable_physical_cores(
    info: MachineInfo, use_smt: bool = False, include_efficiency: bool = False
) -> list[list[int]]:
    """Physical cores this process may use, each as its usable logical CPUs, for stream pinning.

    Ordered by NUMA node then by lowest CPU id, so consecutive streams share a node. Without
    `use_smt` only the first usable sibling of each core is kept (one thread per core avoids
    two streams fighting over one core's vector units). Efficiency cores are skipped unless
    `include_efficiency`, or unless the process may use nothing else. With a cgroup CPU quota the
    list is cut to `info.cpu_budget` logical CPUs (the last core may keep fewer siblings).
    """
    usable = set(info.usable_cpus)
    picked: list[tuple[str, list[int]]] = []
    for core in info.cores:  # already sorted by (NUMA node, first CPU)
        cpus = [c for c in core.cpus if c in usable]
        if cpus:
            picked.append((core.core_type, cpus if use_smt else cpus[:1]))
    if not include_efficiency and any(kind != CORE_EFFICIENCY for kind, _ in picked):
        picked = [(kind, cpus) for kind, cpus in picked if kind != CORE_EFFICIENCY]
    result = [cpus for _, cpus in picked]
    if info.cpu_budget is not None:
        budget, cut = info.cpu_budget, []
        for cpus in result:
            if budget <= 0:
                break
            cut.append(cpus[:budget])
            budget -= len(cut[-1])
        result = cut
    return result
