"""CPU introspection: real parsing of captured machine trees (tests/data/machines) and of this machine."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import parnet_cpu.cli as cli
from parnet_cpu.system.cpuinfo import (
    CORE_EFFICIENCY,
    CORE_PERFORMANCE,
    CORE_STANDARD,
    MachineInfo,
    cpuinfo_flags,
    describe_machine,
    format_cpu_list,
    parse_cpu_list,
    parse_cpu_max,
    parse_cpuinfo,
    query_openvino_cpu,
    usable_physical_cores,
)

MACHINES = Path(__file__).parent / "data" / "machines"
SPR = MACHINES / "xeon-spr-2s"
ADL = MACHINES / "alderlake-i9-12900k"
EPYC = MACHINES / "epyc-container"

NO_ISA = dict.fromkeys(
    ["avx2", "fma", "avx512f", "avx512_bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
     "amx_tile", "amx_int8", "amx_bf16"],
    False,
)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


# --------------------------------------------------------------------------- CPU lists


@pytest.mark.parametrize(
    "text, cpus",
    [
        ("0-3,8,10-11", [0, 1, 2, 3, 8, 10, 11]),
        ("0", [0]),
        ("0-1\n", [0, 1]),
        (" 5 , 2-3 ", [2, 3, 5]),
        ("3,1,1-2", [1, 2, 3]),
        ("", []),
    ],
)
def test_parse_cpu_list(text: str, cpus: list[int]) -> None:
    assert parse_cpu_list(text) == cpus


@pytest.mark.parametrize(
    "cpus", [[0, 1, 2, 3, 8], [0], [0, 1], [1, 3, 5], list(range(224)), [0, 2, 3, 4, 10, 11, 12, 20]]
)
def test_cpu_list_round_trip(cpus: list[int]) -> None:
    assert parse_cpu_list(format_cpu_list(cpus)) == cpus


def test_format_cpu_list() -> None:
    assert format_cpu_list([0, 1, 2, 3, 8]) == "0-3,8"
    assert format_cpu_list([8, 3, 2, 1, 0, 3]) == "0-3,8"
    assert format_cpu_list([0, 1]) == "0-1"
    assert format_cpu_list([]) == ""
    with pytest.raises(ValueError, match=">= 0"):
        format_cpu_list([-1, 0])


@pytest.mark.parametrize("bad", ["a", "1-", "-1", "1,,2", "0-3:2", "3-1", "0x2", "1 2"])
def test_parse_cpu_list_rejects_garbage(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid CPU list"):
        parse_cpu_list(bad)


# --------------------------------------------------------------------------- small parsers


def test_parse_cpuinfo_and_flags() -> None:
    text = (
        "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Some CPU: rev 2\nflags\t\t: fpu avx2 fma\n\n"
        "processor\t: 1\nvendor_id\t: GenuineIntel\nflags\t\t: fpu avx2\npower management:\n\n"
    )
    entries = parse_cpuinfo(text)
    assert [e["processor"] for e in entries] == ["0", "1"]
    assert entries[0]["model name"] == "Some CPU: rev 2"  # split on the first colon only
    assert entries[1]["power management"] == ""
    assert cpuinfo_flags(entries) == {"fpu", "avx2"}  # only what every CPU has
    assert cpuinfo_flags([]) == set()


def test_parse_cpu_max() -> None:
    assert parse_cpu_max("max 100000") is None
    assert parse_cpu_max("max") is None
    assert parse_cpu_max("150000 100000") == (150000, 100000)
    assert parse_cpu_max("50000") == (50000, 100000)
    for bad in ("", "abc 100000", "0 100000", "-1 100000"):
        with pytest.raises(ValueError):
            parse_cpu_max(bad)


# --------------------------------------------------------------------------- captured machines


@pytest.mark.parametrize(
    "root, expected",
    [
        (SPR, dict(model_name="Intel(R) Xeon(R) Platinum 8480+", vendor="GenuineIntel", sockets=2, numa=2,
                   cores=112, threads=224, tpc=2, hybrid=False, isa_level="amx", int8="AMX",
                   isa={**NO_ISA, **dict.fromkeys(NO_ISA, True)})),
        (ADL, dict(model_name="12th Gen Intel(R) Core(TM) i9-12900K", vendor="GenuineIntel", sockets=1, numa=1,
                   cores=16, threads=24, tpc=2, hybrid=True, isa_level="avx_vnni", int8="AVX-VNNI",
                   isa={**NO_ISA, "avx2": True, "fma": True, "avx_vnni": True})),
        (EPYC, dict(model_name="AMD EPYC", vendor="AuthenticAMD", sockets=1, numa=1, cores=2, threads=2, tpc=1,
                    hybrid=False, isa_level="avx512_vnni", int8="AVX512-VNNI",
                    isa={**dict.fromkeys(NO_ISA, True), "amx_tile": False, "amx_int8": False, "amx_bf16": False})),
    ],
    ids=["xeon-spr-2s", "alderlake-i9-12900k", "epyc-container"],
)
def test_fixture_machines(root: Path, expected: dict) -> None:
    info = describe_machine(root)
    assert info.live is False
    assert info.model_name == expected["model_name"]
    assert info.vendor == expected["vendor"]
    assert info.sockets == expected["sockets"]
    assert len(info.numa_nodes) == expected["numa"]
    assert info.physical_cores == expected["cores"]
    assert info.logical_cpus == expected["threads"]
    assert info.threads_per_core == expected["tpc"]
    assert info.hybrid is expected["hybrid"]
    assert info.isa == expected["isa"]
    assert info.isa_level == expected["isa_level"]
    assert info.int8_kernels == expected["int8"]
    assert info.topology_source == "sysfs"
    assert info.warnings == []
    assert info.openvino is None and info.psutil_logical is None  # only asked on the live machine
    # every online CPU belongs to exactly one core
    assert sorted(c for core in info.cores for c in core.cpus) == info.online_cpus


def test_spr_topology() -> None:
    info = describe_machine(SPR)
    assert info.cpu_family == 6 and info.cpu_model == 143 and info.stepping == 8
    nodes = {n.node: n.cpus for n in info.numa_nodes}
    assert nodes[0] == list(range(0, 56)) + list(range(112, 168))
    assert nodes[1] == list(range(56, 112)) + list(range(168, 224))
    first = info.cores[0]
    assert (first.socket, first.numa_node, first.cpus, first.core_type) == (0, 0, [0, 112], CORE_STANDARD)
    core_56 = next(c for c in info.cores if 56 in c.cpus)
    assert (core_56.socket, core_56.numa_node, core_56.cpus) == (1, 1, [56, 168])
    assert first.max_freq_mhz == 3800.0
    assert info.cpu_quota is None and info.cpu_budget is None
    assert info.usable_cpus == list(range(224))

    cores = usable_physical_cores(info)
    assert len(cores) == 112 and all(len(c) == 1 for c in cores)
    assert [c[0] for c in cores] == list(range(112))  # NUMA node 0 first, then node 1
    smt = usable_physical_cores(info, use_smt=True)
    assert smt[0] == [0, 112] and smt[56] == [56, 168] and len(smt) == 112


def test_machine_summary_is_the_one_machine_description() -> None:
    """What every report records about the machine (bench, demo, train): one function, from describe_machine."""
    from parnet_cpu.system.cpuinfo import machine_summary

    info = describe_machine(SPR)
    summary = machine_summary(info)
    assert summary["cpu"] == info.model_name and summary["isa_level"] == info.isa_level
    assert (summary["sockets"], summary["physical_cores"], summary["logical_cpus"]) == (2, 112, 224)
    assert summary["usable_cpus"] == list(range(224)) and summary["openvino"] is None  # a captured tree
    assert {"python", "system"} <= set(summary)
    json.dumps(summary)  # goes into JSON reports as it is


def test_every_machine_record_is_machine_summary_plus_extras() -> None:
    """The trainer's and the benchmark scripts' machine records carry every key of machine_summary with its
    value (their extras, threads and library versions, alongside), not a schema of their own."""
    import importlib

    from parnet_cpu.system.cpuinfo import machine_summary
    from parnet_cpu.training.trainer import machine_description

    shared = machine_summary(describe_machine(query_openvino=False))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        bench_common = importlib.import_module("common")
    finally:
        sys.path.pop(0)
    records = {"trainer": machine_description(), "benchmarks": bench_common.machine_summary(1)}
    for name, record in records.items():
        assert set(shared) <= set(record), (name, set(shared) - set(record))
        same = {k: record[k] for k in shared if k not in ("openvino", "usable_cpus")}  # ov: queried or not
        assert same == {k: v for k, v in shared.items() if k not in ("openvino", "usable_cpus")}, name
        json.dumps(record)
    assert records["benchmarks"]["threads_used"] == 1 and records["benchmarks"]["openvino"]


def test_alderlake_hybrid() -> None:
    info = describe_machine(ADL)
    assert info.core_types == {CORE_PERFORMANCE: list(range(16)), CORE_EFFICIENCY: list(range(16, 24))}
    p_cores = [c for c in info.cores if c.core_type == CORE_PERFORMANCE]
    e_cores = [c for c in info.cores if c.core_type == CORE_EFFICIENCY]
    assert [c.cpus for c in p_cores] == [[2 * i, 2 * i + 1] for i in range(8)]
    assert [c.cpus for c in e_cores] == [[16 + j] for j in range(8)]
    assert {c.max_freq_mhz for c in p_cores} == {5100.0} and {c.max_freq_mhz for c in e_cores} == {3900.0}

    # E-cores are left out by default
    assert usable_physical_cores(info) == [[2 * i] for i in range(8)]
    assert usable_physical_cores(info, use_smt=True) == [[2 * i, 2 * i + 1] for i in range(8)]
    with_e = usable_physical_cores(info, include_efficiency=True)
    assert with_e == [[2 * i] for i in range(8)] + [[16 + j] for j in range(8)]


def test_alderlake_only_e_cores_allowed_still_returns_them() -> None:
    info = describe_machine(ADL, pid_affinity={18, 19, 20})
    assert info.usable_cpus == [18, 19, 20]
    assert usable_physical_cores(info) == [[18], [19], [20]]


def test_epyc_container_quota() -> None:
    info = describe_machine(EPYC)
    assert info.cpu_quota is not None
    assert (info.cpu_quota.quota_us, info.cpu_quota.period_us) == (150000, 100000)
    assert info.cpu_quota.cpus == 1.5
    assert info.cpu_budget == 1  # floor(1.5): never more threads than the quota can run
    assert usable_physical_cores(info) == [[0]]


@pytest.mark.parametrize(
    "cpu_max, no_smt, smt",
    [
        ("400000 100000", [[0], [2], [4], [6]], [[0, 1], [2, 3]]),
        ("250000 100000", [[0], [2]], [[0, 1]]),  # budget floor(2.5) = 2
        ("300000 100000", [[0], [2], [4]], [[0, 1], [2]]),  # budget 3: the last core keeps one sibling
        ("50000 100000", [[0]], [[0]]),  # half a CPU still runs one thread
        ("max 100000", [[2 * i] for i in range(8)], [[2 * i, 2 * i + 1] for i in range(8)]),
    ],
)
def test_quota_truncates_cores(tmp_path: Path, cpu_max: str, no_smt: list, smt: list) -> None:
    root = _copy(ADL, tmp_path / "adl")
    _write(root, "sys/fs/cgroup/cpu.max", cpu_max)
    info = describe_machine(root)
    assert usable_physical_cores(info) == no_smt
    assert usable_physical_cores(info, use_smt=True) == smt


def test_quota_cgroup_v1_and_parent_v2(tmp_path: Path) -> None:
    # cgroup v1: cpu.cfs_quota_us / cpu.cfs_period_us (the epyc capture has quota -1 = unlimited)
    root = _copy(EPYC, tmp_path / "v1")
    (root / "sys/fs/cgroup/cpu.max").unlink()
    assert describe_machine(root).cpu_budget is None
    _write(root, "sys/fs/cgroup/cpu/cpu.cfs_quota_us", "100000")
    info = describe_machine(root)
    assert info.cpu_budget == 1 and info.cpu_quota.source.endswith("cpu.cfs_quota_us")
    assert usable_physical_cores(info) == [[0]]

    # cgroup v2 limit on a parent slice of this process's cgroup counts too
    root = _copy(ADL, tmp_path / "v2")
    _write(root, "proc/self/cgroup", "0::/app.slice/worker")
    _write(root, "sys/fs/cgroup/app.slice/worker/cpu.max", "max 100000")
    _write(root, "sys/fs/cgroup/app.slice/cpu.max", "300000 100000")
    info = describe_machine(root)
    assert info.cpu_budget == 3 and info.cpu_quota.source == "sys/fs/cgroup/app.slice/cpu.max"


def test_affinity_restriction() -> None:
    allowed = set(range(0, 8)) | set(range(112, 120))
    info = describe_machine(SPR, pid_affinity=allowed)
    assert info.affinity == sorted(allowed) and info.usable_cpus == sorted(allowed)
    assert usable_physical_cores(info) == [[i] for i in range(8)]
    assert usable_physical_cores(info, use_smt=True) == [[i, 112 + i] for i in range(8)]
    # only the second sibling allowed: that sibling stands for the core
    info = describe_machine(SPR, pid_affinity={112, 57})
    assert usable_physical_cores(info) == [[112], [57]]  # node 0 before node 1
    # affinity outside the online CPUs leaves nothing, with a warning
    info = describe_machine(EPYC, pid_affinity={7})
    assert info.usable_cpus == [] and usable_physical_cores(info) == [] and info.warnings


def test_cgroup_cpuset_restriction(tmp_path: Path) -> None:
    root = _copy(ADL, tmp_path / "adl")
    _write(root, "sys/fs/cgroup/cpuset.cpus.effective", "2-5,16")
    info = describe_machine(root)
    assert info.cgroup_cpuset == [2, 3, 4, 5, 16]
    assert info.usable_cpus == [2, 3, 4, 5, 16]
    assert usable_physical_cores(info) == [[2], [4]]
    assert usable_physical_cores(info, use_smt=True, include_efficiency=True) == [[2, 3], [4, 5], [16]]
    # affinity and cpuset intersect
    info = describe_machine(root, pid_affinity={3, 4, 7})
    assert info.usable_cpus == [3, 4]


# --------------------------------------------------------------------------- hidden /sys fallbacks


def test_fallback_to_proc_cpuinfo(tmp_path: Path) -> None:
    root = tmp_path / "bare"
    _write(root, "proc/cpuinfo", (ADL / "proc/cpuinfo").read_text())
    info = describe_machine(root)
    assert info.topology_source == "cpuinfo"
    assert info.online_cpus == list(range(24))
    assert (info.physical_cores, info.logical_cpus, info.threads_per_core) == (16, 24, 2)
    assert [n.node for n in info.numa_nodes] == [0] and info.numa_nodes[0].cpus == list(range(24))
    assert info.isa_level == "avx_vnni"
    assert any("/proc/cpuinfo" in w for w in info.warnings)
    assert any("NUMA" in w for w in info.warnings)


def test_fallback_to_one_core_per_cpu(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    text = "".join(
        f"processor\t: {i}\nvendor_id\t: AuthenticAMD\nmodel name\t: Mystery\nflags\t\t: fpu sse2\n\n" for i in range(4)
    )
    _write(root, "proc/cpuinfo", text)
    _write(root, "sys/devices/system/cpu/online", "0-3")
    info = describe_machine(root)
    assert info.topology_source == "flat"
    assert [c.cpus for c in info.cores] == [[0], [1], [2], [3]]
    assert info.isa_level == "sse" and info.int8_kernels == "SSE4.1"
    assert len(info.warnings) == 2  # no topology, no NUMA

    # "siblings" > "cpu cores" but no "core id": SMT exists and the warning says it is not resolved
    _write(root, "proc/cpuinfo", text.replace("flags", "siblings\t: 4\ncpu cores\t: 2\nflags"))
    info = describe_machine(root)
    assert info.topology_source == "flat" and any("4 threads for 2 cores" in w for w in info.warnings)


def test_empty_root_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no CPU description"):
        describe_machine(tmp_path)


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def info_cli(monkeypatch: pytest.MonkeyPatch):
    """The real `parnet-cpu` entry point."""
    assert "parnet_cpu.cli.info" in cli.COMMANDS
    return cli.main


@pytest.mark.parametrize("root", [SPR, ADL, EPYC], ids=lambda p: p.name)
def test_cli_info_json(info_cli, capsys: pytest.CaptureFixture, root: Path) -> None:
    assert info_cli(["info", "--json", "--root", str(root)]) == 0
    data = json.loads(capsys.readouterr().out)
    expected = describe_machine(root).to_dict()
    assert data == json.loads(json.dumps(expected))
    assert data["logical_cpus"] == len(data["online_cpus"])
    assert set(data["isa"]) == set(NO_ISA)


def test_cli_info_human(info_cli, capsys: pytest.CaptureFixture) -> None:
    assert info_cli(["info", "--root", str(ADL)]) == 0
    out = capsys.readouterr().out
    assert "12th Gen Intel(R) Core(TM) i9-12900K" in out
    assert "Performance cores  8 (0-15" in out and "Efficiency cores   8 (16-23" in out
    assert "int8 kernels" in out and "AVX-VNNI" in out
    assert "avx512f no" in out and "avx_vnni yes" in out

    assert info_cli(["info", "--root", str(EPYC)]) == 0
    out = capsys.readouterr().out
    assert "1.5 CPUs" in out and "budget 1" in out


def test_cli_info_bad_root(info_cli, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    assert info_cli(["info", "--root", str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert info_cli(["info", "--root", str(tmp_path)]) == 2
    assert "no CPU description" in capsys.readouterr().err


# --------------------------------------------------------------------------- live machine


def test_live_machine_matches_os() -> None:
    info = describe_machine(query_openvino=False)
    assert info.live is True
    assert set(info.usable_cpus) == os.sched_getaffinity(0)
    assert info.logical_cpus == os.cpu_count()
    assert 1 <= info.physical_cores <= info.logical_cpus
    assert info.psutil_logical == os.cpu_count()
    assert info.openvino is None
    flat = sorted(c for core in usable_physical_cores(info, use_smt=True) for c in core)
    assert set(flat) <= set(info.usable_cpus)
    if info.cpu_budget is None and not info.hybrid:
        assert flat == info.usable_cpus
    json.dumps(info.to_dict())
    assert isinstance(info, MachineInfo)


def test_live_openvino_query() -> None:
    pytest.importorskip("openvino")
    ov_info, why = query_openvino_cpu()
    assert why is None and ov_info is not None
    assert "FP32" in ov_info.optimization_capabilities
    assert ov_info.full_device_name


def test_openvino_absent_is_tolerated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # makes `import openvino` raise ImportError
    info = describe_machine()
    assert info.openvino is None
    assert any("OpenVINO not available" in w for w in info.warnings)


def test_system_package_does_not_import_torch() -> None:
    code = (
        "import sys; from parnet_cpu.system.cpuinfo import describe_machine; import parnet_cpu.cli.info; "
        "describe_machine(query_openvino=False); assert 'torch' not in sys.modules, 'torch imported'"
    )
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=repo, env=env)
