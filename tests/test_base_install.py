"""Issue 26 item 5: on the base install (`pip install parnet-cpu`, no `[full]` extra) `--help` marks the commands
that need the full install, and running one says the install command at once: before its arguments are
checked and before anything is written (`demo` left an empty ./parnet-demo/).

The base install is made real for the child process: the `full` extra's packages are entries of None in
sys.modules, which is how Python itself says "not importable" (`import torch` raises ModuleNotFoundError,
`importlib.util.find_spec` answers None), and the CLI runs through `python -m parnet_cpu` as installed."""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from parnet_cpu.cli import COMMANDS, FULL_INSTALL_MODULES, FULL_INSTALL_NEEDS

ROOT = Path(__file__).resolve().parents[1]
INSTALL_HINT = "pip install 'parnet-cpu[full]'"
MARK = "[full install]"
# the child: given packages absent, then the real entry point
CHILD = ("import runpy, sys\n"
         "for m in {missing!r}: sys.modules[m] = None\n"
         "sys.argv = ['parnet-cpu', *sys.argv[1:]]\n"
         "runpy.run_module('parnet_cpu', run_name='__main__', alter_sys=True)\n")


def cli(*args: str, missing=FULL_INSTALL_MODULES, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD.format(missing=sorted(missing)), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def help_lines(out: str) -> dict[str, str]:
    """`--help`'s command list: name -> its help text (continuation lines joined)."""
    lines, name = {}, None
    for line in out.split("options:")[0].splitlines():
        m = re.match(r"^    (\w+)\s{2,}(.*)$", line) or re.match(r"^    (\w+)$", line)
        if m:
            name = m.group(1)
            lines[name] = m.group(2) if m.lastindex == 2 else ""
        elif name and line.startswith("      "):
            lines[name] += " " + line.strip()
    return lines


def test_full_install_modules_are_the_full_extra():
    """The modules the CLI checks are the `full` extra's, read from pyproject (a new extra dependency that a
    command needs cannot be forgotten here)."""
    full = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["full"]
    names = {re.match(r"[A-Za-z0-9_.-]+", req).group(0).lower().replace("-", "_") for req in full}
    assert names == set(FULL_INSTALL_MODULES)
    assert {m for needs in FULL_INSTALL_NEEDS.values() for m in needs} <= set(FULL_INSTALL_MODULES)
    registered = {m.rsplit(".", 1)[1] for m in COMMANDS}
    assert set(FULL_INSTALL_NEEDS) <= registered


def test_help_marks_exactly_the_commands_that_need_the_full_install():
    base = cli("--help")
    assert base.returncode == 0, base.stderr
    listed = help_lines(base.stdout)
    assert set(listed) == {m.rsplit(".", 1)[1] for m in COMMANDS}
    assert {n for n, text in listed.items() if MARK in text} == set(FULL_INSTALL_NEEDS)
    assert INSTALL_HINT in " ".join(base.stdout.split())  # the epilog says what the mark means
    full = subprocess.run([sys.executable, "-m", "parnet_cpu", "--help"], capture_output=True, text=True)
    assert full.returncode == 0 and MARK not in full.stdout and INSTALL_HINT not in full.stdout


EXTRAS = {"bare": (), "out-and-unknown-flag": ("--out", "made-by-it", "--no-such-flag"), "help": ("--help",)}


def extra_cases():
    """Every marked command bare, and every extra on one of them, in the inner loop; the rest in the full suite."""
    for command in sorted(FULL_INSTALL_NEEDS):
        for name, extra in EXTRAS.items():
            inner = name == "bare" or command == "export"
            yield pytest.param(command, extra, id=f"{name}-{command}", marks=() if inner else pytest.mark.slow)


@pytest.mark.parametrize("command,extra", extra_cases())
def test_a_full_install_command_says_the_install_command_and_writes_nothing(command, extra, tmp_path):
    """Every marked command, with no arguments, an unknown flag, an output folder, or --help: the install
    command, not argparse's usage error or a traceback, and nothing created in the working folder."""
    r = cli(command, *extra, cwd=tmp_path)
    assert "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []
    if extra == ("--help",):  # the command's own help still shows, saying what it needs
        assert r.returncode == 0 and "usage: parnet-cpu " + command in r.stdout
        assert INSTALL_HINT in " ".join(r.stdout.split())  # (wrapped by argparse)
        return
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert f"parnet-cpu {command}: error: this command needs the full install" in r.stderr
    assert INSTALL_HINT in r.stderr
    for module in FULL_INSTALL_NEEDS[command]:
        assert module in r.stderr  # what is missing, by name


def test_demo_refused_leaves_no_parnet_demo_folder(tmp_path):
    r = cli("demo", "--quick", cwd=tmp_path)
    assert r.returncode == 2 and INSTALL_HINT in r.stderr
    assert not (tmp_path / "parnet-demo").exists()
    r = cli("demo", "--out", str(tmp_path / "a" / "b"))
    assert r.returncode == 2 and not (tmp_path / "a").exists()


@pytest.mark.slow
def test_a_partial_install_marks_only_what_is_missing(tmp_path):
    """torch present but matplotlib absent: demo (which plots) is refused naming matplotlib only; commands
    that need only torch are not marked and run."""
    r = cli("--help", missing={"matplotlib"})
    marked = {n for n, text in help_lines(r.stdout).items() if MARK in text}
    assert marked == {n for n, needs in FULL_INSTALL_NEEDS.items() if "matplotlib" in needs} == {"demo"}
    r = cli("demo", missing={"matplotlib"}, cwd=tmp_path)
    assert r.returncode == 2 and "(matplotlib is not installed)" in r.stderr
    assert list(tmp_path.iterdir()) == []
    r = cli("models", missing={"matplotlib"})
    assert r.returncode == 0 and "parnet_s" in r.stdout


def test_base_install_commands_are_not_marked_and_run():
    """The torch-free commands run on the base install (what a serving container has)."""
    r = cli("info")
    assert r.returncode == 0 and "Traceback" not in r.stderr
    r = cli("verify", "/nonexistent-model-folder")
    assert r.returncode == 2 and "full install" not in r.stderr and "Traceback" not in r.stderr


def test_needs_follow_the_import_graph():
    """Each declared need is real: the command's module reaches that package (at any depth, function-level
    imports included), so the mark is not a guess. The quantization pipeline finds its backends through the
    registry (an import by name the graph cannot see): a command that reaches the pipeline needs what the
    default backend imports."""
    import grimp

    from parnet_cpu.quantization.base import QuantizeOptions, backend_class

    graph = grimp.build_graph("parnet_cpu", include_external_packages=True)
    default_backend = backend_class(QuantizeOptions().backend).__module__

    def reaches(command: str, module: str) -> bool:
        cmd = f"parnet_cpu.cli.{command}"
        return graph.chain_exists(cmd, module) or (graph.chain_exists(cmd, "parnet_cpu.quantization.ptq")
                                                   and graph.chain_exists(default_backend, module))

    for command, needs in FULL_INSTALL_NEEDS.items():
        for module in needs:
            assert reaches(command, module), (command, module)
