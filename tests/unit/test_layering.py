"""Package arrows run one way: models <- node <- workers. The node never imports workers or torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path, *, module_level_only: bool = False) -> list[str]:
    """Absolute module names imported in ``path``: anywhere (function-level imports included), or
    only in the module's own body."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: list[str] = []
    for node in tree.body if module_level_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def _offenders(package: str, forbidden: tuple[str, ...], *, module_level_only: bool = False) -> list[str]:
    return [f"{path.relative_to(ROOT)}: {name}"
            for path in sorted((ROOT / package).rglob("*.py"))
            for name in _imports(path, module_level_only=module_level_only) if name.split(".")[0] in forbidden]


def test_node_never_imports_workers_in_source() -> None:
    assert _offenders("node", ("workers", "torch", "monai", "SimpleITK", "tests")) == []


def test_models_import_neither_node_nor_workers() -> None:
    assert _offenders("models", ("node", "workers", "testkit", "tests")) == []


def test_product_ships_no_fixtures() -> None:
    """Phantoms and evaluation helpers live in testkit; only ``dicom-node models evaluate`` loads
    them, inside the command (never at import)."""
    assert _offenders("workers", ("testkit", "tests")) == []
    assert _offenders("node", ("testkit",), module_level_only=True) == []


def test_the_scan_sees_function_level_imports(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("def f() -> None:\n    from workers.tasks import register\n    import torch.nn\n")
    assert _imports(f) == ["workers.tasks", "torch.nn"]


def test_node_entry_points_load_no_workers_and_no_torch() -> None:
    """In a fresh interpreter: what the node process imports (CLI, service, enqueue) loads no
    ``workers`` module and no torch."""
    code = (
        "import sys\n"
        "import node.cli, node.service, node.enqueue\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('workers', 'torch', 'monai', 'SimpleITK'))\n"
        "print(' '.join(bad))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"loaded: {proc.stdout.strip()} {proc.stderr[-2000:]}"
