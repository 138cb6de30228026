"""A large instance streams to the spool as it arrives: stored intact without being held in memory, or refused.

A 400 MB Enhanced CT (800 frames of 512 x 512) is sent to ``pacs-agent scp`` from its file (the
sender does not hold it either). The receiving process's peak resident memory (VmHWM) must stay
well under the instance size; benchmarks/memory_receive.py measures the same with 1 GB.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from pacs_agent.db.tables import Event, Instance
from tests.integration.large_instance import (
    LargeInstance,
    dataset_sha256,
    peak_rss_bytes,
    send_large,
    write_large_ct,
)
from tests.integration.peers import Node, Nodes, wait_for

pytestmark = pytest.mark.integration

MB = 1024 * 1024
INSTANCE_MB = 400
PEAK_RSS_LIMIT = 250 * MB
"""Well under the 400 MB instance: the node itself takes about 100 MB."""
ALLOW_SENDER = '[security]\nallowed_calling_aets = ["PYNETDICOM", "STORESCU", "ECHOSCU"]\n'


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LargeInstance]:
    folder = tmp_path_factory.mktemp("large")
    instance = write_large_ct(folder / "large.dcm", INSTANCE_MB)
    yield instance
    instance.path.unlink(missing_ok=True)


def temp_files(node: Node) -> list[Path]:
    return list((node.state_dir / "spool" / "tmp").iterdir())


def pid(node: Node) -> int:
    assert node.process is not None
    return node.process.pid


def test_a_large_instance_is_stored_intact_without_being_held_in_memory(nodes: Nodes, large: LargeInstance) -> None:
    node = nodes.start("scp", extra_config=ALLOW_SENDER + "max_instance_mb = 450\n")
    assert send_large(node.port, large) == 0x0000
    stored = list((node.state_dir / "spool").rglob(f"{large.sop_instance_uid}.dcm"))
    assert len(stored) == 1
    assert dataset_sha256(stored[0]) == large.dataset_sha256
    row = node.scalars(select(Instance).where(Instance.sop_instance_uid == large.sop_instance_uid))
    assert len(row) == 1 and row[0].size_bytes == stored[0].stat().st_size
    assert not temp_files(node)
    peak = peak_rss_bytes(pid(node))
    assert peak < PEAK_RSS_LIMIT, f"the node's peak RSS was {peak / MB:.0f} MB for a {INSTANCE_MB} MB instance"


def test_an_instance_over_max_instance_mb_is_refused_while_it_arrives(nodes: Nodes, large: LargeInstance) -> None:
    node = nodes.start("scp", extra_config=ALLOW_SENDER + "max_instance_mb = 100\n")
    assert send_large(node.port, large) == 0xA700
    refused = node.scalars(select(Event).where(Event.kind == "store_refused"))
    assert [(e.status, e.sop_instance_uid) for e in refused] == [(0xA700, large.sop_instance_uid)]
    assert refused[0].detail.startswith(
        f"instance of {large.size / MB:.1f} MB is larger than [security] max_instance_mb = 100"
    )
    assert not node.scalars(select(Instance))
    assert not list((node.state_dir / "spool").rglob("*.dcm"))
    assert not temp_files(node)
    assert peak_rss_bytes(pid(node)) < PEAK_RSS_LIMIT


def test_an_instance_cut_off_in_the_middle_leaves_nothing_behind(nodes: Nodes, large: LargeInstance) -> None:
    """The sender is killed while the instance streams in: the half-received file is removed, nothing recorded."""
    node = nodes.start("scp", extra_config=ALLOW_SENDER)
    sender = subprocess.Popen(
        ["storescu", "-aec", node.ae_title, "127.0.0.1", str(node.port), str(large.path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: temp_files(node), 120, "the instance to be streamed into the spool's temp directory")
    finally:
        sender.kill()
        sender.wait()
    wait_for(lambda: not temp_files(node), 30, "the half-received file to be removed")
    aborted = wait_for(
        lambda: node.scalars(select(Event).where(Event.kind == "association")), 30, "the association event"
    )
    assert aborted[0].detail.startswith("aborted")
    assert not node.scalars(select(Instance))
    assert not list((node.state_dir / "spool").rglob("*.dcm"))
    assert node.echo()
