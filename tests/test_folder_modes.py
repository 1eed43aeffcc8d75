"""Issue 26 item 1: model folders follow the umask, as other tools' outputs do. mkdtemp/mkstemp made every model
folder drwx------ and parnet.json 0644 whatever the umask, so the documented non-root container (uid 10001) could
not read a folder made as root. Checked through the CLI, and read back by a real second uid: `parnet-cpu verify`
run with setpriv as uid 10001 (no groups)."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

OTHER_UID = 10001  # the Dockerfile's user
NARROW_EXPORT = ["export", "--model", "parnet_s", "--planes", "16,32,64,128", "--blocks", "5,6,6,1",
                 "--input-size", "64"]

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv") or not shutil.which("unshare"),
                                reason="needs root, setpriv and unshare to run a child as another uid")


def as_other_uid(args: list[str], home: Path) -> subprocess.CompletedProcess:
    """`python args` as uid 10001. Where the interpreter lies under a folder others cannot enter (here
    /root/.pyenv, /root being 0700), the child gets its own mount namespace in which that folder is a 0755 tmpfs
    holding a bind mount of the interpreter's tree only; nothing else is changed, least of all the model folder."""
    drop = ["setpriv", "--reuid", str(OTHER_UID), "--regid", str(OTHER_UID), "--clear-groups"]
    prefix = Path(sys.base_prefix).resolve()
    closed = next((a for a in reversed(prefix.parents) if not os.stat(a).st_mode & stat.S_IXOTH), None)
    env = {**os.environ, "HOME": str(home)}
    if closed is None:
        return subprocess.run([*drop, sys.executable, *args], capture_output=True, text=True, timeout=600, env=env)
    keep = closed / prefix.relative_to(closed).parts[0]
    side = home / "interpreter"
    side.mkdir()
    script = (f'mount --bind "{keep}" "{side}" && mount -t tmpfs -o mode=755 tmpfs "{closed}" && '
              f'mkdir -p "{keep}" && mount --bind "{side}" "{keep}" && exec "$@"')
    return subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *drop, sys.executable, *args],
                          capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture
def shared_tmp():
    """A folder uid 10001 can reach (pytest's tmp_path lies under a 0700 folder)."""
    d = Path(tempfile.mkdtemp(prefix="parnet-modes-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def run(args: list[str], umask: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], umask=umask, capture_output=True, text=True, timeout=600)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask, other_uid_reads", [(0o022, True), pytest.param(0o077, False, marks=pytest.mark.slow)],
                         ids=["022", "077"])
def test_export_follows_the_umask_and_another_uid_reads_what_it_allows(umask, other_uid_reads, shared_tmp):
    out = shared_tmp / "model"
    r = run(["-m", "parnet_cpu", *NARROW_EXPORT, "--out", str(out)], umask)
    assert r.returncode == 0, r.stderr
    assert mode(out) == 0o777 & ~umask
    files = sorted(p for p in out.iterdir())
    assert {p.name for p in files} >= {"parnet.json", "model_fp32.xml", "model_fp32.bin", "model_deploy.pt"}
    for p in files:
        assert mode(p) == 0o666 & ~umask, p.name

    r = as_other_uid(["-m", "parnet_cpu", "verify", str(out)], shared_tmp)
    assert "Traceback" not in r.stderr, r.stderr
    if other_uid_reads:
        assert r.returncode == 0 and "result        ok" in r.stdout, (r.stdout, r.stderr)
    else:  # a clear refusal naming what it could not read (exit 74: the place, not the input)
        assert r.returncode == 74 and f"{out}/parnet.json: Permission denied" in r.stderr, (r.stdout, r.stderr)


@pytest.mark.parametrize("umask", [0o002, 0o027, 0o077], ids=["002", "027", "077"])
def test_every_atomic_output_follows_the_umask(umask, shared_tmp):
    """The mechanism, beyond export: a single file (atomic_write, as --json, checkpoints, plan caches and the
    manifest use it) and an output folder (atomic_output_dir, as quantize uses it) under umasks not tried above."""
    code = ("import sys; from pathlib import Path\n"
            "from parnet_cpu.outputs import atomic_output_dir, write_json\n"
            "base = Path(sys.argv[1])\n"
            "write_json(base / 'report.json', {'a': 1})\n"
            "with atomic_output_dir(base / 'out', foreign=lambda p: None) as tmp:\n"
            "    write_json(tmp / 'inside.json', {'b': 2})\n")
    r = run(["-c", code, str(shared_tmp)], umask)
    assert r.returncode == 0, r.stderr
    assert mode(shared_tmp / "report.json") == 0o666 & ~umask
    assert mode(shared_tmp / "out") == 0o777 & ~umask
    assert mode(shared_tmp / "out" / "inside.json") == 0o666 & ~umask
