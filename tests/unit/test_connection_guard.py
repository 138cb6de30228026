"""Connections before their association: the guard's admissions, evictions and timeouts, the
aggregation of closings into few audit events, and how /metrics sums them (SQLite and PostgreSQL)."""

from __future__ import annotations

from typing import Any

import pytest

from pacs_agent.audit import record_event
from pacs_agent.config import SecuritySettings, settings_from_mapping
from pacs_agent.db import Database
from pacs_agent.errors import ConfigError
from pacs_agent.metrics import Exposition, database_metrics
from pacs_agent.receive.access import (
    Connection,
    ConnectionClosing,
    ConnectionGuard,
    ConnectionTally,
    RepeatFilter,
)


class Clock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Closed:
    """Records which connections the guard asked to close."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def closer(self, name: str) -> Any:
        return lambda: self.names.append(name)


def security(**values: Any) -> SecuritySettings:
    return SecuritySettings(**{"max_connections_per_host": 3, "association_request_timeout_seconds": 5, **values})


def admit(guard: ConnectionGuard, closed: Closed, address: str, name: str) -> Connection:
    admission = guard.open(address, closed.closer(name))
    for older, _ in admission.evicted:
        older.close()
    assert admission.connection is not None, admission.refused
    return admission.connection


def test_a_host_outside_allowed_hosts_is_refused_and_counts_against_nothing() -> None:
    guard = ConnectionGuard(security(allowed_hosts=("10.0.0.0/8",)))
    admission = guard.open("192.168.1.5", lambda: None)
    assert admission.connection is None
    assert admission.refused is ConnectionClosing.HOST_NOT_ALLOWED
    assert guard.open_count() == 0
    assert guard.open("10.1.2.3", lambda: None).connection is not None
    assert guard.open_count() == 1


def test_a_host_at_its_limit_gives_up_its_oldest_waiting_connection() -> None:
    clock, closed = Clock(), Closed()
    guard = ConnectionGuard(security(), clock=clock)
    first = admit(guard, closed, "10.0.0.1", "first")
    clock.now += 1
    second = admit(guard, closed, "10.0.0.1", "second")
    guard.requested(first)  # an association: never evicted
    admit(guard, closed, "10.0.0.1", "third")
    admission = guard.open("10.0.0.1", closed.closer("fourth"))
    assert [(c, why) for c, why in admission.evicted] == [(second, ConnectionClosing.MADE_ROOM_HOST)]
    assert admission.connection is not None
    assert guard.open_count("10.0.0.1") == 3
    assert guard.open("10.0.0.2", lambda: None).connection is not None  # other hosts are not affected


def test_a_host_whose_connections_are_all_associations_is_refused_until_one_closes() -> None:
    closed = Closed()
    guard = ConnectionGuard(security())
    held = [admit(guard, closed, "10.0.0.1", f"assoc{i}") for i in range(3)]
    for connection in held:
        guard.requested(connection)
    admission = guard.open("10.0.0.1", closed.closer("new"))
    assert (admission.connection, admission.refused) == (None, ConnectionClosing.HOST_FULL)
    guard.closed(held[0])
    assert guard.open("10.0.0.1", closed.closer("new")).connection is not None
    assert closed.names == []


def test_the_node_closes_the_oldest_waiting_connection_of_any_host_beyond_its_waiting_limit() -> None:
    closed = Closed()
    guard = ConnectionGuard(security(), max_waiting=2)
    admit(guard, closed, "10.0.0.1", "a")
    admit(guard, closed, "10.0.0.2", "b")
    admission = guard.open("10.0.0.3", closed.closer("c"))
    assert [(c.address, why) for c, why in admission.evicted] == [("10.0.0.1", ConnectionClosing.MADE_ROOM_NODE)]
    assert guard.open_count() == 2


def test_a_connection_without_request_expires_after_the_timeout_and_an_association_does_not() -> None:
    clock, closed = Clock(), Closed()
    guard = ConnectionGuard(security(), clock=clock)
    silent = admit(guard, closed, "10.0.0.1", "silent")
    talking = admit(guard, closed, "10.0.0.1", "talking")
    guard.requested(talking)
    assert guard.next_deadline() == 105.0
    clock.now = 104.9
    assert guard.expired() == []
    clock.now = 105.0
    assert guard.expired() == [silent]
    assert guard.expired() == []  # handed out once
    assert guard.open_count() == 1
    assert guard.next_deadline() is None


def test_a_tls_handshake_holds_the_request_timeout_until_it_ends() -> None:
    clock, closed = Clock(), Closed()
    guard = ConnectionGuard(security(), clock=clock)
    connection = admit(guard, closed, "10.0.0.1", "tls")
    guard.handshaking(connection)
    clock.now += 60
    assert guard.expired() == []
    guard.restart(connection, closed.closer("tls socket"))
    clock.now += 5
    [late] = guard.expired()
    late.close()
    assert closed.names == ["tls socket"]


def test_a_connection_whose_thread_ended_unnoticed_no_longer_counts() -> None:
    closed = Closed()
    guard = ConnectionGuard(security())
    connection = admit(guard, closed, "10.0.0.1", "gone")
    connection.alive = lambda: False
    assert guard.open_count("10.0.0.1") == 0


def test_the_tally_aggregates_per_reason_and_host_and_sums_hosts_beyond_its_limit() -> None:
    clock = Clock()
    tally = ConnectionTally(max_hosts=2, clock=clock)
    assert not tally
    for _ in range(40):
        tally.add(ConnectionClosing.MADE_ROOM_HOST, "10.0.0.1")
        clock.now += 0.1
    tally.add(ConnectionClosing.TIMED_OUT, "10.0.0.1")
    for host in ("10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5"):
        tally.add(ConnectionClosing.HOST_NOT_ALLOWED, host)
    lines = tally.drain()
    assert not tally and tally.drain() == []
    sec = security()
    details = sorted(
        ((line.closing.kind, line.address, line.detail(sec)) for line in lines),
        key=lambda row: (row[0], row[1] or "~", row[2]),  # the line of other hosts last
    )
    assert details == [
        (
            "connection_refused",
            "10.0.0.2",
            "1 connection from 10.0.0.2 closed at accept: the host is not in [security] allowed_hosts",
        ),
        (
            "connection_refused",
            "10.0.0.3",
            "1 connection from 10.0.0.3 closed at accept: the host is not in [security] allowed_hosts",
        ),
        (
            "connection_refused",
            None,
            "2 connections from 2 other hosts closed at accept: the host is not in [security] allowed_hosts",
        ),
        (
            "connection_timeout",
            "10.0.0.1",
            "1 connection from 10.0.0.1 closed: no A-ASSOCIATE-RQ within "
            "[security] association_request_timeout_seconds = 5",
        ),
        (
            "connection_timeout",
            "10.0.0.1",
            "40 connections from 10.0.0.1 closed before their A-ASSOCIATE-RQ to make room: the host reached "
            "[security] max_connections_per_host = 3 and a newer connection came",
        ),
    ]
    made_room = next(line for line in lines if line.closing is ConnectionClosing.MADE_ROOM_HOST)
    assert made_room.last - made_room.first == pytest.approx(3.9)


def test_each_reason_is_told_apart_by_its_marker_among_its_kind() -> None:
    sec = security()
    for closing in ConnectionClosing:
        same_kind = [c for c in ConnectionClosing if c.kind == closing.kind]
        detail = closing.describe(sec)
        assert [c for c in same_kind if c.marker in detail] == [closing], closing


def test_metrics_sum_the_connections_of_the_aggregated_events(any_db: Database) -> None:
    sec = security()
    tally = ConnectionTally()
    for _ in range(93):
        tally.add(ConnectionClosing.MADE_ROOM_HOST, "127.0.0.1")
    for _ in range(7):
        tally.add(ConnectionClosing.TIMED_OUT, "127.0.0.1")
    for _ in range(20):
        tally.add(ConnectionClosing.HOST_NOT_ALLOWED, "127.0.0.2")
    tally.add(ConnectionClosing.HOST_NOT_ALLOWED, "127.0.0.3")
    with any_db.session() as session, session.begin():
        for line in tally.drain():
            record_event(session, line.closing.kind, peer=line.address, detail=line.detail(sec), log=False)
        record_event(session, "connection_refused", detail="2 connections written by a future version", log=False)
    out = Exposition()
    with any_db.engine.connect() as conn:
        database_metrics(conn, (), out)
    text = out.render()
    assert 'pacs_agent_connections_refused_total{reason="host_not_allowed"} 21' in text
    assert 'pacs_agent_connections_refused_total{reason="host_limit"} 0' in text
    assert 'pacs_agent_connections_refused_total{reason="other"} 2' in text
    assert 'pacs_agent_connections_timed_out_total{reason="no_request"} 7' in text
    assert 'pacs_agent_connections_timed_out_total{reason="host_limit"} 93' in text
    assert 'pacs_agent_connections_timed_out_total{reason="waiting_limit"} 0' in text


def test_repeated_tls_refusals_pass_once_per_period_and_are_counted() -> None:
    repeats = RepeatFilter(max_keys=2)
    assert not repeats
    assert repeats.first("10.0.0.1", "no TLS handshake within the time limit")
    assert [repeats.first("10.0.0.1", "no TLS handshake within the time limit") for _ in range(5)] == [False] * 5
    assert repeats.first("10.0.0.1", "bad certificate")  # another reason passes
    assert not repeats.first("10.0.0.2", "bad certificate")  # beyond max_keys: counted as others
    assert not repeats.first("10.0.0.3", "bad certificate")
    assert sorted(repeats.drain(), key=str) == sorted(
        [("10.0.0.1", "no TLS handshake within the time limit", 5), (None, None, 2)], key=str
    )
    assert repeats.first("10.0.0.1", "no TLS handshake within the time limit")  # a new period


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"association_request_timeout_seconds": 0}, "association_request_timeout_seconds"),
        ({"association_request_timeout_seconds": 301}, "association_request_timeout_seconds"),
        ({"max_connections_per_host": 0}, "max_connections_per_host"),
    ],
)
def test_connection_settings_are_validated(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        settings_from_mapping({"security": values})


def test_connection_settings_have_their_documented_defaults() -> None:
    sec = settings_from_mapping({}).security
    assert (sec.association_request_timeout_seconds, sec.max_connections_per_host) == (5.0, 32)
