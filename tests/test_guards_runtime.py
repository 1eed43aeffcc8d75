"""Issue 21, classes 5, 7 and 8: the runtime's process and resource guards.

c5: a process forked after a Runtime exists (os.fork, multiprocessing's 'fork') gets a clear error from every
call, exits normally without hanging, and its exit never touches the parent's workers, leases or shared memory.
c7: a /dev/shm too small for the plan is refused at start-up with the size and the Docker fix, never a SIGBUS.
c8: lease files are never followed, truncated or chmod-ed through a link; a bad lease folder is a clear error.

Real processes everywhere: real forks of a script that really exits (interpreter finalisation included), a
real 1 MiB tmpfs on /dev/shm in a private mount namespace (`unshare -m`), a real read-only bind mount, real
symlinks, FIFOs, hard links and another uid's folder (chown as root).
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import NARROW, slow_param

REPO = Path(__file__).resolve().parents[1]
CPUS = sorted(os.sched_getaffinity(0))
GROUPS = [[CPUS[0]], [CPUS[-1]], [CPUS[0]]]  # three stream groups on 2 cores, as tests/test_trust_runtime.py
SIZE = NARROW["input_size"]

pytestmark = pytest.mark.usefixtures("own_lease_namespace")  # conftest: leases are machine-wide


@pytest.fixture(scope="module")
def model_dir(narrow_copy, tmp_path_factory) -> Path:
    return narrow_copy(tmp_path_factory.mktemp("guards_rt") / "narrow")


def run_script(code: str, *args: str, timeout: float = 240, wrap: list[str] | None = None) -> dict:
    """Run `code` as a real script (its own interpreter, main guard, normal exit) and return the JSON it
    prints last, with its exit code and stderr."""
    proc = subprocess.run([*(wrap or []), sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    report = json.loads(lines[-1]) if lines else {}
    report.update(returncode=proc.returncode, stderr=proc.stderr[-3000:])
    return report


# ---------------------------------------------------------------------------------------------- class 5

FORK_SCRIPT = r'''
import gc, json, multiprocessing as mp, os, signal, sys, time
import numpy as np
from parnet_cpu.runtime import Runtime
from parnet_cpu.runtime.leases import current_leases
from parnet_cpu.runtime.runtime import RuntimeForkedError

model, plan, how, result_path = sys.argv[1:5]
CPUS = sorted(os.sched_getaffinity(0))
KW = dict(plan="multistream", cores=[[CPUS[0]], [CPUS[-1]], [CPUS[0]]]) if plan == "multi" else dict(plan="single")


def in_child(rt, x):
    """Every entry point, in the forked child: each must refuse with RuntimeForkedError."""
    calls = {"infer": lambda: rt.infer(x[:1]), "submit": lambda: rt.submit(x[:1]).result(10),
             "classify": lambda: rt.classify(x[:1]), "check": rt.check, "describe": rt.describe,
             "thread_affinity": rt.thread_affinity, "message_round_trip_ms": rt.message_round_trip_ms}
    out = {}
    for name, call in calls.items():
        try:
            out[name] = "returned " + repr(call())[:60]
        except RuntimeForkedError as exc:
            out[name] = "forked: " + str(exc)
        except BaseException as exc:
            out[name] = f"{type(exc).__name__}: {exc}"
    out["healthy"], out["failure"] = rt.healthy(), rt.failure()
    rt.close()  # a child closing its copy touches nothing of the parent's
    with open(result_path, "w") as f:
        json.dump(out, f)


def mp_child(x):
    in_child(RT, x)  # then multiprocessing's own exit (its exit handler, its finalizers)


def wait_exit(pid_or_proc, seconds=60):
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        if isinstance(pid_or_proc, int):
            pid, status = os.waitpid(pid_or_proc, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
        else:
            pid_or_proc.join(0.1)
            if pid_or_proc.exitcode is not None:
                return pid_or_proc.exitcode
        time.sleep(0.1)
    os.kill(pid_or_proc if isinstance(pid_or_proc, int) else pid_or_proc.pid, signal.SIGKILL)
    return "hung"


if __name__ == "__main__":
    RT = Runtime(model, precision="fp32", **KW)
    x = np.random.default_rng(5).standard_normal((4, 3, SIZE_, SIZE_)).astype(np.float32)
    ref = [RT.infer(x[i:i + 1]) for i in range(4)]
    workers = {p.pid for p in RT._procs}
    if how == "os.fork":
        pid = os.fork()
        if pid == 0:
            in_child(RT, x)
            del RT
            gc.collect()
            sys.exit(0)  # a normal exit: atexit handlers and interpreter finalisation run
        code = wait_exit(pid)
    else:
        child = mp.get_context("fork").Process(target=mp_child, args=(x,))
        child.start()
        code = wait_exit(child)
    same = [bool(np.array_equal(RT.infer(x[i % 4:i % 4 + 1]), ref[i % 4])) for i in range(20)]
    report = {"child_exit": code, "same": same, "healthy": RT.healthy(), "workers_alive": all(
        p.is_alive() for p in RT._procs), "workers_same": workers == {p.pid for p in RT._procs}}
    # a long-lived child must not keep the parent's cores leased once the parent lets them go
    r, w = os.pipe()
    up_r, up_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # its fork handlers have run once it can say it is up
        os.write(up_w, b"u")
        os.read(r, 1)  # sleeps until the parent has closed its Runtime
        os._exit(0)
    os.read(up_r, 1)
    RT.close()
    report["leases_after_close"] = [lease.cpu for lease in current_leases(CPUS)]
    os.write(w, b"x")
    report["second_child_exit"] = wait_exit(pid)
    print(json.dumps(report))
'''.replace("SIZE_", str(SIZE))


@pytest.mark.parametrize("plan,how", [("multi", "os.fork"), slow_param("multi", "mp-fork"),
                                      slow_param("single", "os.fork"), ("single", "mp-fork")])
def test_c5_forked_child_gets_clear_error_and_parent_keeps_correct_answers(model_dir, tmp_path, plan, how):
    """A script makes a Runtime, forks, and the child calls every entry point, closes, and exits normally.
    Before: multi-stream answers went wrong and the child's exit SIGTERMed the parent's workers; the single
    graph's child hung at exit in OpenVINO's executor destructor."""
    result = tmp_path / "child.json"
    report = run_script(FORK_SCRIPT, str(model_dir), plan, how, str(result))
    assert report["returncode"] == 0, report["stderr"]
    assert report["child_exit"] == 0, report  # no hang ("hung"), no crash
    child = json.loads(result.read_text())
    for name in ("infer", "submit", "classify", "check", "describe", "thread_affinity", "message_round_trip_ms"):
        assert child[name].startswith("forked: "), (name, child[name])
        assert "is a fork of it" in child[name] and "after forking" in child[name] and "spawn" in child[name]
    assert child["healthy"] is False and "after forking" in child["failure"]
    assert report["same"] == [True] * 20, report  # the parent's next 20 calls equal its reference logits
    assert report["healthy"] and report["workers_alive"] and report["workers_same"], report
    assert report["leases_after_close"] == [] and report["second_child_exit"] == 0, report
    assert "can only join a child process" not in report["stderr"], report["stderr"]


@pytest.mark.slow
def test_c5_a_child_can_create_its_own_runtime_after_forking(model_dir):
    """The fix the error names works: a forked child creates a Runtime of its own (on cores the parent does
    not hold) and gets the same logits as the parent; the parent is untouched."""
    code = r'''
import json, os, sys, time
import numpy as np
from parnet_cpu.runtime import Runtime
CPUS = sorted(os.sched_getaffinity(0))
if __name__ == "__main__":
    rt = Runtime(sys.argv[1], precision="fp32", plan="single", cores=[[CPUS[0]]])
    x = np.random.default_rng(1).standard_normal((2, 3, SIZE_, SIZE_)).astype(np.float32)
    ref = rt.infer(x)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        with Runtime(sys.argv[1], precision="fp32", plan="single", cores=[[CPUS[-1]]]) as own:
            os.write(w, json.dumps({"same": bool(np.allclose(own.infer(x), ref, rtol=1e-4, atol=1e-4)),
                                    "cpus": own.plan.cpus}).encode())
        sys.exit(0)
    os.close(w)
    t0 = time.monotonic()
    while not os.waitpid(pid, os.WNOHANG)[0]:
        assert time.monotonic() - t0 < 120, "child hung"
        time.sleep(0.1)
    child = json.loads(os.read(r, 4096) or b"{}")
    print(json.dumps({"child": child, "parent_same": bool(np.array_equal(rt.infer(x), ref))}))
    rt.close()
'''.replace("SIZE_", str(SIZE))
    report = run_script(code, str(model_dir))
    assert report["returncode"] == 0, report["stderr"]
    assert report["child"] == {"same": True, "cpus": [CPUS[-1]]} and report["parent_same"], report


# ---------------------------------------------------------------------------------------------- class 7

def unshare_works() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"],
                           capture_output=True)
    return probe.returncode == 0


needs_unshare = pytest.mark.skipif(not unshare_works(), reason="needs root and `unshare -m` (a private mount "
                                   "namespace) to give a process a small /dev/shm or a read-only folder")

SHM_SCRIPT = r'''
import json, os, sys
import numpy as np
from parnet_cpu.runtime import Runtime
CPUS = sorted(os.sched_getaffinity(0))
if __name__ == "__main__":
    model, plan, inflight, max_batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    kw = dict(plan="multistream", cores=[[CPUS[0]], [CPUS[-1]], [CPUS[0]]]) if plan == "multi" else dict(plan=plan)
    try:
        with Runtime(model, precision="fp32", inflight=inflight, max_batch=max_batch, **kw) as rt:
            shape = rt.infer(np.ones((max_batch, 3, SIZE_, SIZE_), np.float32)).shape
            print(json.dumps({"ok": list(shape), "kind": rt.plan.kind}))
    except Exception as exc:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
'''.replace("SIZE_", str(SIZE))


def with_small_shm(size: str) -> list[str]:
    return ["unshare", "-m", "sh", "-c", f'mount -t tmpfs -o size={size} tmpfs /dev/shm && exec "$@"', "sh"]


@needs_unshare
@pytest.mark.parametrize("inflight,max_batch", [(2, 16), slow_param(1, 32), slow_param(4, 8)])
def test_c7_too_small_dev_shm_is_refused_at_start_with_the_size_and_the_fix(model_dir, inflight, max_batch):
    """A 1 MiB /dev/shm: the multi-stream plan is refused at start-up, naming /dev/shm, what it needs (which
    grows with inflight x max_batch) and `docker run --shm-size`. Before: the worker or the caller itself died
    of SIGBUS at the first full batch."""
    report = run_script(SHM_SCRIPT, str(model_dir), "multi", str(inflight), str(max_batch),
                        wrap=with_small_shm("1m"))
    assert report["returncode"] == 0, report  # never a SIGBUS (135 / -7)
    assert report.get("error") == "SharedMemoryError", report
    msg = report["message"]
    assert "/dev/shm" in msg and "docker run --shm-size=" in msg and "max_batch" in msg, msg
    needed = float(msg.split(" needs ")[1].split(" MiB")[0])
    assert needed > 1.0 and f"{inflight} in-flight slot(s)" in msg and f"of {max_batch} images" in msg, msg


@pytest.mark.slow
@needs_unshare
def test_c7_plans_that_fit_still_run_in_a_small_dev_shm(model_dir):
    """Only what the plan needs is refused: in the same 1 MiB /dev/shm, the single graph (no shared memory)
    and a multi-stream plan that fits (one slot of 2 images) answer."""
    single = run_script(SHM_SCRIPT, str(model_dir), "single", "2", "16", wrap=with_small_shm("1m"))
    assert single.get("ok") == [16, 1000], single
    small = run_script(SHM_SCRIPT, str(model_dir), "multi", "1", "2", wrap=with_small_shm("1m"))
    assert small.get("ok") == [2, 1000] and small["kind"] == "multistream", small


@needs_unshare
def test_c7_dev_shm_out_of_inodes_is_a_clear_error(model_dir):
    """A /dev/shm with room but no inode left (a case beyond the size): creating the segment fails with the
    same clear error, not an OSError traceback."""
    report = run_script(SHM_SCRIPT, str(model_dir), "multi", "2", "4", wrap=[
        "unshare", "-m", "sh", "-c", 'mount -t tmpfs -o size=64m,nr_inodes=1 tmpfs /dev/shm && exec "$@"', "sh"])
    assert report["returncode"] == 0, report
    assert report.get("error") == "SharedMemoryError" and "/dev/shm" in report["message"], report


# ---------------------------------------------------------------------------------------------- class 8

@pytest.fixture
def lease_folder(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "leases"
    d.mkdir(mode=0o755)
    monkeypatch.setenv("PARNET_CPU_LEASE_DIR", str(d))
    return d


def refused(fn, *args):
    """fn(*args) must raise LeaseDirError within 20 s (a FIFO must not block it); returns the message."""
    from parnet_cpu.runtime.leases import LeaseDirError

    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive(), "blocked (a FIFO opened for reading waits for a writer)"
    assert isinstance(box.get("error"), LeaseDirError), box
    return str(box["error"])


def lease(cpu: int):
    from parnet_cpu.runtime.leases import CoreLease

    return CoreLease([cpu])


def test_c8_symlinked_lock_file_is_never_followed(lease_folder, tmp_path, model_dir):
    """cpuN.lock is a symlink to a file of the test's own: the lease, the Runtime and the lease listing refuse
    it by name; the target's content and mode are unchanged. Before: truncated, overwritten, chmod-ed 0666."""
    from parnet_cpu.runtime import Runtime
    from parnet_cpu.runtime.leases import current_leases

    victim = tmp_path / "precious.txt"
    victim.write_text("keep me\n")
    victim.chmod(0o600)
    for cpu in CPUS:
        (lease_folder / f"cpu{cpu}.lock").symlink_to(victim)
    msg = refused(lease, CPUS[0])
    assert f"cpu{CPUS[0]}.lock" in msg and "symbolic link" in msg and str(victim) in msg
    assert "PARNET_CPU_LEASE_DIR" in msg
    msg = refused(lambda: Runtime(model_dir, cores=[[CPUS[-1]]], precision="fp32", plan="single"))
    assert "symbolic link" in msg
    refused(current_leases)
    assert victim.read_text() == "keep me\n" and stat.S_IMODE(victim.stat().st_mode) == 0o600


def test_c8_symlinked_registry_and_dangling_link_are_refused(lease_folder, tmp_path):
    """Beyond cpuN.lock: the registry lock as a symlink, and a dangling symlink (which O_CREAT would have
    created at its target) are refused; nothing is created at the target."""
    target = tmp_path / "would-be-created"
    (lease_folder / ".registry.lock").symlink_to(target)
    assert ".registry.lock" in refused(lease, CPUS[0])
    (lease_folder / ".registry.lock").unlink()
    (lease_folder / f"cpu{CPUS[0]}.lock").symlink_to(target)
    assert "symbolic link" in refused(lease, CPUS[0])
    assert not target.exists()


def test_c8_lock_that_is_a_directory_fifo_or_hard_link_is_refused(lease_folder, tmp_path):
    (lease_folder / f"cpu{CPUS[0]}.lock").mkdir()
    assert "is a folder" in refused(lease, CPUS[0])
    os.rmdir(lease_folder / f"cpu{CPUS[0]}.lock")
    os.mkfifo(lease_folder / f"cpu{CPUS[0]}.lock")
    assert "FIFO" in refused(lease, CPUS[0])  # refused at once, never blocks
    from parnet_cpu.runtime.leases import current_leases

    refused(current_leases)  # the listing (parnet-cpu info) does not block on it either
    os.unlink(lease_folder / f"cpu{CPUS[0]}.lock")
    other = lease_folder / "other"
    other.write_text("x")
    os.link(other, lease_folder / f"cpu{CPUS[0]}.lock")
    assert "hard links" in refused(lease, CPUS[0])
    assert other.read_text() == "x"


def test_c8_folder_that_is_a_file_or_a_symlink_is_refused(tmp_path, monkeypatch):
    from parnet_cpu.runtime.leases import lease_dir

    as_file = tmp_path / "leases-file"
    as_file.write_text("not a folder")
    monkeypatch.setenv("PARNET_CPU_LEASE_DIR", str(as_file))
    msg = refused(lease_dir)
    assert str(as_file) in msg and "is a file, not a folder" in msg and "PARNET_CPU_LEASE_DIR" in msg
    assert as_file.read_text() == "not a folder"
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    monkeypatch.setenv("PARNET_CPU_LEASE_DIR", str(tmp_path / "link"))
    assert "symbolic link" in refused(lease_dir)
    monkeypatch.setenv("PARNET_CPU_LEASE_DIR", str(as_file / "sub"))  # below a file: cannot be created
    assert "cannot create the core lease folder" in refused(lease_dir)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_c8_folder_of_another_user_or_writable_by_all_is_refused(lease_folder):
    """Owned by another uid (and not sticky): refused. Writable by everyone without the sticky bit: refused.
    Sticky and shared (as /tmp and the default /dev/shm folder): accepted, whoever created it."""
    os.chown(lease_folder, 12345, 12345)
    msg = refused(lease, CPUS[0])
    assert "uid 12345" in msg and "PARNET_CPU_LEASE_DIR" in msg
    os.chown(lease_folder, 0, 0)
    os.chmod(lease_folder, 0o777)
    assert "without the sticky bit" in refused(lease, CPUS[0])
    os.chmod(lease_folder, 0o1777)
    os.chown(lease_folder, 12345, 12345)
    held = lease(CPUS[0])
    try:
        assert held.cpus == {CPUS[0]}
    finally:
        held.release()
    os.chmod(lease_folder, 0o755)
    os.chown(lease_folder, 0, 0)
    os.chown(lease_folder / f"cpu{CPUS[0]}.lock", 12345, 12345)  # another uid's file in a private folder
    assert "belongs to uid 12345" in refused(lease, CPUS[0])


@needs_unshare
def test_c8_read_only_folder_is_a_clear_error(lease_folder, model_dir):
    """A read-only lease folder (a read-only bind mount: root is refused too) fails with a clear error naming
    the folder, through the Runtime and through `parnet-cpu predict`, never a traceback."""
    code = r'''
import json, sys
from parnet_cpu.runtime import Runtime
from parnet_cpu.runtime.cores import CoreSpecError
if __name__ == "__main__":
    try:
        Runtime(sys.argv[1], precision="fp32", plan="single")
        print(json.dumps({"ok": True}))
    except CoreSpecError as exc:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
'''
    ro = ["unshare", "-m", "sh", "-c", f'mount --bind {lease_folder} {lease_folder} && mount -o remount,bind,ro '
          f'{lease_folder} && exec "$@"', "sh"]
    report = run_script(code, str(model_dir), wrap=ro)
    assert report.get("error") == "LeaseDirError", report
    assert str(lease_folder) in report["message"] and "read-only" in report["message"], report
    images = model_dir.parent / "images"
    images.mkdir(exist_ok=True)
    cli = subprocess.run([*ro, sys.executable, "-m", "parnet_cpu", "predict", "--model-dir", str(model_dir),
                          "--data", str(images), "--out", str(model_dir.parent / "p.jsonl")],
                         capture_output=True, text=True, timeout=240, cwd=REPO)
    assert cli.returncode == 2 and "Traceback" not in cli.stderr, cli.stderr
    assert str(lease_folder) in cli.stderr, cli.stderr


def test_c5_fork_while_another_thread_holds_the_lease_registry(lease_folder):
    """A fork while another thread is inside `lease_transaction` (a Runtime starting): the child's copy of the
    registry lock is reset, so the child can lease cores of its own once the parent's transaction ends, instead
    of waiting forever on a lock held by a thread that does not exist in it."""
    from parnet_cpu.runtime.leases import CoreLease, lease_transaction

    inside, leave = threading.Event(), threading.Event()

    def hold() -> None:
        with lease_transaction():
            inside.set()
            leave.wait(30)

    t = threading.Thread(target=hold, daemon=True)
    t.start()
    assert inside.wait(30)
    pid = os.fork()
    if pid == 0:  # the child: report through the exit status, never return into pytest
        code = 1
        try:
            held = CoreLease([CPUS[-1]])
            code = 0 if held.cpus == {CPUS[-1]} else 3
        finally:
            os._exit(code)
    threading.Timer(1.0, leave.set).start()  # the parent's transaction ends a second later
    t0 = time.monotonic()
    while not (done := os.waitpid(pid, os.WNOHANG))[0]:
        if time.monotonic() - t0 > 30:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child waits forever for the registry lock")
        time.sleep(0.05)
    t.join(30)
    assert os.waitstatus_to_exitcode(done[1]) == 0
