"""Issue 22 item 4: safe outputs are their own module (`parnet_cpu.outputs`), which knows nothing of model
folders, with its own error base (`OutputError`; OutputWriteError stays an OSError). What the split must keep:
every output refusal is an OutputError (never mistaken for, or swallowed as, a model-folder error) and reaches
the user as exit 2 with a message (75 when busy); the owner test of a folder to replace comes from the caller.

Real files, FIFOs, hard links, a real second thread holding a real flock, real `parnet-cpu` runs.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from parnet_cpu.artifacts import ModelDirError
from parnet_cpu.cli import main
from parnet_cpu.outputs import (OutputBusyError, OutputError, OutputPathError, OutputWriteError, atomic_output_dir,
                                check_output_dir, check_output_file, output_lock)


def test_outputs_loads_no_model_folder_code():
    """A fresh interpreter imports outputs without artifacts (or any other parnet_cpu module but the package)."""
    code = ("import sys, parnet_cpu.outputs; "
            "print(sorted(m for m in sys.modules if m.startswith(('parnet_cpu.', 'torch', 'openvino'))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "['parnet_cpu.outputs']", r.stdout


def _hold_lock_in_another_thread(out: Path) -> tuple[threading.Event, threading.Thread]:
    held, release = threading.Event(), threading.Event()

    def hold():
        with output_lock(out):
            held.set()
            release.wait(30)

    t = threading.Thread(target=hold, daemon=True)
    t.start()
    assert held.wait(30)
    return release, t


def _refusals(tmp: Path):
    """(name, action) for every kind of output refusal, of every public entry point of outputs."""
    owner_ok = {"foreign": lambda p: None}
    afile = tmp / "a.txt"
    afile.write_text("mine")
    full = tmp / "full"
    full.mkdir()
    (full / "x").write_text("x")
    data = tmp / "data"
    data.mkdir()
    os.mkfifo(tmp / ".fifo_out.parnet-cpu.lock")
    os.link(afile, tmp / "alias.txt")
    return [
        ("dir: the current directory", lambda: check_output_dir(os.getcwd(), **owner_ok)),
        ("dir: an existing file", lambda: check_output_dir(afile, **owner_ok)),
        ("dir: non-empty without --overwrite", lambda: check_output_dir(full, **owner_ok)),
        ("dir: inside an input", lambda: check_output_dir(data / "m", inputs={"--data": data}, **owner_ok)),
        ("dir: under a file", lambda: check_output_dir(afile / "m", **owner_ok)),
        ("dir: not ours", lambda: check_output_dir(full, True, foreign=lambda p: "a stranger's x")),
        ("atomic dir: not ours", lambda: atomic_output_dir(full, True, foreign=lambda p: "x").__enter__()),
        ("file: a folder", lambda: check_output_file(full, "--json")),
        ("file: empty name", lambda: check_output_file(" ", "--report")),
        ("file: missing folder", lambda: check_output_file(tmp / "nowhere" / "r.json", "--json")),
        ("file: a hard link of an input", lambda: check_output_file(tmp / "alias.txt", "--plot", {"--labels": afile})),
        ("file: a user's file", lambda: check_output_file(afile, "--json", report="eval")),
        ("lock: a FIFO under its name", lambda: output_lock(tmp / "fifo_out").__enter__()),
    ]


def test_every_output_refusal_is_an_output_error_and_no_model_folder_error(tmp_path):
    for name, action in _refusals(tmp_path):
        with pytest.raises(OutputError) as exc:
            action()
        assert isinstance(exc.value, OutputPathError), name
        assert not isinstance(exc.value, ModelDirError), name  # a model-folder handler cannot swallow it
        assert str(exc.value).strip(), name
    assert (tmp_path / "a.txt").read_text() == "mine" and (tmp_path / "full" / "x").read_text() == "x"


def test_busy_is_an_output_error_and_a_write_error_an_oserror(tmp_path):
    release, t = _hold_lock_in_another_thread(tmp_path / "m")  # a real flock held meanwhile by another thread
    try:
        with pytest.raises(OutputBusyError, match=f"pid {os.getpid()}") as exc:
            with output_lock(tmp_path / "m"):
                pass
        assert isinstance(exc.value, OutputError) and not isinstance(exc.value, ModelDirError)
    finally:
        release.set()
        t.join(30)
    assert issubclass(OutputWriteError, OSError) and not issubclass(OutputWriteError, OutputError)


def test_the_caller_says_which_folders_are_its_own(tmp_path):
    """outputs knows no model folder: whether a non-empty folder may be replaced is the caller's `foreign`,
    asked only when there is something to replace, and asked again after the work."""
    asked: list[Path] = []

    def stranger(p: Path) -> str | None:
        asked.append(p)
        return "it holds a stranger's file" if (p / "stranger").exists() else None

    out = tmp_path / "out"
    assert check_output_dir(out, True, foreign=stranger) == out.resolve() and asked == []  # nothing there yet
    out.mkdir()
    assert check_output_dir(out, True, foreign=stranger) == out.resolve() and asked == []  # empty: nothing to lose
    (out / "old").write_text("ours")
    with atomic_output_dir(out, True, foreign=stranger) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(os.listdir(out)) == ["new"] and asked == [out.resolve()] * 2

    with pytest.raises(OutputPathError, match="a stranger's file"):
        with atomic_output_dir(out, True, foreign=stranger) as tmp:
            (tmp / "newer").write_text("newer")
            (out / "stranger").write_text("moved in meanwhile")  # refused at the end, not replaced
    assert sorted(os.listdir(out)) == ["new", "stranger"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".parnet-cpu-tmp-")] == []

    with pytest.raises(TypeError):  # no default owner test: a caller cannot forget to say whose folders it replaces
        check_output_dir(out, True)  # type: ignore[call-arg]


@pytest.mark.parametrize("command", ["export", "quantize"])
def test_a_planted_lock_fifo_is_exit_2_through_the_command_line(tmp_path, capsys, command):
    """OutputPathError raised where no command catches it (the lock is taken outside each job's try) still ends
    as exit 2 with the message, no traceback, nothing written."""
    out = tmp_path / "q_out"
    os.mkfifo(tmp_path / ".q_out.parnet-cpu.lock")
    calib = tmp_path / "calib"
    calib.mkdir()
    argv = {"export": ["export", "--model", "parnet_s", "--out", str(out)],
            "quantize": ["quantize", "--model", "parnet_s", "--calib", str(calib), "--out", str(out)]}[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "named pipe (FIFO), not a lock file this tool made" in err and "Traceback" not in err, err
    assert not out.exists()


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write_of_that_file(tmp_path):
    """kill -9 (or the OOM killer) mid-write leaves the temporary file (no cleanup runs): the next atomic write
    of the same file removes it, and only it: not a live writer's, not another host's, not another file's."""
    import signal
    import subprocess
    import sys
    import time

    from parnet_cpu.outputs import atomic_write

    out = tmp_path / "preds.jsonl"
    child = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom parnet_cpu.outputs import atomic_write\n"
        f"with atomic_write({str(out)!r}) as f:\n"
        "    f.write('x' * 100000); f.flush(); print('writing', flush=True); time.sleep(600)\n")],
        stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "writing"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
        stale = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        assert len(stale) == 1 and stale[0].name.startswith(f".preds.jsonl.{child.pid}-")
        tag = stale[0].name.split(".")[3].split("-")[1]
        keep = [tmp_path / f".preds.jsonl.{live.pid}-{tag}.abc.tmp",  # a writer still running
                tmp_path / f".preds.jsonl.{child.pid}-00000000.abc.tmp",  # another host's, on a shared folder
                tmp_path / f".other.jsonl.{child.pid}-{tag}.abc.tmp"]  # another file's
        for p in keep:
            p.write_text("not mine to remove")
        time.sleep(0.1)
        with atomic_write(out) as f:
            f.write("done\n")
        assert out.read_text() == "done\n" and not stale[0].exists()
        assert all(p.exists() for p in keep)
    finally:
        live.kill()
        live.wait()
