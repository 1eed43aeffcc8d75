"""Layout rules the import contracts (.importlinter) cannot state: no module of parnet_cpu imports another
module's private (`_name`) names; each module's private helpers stay its own business."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "parnet_cpu"


def private_imports(path: Path) -> list[str]:
    """`from parnet_cpu... import _x` (absolute or relative) in one file, as 'file:line: name from module'."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level == 0 and (node.module or "").split(".")[0] != "parnet_cpu":
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


def test_the_check_sees_private_imports(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("from parnet_cpu.data.preprocess import _reason, load_image\n"
                      "from .x import (a,\n    _b)\nfrom os import _exit\nfrom parnet_cpu import __version__\n")
    assert [h.split(": ")[1].split()[0] for h in private_imports(sample)] == ["_reason", "_b"]
