"""The import contract: layers that follow the data, no cycle, light packages that stay light.

``pacs_agent`` (the service) uses ``dicom_sr`` and ``inference``; ``dicom_sr`` uses only the light
result types of ``inference``; ``inference`` imports neither. Checked on the source (every import
statement, also inside functions) and, for what a process loads, in a fresh interpreter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pacs_agent", "inference", "dicom_sr")
LIGHT_INFERENCE = (
    "inference",
    "inference.errors",
    "inference.version",
    "inference.methods",
    "inference.uids",
    "inference.results",
    "inference.structures",
    "inference.response",
    "inference.response.results",
)
"""What ``dicom_sr`` may import from ``inference``: result types and shared light things."""
HEAVY = ("torch", "SimpleITK", "radiomics", "sklearn", "skimage", "scipy")


@cache
def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "migrations" in path.parts and "versions" in path.parts:
                continue
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            found[".".join(parts)] = path
    return found


def _resolve(name: str) -> str | None:
    while name and name not in modules():
        name = name.rpartition(".")[0]
    return name or None


@cache
def imports() -> dict[str, frozenset[str]]:
    """Module -> the project modules it imports anywhere in its source."""
    graph = {}
    for name, path in modules().items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(t for a in node.names if (t := _resolve(a.name)))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = name.split(".") if is_package else name.split(".")[:-1]
                    parts = parts[: len(parts) - (node.level - 1)]
                    base = ".".join([*parts, base] if base else parts)
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    target = full if full in modules() else _resolve(base)
                    if target:
                        targets.add(target)
        targets.discard(name)
        graph[name] = frozenset(targets)
    return graph


def test_inference_and_dicom_sr_never_import_the_service() -> None:
    upward = sorted(
        f"{module} -> {target}"
        for module, targets in imports().items()
        if module.startswith(("inference", "dicom_sr"))
        for target in targets
        if target.startswith("pacs_agent")
    )
    assert upward == []


def test_dicom_sr_uses_only_the_light_types_of_inference() -> None:
    heavy = sorted(
        f"{module} -> {target}"
        for module, targets in imports().items()
        if module.startswith("dicom_sr")
        for target in targets
        if target.startswith("inference") and target not in LIGHT_INFERENCE
    )
    assert heavy == []


def test_there_is_no_import_cycle() -> None:
    graph, index, low, stack, on_stack, cycles = imports(), {}, {}, [], set(), []
    counter = [0]

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert cycles == []


def test_the_contract_test_sees_a_violation() -> None:
    """The graph is read from the source: the known downward import is found (the checks can fail)."""
    assert "inference.results" in imports()["dicom_sr.sr.lesions"]
    assert "dicom_sr.sr.lesions" in imports()["pacs_agent.jobs.execute"]


def loaded_after(code: str) -> list[str]:
    script = f"import sys\n{code}\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT)
    return out.stdout.split()


def test_importing_dicom_sr_loads_no_heavy_library() -> None:
    writers = " ".join(f"import {m};" for m in modules() if m.startswith("dicom_sr"))
    assert loaded_after(writers) == []


@pytest.mark.parametrize("module", ["inference.structures", "inference.response", "inference.results"])
def test_the_light_types_of_inference_stay_light(module: str) -> None:
    assert loaded_after(f"import {module}") == []


def test_the_receiving_process_never_imports_torch(tmp_path: Path) -> None:
    code = (
        "from pacs_agent.config import load_settings\n"
        "from pacs_agent.service import ScpService\n"
        f"ScpService(load_settings(None, {{'PACS_AGENT__STORAGE__STATE_DIR': r'{tmp_path}'}}))"
    )
    loaded = loaded_after(code)
    assert "torch" not in loaded and "radiomics" not in loaded and "SimpleITK" not in loaded


def test_the_console_never_imports_torch(tmp_path: Path) -> None:
    """The web console reads the database and result files: no torch, pipelines or radiomics, even serving."""
    code = (
        "from pacs_agent.config import load_settings\n"
        "from pacs_agent.console.server import uvicorn_config\n"
        "from pacs_agent.console import data\n"
        "from pacs_agent.db import Database\n"
        f"s = load_settings(None, {{'PACS_AGENT__STORAGE__STATE_DIR': r'{tmp_path}'}})\n"
        "db = Database(s.database_url)\n"
        "uvicorn_config(s, db)\n"
        "data.overview(db, s); data.models(s); data.configuration(s)\n"
    )
    loaded = loaded_after(code)
    assert "torch" not in loaded and "radiomics" not in loaded and "SimpleITK" not in loaded


def test_the_console_imports_no_pipeline_module() -> None:
    heavy = sorted(
        f"{module} -> {target}"
        for module, targets in imports().items()
        if module.startswith("pacs_agent.console")
        for target in targets
        if target.startswith(("inference.pipelines", "inference.models", "inference.training", "inference.radiomics"))
    )
    assert heavy == []
    assert (
        "pacs_agent.console.data" in imports() and "inference.registry.package" in imports()["pacs_agent.console.data"]
    )


def test_the_method_registry_is_the_one_list_of_methods() -> None:
    """Configuration, routing, pipelines and result series all read the registry (inference.methods)."""
    from dicom_sr.series import SERIES_NUMBERS
    from inference.methods import METHODS, method_names
    from inference.pipelines import PIPELINES
    from pacs_agent.config import KNOWN_METHODS, PAIR_METHODS
    from pacs_agent.routing.methods import DEFAULT_METHOD_REGIONS
    from pacs_agent.routing.pairing import RESPONSE_METHOD

    assert set(KNOWN_METHODS) == set(PIPELINES) == set(method_names(pair=False))
    assert PAIR_METHODS == (RESPONSE_METHOD,) == method_names(pair=True)
    assert set(SERIES_NUMBERS) == {spec.name for spec in METHODS}
    assert set(DEFAULT_METHOD_REGIONS) <= set(KNOWN_METHODS)
    # no other module spells a method name as a string literal list (the registry's job)
    literal = [
        module
        for module, path in modules().items()
        if module != "inference.methods" and '"m1", "m2", "m3", "m4"' in path.read_text()
    ]
    assert literal == [], literal


def test_states_are_written_through_their_enums() -> None:
    """No module assigns a bare string to a state column: each table's states are one enum (pacs_agent.db.tables)."""
    bare = []
    for module, path in modules().items():
        if not module.startswith("pacs_agent"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)
            ):
                for target in node.targets:
                    if isinstance(target, ast.Attribute) and target.attr == "state":
                        bare.append(f"{module}:{node.lineno}")
    assert bare == []
