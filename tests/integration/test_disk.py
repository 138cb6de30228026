"""A full disk: the node refuses with 0xA700, writes nothing half, and recovers by itself.

The state directory lives on a small tmpfs made by the test (needs root; skipped otherwise).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from inference.phantom import PhantomStudy
from pacs_agent.config import Destination
from pacs_agent.db.tables import Event, Instance
from pacs_agent.send.scu import store_files
from tests.integration.peers import Node, Nodes

pytestmark = [
    pytest.mark.integration,
    pytest.mark.phantom(seed=71, lesions=1, slices=20, rows=256, columns=256, segmentation="seg"),
]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)], capture_output=True, check=False
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def send(node: Node, files: list[Path]) -> list[int | None]:
    outcomes = store_files(
        Destination(name="node", ae_title=node.ae_title, host="127.0.0.1", port=node.port),
        files,
        calling_ae_title="STORESCU",
    )
    return [o.status for o in outcomes]


def counts(node: Node) -> tuple[int, int]:
    stored = node.scalar(select(func.count(Instance.id)))
    refused = node.scalar(select(func.count(Event.id)).where(Event.kind == "store_refused", Event.status == 0xA700))
    return stored, refused


def node_on(disk: Path, nodes: Nodes) -> Node:
    """A node (not started) whose state directory is on ``disk``."""
    node = nodes.new()
    node.state_dir = disk / "state"
    return node


def test_watermark_refuses_then_recovers(small_disk: Path, nodes: Nodes, phantom: PhantomStudy) -> None:
    node = node_on(small_disk, nodes)
    node.start("scp")
    # min_free_mb is 10 in the test config; leave about 6 MB free
    free_mb = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize // 2**20
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * ((free_mb - 6) * 2**20))
    assert send(node, list(phantom.ct_files[:3])) == [0xA700] * 3
    stored, refused = counts(node)
    assert (stored, refused) == (0, 3)
    assert not list((node.state_dir / "spool").rglob("*.dcm"))
    assert not list((node.state_dir / "spool" / "tmp").iterdir())
    filler.unlink()  # space comes back: no restart, no operator action
    assert send(node, list(phantom.ct_files[:3])) == [0x0000] * 3
    assert counts(node)[0] == 3
    assert node.stop() == 0


def test_disk_full_during_a_write_leaves_nothing_half_written(
    small_disk: Path, nodes: Nodes, phantom: PhantomStudy
) -> None:
    node = node_on(small_disk, nodes)
    node.start("scp", env={"PACS_AGENT__STORAGE__MIN_FREE_MB": "0"})
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (free - 60_000))  # less room than one 256x256 slice (131 KB)
    statuses = send(node, list(phantom.ct_files[:2]))
    assert all(status == 0xA700 for status in statuses), statuses
    assert not list((node.state_dir / "spool" / "tmp").iterdir())
    assert not list((node.state_dir / "spool").rglob("*.dcm"))
    filler.unlink()
    assert send(node, list(phantom.ct_files[:2])) == [0x0000, 0x0000]
    assert node.echo()
    assert node.stop() == 0
