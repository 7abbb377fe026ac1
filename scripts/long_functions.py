"""List the functions longer than a limit (default 80 lines), longest first.

    python scripts/long_functions.py [--limit 80] [paths ...]

A function's length is its lines from `def` (decorators excluded) to its last
line, docstring and comments included: what a reader scrolls through. Nested
functions are listed on their own and also count in their parent's length.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

DEFAULT_PATHS = ("tvq_eqx", "pallas_kernels", "benchmarks", "scripts")


def function_lengths(path: Path) -> list[tuple[int, str]]:
    """(length, "path:line name") of every function and method in `path`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            assert node.end_lineno is not None  # set by ast.parse
            length = node.end_lineno - node.lineno + 1
            found.append((length, f"{path}:{node.lineno} {node.name}"))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", default=DEFAULT_PATHS)
    parser.add_argument("--limit", type=int, default=80)
    args = parser.parse_args()
    files = []
    for p in map(Path, args.paths):
        files.extend(sorted(p.rglob("*.py")) if p.is_dir() else [p])
    lengths = [f for path in files for f in function_lengths(path)]
    long = sorted((f for f in lengths if f[0] > args.limit), reverse=True)
    for length, where in long:
        print(f"{length:5d}  {where}")
    print(f"{len(long)} functions over {args.limit} lines")


if __name__ == "__main__":
    main()
