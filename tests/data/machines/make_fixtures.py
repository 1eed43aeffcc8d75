"""Regenerate the captured-machine trees used by tests/test_cpuinfo.py.

Each tree mirrors the files `parnet_cpu.system.cpuinfo.describe_machine(root=...)` reads:
proc/cpuinfo, sys/devices/system/cpu/..., sys/devices/system/node/..., sys/devices/cpu_{core,atom}
(hybrid only) and sys/fs/cgroup/...

    python tests/data/machines/make_fixtures.py                 # rewrite xeon-spr-2s, alderlake-i9-12900k
    python tests/data/machines/make_fixtures.py --capture-live  # also re-capture epyc-container from THIS machine

The two Intel trees are synthesized (topology laid out the way Linux numbers those machines) around
real /proc/cpuinfo identity and flags lines; `epyc-container` is a verbatim copy of the files on the
2-vCPU AMD EPYC build container, plus a cgroup v2 cpu.max of "150000 100000" to exercise the quota
path. The generated files are committed; rerun only to change them.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Intel Xeon Platinum 8480+ (Sapphire Rapids, family 6 model 143 stepping 8): model name and flags
# from the `lscpu` of a 2x8480+ server in Hugging Face's blog "Fine-tuning Stable Diffusion models on
# Intel CPUs" (huggingface/blog, stable-diffusion-finetuning-intel.md); "arch_per fmon" there is a
# line-wrap artifact of arch_perfmon.
SPR_MODEL_NAME = "Intel(R) Xeon(R) Platinum 8480+"
SPR_FLAGS = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush dts acpi mmx fxsr "
    "sse sse2 ss ht tm pbe syscall nx pdpe1gb rdtscp lm constant_tsc art arch_perfmon pebs bts rep_good "
    "nopl xtopology nonstop_tsc cpuid aperfmperf tsc_known_freq pni pclmulqdq dtes64 monitor ds_cpl vmx "
    "smx est tm2 ssse3 sdbg fma cx16 xtpr pdcm pcid dca sse4_1 sse4_2 x2apic movbe popcnt "
    "tsc_deadline_timer aes xsave avx f16c rdrand lahf_lm abm 3dnowprefetch cpuid_fault epb cat_l3 "
    "cat_l2 cdp_l3 invpcid_single intel_ppin cdp_l2 ssbd mba ibrs ibpb stibp ibrs_enhanced tpr_shadow "
    "vnmi flexpriority ept vpid ept_ad fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid cqm rdt_a "
    "avx512f avx512dq rdseed adx smap avx512ifma clflushopt clwb intel_pt avx512cd sha_ni avx512bw "
    "avx512vl xsaveopt xsavec xgetbv1 xsaves cqm_llc cqm_occup_llc cqm_mbm_total cqm_mbm_local "
    "split_lock_detect avx_vnni avx512_bf16 wbnoinvd dtherm ida arat pln pts hwp hwp_act_window hwp_epp "
    "hwp_pkg_req avx512vbmi umip pku ospke waitpkg avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni "
    "avx512_bitalg tme avx512_vpopcntdq la57 rdpid bus_lock_detect cldemote movdiri movdir64b enqcmd "
    "fsrm md_clear serialize tsxldtrk pconfig arch_lbr amx_bf16 avx512_fp16 amx_tile amx_int8 flush_l1d "
    "arch_capabilities"
)

# 12th Gen Intel Core i9-12900K (Alder Lake-S, family 6 model 151 stepping 2, microcode 0x15): the
# /proc/cpuinfo posted in andikleen/pmu-tools issue #415 ("Alder Lake model number", 2022-01). The
# stored copy of that post is cut after "... hwp_pkg_req umip pku os"; the tail is the one a bare-metal
# i7-12700K (same die and kernel generation) prints after the identical prefix.
ADL_MODEL_NAME = "12th Gen Intel(R) Core(TM) i9-12900K"
ADL_FLAGS = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush dts acpi mmx fxsr "
    "sse sse2 ss ht tm pbe syscall nx pdpe1gb rdtscp lm constant_tsc art arch_perfmon pebs bts rep_good "
    "nopl xtopology nonstop_tsc cpuid aperfmperf tsc_known_freq pni pclmulqdq dtes64 monitor ds_cpl vmx "
    "smx est tm2 ssse3 sdbg fma cx16 xtpr pdcm pcid sse4_1 sse4_2 x2apic movbe popcnt "
    "tsc_deadline_timer aes xsave avx f16c rdrand lahf_lm abm 3dnowprefetch cpuid_fault cat_l2 "
    "invpcid_single cdp_l2 ssbd ibrs ibpb stibp ibrs_enhanced tpr_shadow vnmi flexpriority ept vpid "
    "ept_ad fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid rdt_a rdseed adx smap clflushopt clwb "
    "intel_pt sha_ni xsaveopt xsavec xgetbv1 xsaves split_lock_detect avx_vnni dtherm ida arat pln pts "
    "hwp hwp_notify hwp_act_window hwp_epp hwp_pkg_req umip pku ospke waitpkg gfni vaes vpclmulqdq tme "
    "rdpid movdiri movdir64b fsrm md_clear serialize pconfig arch_lbr flush_l1d arch_capabilities"
)


def _fmt_cpulist(cpus: list[int]) -> str:
    """Kernel cpulist format (kept local so the generator does not depend on the code under test)."""
    cpus = sorted(cpus)
    out, i = [], 0
    while i < len(cpus):
        j = i
        while j + 1 < len(cpus) and cpus[j + 1] == cpus[j] + 1:
            j += 1
        out.append(str(cpus[i]) if i == j else f"{cpus[i]}-{cpus[j]}")
        i = j + 1
    return ",".join(out)


def _cpuinfo_block(fields: list[tuple[str, str]]) -> str:
    """One processor block laid out like the kernel's show_cpuinfo (key, tabs to column 16, ': ')."""
    lines = []
    for key, value in fields:
        if key == "power management":
            lines.append("power management:")
        else:
            lines.append(f"{key}{chr(9) * (2 if len(key) < 8 else 1)}: {value}")
    return "\n".join(lines) + "\n\n"


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")


def _write_tree(
    root: Path,
    *,
    cpuinfo: str,
    cores: list[dict],  # {"socket", "core_id", "cpus", "freq_khz"}
    nodes: dict[int, list[int]],
    cpu_max: str,
    hybrid: tuple[list[int], list[int]] | None = None,
) -> None:
    if root.exists():
        shutil.rmtree(root)
    all_cpus = sorted(c for core in cores for c in core["cpus"])
    span = _fmt_cpulist(all_cpus)
    _write(root, "proc/cpuinfo", cpuinfo.rstrip("\n") + "\n")
    for name in ("online", "possible", "present"):
        _write(root, f"sys/devices/system/cpu/{name}", span)
    _write(root, "sys/devices/system/cpu/offline", "")
    for core in cores:
        package_cpus = [c for k in cores if k["socket"] == core["socket"] for c in k["cpus"]]
        for cpu in core["cpus"]:
            topo = f"sys/devices/system/cpu/cpu{cpu}/topology"
            _write(root, f"{topo}/physical_package_id", str(core["socket"]))
            _write(root, f"{topo}/die_id", "0")
            _write(root, f"{topo}/core_id", str(core["core_id"]))
            _write(root, f"{topo}/thread_siblings_list", _fmt_cpulist(core["cpus"]))
            _write(root, f"{topo}/core_cpus_list", _fmt_cpulist(core["cpus"]))
            _write(root, f"{topo}/package_cpus_list", _fmt_cpulist(package_cpus))
            if core.get("freq_khz"):
                _write(root, f"sys/devices/system/cpu/cpu{cpu}/cpufreq/cpuinfo_max_freq", str(core["freq_khz"]))
    _write(root, "sys/devices/system/node/online", _fmt_cpulist(list(nodes)))
    for node, cpus in nodes.items():
        _write(root, f"sys/devices/system/node/node{node}/cpulist", _fmt_cpulist(cpus))
    if hybrid is not None:
        _write(root, "sys/devices/cpu_core/cpus", _fmt_cpulist(hybrid[0]))
        _write(root, "sys/devices/cpu_atom/cpus", _fmt_cpulist(hybrid[1]))
    _write(root, "sys/fs/cgroup/cpu.max", cpu_max)
    _write(root, "sys/fs/cgroup/cpuset.cpus.effective", span)


def make_xeon_spr_2s(root: Path) -> None:
    """2 x Xeon Platinum 8480+: 2 sockets x 56 cores x 2 threads = 224 CPUs, one NUMA node per socket.

    Linux numbering: 0-55 socket 0 first threads, 56-111 socket 1 first threads, 112-167 socket 0
    siblings, 168-223 socket 1 siblings.
    """
    cores_per_socket, sockets = 56, 2
    first = cores_per_socket * sockets
    cores = []
    for s in range(sockets):
        for c in range(cores_per_socket):
            cpus = [s * cores_per_socket + c, first + s * cores_per_socket + c]
            cores.append({"socket": s, "core_id": c, "cpus": cpus, "freq_khz": 3_800_000})
    blocks = []
    for core in cores:
        for thread, cpu in enumerate(core["cpus"]):
            apicid = core["socket"] * 128 + core["core_id"] * 2 + thread
            blocks.append(_cpuinfo_block([
                ("processor", str(cpu)), ("vendor_id", "GenuineIntel"), ("cpu family", "6"),
                ("model", "143"), ("model name", SPR_MODEL_NAME), ("stepping", "8"),
                ("microcode", "0x2b000181"), ("cpu MHz", "2000.000"), ("cache size", "107520 KB"),
                ("physical id", str(core["socket"])), ("siblings", "112"), ("core id", str(core["core_id"])),
                ("cpu cores", "56"), ("apicid", str(apicid)), ("initial apicid", str(apicid)),
                ("fpu", "yes"), ("fpu_exception", "yes"), ("cpuid level", "32"), ("wp", "yes"),
                ("flags", SPR_FLAGS), ("bugs", "spectre_v1 spectre_v2 spec_store_bypass swapgs eibrs_pbrsb"),
                ("bogomips", "4000.00"), ("clflush size", "64"), ("cache_alignment", "64"),
                ("address sizes", "52 bits physical, 57 bits virtual"), ("power management", ""),
            ]))
    by_cpu = sorted(blocks, key=lambda b: int(b.split("\n", 1)[0].split(":")[1]))
    nodes = {
        s: sorted(c for core in cores if core["socket"] == s for c in core["cpus"]) for s in range(sockets)
    }
    _write_tree(root, cpuinfo="".join(by_cpu), cores=cores, nodes=nodes, cpu_max="max 100000")


def make_alderlake_i9_12900k(root: Path) -> None:
    """i9-12900K: 8 P-cores with HT (CPUs 0-15, siblings 0-1, 2-3, ...) + 8 E-cores (CPUs 16-23)."""
    cores = []
    for i in range(8):  # Golden Cove P-cores: Linux core ids 0, 4, ..., 28
        cores.append({"socket": 0, "core_id": 4 * i, "cpus": [2 * i, 2 * i + 1], "freq_khz": 5_100_000,
                      "apic": [8 * i, 8 * i + 1]})
    for j in range(8):  # Gracemont E-cores: core ids 32..39
        cores.append({"socket": 0, "core_id": 32 + j, "cpus": [16 + j], "freq_khz": 3_900_000,
                      "apic": [64 + 2 * j]})
    blocks = []
    for core in cores:
        for cpu, apicid in zip(core["cpus"], core["apic"]):
            blocks.append(_cpuinfo_block([
                ("processor", str(cpu)), ("vendor_id", "GenuineIntel"), ("cpu family", "6"),
                ("model", "151"), ("model name", ADL_MODEL_NAME), ("stepping", "2"),
                ("microcode", "0x15"), ("cpu MHz", "3200.000"), ("cache size", "30720 KB"),
                ("physical id", "0"), ("siblings", "24"), ("core id", str(core["core_id"])),
                ("cpu cores", "16"), ("apicid", str(apicid)), ("initial apicid", str(apicid)),
                ("fpu", "yes"), ("fpu_exception", "yes"), ("cpuid level", "32"), ("wp", "yes"),
                ("flags", ADL_FLAGS), ("bugs", "spectre_v1 spectre_v2 spec_store_bypass swapgs"),
                ("bogomips", "6374.40"), ("clflush size", "64"), ("cache_alignment", "64"),
                ("address sizes", "46 bits physical, 48 bits virtual"), ("power management", ""),
            ]))
    _write_tree(
        root, cpuinfo="".join(blocks), cores=cores, nodes={0: list(range(24))}, cpu_max="max 100000",
        hybrid=(list(range(16)), list(range(16, 24))),
    )


# Files copied verbatim from the live machine by --capture-live (those describe_machine reads).
_LIVE_CPU_FILES = ("online", "possible", "present", "offline")
_LIVE_TOPOLOGY_FILES = (
    "physical_package_id", "die_id", "core_id", "thread_siblings_list", "core_cpus_list",
    "package_cpus_list", "cluster_id",
)
_LIVE_CGROUP_FILES = (
    "sys/fs/cgroup/cpu.max", "sys/fs/cgroup/cpuset.cpus.effective",
    "sys/fs/cgroup/cpu/cpu.cfs_quota_us", "sys/fs/cgroup/cpu/cpu.cfs_period_us",
    "sys/fs/cgroup/cpuset/cpuset.effective_cpus", "sys/fs/cgroup/cpuset/cpuset.cpus",
)


def capture_live(root: Path, cpu_max: str | None = "150000 100000") -> None:
    """Copy this machine's CPU description into `root`, then impose `cpu_max` (cgroup v2) on it."""
    live = Path("/")
    if root.exists():
        shutil.rmtree(root)

    def copy(rel: str) -> None:
        try:
            text = (live / rel).read_text(encoding="utf-8")
        except OSError:
            return
        _write(root, rel, text.rstrip("\n"))

    copy("proc/cpuinfo")
    cpu_dir = "sys/devices/system/cpu"
    for name in _LIVE_CPU_FILES:
        copy(f"{cpu_dir}/{name}")
    for cpu_path in sorted((live / cpu_dir).glob("cpu[0-9]*")):
        for name in _LIVE_TOPOLOGY_FILES:
            copy(f"{cpu_dir}/{cpu_path.name}/topology/{name}")
        copy(f"{cpu_dir}/{cpu_path.name}/cpufreq/cpuinfo_max_freq")
    node_dir = "sys/devices/system/node"
    copy(f"{node_dir}/online")
    for node_path in sorted((live / node_dir).glob("node[0-9]*")):
        copy(f"{node_dir}/{node_path.name}/cpulist")
    for name in ("cpu_core", "cpu_atom"):
        copy(f"sys/devices/{name}/cpus")
    for rel in _LIVE_CGROUP_FILES:
        copy(rel)
    if cpu_max is not None:
        _write(root, "sys/fs/cgroup/cpu.max", cpu_max)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capture-live", action="store_true",
                        help="also re-capture epyc-container from this machine (overwrites it)")
    args = parser.parse_args()
    make_xeon_spr_2s(HERE / "xeon-spr-2s")
    make_alderlake_i9_12900k(HERE / "alderlake-i9-12900k")
    if args.capture_live:
        capture_live(HERE / "epyc-container")
    print(f"fixtures written under {HERE}")


if __name__ == "__main__":
    main()
