"""Machine-wide core leases: which Runtime holds which CPUs, the free cores, and worker pools (share:N).

Runtimes anywhere on the machine (this process or another) get disjoint cores or a clear error naming the
holder: models sharing cores is the most common cause of collapsed CPU latency. The lease is one
`flock`-ed file per logical CPU (see `lease_dir`): the kernel drops a lock when its holder exits, however
it exits, so a crashed process never leaves a stale claim behind. Sizing and placement (pure, no lease)
are `parnet_cpu.runtime.cores`.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import sys
import tempfile
import threading
import time
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from parnet_cpu.runtime.cores import CoreSpecError
from parnet_cpu.system.cpuinfo import describe_machine, format_cpu_list, usable_physical_cores

LEASE_DIR_ENV = "PARNET_CPU_LEASE_DIR"  # override (tests give each session its own namespace)
_REGISTRY = ".registry.lock"
_REGISTRY_TIMEOUT_S = 60.0


class CoreShareWarning(UserWarning):
    """A Runtime was allowed (`share=True`) onto CPUs another Runtime holds: both will run slower."""


def lease_dir() -> Path:
    """Where the per-CPU lease files live: $PARNET_CPU_LEASE_DIR, else /dev/shm/parnet-cpu-leases (memory,
    shared by every user of the machine), else $XDG_RUNTIME_DIR/parnet-cpu-leases, else the temp folder.
    Only processes that see the same folder coordinate (containers with private /dev/shm do not).
    The folder is checked on every use (`check_lease_dir`): a bad one is a `LeaseDirError`, never a traceback."""
    shared = False
    if os.environ.get(LEASE_DIR_ENV):
        d = Path(os.environ[LEASE_DIR_ENV])
    elif os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        d, shared = Path("/dev/shm/parnet-cpu-leases"), True
    elif os.environ.get("XDG_RUNTIME_DIR"):
        d = Path(os.environ["XDG_RUNTIME_DIR"]) / "parnet-cpu-leases"
    else:
        d, shared = Path(tempfile.gettempdir()) / "parnet-cpu-leases", True
    return check_lease_dir(d, shared)


class LeaseDirError(CoreSpecError):
    """The core-lease folder, or a file in it, cannot be used safely; the message names it and the fix."""


LEASE_DIR_FIX = (f"point {LEASE_DIR_ENV} at a folder of your own (runtimes coordinate their cores with those that "
                 "use the same folder)")
_KINDS = {stat.S_IFDIR: "folder", stat.S_IFLNK: "symbolic link", stat.S_IFIFO: "named pipe (FIFO)",
          stat.S_IFSOCK: "socket", stat.S_IFCHR: "character device", stat.S_IFBLK: "block device"}


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "special file")


def check_lease_dir(d: Path, shared: bool = False) -> Path:
    """Create the lease folder if it is missing (mode 1777 where every user shares it, else 0755), then refuse
    one whose lock files someone else could swap: a symbolic link, not a folder, owned by another user (unless
    sticky, as /tmp is), or writable by others without the sticky bit. Lock files are opened by
    `_open_lock_file`, which never follows a link. A relative path is refused: it would name a different
    folder in each working directory, so runtimes started from two folders would share cores unwarned."""
    if not d.is_absolute():
        raise LeaseDirError(f"the core lease folder {str(d)!r} is a relative path: runtimes started from different "
                            f"folders would each use their own and share cores without knowing; give "
                            f"{LEASE_DIR_ENV} an absolute path (e.g. {LEASE_DIR_ENV}=$PWD/{str(d).strip() or 'leases'})")
    try:
        try:
            st = os.lstat(d)
        except FileNotFoundError:
            d.mkdir(parents=True, mode=0o755, exist_ok=True)
            if shared:
                os.chmod(d, 0o1777)  # every user's runtimes coordinate; sticky: nobody deletes another's file
            st = os.lstat(d)
    except OSError as exc:
        raise LeaseDirError(f"cannot create the core lease folder {d}: {exc.strerror or exc}; {LEASE_DIR_FIX}") \
            from None
    if not stat.S_ISDIR(st.st_mode):
        what = "a file" if stat.S_ISREG(st.st_mode) else f"a {_kind(st.st_mode)}"
        if stat.S_ISLNK(st.st_mode):
            what += f" (to {os.readlink(d)}; never followed: another user could point it anywhere)"
        raise LeaseDirError(f"the core lease folder {d} is {what}, not a folder; remove it or {LEASE_DIR_FIX}")
    sticky = bool(st.st_mode & stat.S_ISVTX)
    if st.st_uid not in (os.geteuid(), 0) and not sticky:
        raise LeaseDirError(f"the core lease folder {d} belongs to uid {st.st_uid}, not to you (uid {os.geteuid()}) "
                            f"or root, and is not sticky: its owner could swap its lock files; {LEASE_DIR_FIX}")
    if st.st_mode & 0o022 and not sticky:
        raise LeaseDirError(f"the core lease folder {d} is writable by other users (mode "
                            f"{stat.S_IMODE(st.st_mode):04o}) without the sticky bit: anyone could swap its lock "
                            f"files; chmod it 1777 (shared, as /tmp) or 0755, or {LEASE_DIR_FIX}")
    return d


def _open_lock_file(path: Path, create: bool = True) -> int:
    """Open one lease or registry file (created if missing and `create`) without following a link and without
    blocking on a FIFO, and refuse anything but a plain file with one link: a symlink, folder, FIFO or hard
    link planted under a lock's name is a `LeaseDirError`, never truncated, written or chmod-ed. Another
    user's file is opened read-only where it is not writable (locking needs no write access)."""
    safe = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        if not create:
            fd = os.open(path, os.O_RDONLY | safe)
        else:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | safe, 0o666)
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS) or not os.path.lexists(path):
                    raise
                fd = os.open(path, os.O_RDONLY | safe)  # another user's file, or a read-only folder
    except FileNotFoundError:
        if not create:
            raise
        # ENOENT from O_CREAT: the folder went away, or it is a file system that makes no files (/proc, /sys)
        why = ("its folder is gone" if not path.parent.is_dir() else
               "its folder takes no new files (a file system such as /proc or /sys)")
        raise LeaseDirError(f"cannot create the core lease file {path}: {why}; {LEASE_DIR_FIX}") from None
    except OSError as exc:
        raise LeaseDirError(_lock_file_problem(path, exc)) from None
    st = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(st.st_mode):
        problem = f"is a {_kind(st.st_mode)}, not a plain file"
    elif st.st_nlink != 1:
        problem = f"has {st.st_nlink} hard links (it may be another file)"
    elif st.st_uid not in (os.geteuid(), 0) and not os.lstat(path.parent).st_mode & stat.S_ISVTX:
        problem = f"belongs to uid {st.st_uid} in a folder that is not shared (sticky)"
    if problem:
        os.close(fd)
        raise LeaseDirError(f"the core lease file {path} {problem}; remove it, or {LEASE_DIR_FIX}")
    if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != 0o666:
        try:
            os.fchmod(fd, 0o666)  # every user's runtimes may record themselves as holder
        except OSError:
            pass
    return fd


def _lock_file_problem(path: Path, exc: OSError) -> str:
    """Why a lease file could not be opened, in words (the fd-less cases of `_open_lock_file`)."""
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            why = f"is a symbolic link (to {os.readlink(path)}): lease files are never followed"
        elif not stat.S_ISREG(st.st_mode):
            why = f"is a {_kind(st.st_mode)}, not a plain file"
        else:
            why = f"cannot be opened: {exc.strerror or exc}"
    except OSError:
        why = f"cannot be created: {exc.strerror or exc}" + (" (the folder is read-only)" if exc.errno in
                                                            (errno.EROFS, errno.EACCES, errno.EPERM) else "")
    return f"the core lease file {path} {why}; remove it, or {LEASE_DIR_FIX}"


_registry_lock = threading.RLock()
_registry_depth = 0
_registry_fd: int | None = None


@contextmanager
def lease_transaction() -> Iterator[None]:
    """Serialise "look for free cores, plan, claim them" machine-wide, so two runtimes starting at the
    same moment do not both plan on the same free cores. Re-entrant within a process."""
    global _registry_depth, _registry_fd
    with _registry_lock:
        if _registry_depth == 0:
            fd = _open_lock_file(lease_dir() / _REGISTRY)
            deadline = time.monotonic() + _REGISTRY_TIMEOUT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        os.close(fd)
                        raise CoreSpecError(f"the core lease registry {lease_dir() / _REGISTRY} stayed locked for "
                                            f"{_REGISTRY_TIMEOUT_S:.0f} s (a stopped process?)") from None
                    time.sleep(0.01)
            _registry_fd = fd
        _registry_depth += 1
        try:
            yield
        finally:
            _registry_depth -= 1
            if _registry_depth == 0 and _registry_fd is not None:
                fcntl.flock(_registry_fd, fcntl.LOCK_UN)
                os.close(_registry_fd)
                _registry_fd = None


def _cpu_file(cpu: int) -> Path:
    return lease_dir() / f"cpu{cpu}.lock"


def _holder(cpu: int) -> dict:
    """What the last holder of `cpu` wrote about itself (pid, command, since); {} if unknown."""
    try:
        fd = _open_lock_file(_cpu_file(cpu), create=False)  # never a link, never blocks on a FIFO
    except (OSError, LeaseDirError):
        return {}
    try:
        record = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}
    finally:
        os.close(fd)


def _is_held(cpu: int) -> bool:
    """Whether any process (this one included) holds a lease on `cpu` right now."""
    path = _cpu_file(cpu)
    if not os.path.lexists(path):
        return False
    fd = _open_lock_file(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's lock
    return False


@dataclass(frozen=True)
class LeaseInfo:
    cpu: int
    pid: int | None
    mode: str  # "exclusive" | "shared"
    since: str
    command: str


def current_leases(cpus: Sequence[int] | None = None) -> list[LeaseInfo]:
    """Leases held right now (live locks only: a dead holder's file is just a file)."""
    if cpus is None:
        cpus = sorted(int(p.stem[3:]) for p in lease_dir().glob("cpu*.lock") if p.stem[3:].isdigit())
    out = []
    for cpu in cpus:
        if _is_held(cpu):
            h = _holder(cpu)
            out.append(LeaseInfo(cpu, h.get("pid"), h.get("mode", "exclusive"), h.get("since", "?"),
                                 h.get("command", "?")))
    return out


def _describe_holders(leases: Sequence[LeaseInfo]) -> str:
    by_pid: dict = {}
    for lease in leases:
        by_pid.setdefault((lease.pid, lease.command), []).append(lease.cpu)
    return "; ".join(f"CPUs {format_cpu_list(c)} by pid {pid if pid is not None else '?'} ({cmd})"
                     for (pid, cmd), c in by_pid.items())


def available_cores(use_smt: bool = False, info=None, share: bool = False) -> list[list[int]]:
    """Usable physical cores (each a list of logical CPUs) that no Runtime on this machine holds
    (with `share`: all usable cores, held or not)."""
    info = info or describe_machine(query_openvino=False)
    cores = usable_physical_cores(info, use_smt=use_smt)
    if share:
        return cores
    with lease_transaction():
        return [c for c in cores if not any(_is_held(x) for x in c)]


def stream_groups_for_this_machine() -> tuple[list[list[int]] | None, str]:
    """Auto-sized groups where there are >= 3 physical cores; else overlapping single-core groups,
    said out loud (the multi-stream path still runs and is checked, but cannot be faster)."""
    cores = available_cores()
    if len(cores) >= 3:
        return None, f"{len(cores)} physical cores: stream groups sized by cost"
    first, last = cores[0][0], cores[-1][0]
    return [[first], [last], [first]], (f"only {len(cores)} physical core(s): the 3 stream groups overlap "
                                         "(runs, but cannot beat the single graph here)")


def no_free_cores_message() -> str:
    info = describe_machine(query_openvino=False)
    held = current_leases(info.usable_cpus)
    return (f"no free core for this runtime: this process may use CPUs {format_cpu_list(info.usable_cpus)}"
            + (f", and they are already used by another Runtime ({_describe_holders(held)})" if held else "")
            + "; close that Runtime, give this one other cores, or opt in to sharing (share=True, "
              "--share-cores: both run slower)" + POOL_HINT)


# said wherever cores are refused: the fix when the other holder is a sibling worker of the same server
POOL_HINT = ("; for N worker processes of one server (uvicorn/gunicorn --workers N), give each Runtime "
             "cores='share:N' to lease each worker its own part of the free cores")


def plan_groups(n_groups: int, cores_per_group: Sequence[int] | int, use_smt: bool = False,
                info=None, share: bool = False) -> list[list[int]]:
    """Consecutive physical cores (NUMA-ordered) for each group: `cores_per_group` cores each."""
    sizes = [cores_per_group] * n_groups if isinstance(cores_per_group, int) else list(cores_per_group)
    if any(s < 1 for s in sizes):
        raise CoreSpecError("each group needs at least one core")
    cores = available_cores(use_smt, info, share)
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


class ProcessBound:
    """A mix-in for objects that own this process's resources (core leases, worker processes, pipes, shared
    memory): they refuse `copy.copy`, `copy.deepcopy` and pickling. A copy would share those resources, and
    its `close()`/`release()` would free what the original still uses (the original then ran on cores it no
    longer held, or crashed on unmapped shared memory); a pickled one cannot carry them to another process."""

    _OWNS = "this process's core leases, worker processes and shared memory"
    _TRANSFER_FIX = ("pass the model folder instead and open a Runtime in the other process (threads of this process "
                     "can share this one object)")

    def __reduce_ex__(self, protocol: object) -> object:  # copy, deepcopy and pickle all come here
        raise TypeError(f"a {type(self).__name__} cannot be copied or pickled: it owns {self._OWNS}, which a copy "
                        f"would free under the original; {self._TRANSFER_FIX}")

    def __copy__(self) -> object:
        return self.__reduce_ex__(2)

    def __deepcopy__(self, memo: object) -> object:
        return self.__reduce_ex__(2)


class CoreLease(ProcessBound):
    """Holds CPUs for one Runtime, machine-wide, until `release()` or until this process ends.

    Exclusive by default: CPUs another Runtime holds are refused with its pid. With `share=True` the
    Runtime takes a shared lease (others may share too, nobody may take them exclusively meanwhile) or,
    where another holds them exclusively, runs there unleased; either way it warns."""

    def __init__(self, cpus: set[int] | Sequence[int], share: bool = False) -> None:
        self.cpus: set[int] = set()
        self.shared = share
        self._fds: dict[int, int] = {}
        _LIVE_LEASES.add(self)  # a forked child forgets it (`_forget_parent_locks`)
        mode = fcntl.LOCK_SH if share else fcntl.LOCK_EX
        busy: list[int] = []
        with lease_transaction():
            for cpu in sorted(set(cpus)):
                fd = _open_lock_file(_cpu_file(cpu))
                try:
                    fcntl.flock(fd, mode | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    busy.append(cpu)
                    continue
                self._fds[cpu] = fd
            if busy and not share:
                held = current_leases(busy)
                self.release()
                raise CoreSpecError(f"CPUs {format_cpu_list(busy)} are already used by another Runtime "
                                    f"({_describe_holders(held) or 'holder unknown'}); give each model its own "
                                    "cores, close the other Runtime, or opt in to sharing (share=True, --share-cores)"
                                    + POOL_HINT)
            others = current_leases(busy) if busy else []
            for cpu, fd in self._fds.items():
                _write_holder(fd, "shared" if share else "exclusive")
            self.cpus = set(self._fds)
        if share:
            also = busy or [c for c in self.cpus if _shared_by_others(c)]
            if also:
                warnings.warn(f"sharing CPUs {format_cpu_list(sorted(set(busy) | set(self.cpus)))} with other "
                              f"Runtimes ({_describe_holders(others) or 'shared leases'}): expect each to run slower",
                              CoreShareWarning, stacklevel=3)

    def release(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)  # closing the file drops its lock
            except OSError:
                pass
        self._fds = {}
        self.cpus = set()


_LIVE_LEASES: "weakref.WeakSet[CoreLease]" = weakref.WeakSet()


def _forget_parent_locks() -> None:
    """In a forked child (os.fork, multiprocessing's 'fork'): its lease and registry descriptors are copies of
    the parent's and share the parent's locks. Close them (closing a copy never unlocks while the parent keeps
    its own; only an explicit unlock would) and forget them: the child can then neither release the parent's
    cores nor keep them held after the parent lets them go, and never closes a descriptor number it reuses.
    A registry lock held by another thread at the fork is reset, so the child can start its own Runtime."""
    global _registry_lock, _registry_depth, _registry_fd
    for lease in list(_LIVE_LEASES):
        for fd in lease._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        lease._fds, lease.cpus = {}, set()
    if _registry_fd is not None:
        try:
            os.close(_registry_fd)
        except OSError:
            pass
    _registry_lock, _registry_depth, _registry_fd = threading.RLock(), 0, None


os.register_at_fork(after_in_child=_forget_parent_locks)


def _write_holder(fd: int, mode: str) -> None:
    """Record who holds the lease (read by refusals and `parnet-cpu info`); the lock is what counts."""
    record = {"pid": os.getpid(), "mode": mode, "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "command": " ".join(sys.argv)[:200] or sys.executable}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
    except OSError as exc:
        if exc.errno not in (errno.EBADF, errno.EACCES, errno.EPERM):  # read-only fd of another user's file
            raise


def _shared_by_others(cpu: int) -> bool:
    """With our shared lock held: does anybody else hold one too? (a second exclusive probe fails either
    way, so ask /proc/locks whether another pid locks this inode)."""
    try:
        ino = os.stat(_cpu_file(cpu), follow_symlinks=False).st_ino
        with open("/proc/locks") as f:
            pids = {int(p[4]) for p in (line.split() for line in f)
                    if len(p) > 5 and p[1] == "FLOCK" and p[5].rsplit(":", 1)[-1] == str(ino)}
    except (OSError, ValueError, IndexError):
        return False
    return bool(pids - {os.getpid()})


# --------------------------------------------------------------------------- worker pools: cores="share:N"
# N worker processes of one server (uvicorn/gunicorn --workers N) each start the same code and cannot know
# their index. Each takes, under the machine-wide lease transaction, an equal part of the cores still free
# for the pool: free cores // (N - members already holding a share). The members are found through their
# lease records (a "pool" key: the parent process and N), so a restarted worker gets its predecessor's cores.

POOL_SPEC_PREFIX = "share:"
POOL_ENV = "PARNET_CPU_POOL"  # names the pool where workers have no common parent (e.g. separate services)


@dataclass(frozen=True)
class PoolSpec:
    workers: int  # N
    key: str  # which pool: $PARNET_CPU_POOL or the parent's pid, and N


def parse_pool_spec(cores: object) -> PoolSpec | None:
    """`"share:N"` -> this process's pool; anything else (explicit groups, None) -> None."""
    if not isinstance(cores, str) or not cores.strip().lower().startswith(POOL_SPEC_PREFIX):
        return None
    n = cores.strip()[len(POOL_SPEC_PREFIX):].strip()
    if not n.isdigit() or int(n) < 1:
        raise CoreSpecError(f"cores='share:N' takes N, the number of worker processes that share the free cores, "
                            f"as a positive integer; got {cores!r}")
    owner = os.environ.get(POOL_ENV) or f"parent {os.getppid()}"
    return PoolSpec(int(n), f"{owner}/{int(n)}")


def pool_members(key: str) -> dict[int, list[int]]:
    """pid -> CPUs of every live lease recorded as a share of pool `key` (this process included)."""
    members: dict[int, list[int]] = {}
    for p in sorted(lease_dir().glob("cpu*.lock")):
        if not p.stem[3:].isdigit():
            continue
        cpu = int(p.stem[3:])
        h = _holder(cpu)
        if h.get("pool") == key and _is_held(cpu):
            members.setdefault(h.get("pid"), []).append(cpu)
    return members


def pool_share(pool: PoolSpec, use_smt: bool = False) -> list[int]:
    """The logical CPUs this worker of `pool` should lease: an equal part of the free physical cores among
    the shares not taken yet (remainders go to the last workers to start). Call it inside
    `lease_transaction` and lease the result there, then `mark_pool`, so no two workers get the same cores."""
    with lease_transaction():
        members = pool_members(pool.key)
        left = pool.workers - len(members)
        held = "; ".join(f"pid {pid}: CPUs {format_cpu_list(c)}" for pid, c in sorted(members.items(), key=str))
        if left < 1:
            raise CoreSpecError(f"all {pool.workers} shares of this worker pool ({pool.key}) are taken ({held}); "
                                f"start at most {pool.workers} workers, or give the Runtime cores='share:M' with M "
                                "the number of workers")
        free = available_cores(use_smt)
        per = len(free) // left
        if per < 1:
            raise CoreSpecError(f"{no_free_cores_message()}. Worker pool {pool.key}: {len(free)} free physical "
                                f"core(s) for the {left} share(s) not taken yet" + (f" ({held})" if held else ""))
        return sorted(c for core in free[:per] for c in core)


def mark_pool(lease: CoreLease, pool: PoolSpec) -> None:
    """Record in each of `lease`'s CPU files that it is a share of `pool` (read by `pool_members`)."""
    for fd in lease._fds.values():
        try:
            record = json.loads(os.pread(fd, 4096, 0) or b"{}")
            record["pool"] = pool.key
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
        except (OSError, ValueError) as exc:
            raise CoreSpecError(f"cannot record the worker pool in the core lease files of {lease_dir()}: {exc}") \
                from None
