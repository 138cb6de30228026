"""Connections that never send an A-ASSOCIATE-RQ, against a real node (issue 15, finding 1).

100 idle TCP connections used to fill pynetdicom's association count, so that legitimate senders
got "local limit exceeded" for up to 30 s, unrecorded. Now idle connections are closed after
``[security] association_request_timeout_seconds`` or to make room for newer ones, hosts outside
``allowed_hosts`` are closed at accept, and each closing is an event and a count in /metrics.
"""

from __future__ import annotations

import contextlib
import re
import socket
from collections.abc import Iterator

import pytest
import requests
from sqlalchemy import func, select

from inference.phantom import PhantomStudy
from pacs_agent.db.tables import Event, Instance
from pacs_agent.receive.access import ConnectionClosing
from tests.integration.peers import Node, Nodes, storescu, wait_for

# The TLS node and its certificates are those of the TLS tests (imported: one definition).
from tests.integration.test_tls import Certificates, TlsNode, certs, storescu_tls  # noqa: F401

pytestmark = pytest.mark.integration

IDLE = 100
OUTSIDER = "127.0.0.2"
"""A second loopback address, not in the node's allowed_hosts."""


@contextlib.contextmanager
def idle_connections(port: int, count: int, source: str = "127.0.0.1") -> Iterator[list[socket.socket]]:
    """``count`` TCP connections from ``source`` to the node that never send a byte; closed at the end."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((source, 0))
            sock.connect(("127.0.0.1", port))
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def closed_by_the_node(sockets: list[socket.socket], deadline: float) -> None:
    """Wait until the node has closed every one of ``sockets`` (each reads end-of-stream or a reset)."""
    for sock in sockets:
        sock.settimeout(deadline)
        try:
            assert sock.recv(1) == b"", "the node sent data on a connection that never asked for anything"
        except ConnectionResetError:
            pass
        except TimeoutError:
            raise AssertionError(f"a connection without A-ASSOCIATE-RQ was still open after {deadline:.0f} s") from None


def closings(node: Node, kind: str, peer: str) -> int:
    """Connections from ``peer`` that the events of ``kind`` stand for (each event's detail starts with its number)."""
    details = node.scalars(select(Event.detail).where(Event.kind == kind, Event.peer == peer))
    return sum(int(detail.split(" ", 1)[0]) for detail in details)


def metric(node: Node, name: str, reason: str) -> float:
    text = requests.get(f"http://127.0.0.1:{node.http_port}/metrics", timeout=10).text
    line = f'{name}{{reason="{reason}"}} '
    found = [row for row in text.splitlines() if row.startswith(line)]
    assert found, f"{line.strip()} not in /metrics"
    return float(found[0].removeprefix(line))


def test_senders_get_through_while_100_idle_connections_are_open_and_every_closing_is_counted(
    nodes: Nodes, phantom: PhantomStudy
) -> None:
    node = nodes.start(
        "scp",
        extra_config=(
            '[security]\nallowed_hosts = ["127.0.0.1"]\nmax_associations = 8\n'
            "max_connections_per_host = 16\nassociation_request_timeout_seconds = 4\n"
        ),
    )
    files = [*phantom.ct_files, *(f for f in (phantom.seg_file, phantom.rtstruct_file) if f is not None)]
    with idle_connections(node.port, IDLE) as idle, idle_connections(node.port, 20, OUTSIDER) as outsiders:
        assert node.echo()
        result = storescu(node.port, files)
        assert result.returncode == 0, result.stderr
        assert node.scalar(select(func.count(Instance.id))) == len(files)
        closed_by_the_node(outsiders, 10)
        closed_by_the_node(idle, 30)
    assert node.scalars(select(Event).where(Event.kind == "association_rejected")) == []  # no "local limit"
    # Written aggregated (per reason, host and period), so they come a little after the closings.
    wait_for(lambda: closings(node, "connection_timeout", "127.0.0.1") == IDLE, 30, "100 connection_timeout")
    wait_for(lambda: closings(node, "connection_refused", OUTSIDER) == 20, 30, "20 connection_refused")
    details = node.scalars(select(Event.detail).where(Event.kind.in_(("connection_timeout", "connection_refused"))))
    assert len(details) < 20  # a few events, not one per connection
    assert any(ConnectionClosing.MADE_ROOM_HOST.marker in d for d in details)  # beyond max_connections_per_host
    assert any(ConnectionClosing.TIMED_OUT.marker in d for d in details)  # the last 16 waited out their time
    timed_out = sum(
        metric(node, "pacs_agent_connections_timed_out_total", reason) for reason in ("no_request", "host_limit")
    )
    assert timed_out == IDLE
    assert metric(node, "pacs_agent_connections_refused_total", "host_not_allowed") == 20
    assert node.echo()


def test_the_tls_port_has_the_same_protection(nodes: Nodes, certs: Certificates, phantom: PhantomStudy) -> None:  # noqa: F811
    node = nodes.add(TlsNode(nodes.workdir("tls"), certs))
    node.start_tls()  # handshake time limit 3 s ([node] network_timeout_seconds)

    def tls_refusals() -> int:
        """Connections the tls_refused events stand for (repeats of a period are one event with their number)."""
        details = node.scalars(select(Event.detail).where(Event.kind == "tls_refused"))
        repeats = [re.search(r"\(and (\d+) more connections? ", d) for d in details]
        return sum(int(found[1]) if found else 1 for found in repeats)

    refused_before = tls_refusals()
    tls_args = ("+tls", str(certs.modality.key), str(certs.modality.cert), "+cf", str(certs.pki.ca.cert))
    with idle_connections(node.tls_port, IDLE) as idle:
        result = storescu_tls(node.tls_port, list(phantom.ct_files[:5]), *tls_args)
        assert result.returncode == 0, result.stderr
        closed_by_the_node(idle, 30)
    assert node.scalar(select(func.count(Instance.id))) == 5
    # Idle beyond max_connections_per_host (32): closed to make room; the rest: no handshake in time.
    wait_for(
        lambda: closings(node, "connection_timeout", "127.0.0.1") + tls_refusals() - refused_before == IDLE,
        30,
        "one recorded closing per idle connection",
    )
    assert closings(node, "connection_timeout", "127.0.0.1") > 0
    assert node.scalars(select(Event).where(Event.kind == "association_rejected")) == []


def test_a_host_outside_allowed_hosts_is_closed_at_accept_and_recorded(nodes: Nodes) -> None:
    node = nodes.start("scp", extra_config='[security]\nallowed_hosts = ["10.99.0.0/16"]\n')
    assert not node.echo()
    event = wait_for(
        lambda: node.scalars(select(Event).where(Event.kind == "connection_refused")), 30, "connection_refused"
    )[0]
    assert event.peer == "127.0.0.1"
    assert event.detail.endswith("closed at accept: the host is not in [security] allowed_hosts")
    assert node.scalars(select(Event).where(Event.kind == "association_rejected")) == []
