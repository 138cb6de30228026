"""Several receiving processes behind one DICOM port (``[node] receive_processes``), as real processes.

The scp process accepts and hands connections to a receiving process; the limits and access
rules must hold for the node as a whole, every instance acknowledged must be recorded, and a
receiving process that dies must be restarted without losing anything it acknowledged.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification
from sqlalchemy import func, select

from inference.phantom import generate_study
from pacs_agent.db.tables import Event, Instance
from pacs_agent.receive.access import ConnectionClosing
from tests.integration.peers import Node, Nodes, storescu, wait_for

pytestmark = pytest.mark.integration

TWO_PROCESSES = {"PACS_AGENT__NODE__RECEIVE_PROCESSES": "2"}


@pytest.fixture(scope="module")
def node(module_nodes: Nodes) -> Node:
    """A node with two receiving processes and tight limits."""
    return module_nodes.start(
        "scp",
        env=TWO_PROCESSES,
        extra_config=(
            "[security]\n"
            'allowed_calling_aets = ["BUSY", "OTHER", "SENDER0", "SENDER1", "SENDER2", "SENDER3"]\n'
            "max_associations = 4\n"
            "max_associations_per_aet = 2\n"
            "max_connections_per_host = 6\n"
        ),
    )


def receiving_process(node: Node) -> int:
    """The pid of the node's receiving process (the scp process's child running pacs_agent.receive.worker)."""
    assert node.process is not None

    def find() -> int | None:
        for task in Path(f"/proc/{node.process.pid}/task").iterdir():  # type: ignore[union-attr]
            for child in (task / "children").read_text().split():
                if "pacs_agent.receive.worker" in Path(f"/proc/{child}/cmdline").read_bytes().decode():
                    return int(child)
        return None

    return int(wait_for(find, 60, "the receiving process to start"))


def sockets_of(pid: int, port: int) -> int:
    """Established TCP connections to ``port`` whose socket ``pid`` holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        if local_port == port and fields[3] == "01" and fields[9] in inodes:  # 01: ESTABLISHED
            count += 1
    return count


def open_association(node: Node, calling: str) -> Association:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)


def rejections(node: Node) -> list[Event]:
    return node.scalars(select(Event).where(Event.kind == "association_rejected").order_by(Event.id))


def test_association_limits_count_the_associations_of_every_process(node: Node) -> None:
    worker = receiving_process(node)
    before = len(rejections(node))
    held = [open_association(node, "OTHER"), open_association(node, "BUSY"), open_association(node, "BUSY")]
    try:
        assert all(a.is_established for a in held)
        # The receiving process serves the first two (the scp process counts its index work as one
        # more), the scp process the third: BUSY's two associations are in different processes.
        assert sockets_of(worker, node.port) == 2
        third = open_association(node, "BUSY")
        assert third.is_rejected
        assert (third.acceptor.primitive.result, third.acceptor.primitive.diagnostic) == (2, 2)
        held += [open_association(node, "OTHER")]
        assert all(a.is_established for a in held)
        fifth = open_association(node, "SENDER0")
        assert fifth.is_rejected
        details = [e.detail for e in wait_for(lambda: rejections(node)[before:][:2], 10, "two rejection events")]
        assert details == [
            "local limit exceeded: calling AE title 'BUSY' has 2 associations open "
            "([security] max_associations_per_aet = 2)",
            "local limit exceeded: 4 associations are open ([security] max_associations = 4)",
        ]
    finally:
        for assoc in held:
            if assoc.is_established:
                assoc.release()

    def accepted_again() -> bool:  # slots held in both processes are given back
        assocs = [open_association(node, "BUSY"), open_association(node, "BUSY")]
        ok = all(a.is_established for a in assocs)
        for assoc in assocs:
            if assoc.is_established:
                assoc.release()
        return ok

    wait_for(accepted_again, 10, "the freed slots")
    wait_for(lambda: sockets_of(worker, node.port) == 0, 10, "the receiving process to close its connections")


def test_connections_per_host_are_counted_across_processes(node: Node) -> None:
    worker = receiving_process(node)
    held = [open_association(node, f"SENDER{n}") for n in range(4)]
    idle: list[socket.socket] = []
    try:
        assert all(a.is_established for a in held)
        assert sockets_of(worker, node.port) == 3  # three there, one here (the scp also writes the index)
        for _ in range(3):  # 4 associations + 2 waiting = max_connections_per_host; the third waits too long
            sock = socket.create_connection(("127.0.0.1", node.port))
            idle.append(sock)
        # The host is at its limit: the newest waiting connection made room by closing the oldest one.
        idle[0].settimeout(10)
        assert idle[0].recv(1) == b""
    finally:
        for sock in idle:
            sock.close()
        for assoc in held:
            assoc.release()
    events = wait_for(
        lambda: node.scalars(select(Event).where(Event.kind == ConnectionClosing.MADE_ROOM_HOST.kind)),
        20,
        "the closing to be recorded",
    )
    assert any(ConnectionClosing.MADE_ROOM_HOST.marker in e.detail for e in events)


def test_concurrent_senders_are_all_stored_across_processes(node: Node, tmp_path: Path) -> None:
    worker = receiving_process(node)
    studies = [
        generate_study(tmp_path / f"s{n}", seed=300 + n, lesions=1, slices=24, rows=64, columns=64, segmentation="none")
        for n in range(3)
    ]
    before = int(node.scalar(select(func.count(Instance.id))))
    results: dict[int, int] = {}

    def send(n: int) -> None:
        results[n] = storescu(node.port, studies[n].ct_files, aet=f"SENDER{n}").returncode

    threads = [threading.Thread(target=send, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert results == {0: 0, 1: 0, 2: 0}
    assert int(node.scalar(select(func.count(Instance.id)))) == before + 3 * 24
    assert receiving_process(node) == worker  # still the same process


def test_a_receiving_process_killed_while_receiving_loses_nothing_it_acknowledged(node: Node, tmp_path: Path) -> None:
    worker = receiving_process(node)
    study = generate_study(tmp_path / "s", seed=400, lesions=1, slices=60, rows=64, columns=64, segmentation="none")
    datasets = [dcmread(path) for path in study.ct_files]
    uids = {str(ds.SOPInstanceUID) for ds in datasets}
    ae = AE(ae_title="SENDER3")
    ae.add_requested_context(datasets[0].SOPClassUID)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    raw = assoc.dul.socket.socket  # type: ignore[union-attr]  # pynetdicom's shutdown of a reset socket fails before its close
    acknowledged: set[str] = set()

    def stored() -> set[str]:
        return set(node.scalars(select(Instance.sop_instance_uid).where(Instance.calling_ae_title == "SENDER3")))

    def send(batch: list) -> None:  # type: ignore[type-arg]
        for ds in batch:
            status = assoc.send_c_store(ds)
            if status and status.Status == 0x0000:
                acknowledged.add(str(ds.SOPInstanceUID))
            if not assoc.is_established:
                return

    try:
        # A lone association is served by the receiving process, not by the scp process.
        assert sockets_of(worker, node.port) == 1
        send(datasets[:5])
        assert len(acknowledged) == 5
        sender = threading.Thread(target=send, args=(datasets[5:],))
        sender.start()  # the process is killed while the rest streams in
        os.kill(worker, signal.SIGKILL)
        sender.join(120)
    finally:
        if assoc.is_established:
            assoc.abort()
        if raw is not None:
            raw.close()
    assert 5 <= len(acknowledged) < 60
    assert acknowledged <= stored()
    for path in node.scalars(select(Instance.path).where(Instance.calling_ae_title == "SENDER3")):
        assert (node.state_dir / "spool" / path).stat().st_size > 0
    restarted = wait_for(lambda: (pid := receiving_process(node)) != worker and pid, 60, "a new receiving process")
    assert restarted != worker
    result = storescu(node.port, study.ct_files, aet="SENDER3")  # the rest arrives through the new process
    assert result.returncode == 0, result.stderr
    assert stored() == uids
