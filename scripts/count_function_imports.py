"""Count import statements inside function bodies (issue 22's "function-level imports" figure).

Usage: python3 scripts/count_function_imports.py [folder ...]  (default: parnet_cpu)
Prints the total and, with -v, the count per file.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def count(path: Path) -> int:
    """Import / ImportFrom nodes nested anywhere under a def or async def."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    seen: set[int] = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    seen.add(id(node))
    return len(seen)


def main(argv: list[str]) -> int:
    verbose = "-v" in argv
    roots = [a for a in argv if a != "-v"] or ["parnet_cpu"]
    total = 0
    for root in roots:
        for path in sorted(Path(root).rglob("*.py")):
            n = count(path)
            total += n
            if verbose and n:
                print(f"{n:4d} {path}")
    print(total)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
