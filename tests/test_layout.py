"""Layout rules the import contracts (.importlinter) cannot state: no module of parnet_cpu or benchmarks/
imports another module's private (`_name`) names; each module's private helpers stay its own business."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "parnet_cpu"
BENCHMARKS = ROOT / "benchmarks"


def private_imports(path: Path, own: frozenset[str] = frozenset({"parnet_cpu"})) -> list[str]:
    """`from <own>... import _x` (absolute or relative) in one file, as 'file:line: name from module'; `own` are
    the top-level names of this project's code (the package, and for scripts their sibling modules)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level == 0 and (node.module or "").split(".")[0] not in own:
            continue  # another package's names are its own affair
        for alias in node.names:
            if alias.name.startswith("_") and not alias.name.startswith("__"):
                found.append(f"{path.name}:{node.lineno}: {alias.name} from {'.' * node.level}{node.module or ''}")
    return found


def test_no_module_imports_a_private_name_of_another():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 50  # the whole package was scanned
    offenders = [f"{f.relative_to(PACKAGE)} {hit}" for f in files for hit in private_imports(f)]
    assert not offenders, "private names imported across modules:\n" + "\n".join(offenders)


def test_no_benchmark_imports_a_private_name():
    """The benchmark scripts use the package's and common.py's public names, like any other caller."""
    files = sorted(BENCHMARKS.glob("*.py"))
    assert len(files) > 10 and BENCHMARKS / "common.py" in files
    own = frozenset({"parnet_cpu"} | {f.stem for f in files})  # they import their siblings as top-level modules
    offenders = [f"benchmarks/{f.name} {hit}" for f in files for hit in private_imports(f, own)]
    assert not offenders, "private names imported by benchmarks:\n" + "\n".join(offenders)


def test_the_check_sees_private_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("from parnet_cpu.data.preprocess import _reason, load_image\n"
                      "from .x import (a,\n    _b)\nfrom os import _exit\nfrom parnet_cpu import __version__\n")
    assert [h.split(": ")[1].split()[0] for h in private_imports(sample)] == ["_reason", "_b"]
    script = tmp_path / "script.py"
    script.write_text("from common import _quiet, write_result\nfrom numpy import _pytesttester\n")
    assert [h.split(": ")[1].split()[0] for h in private_imports(script, frozenset({"common"}))] == ["_quiet"]
