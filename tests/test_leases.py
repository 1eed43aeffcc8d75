"""Machine-wide core leases (issue 17 item 1, issue 11 items 3 and 9), with real processes.

Runtimes in separate Python processes claim disjoint cores through flock-ed files; the kernel drops a
dead holder's locks, so `kill -9` frees its cores at once. Affinity is read from /proc, refusals must
name the holder's pid, sharing must be asked for and warns. Also: a CPU that does not exist fails at
once with the real cause, and a torn plan cache is ignored with a warning and rewritten.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest


REPO = Path(__file__).resolve().parents[1]
CPUS = sorted(os.sched_getaffinity(0))

# A process that creates a Runtime with the given keyword arguments, reports its plan and the affinity
# of every inference thread (from /proc), then holds the Runtime until its stdin closes.
HOLDER = r"""
import json, os, sys, warnings
warnings.simplefilter("always")
from parnet_cpu.runtime import Runtime
try:
    rt = Runtime(sys.argv[1], precision="fp32", **json.loads(sys.argv[2]))
except Exception as exc:
    print(json.dumps({"pid": os.getpid(), "error": f"{type(exc).__name__}: {exc}"}), flush=True)
    sys.exit(3)
aff = rt.thread_affinity()
print(json.dumps({"pid": os.getpid(), "cpus": rt.plan.cpus, "reason": rt.plan.reason,
                  "threads": sorted({a for w in aff.values() for a in w["threads"].values()})}), flush=True)
sys.stdin.read()
rt.close()
"""


@pytest.fixture(scope="module")
def model_dir(narrow_copy, tmp_path_factory) -> Path:
    return narrow_copy(tmp_path_factory.mktemp("leases") / "narrow")


class Holder:
    """A real Python process holding a Runtime; `report` is what it printed once started (or refused)."""

    def __init__(self, model_dir: Path, **kwargs) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(model_dir), json.dumps(kwargs)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd=REPO)
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"holder printed nothing; stderr:\n{self.proc.stderr.read()}")
        self.report = json.loads(line)

    def stderr(self) -> str:
        self.close()
        return self.proc.stderr.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(30)

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


def cpus_of(report: dict) -> set[int]:
    from parnet_cpu.system.cpuinfo import parse_cpu_list

    return {c for a in report["threads"] for c in parse_cpu_list(a)}


def test_two_processes_get_disjoint_cores_or_a_refusal_naming_the_holder(model_dir):
    first = Holder(model_dir)
    try:
        assert "error" not in first.report, first.report
        # every thread of the first runtime stays on the cores it leased (read from /proc)
        assert cpus_of(first.report) <= set(first.report["cpus"])
        second = Holder(model_dir)
        try:
            if "error" in second.report:
                assert set(first.report["cpus"]) == set(CPUS)  # only refused when nothing was left
                assert f"pid {first.report['pid']}" in second.report["error"]
                assert "already used by another Runtime" in second.report["error"]
            else:
                assert not set(first.report["cpus"]) & set(second.report["cpus"])
                assert not cpus_of(first.report) & cpus_of(second.report)
        finally:
            second.close()
    finally:
        first.close()


def test_default_runtime_takes_the_free_cores_and_threads_follow(model_dir):
    if len(CPUS) < 2:
        pytest.skip("needs two CPUs")
    first = Holder(model_dir, plan="single", cores=[[CPUS[0]]])
    try:
        assert first.report["cpus"] == [CPUS[0]]
        second = Holder(model_dir)  # default: whatever is free
        try:
            assert "error" not in second.report, second.report
            assert CPUS[0] not in second.report["cpus"]
            assert cpus_of(second.report) <= set(second.report["cpus"])
        finally:
            second.close()
    finally:
        first.close()


@pytest.mark.slow
def test_killed_holder_frees_its_cores_at_once(model_dir):
    from parnet_cpu.runtime.leases import current_leases

    first = Holder(model_dir, plan="single", cores=[CPUS])
    assert set(first.report["cpus"]) == set(CPUS)
    refused = Holder(model_dir, plan="single", cores=[[CPUS[0]]])
    assert f"pid {first.report['pid']}" in refused.report["error"]
    assert {lease.pid for lease in current_leases(CPUS)} == {first.report["pid"]}
    first.kill9()
    t0 = time.monotonic()
    assert current_leases(CPUS) == []  # no stale claim: the kernel dropped the locks with the process
    again = Holder(model_dir, plan="single", cores=[[CPUS[0]]])
    try:
        assert again.report["cpus"] == [CPUS[0]], again.report
        assert time.monotonic() - t0 < 30  # no timeout to wait out, only a process start
    finally:
        again.close()


@pytest.mark.slow
def test_sharing_is_an_opt_in_that_warns(model_dir):
    first = Holder(model_dir, plan="single", cores=[[CPUS[0]]])
    try:
        refused = Holder(model_dir, plan="single", cores=[[CPUS[0]]])
        assert "already used by another Runtime" in refused.report["error"]
        assert "share=True" in refused.report["error"]
        shared = Holder(model_dir, plan="single", cores=[[CPUS[0]]], share=True)
        assert shared.report["cpus"] == [CPUS[0]]
        err = shared.stderr()
        assert "CoreShareWarning" in err and f"pid {first.report['pid']}" in err
    finally:
        first.close()


def test_explicit_overlapping_cores_in_one_process(model_dir):
    from parnet_cpu.runtime import Runtime
    from parnet_cpu.runtime.cores import CoreSpecError
    from parnet_cpu.runtime.leases import CoreShareWarning, current_leases

    with Runtime(model_dir, precision="fp32", plan="single", cores=[[CPUS[0]]]) as a:
        with pytest.raises(CoreSpecError, match=f"already used by another Runtime .*pid {os.getpid()}"):
            Runtime(model_dir, precision="fp32", plan="single", cores=[[CPUS[0]]])
        with pytest.warns(CoreShareWarning, match="sharing CPUs"):
            with Runtime(model_dir, precision="fp32", plan="single", cores=[[CPUS[0]]], share=True) as b:
                x = np.zeros((1, *a.input_shape), np.float32)
                np.testing.assert_allclose(a.infer(x), b.infer(x), rtol=1e-5, atol=1e-5)
        assert [lease.cpu for lease in current_leases(CPUS)] == [CPUS[0]]
    assert current_leases(CPUS) == []  # released on close


def test_simultaneous_starts_never_both_fail(model_dir):
    """Two processes starting at the same moment: the registry lock serialises plan-and-claim, so one
    wins (or both get disjoint cores) instead of each taking half and both failing."""
    procs = [subprocess.Popen([sys.executable, "-c", HOLDER, str(model_dir), "{}"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO)
             for _ in range(2)]
    try:
        reports = [json.loads(p.stdout.readline()) for p in procs]
    finally:
        for p in procs:
            p.stdin.close()
            p.wait(30)
    started = [r for r in reports if "error" not in r]
    assert started, reports
    if len(started) == 2:
        assert not set(started[0]["cpus"]) & set(started[1]["cpus"])


@pytest.mark.slow
def test_info_lists_leases(model_dir):
    first = Holder(model_dir, plan="single", cores=[[CPUS[0]]])
    try:
        out = subprocess.run([sys.executable, "-m", "parnet_cpu", "info"], capture_output=True, text=True,
                             check=True, cwd=REPO).stdout
        assert f"pid {first.report['pid']}" in out and f"CPU {CPUS[0]}" in out
        js = json.loads(subprocess.run([sys.executable, "-m", "parnet_cpu", "info", "--json"], capture_output=True,
                                       text=True, check=True, cwd=REPO).stdout)
        assert [(l["cpu"], l["pid"]) for l in js["leases"]] == [(CPUS[0], first.report["pid"])]
    finally:
        first.close()


def test_quota_rounds_down(tmp_path):
    """A fractional cgroup quota rounds down (1.5 CPUs -> 1 core, 1 thread), never to zero."""
    from parnet_cpu.system.cpuinfo import describe_machine, usable_physical_cores

    root = tmp_path / "root"
    (root / "sys/devices/system/cpu").mkdir(parents=True)
    (root / "sys/devices/system/cpu/online").write_text("0-3\n")
    (root / "proc").mkdir()
    (root / "proc/self").mkdir()
    (root / "proc/self/cgroup").write_text("0::/\n")
    for cpu_max, cores in (("150000 100000", 1), ("50000 100000", 1), ("250000 100000", 2)):
        (root / "sys/fs/cgroup").mkdir(parents=True, exist_ok=True)
        (root / "sys/fs/cgroup/cpu.max").write_text(cpu_max + "\n")
        assert len(usable_physical_cores(describe_machine(root))) == cores, cpu_max


def test_missing_cpu_fails_fast_with_the_cause(model_dir):
    from parnet_cpu.runtime import Runtime
    from parnet_cpu.runtime.cores import CoreSpecError

    t0 = time.monotonic()
    with pytest.raises(CoreSpecError, match="4096 are not usable"):
        Runtime(model_dir, precision="fp32", plan="single", cores=[[4096]])
    assert time.monotonic() - t0 < 10


def test_worker_dying_at_start_is_reported_at_once(model_dir):
    """A worker that dies before it answers (here: killed as soon as it exists) ends the start-up wait
    immediately with its exit code, not after the start timeout."""
    import threading

    import multiprocessing.process as mpp

    from parnet_cpu.runtime import Runtime

    if len(CPUS) < 2:
        pytest.skip("a single-graph plan on every CPU runs in-process (no worker)")
    stop = threading.Event()

    def killer() -> None:
        while not stop.is_set():
            for child in mpp.active_children():
                if child.name.startswith("parnet-"):
                    try:
                        os.kill(child.pid, signal.SIGKILL)
                    except (ProcessLookupError, TypeError):
                        pass
            time.sleep(0.005)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match=r"exited with code -9 while starting"):
            Runtime(model_dir, precision="fp32", plan="single", cores=[[CPUS[0]]], start_timeout=120)
    finally:
        stop.set()
        t.join()
    assert time.monotonic() - t0 < 60


@pytest.mark.slow
def test_corrupt_plan_cache_is_ignored_and_rewritten(model_dir):
    """A torn plan_cache.json no longer breaks every `plan="auto"` start; it is replaced by whole JSON."""
    from parnet_cpu.runtime import Runtime
    from parnet_cpu.runtime.plan import PLAN_CACHE, PlanCacheWarning

    cache = Path(model_dir) / PLAN_CACHE
    cache.write_text('{"["torn')
    groups = [[CPUS[0]], [CPUS[-1]], [CPUS[0]]]
    with pytest.warns(PlanCacheWarning, match="unreadable plan cache"):
        with Runtime(model_dir, precision="fp32", cores=groups) as rt:  # plan="auto" measures both plans
            assert "auto" in rt.plan.reason
    data = json.loads(cache.read_text())  # whole JSON again (empty when the CPUs were too busy to cache)
    for key, entry in data.items():
        assert entry["cpus"] == sorted({c for g in groups for c in g})
        assert {"measured", "host", "machine_id", "other_load_before", "other_load_after"} <= set(entry)
    leftovers = [p.name for p in Path(model_dir).iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_busy_cpus_are_seen_as_busy():
    """The contention check reads real load: a spinning process pinned to a CPU shows on that CPU."""
    from parnet_cpu.system.load import QUIET_LOAD, other_load

    spin = subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{CPUS[-1]}}})\nwhile True: pass"])
    try:
        time.sleep(0.3)
        assert other_load([CPUS[-1]], 0.5)[CPUS[-1]] > QUIET_LOAD
    finally:
        spin.kill()
        spin.wait()


@pytest.mark.slow
def test_cache_entry_from_another_core_set_or_machine_is_ignored(model_dir):
    """The cache key holds the machine id and the core set: a planted entry for other CPUs is not used."""
    from parnet_cpu.runtime import Runtime
    from parnet_cpu.runtime.plan import PLAN_CACHE, PlanCache

    cache = Path(model_dir) / PLAN_CACHE
    groups = [[CPUS[0]], [CPUS[-1]], [CPUS[0]]]
    with Runtime(model_dir, precision="fp32", cores=groups, plan="multistream") as rt:  # no measurement
        key = json.loads(PlanCache(rt.model_dir).key(rt.plan.cpus, rt.precision, rt.ir_path))
    planted = {}
    for i, value in ((1, [4095]), (5, "another-machine")):  # core set, machine id
        other = list(key)
        other[i] = value
        planted[json.dumps(other)] = {"choice": "multistream", "measured": "planted"}
    cache.write_text(json.dumps(planted))
    with Runtime(model_dir, precision="fp32", cores=groups) as rt:
        assert "planted" not in rt.plan.reason and "auto (cached" not in rt.plan.reason
    assert set(planted) <= set(json.loads(cache.read_text()))  # other machines' entries are kept, not used


def test_info_reports_an_unusable_lease_folder_instead_of_a_traceback(tmp_path, monkeypatch, capsys):
    """`parnet-cpu info` still describes the machine when the lease folder is unsafe or relative, and says why
    the leases cannot be read (it used to end in a LeaseDirError traceback)."""
    from parnet_cpu.cli import main

    unsafe = tmp_path / "open"
    unsafe.mkdir()
    unsafe.chmod(0o777)
    for folder, words in ((str(unsafe), "writable by other users"), ("relative/leases", "relative path")):
        monkeypatch.setenv("PARNET_CPU_LEASE_DIR", folder)
        assert main(["info"]) == 0
        out = capsys.readouterr().out
        assert "Core leases        cannot be read:" in out and words in out and "ISA" in out


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs procfs")
def test_a_lease_folder_that_takes_no_files_is_named_as_such(monkeypatch):
    """/proc exists but makes no files (O_CREAT there is ENOENT): the error says so and the fix, not that the
    folder is gone (hostile pass minor)."""
    from parnet_cpu.runtime.leases import LeaseDirError, available_cores

    monkeypatch.setenv("PARNET_CPU_LEASE_DIR", "/proc")
    with pytest.raises(LeaseDirError, match=r"/proc/\.registry\.lock: its folder takes no new files") as exc:
        available_cores()
    assert "gone" not in str(exc.value) and "PARNET_CPU_LEASE_DIR" in str(exc.value)
