"""Test helpers live in ``tests/`` and ``benchmarks/common.py``, not in product modules.

Free ports, fake PACS and receivers used to be imported from ``pacs_agent.demo``; the demo keeps its own
private copies and no test or benchmark imports from it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_no_test_or_benchmark_imports_the_demo() -> None:
    offenders = sorted(
        str(path.relative_to(ROOT))
        for folder in ("tests", "benchmarks")
        for path in (ROOT / folder).rglob("*.py")
        if "pacs_agent.demo" in imported_modules(path)
    )
    assert offenders == []


def test_the_demo_exposes_only_run_demo() -> None:
    tree = ast.parse((ROOT / "pacs_agent" / "demo.py").read_text())
    public = sorted(
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.ClassDef) and not node.name.startswith("_")
    )
    assert public == ["run_demo"]
