"""Print structure figures of the product packages: import arrows between packages, largest files,
longest functions. Used to measure a restructuring before and after (``python -m tools.structure``).

An arrow ``node -> workers`` counts every ``import`` statement in a ``node/`` file that names a
``workers`` module (function-level imports included).
"""

from __future__ import annotations

import argparse
import ast
from collections import Counter
from pathlib import Path

PACKAGES = ("models", "node", "workers")
ROOT = Path(__file__).resolve().parent.parent


def imported_modules(tree: ast.AST) -> list[str]:
    """Absolute module names imported anywhere in ``tree``."""
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--top", type=int, default=8, help="how many files and functions to list")
    args = parser.parse_args(argv)
    arrows: Counter[tuple[str, str]] = Counter()
    sizes: list[tuple[int, str]] = []
    functions: list[tuple[int, str]] = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            text = path.read_text()
            rel = str(path.relative_to(ROOT))
            sizes.append((len(text.splitlines()), rel))
            tree = ast.parse(text)
            for module in imported_modules(tree):
                top = module.split(".")[0]
                if top in PACKAGES and top != package:
                    arrows[(package, top)] += 1
            for node in ast.walk(tree):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno is not None:
                    functions.append((node.end_lineno - node.lineno + 1, f"{rel}:{node.name}"))
    print("import arrows between packages (statements):")
    for a in PACKAGES:
        for b in PACKAGES:
            if a != b:
                print(f"  {a:>8} -> {b:<8} {arrows[(a, b)]}")
    print(f"largest files (lines; {len(sizes)} files, {sum(n for n, _ in sizes)} lines in all):")
    for n, rel in sorted(sizes, reverse=True)[: args.top]:
        print(f"  {n:5d}  {rel}")
    print("longest functions (lines):")
    for n, name in sorted(functions, reverse=True)[: args.top]:
        print(f"  {n:5d}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
