"""Shared fixtures of the integration tests: phantom studies, an Orthanc peer, running nodes, Orthanc wired to a node.

Every peer listens on free ports and keeps its files in the test's (or module's) temporary folder, which
pytest makes per xdist worker: the fixtures are safe to use with ``pytest -n``.

- ``phantom``: the module's phantom study (``DEFAULT_OPTIONS``, or the options of a module-level
  ``pytest.mark.phantom(...)``); ``phantoms``: any other study or follow-up, generated once per worker.
- ``orthanc``: an Orthanc of the test's own, not started yet.
- ``nodes`` / ``module_nodes``: make and start nodes (``nodes.start("scp", extra_config=...)``); at the end
  every node still running is stopped and must exit with 0.
- ``pacs_and_node``: Orthanc started and a node (not started) that knows it by its ``pacs_node_config``
  (by default Orthanc as its destination; a module overrides that fixture for sources, methods, ...)
  and that Orthanc knows as modality ``pacsagent``. Read the node's database with ``node.rows(...)``,
  ``node.scalars(...)``, ``node.scalar(...)`` and ``node.write(...)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from inference.phantom import PhantomStudy
from tests.integration.peers import Node, Nodes, Orthanc
from tests.integration.phantoms import DEFAULT_OPTIONS, Phantoms


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "phantom(**options): generate_study options of the module's `phantom` fixture (module level)"
    )


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Phantoms:
    """Phantom studies generated once per test process (xdist worker), shared read-only."""
    return Phantoms(tmp_path_factory.mktemp("phantoms"))


@pytest.fixture(scope="module")
def phantom(request: pytest.FixtureRequest, phantoms: Phantoms) -> PhantomStudy:
    """The module's phantom study: ``DEFAULT_OPTIONS`` unless the module says ``pytest.mark.phantom(...)``."""
    marker = request.node.get_closest_marker("phantom")
    return phantoms.study(**(marker.kwargs if marker is not None else DEFAULT_OPTIONS))


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """An Orthanc of the test's own (free ports, storage in the test's folder), not started; stopped at the end."""
    server = Orthanc(tmp_path / "orthanc")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[Nodes]:
    """Nodes of the test's own; any still running at the end is stopped and must exit with 0."""
    made = Nodes(tmp_path)
    try:
        yield made
    finally:
        made.stop_all()


@pytest.fixture(scope="module")
def module_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nodes]:
    """Nodes shared by the tests of a module; stopped (and checked for exit 0) after the module's last test."""
    made = Nodes(tmp_path_factory.mktemp("nodes"))
    try:
        yield made
    finally:
        made.stop_all()


@pytest.fixture
def pacs_node_config(orthanc: Orthanc) -> str:
    """The TOML the node of ``pacs_and_node`` adds to its configuration; a module overrides it."""
    return orthanc.destination_toml()


@pytest.fixture
def pacs_and_node(orthanc: Orthanc, nodes: Nodes, pacs_node_config: str) -> tuple[Orthanc, Node]:
    """Orthanc as the PACS, started, with the node (not started) as its modality ``pacsagent``."""
    node = nodes.new(extra_config=pacs_node_config)
    orthanc.add_modality("pacsagent", node.ae_title, node.port)
    orthanc.start()
    return orthanc, node
