"""Safe outputs: how this tool writes a file or a folder that others may read, and what it refuses to write.

Generic (no model-folder knowledge: `artifacts` builds on it, never the reverse) and torch-free, used by the
model folder, checkpoints, the trainer, the plan and compile caches and every command's --json/--out: atomic
writes, a place that cannot take a write said as an OutputWriteError (exit 74), output paths checked before the
work (never an input, never a file or folder this tool did not write), per-output locks (OutputBusyError, exit
75), recognisable temporaries of killed runs removed, JSON report stamps, and the project's one file digest.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Callable, Iterator, Mapping, Sequence


class OutputError(ValueError):
    """An output this command must not or cannot write there, said before any work (or as the work ends)."""


class OutputBusyError(OutputError):
    """Another run is writing the same output folder right now."""


class OutputPathError(OutputError):
    """An output (--out FOLDER, or a single file: --json, --report, --out FILE, --plot) this command must not
    write there: an input of the command, a file, or a folder this tool did not write, or a place that cannot
    take it."""


class OutputWriteError(OSError):
    """An output could not be written for a reason of the place, not of the input (disk full, quota, read-only,
    permission, I/O error); what was half-written has been removed. The command line exits with 74."""



_KINDS = {stat.S_IFDIR: "folder", stat.S_IFLNK: "symbolic link", stat.S_IFIFO: "named pipe (FIFO)",
          stat.S_IFSOCK: "socket", stat.S_IFCHR: "character device", stat.S_IFBLK: "block device",
          stat.S_IFREG: "file"}


_umask_lock = threading.Lock()


def creation_modes() -> tuple[int, int]:
    """(folder, file) modes that a plain mkdir/open gives under this process's umask: 0755/0644 at the usual
    022, 0700/0600 at 077. mkdtemp and mkstemp make 0700/0600 whatever the umask, so this tool's temporary
    folders and files are given these before they are renamed into place: a model folder made as root is
    readable by a container's other uid where the umask allows it (issue 26), and no more than it allows.
    The umask is read from /proc/self/status (no change to the process); elsewhere set and restored at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            umask = next((int(line.split()[1], 8) for line in f if line.startswith("Umask:")), None)
    except (OSError, ValueError, IndexError):
        umask = None
    if umask is None:
        with _umask_lock:  # other threads of this tool never create files with the probe's umask
            umask = os.umask(0o077)
            os.umask(umask)
    return 0o777 & ~umask, 0o666 & ~umask


def file_kind(path: str | os.PathLike[str]) -> str:
    """What is at `path`, in words ("named pipe (FIFO)", "folder", ...; the link itself, not its target), for
    messages that must say what a thing is rather than that it is missing."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        try:
            mode = os.lstat(path).st_mode  # a dangling link
        except OSError:
            return "missing path"
    return _KINDS.get(stat.S_IFMT(mode), "special file")


_digests: dict[tuple, str] = {}  # (path, inode, size, mtime_ns) -> sha256: each file state hashed once per process


def sha256_file(path: str | os.PathLike[str]) -> str:
    """sha256 of a file, streamed (ParNet-S fp32 weights are 80 MB), memoised per file state: the project's one
    file digest (model files, checkpoints, compiled-model cache blobs)."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _digests:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        _digests[key] = h.hexdigest()
    return _digests[key]


# errno values that say "this place cannot take the output" (not a bug, not bad input)
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO,
                          errno.EFBIG})


def write_probe(folder: Path, size: int = 1 << 16) -> OSError | None:
    """The OSError `folder` gives when `size` more bytes are written into it (and synced), or None when it
    takes them (they are removed either way). Writers that hide errno (OpenVINO's save_model, torch.save: a
    RuntimeError) are judged by it."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".parnet-cpu-probe-", dir=folder)
    except OSError as exc:
        return exc
    try:
        block = bytes(1 << 20)
        while size > 0:  # a nearly full disk takes part of a write, then refuses the rest
            size -= os.write(fd, block[: min(size, len(block))])
        os.fsync(fd)
    except OSError as exc:
        return exc
    finally:
        os.close(fd)
        os.unlink(probe)
    return None


def output_write_error(exc: BaseException, folder: Path, shown: str) -> OutputWriteError | None:
    """The OutputWriteError that explains `exc`, raised while writing `shown` into `folder`, or None when the
    place is not the cause (a bug, bad input or an interruption: `exc` goes on as it is)."""
    if isinstance(exc, OutputWriteError):
        return exc
    if isinstance(exc, OSError):
        cause, note = (exc if exc.errno in WRITE_ERRNOS else None), ""
    elif isinstance(exc, RuntimeError):
        cause = write_probe(folder)
        note = f" (the writer said: {str(exc).strip()[:160]})" if cause is not None and cause.errno in WRITE_ERRNOS else ""
    else:
        return None
    if cause is None or cause.errno not in WRITE_ERRNOS:
        return None
    return OutputWriteError(cause.errno, f"{os.strerror(cause.errno)} ({errno.errorcode[cause.errno]}){note}", shown)


@contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w", encoding: str | None = None) -> Iterator[IO]:
    """Write `path` atomically: yields a file object on a uniquely named temporary file in the same folder,
    which is synced and replaces `path` (os.replace) only when the block ends without an error, so readers (and
    concurrent writers) only ever see a whole file; on an error or interruption the temporary file is removed,
    and a full disk, a quota, a read-only or unwritable place becomes an OutputWriteError naming `path`.
    A device or a pipe (`/dev/stdout`) is written directly: there is nothing to replace.
    The one way this project writes a file that others may read meanwhile (JSON, checkpoints)."""
    path = Path(path)
    if os.path.exists(path) and not path.is_file() and not path.is_dir():
        try:
            with open(path, mode, encoding=encoding) as f:
                yield f
        except BaseException as exc:
            err = output_write_error(exc, path.parent, str(path))
            if err is None or err is exc:
                raise
            raise err from exc
        return
    tmp = None
    remove_stale_temp_files(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-{_host_tag()}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, mode, encoding=encoding) as f:
            os.fchmod(fd, creation_modes()[1])  # as a plain write would leave it (mkstemp makes 0600)
            yield f
            f.flush()
            os.fsync(f.fileno())  # a disk that accepted the bytes but cannot keep them says so now, not later
        os.replace(tmp, path)
    except BaseException as exc:
        err = output_write_error(exc, path.parent, str(path))  # probed while the temporary still holds its space
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        if err is None or err is exc:
            raise
        raise err from exc


def write_json(path: Path, obj: dict) -> None:
    """Atomic (see `atomic_write`): readers only ever see a whole file."""
    with atomic_write(path) as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


# Temporary folders of this tool: `.parnet-cpu-tmp-<pid>-<host tag>-<random>`, so a later run can tell its
# own leftovers (a kill -9, a crash) from anything else and remove only those.
TEMP_PREFIX = ".parnet-cpu-tmp-"
_TEMP_RE = re.compile(r"^\.parnet-cpu-tmp-(\d+)-([0-9a-f]{8})-")


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def temp_dir_prefix(pid: int | None = None) -> str:
    """Name prefix of the temporary folders process `pid` (default: this one) creates on this host."""
    return f"{TEMP_PREFIX}{os.getpid() if pid is None else pid}-{_host_tag()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, owned by someone else
        return True
    return True


def _dead_writers_entries(parent: Path, pattern: re.Pattern, folders: bool) -> list[os.DirEntry]:
    """Entries of `parent` named by `pattern` (groups: pid, host tag), made on this host by a process that is
    gone: what a killed run of this tool left (a shared folder may hold other hosts' and live runs')."""
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return []
    found = []
    for e in entries:
        m = pattern.match(e.name)
        kind_ok = e.is_dir(follow_symlinks=False) if folders else e.is_file(follow_symlinks=False)
        if m and m.group(2) == _host_tag() and kind_ok and int(m.group(1)) != os.getpid() \
                and not _pid_alive(int(m.group(1))):
            found.append(e)
    return found


def remove_stale_temp_files(path: Path) -> list[Path]:
    """Remove the temporary files earlier writes of `path` left when their process was killed (kill -9, OOM: no
    cleanup ran): only `.<name>.<pid>-<host>.*.tmp` made on this host by a process that is gone."""
    pattern = re.compile(r"^\." + re.escape(path.name) + r"\.(\d+)-([0-9a-f]{8})\..*\.tmp$")
    removed: list[Path] = []
    for e in _dead_writers_entries(path.parent, pattern, folders=False):
        try:
            os.unlink(e.path)
            removed.append(Path(e.path))
        except OSError:
            pass
    return removed


def remove_stale_temp_dirs(parent: Path) -> list[Path]:
    """Remove the temporary model folders earlier runs of this tool left in `parent` when they were killed."""
    removed: list[Path] = []
    for e in _dead_writers_entries(parent, _TEMP_RE, folders=True):
        shutil.rmtree(e.path, ignore_errors=True)
        removed.append(Path(e.path))
    return removed




InputPaths = Mapping[str, "str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None"]


def _input_paths(inputs: InputPaths | None) -> Iterator[tuple[str, str, Path]]:
    """(flag, path as given, real path) of every input path (a flag may name several, or none)."""
    for flag, value in (inputs or {}).items():
        values = [value] if isinstance(value, (str, os.PathLike)) else list(value or ())
        for src in values:
            if src is not None:
                yield flag, str(src), Path(os.path.realpath(Path(src).expanduser()))


def _nearest_existing(path: Path) -> Path:
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


ForeignProblem = Callable[[Path], "str | None"]  # why a non-empty folder is not this tool's to replace (None: it is)


def check_output_dir(out: str | Path, overwrite: bool = False, inputs: Mapping[str, str | Path | None] | None = None,
                     *, foreign: ForeignProblem) -> Path:
    """Refuse (OutputPathError), before any work, an output folder this tool must not write or replace; return
    its real path. The folders this tool writes are model folders: `foreign` says what in one is not ours
    (`artifacts.foreign_model_dir_problem`; passed in, since this module knows nothing of model folders).

    Refused: the current directory or a parent of it; a path that equals, contains or lies inside one of
    `inputs` (flag -> path, e.g. {"--calib": DIR}); an existing file; a non-empty folder without
    `overwrite`, and with it any folder `foreign` finds a problem with; a place that cannot be written (probed
    by creating a temporary folder there)."""
    shown = str(out)
    target = Path(os.path.realpath(Path(out).expanduser()))
    cwd = Path(os.path.realpath(os.getcwd()))
    if target == cwd or target in cwd.parents:
        raise OutputPathError(f"--out {shown} is the current directory or one of its parents; name a new folder "
                              "for the model")
    for flag, src, real in _input_paths(inputs):
        how = "is" if target == real else "contains" if target in real.parents else \
            "is inside" if real in target.parents else None
        if how:
            raise OutputPathError(f"--out {shown} {how} {flag} {src}: the model folder must be separate from the "
                                  "data it is made from")
    if os.path.lexists(target) and not target.is_dir():
        raise OutputPathError(f"--out {shown} is a file, not a folder; refusing to replace it")
    if target.is_dir():
        try:
            entries = os.listdir(target)
        except OSError as exc:
            raise OutputPathError(f"cannot read --out {shown}: {exc.strerror}") from None
        if entries and not overwrite:
            raise OutputPathError(f"output folder {shown} exists and is not empty (use --overwrite to replace a "
                                  "model folder written by parnet-cpu)")
        problem = foreign(target) if entries else None
        if problem:
            raise OutputPathError(f"--out {shown} is not wholly a model folder parnet-cpu wrote: {problem}; "
                                  "--overwrite only replaces what this tool wrote (move those entries out, or name "
                                  "another --out)")
    base = _nearest_existing(target.parent)
    try:
        if not base.is_dir():
            raise NotADirectoryError(20, "not a folder", str(base))
        probe = tempfile.mkdtemp(prefix=temp_dir_prefix(), dir=base)
        try:
            pass
        finally:
            os.rmdir(probe)
    except OSError as exc:
        raise OutputPathError(f"cannot write --out {shown}: {exc.strerror or exc} ({base})") from None
    return target


MAX_REPORT_BYTES = 64 << 20  # a JSON report is KBs (a profile of every layer: a few MB)


def own_report_kind(path: Path) -> str | None:
    """The kind of JSON report this tool wrote at `path` (its `report_stamp`: "report" and "parnet_cpu"
    fields), or None when the file is anything else (read through a non-blocking, link-refusing open)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        raw = f.read(MAX_REPORT_BYTES + 1)
    try:
        obj = json.loads(raw.decode("utf-8")) if len(raw) <= MAX_REPORT_BYTES else None
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if isinstance(obj, dict) and isinstance(obj.get("report"), str) and "parnet_cpu" in obj:
        return obj["report"]
    return None


def check_output_file(out: str | os.PathLike[str], flag: str, inputs: InputPaths | None = None, *,
                      overwrite: bool = False, report: str | None = None) -> Path:
    """Refuse, before any work, a single-file output this command must not write; return the path to write
    (links resolved: what is replaced is the file the path names).

    Refused (OutputPathError): a folder; a path that is, or lies inside, one of `inputs` (flag -> path or
    paths: the model folder, data folders and files, checkpoint, label and class files, and the command's
    other outputs), or the same file as one of them under another name (a hard link); an existing file unless
    `overwrite` or it is a JSON report of kind `report` this tool wrote (`own_report_kind`: rerunning a command
    replaces its previous report, as expected, never a user's JPEG or notes); a missing folder, or one that
    cannot be written or cannot take a write (full, quota, read-only: probed). A device or a pipe
    (/dev/stdout) is accepted as it is: written directly, nothing is replaced."""
    shown = str(out)
    if not str(out).strip():
        raise OutputPathError(f"{flag} is empty; name a file")
    path = Path(out).expanduser()
    target = Path(os.path.realpath(path))
    if os.path.exists(path) and not os.path.isdir(path) and not os.path.isfile(path):
        target = path  # a device or pipe such as /dev/stdout (its realpath may be an unopenable pipe:[...] name)
    for other, src, real in _input_paths(inputs):
        how = "is" if target == real else "is inside" if real in target.parents else None
        if how is None and os.path.exists(target) and os.path.exists(real):
            a, b = os.stat(target), os.stat(real)
            how = "is the same file as" if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) else None
        if how:
            raise OutputPathError(f"{flag} {shown} {how} {other} {src}, an input of this command; writing it "
                                  f"would destroy that input: name another file for {flag}")
    if target.is_dir():
        raise OutputPathError(f"{flag} {shown} is a folder; name a file")
    if os.path.exists(target) and not target.is_file():
        return target  # a device or a pipe (/dev/stdout): written directly, nothing to replace or probe
    if target.is_file() and not overwrite:
        kind = own_report_kind(target) if report else None
        if report is None or kind != report:
            what = f"a parnet-cpu {kind} report, not {report} one" if kind else "not written by this parnet-cpu " \
                f"command{' (no ' + report + ' report stamp)' if report else ''}"
            raise OutputPathError(f"{flag} {shown} exists and is {what}; refusing to replace it: pass --overwrite "
                                  "to replace it, or name another file")
    folder = target.parent
    if not folder.is_dir():
        raise OutputPathError(f"{flag} {shown}: folder {folder} is missing (create it first)")
    problem = write_probe(folder, size=1)  # a full disk, a quota, a read-only mount: said before the work
    if problem is not None:
        raise OutputPathError(f"{flag} {shown}: folder {folder} cannot take the result "
                              f"({problem.strerror or problem})")
    return target


@contextmanager
def output_file(out: str | os.PathLike[str], flag: str, inputs: InputPaths | None = None, *,
                overwrite: bool = False, report: str | None = None, mode: str = "w",
                encoding: str | None = "utf-8") -> Iterator[IO]:
    """The one way a command writes a single-file output: checked (`check_output_file`, again: nothing may
    have become an input or a foreign file since the check before the work), written atomically
    (`atomic_write`: a whole file or none), and any OSError of the place becomes an OutputWriteError naming
    the path (exit 74)."""
    target = check_output_file(out, flag, inputs, overwrite=overwrite, report=report)
    shown = str(out)
    try:
        with atomic_write(target, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
    except OutputWriteError as exc:
        raise OutputWriteError(exc.errno, exc.strerror, shown) from exc
    except OSError as exc:
        raise OutputWriteError(exc.errno or errno.EIO, f"{exc.strerror or exc}"
                               f" ({errno.errorcode.get(exc.errno or errno.EIO, '?')})", shown) from exc


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C / SIGTERM for the few renames that swap the model folder in, so an interruption cannot
    fall between "old model moved away" and "new model moved in"; the signal acts right after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    sigs = (signal.SIGINT, signal.SIGTERM)
    old = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in sigs}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for s in caught[:1]:
            if callable(old[s]):
                old[s](s, None)
            elif old[s] == signal.SIG_DFL:
                signal.raise_signal(s)


LOCK_SUFFIX = ".parnet-cpu.lock"
_LOCK_RE = re.compile(r"^\..+" + re.escape(LOCK_SUFFIX) + "$")
_held_locks: dict[tuple[str, int], int] = {}  # (lock file, thread) -> nesting depth: a run may re-enter its own lock


def output_lock_path(out: str | Path) -> Path:
    """`.<name>.parnet-cpu.lock` next to the output folder `out`."""
    target = Path(os.path.realpath(Path(out).expanduser()))
    return target.parent / f".{target.name}{LOCK_SUFFIX}"


def _open_lock_file(path: Path) -> int:
    """Open (create) an output lock file without following a link or blocking on a FIFO, and refuse anything
    but a plain file with one link: a symlink, FIFO, folder or hard link planted under the lock's name is an
    OutputPathError naming it, never truncated or written (what `runtime.leases` does for core lease files;
    that one raises its own LeaseDirError and sits above this module, so it cannot be shared)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise
        kind = "symbolic link" if exc.errno == errno.ELOOP else file_kind(path)
        raise OutputPathError(f"the output lock {path} is a {kind}, not a lock file this tool made; remove it "
                              "and run again") from None
    st = os.fstat(fd)
    problem = (f"is a {_KINDS.get(stat.S_IFMT(st.st_mode), 'special file')}" if not stat.S_ISREG(st.st_mode) else
               f"has {st.st_nlink} hard links (it may be another file)" if st.st_nlink != 1 else None)
    if problem:
        os.close(fd)
        raise OutputPathError(f"the output lock {path} {problem}, not a lock file this tool made; remove it and "
                              "run again")
    return fd


def _lock_file(path: Path, tries: int = 1) -> int | None:
    """An fd holding an exclusive flock on the file now at `path` (created if needed), or None while another
    process holds it (asked `tries` times, 50 ms apart). A holder removes the file as it releases it, so after
    locking, the file must still be the one at `path` (else try again): two runs never hold different files."""
    while True:
        fd = _open_lock_file(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            tries -= 1
            if tries <= 0:
                return None
            time.sleep(0.05)
            continue
        except BaseException:
            os.close(fd)
            raise
        try:
            st = os.stat(path)
            if (st.st_dev, st.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _lock_holder(path: Path) -> str:
    try:
        note = json.loads(path.read_text(encoding="utf-8"))
        host = "" if note["host"] == socket.gethostname() else f" on {note['host']}"
        return f"pid {note['pid']}{host}, since {note['started']}: {note['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "it has not said who it is yet"


@contextmanager
def output_lock(out: str | Path) -> Iterator[Path]:
    """Hold the output folder `out` for this run (an flock on `.<name>.parnet-cpu.lock` next to it, which says
    who holds it and is removed at the end): a second run writing the same `out` meanwhile is refused at once
    (OutputBusyError naming this run's pid) instead of both finishing and one result silently replacing the
    other. The kernel releases the lock of a killed run; re-entering it in the same thread is free."""
    path = output_lock_path(out)
    key = (str(path), threading.get_ident())
    if key in _held_locks:
        _held_locks[key] += 1
        try:
            yield path
        finally:
            _held_locks[key] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _lock_file(path, tries=5)  # a moment's patience: another run's `remove_stale_locks` may hold it briefly
    if fd is None:
        raise OutputBusyError(f"--out {out} is being written by another parnet-cpu run ({_lock_holder(path)}); "
                              "wait for it to finish or choose another --out")
    try:
        note = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
                "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            os.ftruncate(fd, 0)  # the note of a killed run that held it before
            os.write(fd, json.dumps(note).encode())
        except OSError:  # a full disk: the lock holds without its note
            pass
        _held_locks[key] = 1
        yield path
    finally:
        _held_locks.pop(key, None)
        try:
            os.unlink(path)  # while still holding it: a run that opened it meanwhile sees it is gone and retries
        except OSError:
            pass
        os.close(fd)


def remove_stale_locks(parent: Path) -> None:
    """Remove output locks in `parent` that no process holds (their run was killed)."""
    try:
        names = [e.name for e in os.scandir(parent) if _LOCK_RE.match(e.name) and e.is_file(follow_symlinks=False)]
    except OSError:
        return
    for name in names:
        try:
            fd = _lock_file(parent / name)
        except (OSError, OutputError):  # a planted file under a lock's name: left alone, the run says so
            continue
        if fd is not None:
            try:
                os.unlink(parent / name)
            except OSError:
                pass
            os.close(fd)


@contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False,
                      inputs: Mapping[str, str | Path | None] | None = None, *,
                      foreign: ForeignProblem) -> Iterator[Path]:
    """Yield a temporary folder next to `out`; on success it replaces `out`, on failure or interruption it
    is removed, so a run never leaves a half-written model folder behind. `out` is checked first (see
    `check_output_dir`, with `foreign`) and held for the run (`output_lock`); stale temporaries and locks of
    killed runs next to it are removed. A full disk (or quota, read-only, permission, I/O error) is an
    OutputWriteError."""
    target = check_output_dir(out, overwrite, inputs, foreign=foreign)
    with output_lock(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_dirs(target.parent)
        remove_stale_locks(target.parent)
        tmp = None
        try:
            tmp = Path(tempfile.mkdtemp(prefix=temp_dir_prefix(), dir=target.parent))
            os.chmod(tmp, creation_modes()[0])  # as a plain mkdir would make it (mkdtemp makes 0700)
            yield tmp
            check_output_dir(out, overwrite, inputs, foreign=foreign)  # nothing foreign moved in meanwhile
            with _signals_deferred():
                if target.exists():
                    old = tmp.with_name(tmp.name + "-old")
                    target.rename(old)
                    tmp.rename(target)
                    shutil.rmtree(old, ignore_errors=True)  # if this fails, the next run removes it (dead pid)
                else:
                    tmp.rename(target)
        except BaseException as exc:
            err = output_write_error(exc, tmp or target.parent, f"--out {out}")  # before the space is freed
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            if err is None or err is exc:
                raise
            raise err from exc


REPORT_SCHEMA = 1  # version of the JSON reports (quantize's report.json, eval --json, bench --json)


def report_stamp(kind: str) -> dict:
    """What every JSON report starts with: what it is, its schema version, the tool version and a
    time-zone-aware UTC timestamp, so a report read months later says what wrote it and when."""
    from parnet_cpu import __version__

    return {"report": kind, "schema": REPORT_SCHEMA, "parnet_cpu": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
