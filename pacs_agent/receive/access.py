"""Who may open an association: host and AE title allow-lists, the called AE title, limits.

:func:`check_request` is a pure function of ``[security]``, the node's AE title and what the
peer sent; :class:`AssociationLimiter` counts the associations that were let in. Each refusal is
a :class:`Refusal` with the A-ASSOCIATE-RJ fields to send and the reason to record.

Before any of that, :class:`ConnectionGuard` looks after TCP connections that have not sent their
A-ASSOCIATE-RQ yet: a host outside ``allowed_hosts`` is closed at accept, one host holds at most
``max_connections_per_host`` connections, and a connection that stays silent longer than
``association_request_timeout_seconds`` (or while newer connections need its place) is closed.
:class:`ConnectionTally` aggregates those closings into a bounded number of audit events.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from pacs_agent.config import SecuritySettings

# A-ASSOCIATE-RJ (PS3.8 9.3.4): result, source, reason/diagnostic.
REJECTED_PERMANENT, REJECTED_TRANSIENT = 0x01, 0x02
SERVICE_USER, SERVICE_PROVIDER_PRESENTATION = 0x01, 0x03
NO_REASON_GIVEN, CALLING_AET_NOT_RECOGNISED, CALLED_AET_NOT_RECOGNISED = 0x01, 0x03, 0x07
LOCAL_LIMIT_EXCEEDED = 0x02  # with source 3 (service-provider, presentation related)


@dataclass(frozen=True)
class Refusal:
    """Why an association is refused, and the A-ASSOCIATE-RJ fields that say so."""

    reason: str
    result: int = REJECTED_PERMANENT
    source: int = SERVICE_USER
    diagnostic: int = NO_REASON_GIVEN


def check_request(
    security: SecuritySettings, node_ae_title: str, calling: str, called: str, address: str
) -> Refusal | None:
    """Decide whether an A-ASSOCIATE-RQ may proceed (the limits are checked afterwards).

    Parameters
    ----------
    security
        ``[security]`` of the node.
    node_ae_title
        ``[node] ae_title``.
    calling, called
        The calling and called AE titles of the request (trailing spaces are ignored).
    address
        The peer's IP address.

    Returns
    -------
    Refusal or None
        None when the association may proceed. Checked in order: ``allowed_hosts``, the calling AE
        title (``allowed_calling_aets`` / ``peers``), the host of a ``peers`` entry, the called AE
        title (``require_called_aet``).
    """
    calling, called = calling.strip(), called.strip()
    if not security.host_allowed(address):
        return Refusal(f"host {address} is not in [security] allowed_hosts")
    if not security.calling_aet_allowed(calling):
        lists = "allowed_calling_aets" + (" or peers" if security.peers else "")
        return Refusal(
            f"calling AE title {calling!r} is not in [security] {lists}", diagnostic=CALLING_AET_NOT_RECOGNISED
        )
    if not security.peer_host_allowed(calling, address):
        hosts = ", ".join(security.peer_hosts(calling) or ())
        return Refusal(
            f"calling AE title {calling!r} may only connect from {hosts} ([security] peers), not from {address}",
            diagnostic=CALLING_AET_NOT_RECOGNISED,
        )
    if security.require_called_aet and called != node_ae_title.strip():
        return Refusal(
            f"called AE title not recognised: {called!r} (this node is {node_ae_title!r}; "
            "[security] require_called_aet)",
            diagnostic=CALLED_AET_NOT_RECOGNISED,
        )
    return None


class AssociationLimiter:
    """Counts admitted associations, in total and per calling AE title (thread-safe).

    An admitted association holds its slot until :meth:`release`; a slot whose association thread
    has ended without a release (``is_alive`` returns False) is reclaimed at the next admission.
    """

    def __init__(self, max_total: int, max_per_aet: int) -> None:
        self.max_total = max_total
        self.max_per_aet = max_per_aet
        self._slots: dict[int, tuple[str, Callable[[], bool]]] = {}
        self._lock = threading.Lock()

    def admit(self, key: int, calling: str, is_alive: Callable[[], bool]) -> Refusal | None:
        """Take a slot for association ``key`` or return the limit it would exceed."""
        calling = calling.strip()
        with self._lock:
            self._slots = {k: v for k, v in self._slots.items() if v[1]()}
            if len(self._slots) >= self.max_total:
                return Refusal(
                    f"local limit exceeded: {len(self._slots)} associations are open "
                    f"([security] max_associations = {self.max_total})",
                    result=REJECTED_TRANSIENT,
                    source=SERVICE_PROVIDER_PRESENTATION,
                    diagnostic=LOCAL_LIMIT_EXCEEDED,
                )
            mine = sum(1 for title, _ in self._slots.values() if title == calling)
            if self.max_per_aet and mine >= self.max_per_aet:
                return Refusal(
                    f"local limit exceeded: calling AE title {calling!r} has {mine} associations open "
                    f"([security] max_associations_per_aet = {self.max_per_aet})",
                    result=REJECTED_TRANSIENT,
                    source=SERVICE_PROVIDER_PRESENTATION,
                    diagnostic=LOCAL_LIMIT_EXCEEDED,
                )
            self._slots[key] = (calling, is_alive)
            return None

    def release(self, key: int) -> None:
        """Give back the slot of association ``key`` (no-op when it holds none)."""
        with self._lock:
            self._slots.pop(key, None)

    def open_count(self) -> int:
        """Associations holding a slot now."""
        with self._lock:
            return len(self._slots)


# -- connections before their association request ---------------------------------------------

MAX_WAITING_CONNECTIONS = 64
"""Connections of all hosts together that may wait for their A-ASSOCIATE-RQ; a newer one closes
the oldest waiting one. A real sender sends its request within milliseconds of connecting."""
MAX_HOSTS_PER_AUDIT = 16
"""Hosts named one by one in the audit events of one period; further hosts are summed as others."""


class ConnectionClosing(Enum):
    """Why the node closed a connection before (or instead of) its association.

    The value is the event kind; :attr:`marker` is the text that identifies the reason in the event
    detail (the metrics classify events by it).
    """

    HOST_NOT_ALLOWED = ("connection_refused", "host_not_allowed", "[security] allowed_hosts")
    HOST_FULL = ("connection_refused", "host_limit", "[security] max_connections_per_host")
    TIMED_OUT = ("connection_timeout", "no_request", "[security] association_request_timeout_seconds")
    MADE_ROOM_HOST = (
        "connection_timeout",
        "host_limit",
        "to make room: the host reached [security] max_connections_per_host",
    )
    MADE_ROOM_NODE = ("connection_timeout", "waiting_limit", "to make room: the node keeps at most")

    @property
    def kind(self) -> str:
        """The audit event kind (``connection_refused`` or ``connection_timeout``)."""
        return self.value[0]

    @property
    def label(self) -> str:
        """The ``reason`` label of the metric that counts these connections."""
        return self.value[1]

    @property
    def marker(self) -> str:
        """Text that, among the details of events of the same kind, only this reason's contain."""
        return self.value[2]

    def describe(self, security: SecuritySettings) -> str:
        """What happened to the connection(s), for the event detail (after the count and host)."""
        if self is ConnectionClosing.HOST_NOT_ALLOWED:
            return "closed at accept: the host is not in [security] allowed_hosts"
        if self is ConnectionClosing.HOST_FULL:
            return (
                f"closed at accept: the host already has [security] max_connections_per_host = "
                f"{security.max_connections_per_host} connections open, all of them associations"
            )
        if self is ConnectionClosing.TIMED_OUT:
            return (
                "closed: no A-ASSOCIATE-RQ within [security] association_request_timeout_seconds = "
                f"{security.association_request_timeout_seconds:g}"
            )
        if self is ConnectionClosing.MADE_ROOM_HOST:
            return (
                f"closed before their A-ASSOCIATE-RQ {self.marker} = {security.max_connections_per_host} "
                "and a newer connection came"
            )
        return f"closed before their A-ASSOCIATE-RQ {self.marker} {MAX_WAITING_CONNECTIONS} waiting connections"


@dataclass(eq=False)
class Connection:
    """One accepted TCP connection, from accept until it closes.

    ``close`` shuts its socket down (the association thread then ends); ``alive`` tells whether
    the thread serving it still runs (None until the association thread exists).
    """

    address: str
    opened: float
    close: Callable[[], None]
    alive: Callable[[], bool] | None = None
    requested: bool = False
    """True once the A-ASSOCIATE-RQ arrived: no longer subject to the request timeout or to eviction."""
    handshaking: bool = False
    """True during a TLS handshake, which has a time limit of its own: the request timeout waits."""
    closing: bool = False


@dataclass(frozen=True)
class Admission:
    """What :meth:`ConnectionGuard.open` decided: the connection (None when refused) and the closings."""

    connection: Connection | None
    refused: ConnectionClosing | None = None
    evicted: tuple[tuple[Connection, ConnectionClosing], ...] = ()
    """Older waiting connections to close now (outside the guard's lock) to make room."""


class ConnectionGuard:
    """Counts open connections per host and finds those that waited too long (thread-safe).

    Parameters
    ----------
    security
        ``[security]``: ``allowed_hosts``, ``max_connections_per_host``,
        ``association_request_timeout_seconds``.
    max_waiting
        Connections of all hosts that may wait for their A-ASSOCIATE-RQ at once.
    clock
        Monotonic seconds (a parameter for tests).
    """

    def __init__(
        self,
        security: SecuritySettings,
        max_waiting: int = MAX_WAITING_CONNECTIONS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.security = security
        self.max_waiting = max_waiting
        self.clock = clock
        self._open: list[Connection] = []
        self._lock = threading.Lock()

    def _prune(self) -> None:
        self._open = [c for c in self._open if not c.closing and (c.alive is None or c.alive())]

    def open(self, address: str, close: Callable[[], None]) -> Admission:
        """Admit a connection just accepted from ``address``, or say why not.

        A host outside ``allowed_hosts`` is refused. A host at ``max_connections_per_host`` gives
        up its oldest connection still waiting for its request; when all of them are associations
        the new connection is refused. When ``max_waiting`` connections wait, the oldest of them
        (any host) is closed.
        """
        if not self.security.host_allowed(address):
            return Admission(None, ConnectionClosing.HOST_NOT_ALLOWED)
        evicted: list[tuple[Connection, ConnectionClosing]] = []
        with self._lock:
            self._prune()
            mine = [c for c in self._open if c.address == address]
            if len(mine) >= self.security.max_connections_per_host:
                waiting = [c for c in mine if not c.requested]
                if not waiting:
                    return Admission(None, ConnectionClosing.HOST_FULL)
                evicted.append((waiting[0], ConnectionClosing.MADE_ROOM_HOST))
                waiting[0].closing = True
            waiting_all = [c for c in self._open if not c.requested and not c.closing]
            if len(waiting_all) >= self.max_waiting:
                evicted.append((waiting_all[0], ConnectionClosing.MADE_ROOM_NODE))
                waiting_all[0].closing = True
            connection = Connection(address, self.clock(), close)
            self._open = [c for c in self._open if not c.closing]
            self._open.append(connection)
        return Admission(connection, evicted=tuple(evicted))

    def requested(self, connection: Connection) -> None:
        """The connection's A-ASSOCIATE-RQ arrived."""
        with self._lock:
            connection.requested = True

    def handshaking(self, connection: Connection) -> None:
        """A TLS handshake starts: hold the request timeout until :meth:`restart`."""
        with self._lock:
            connection.handshaking = True

    def restart(self, connection: Connection, close: Callable[[], None]) -> None:
        """Start the request timeout afresh (after a TLS handshake); close through ``close`` from now on."""
        with self._lock:
            connection.opened = self.clock()
            connection.close = close
            connection.handshaking = False

    def closed(self, connection: Connection) -> None:
        """The connection is closed (no-op when it is no longer counted)."""
        with self._lock:
            connection.closing = True
            self._open = [c for c in self._open if c is not connection]

    def expired(self) -> list[Connection]:
        """Take out the connections that waited longer than the request timeout; the caller closes them."""
        deadline = self.clock() - self.security.association_request_timeout_seconds
        with self._lock:
            late = [
                c
                for c in self._open
                if not c.requested and not c.closing and not c.handshaking and c.opened <= deadline
            ]
            for connection in late:
                connection.closing = True
            self._open = [c for c in self._open if not c.closing]
        return late

    def next_deadline(self) -> float | None:
        """When the oldest waiting connection times out (monotonic seconds), None when none waits."""
        with self._lock:
            waiting = [c.opened for c in self._open if not c.requested and not c.closing and not c.handshaking]
        return min(waiting) + self.security.association_request_timeout_seconds if waiting else None

    def open_count(self, address: str | None = None) -> int:
        """Connections counted now (of ``address`` only, when given)."""
        with self._lock:
            self._prune()
            return sum(1 for c in self._open if address is None or c.address == address)


@dataclass
class TallyLine:
    """Connections closed for one reason from one host (``address`` None: several other hosts)."""

    closing: ConnectionClosing
    address: str | None
    count: int = 0
    first: float = 0.0
    last: float = 0.0
    hosts: set[str] = field(default_factory=set)

    def detail(self, security: SecuritySettings) -> str:
        """The event detail; it starts with the number of connections (the metrics sum it)."""
        plural = "s" if self.count != 1 else ""
        source = self.address if self.address is not None else f"{len(self.hosts)} other hosts"
        return f"{self.count} connection{plural} from {source} {self.closing.describe(security)}"


class ConnectionTally:
    """Counts closed connections between two audit writes, so a flood makes few events (thread-safe).

    At most ``max_hosts`` hosts per reason are named per period; the rest are summed in one line.
    """

    def __init__(self, max_hosts: int = MAX_HOSTS_PER_AUDIT, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_hosts = max_hosts
        self.clock = clock
        self._lines: dict[tuple[ConnectionClosing, str | None], TallyLine] = {}
        self._lock = threading.Lock()

    def add(self, closing: ConnectionClosing, address: str) -> None:
        """Count one connection closed for ``closing`` from ``address``."""
        now = self.clock()
        with self._lock:
            key: tuple[ConnectionClosing, str | None] = (closing, address)
            if key not in self._lines:
                named = sum(1 for c, a in self._lines if c is closing and a is not None)
                if named >= self.max_hosts:
                    key = (closing, None)
            line = self._lines.get(key)
            if line is None:
                line = self._lines[key] = TallyLine(closing, key[1], first=now)
            line.count += 1
            line.last = now
            line.hosts.add(address)

    def __bool__(self) -> bool:
        with self._lock:
            return bool(self._lines)

    def drain(self) -> list[TallyLine]:
        """The lines counted since the last drain (and start counting afresh)."""
        with self._lock:
            lines, self._lines = list(self._lines.values()), {}
        return lines


class RepeatFilter:
    """Lets the first of each ``(address, reason)`` through per period and counts the repeats (thread-safe).

    For refusals recorded with a free-text reason (failed TLS handshakes): the first one of a
    period is written as it is, the repeats as one line with their number. At most ``max_keys``
    pairs are told apart per period; repeats beyond them are counted under ``(None, None)``.
    """

    def __init__(self, max_keys: int = MAX_HOSTS_PER_AUDIT * 4) -> None:
        self.max_keys = max_keys
        self._seen: set[tuple[str, str]] = set()
        self._repeats: dict[tuple[str | None, str | None], int] = {}
        self._lock = threading.Lock()

    def first(self, address: str, reason: str) -> bool:
        """True for the first ``(address, reason)`` of the period; otherwise count it as a repeat."""
        key = (address, reason)
        with self._lock:
            if key not in self._seen and len(self._seen) < self.max_keys:
                self._seen.add(key)
                return True
            counted: tuple[str | None, str | None] = key if key in self._seen else (None, None)
            self._repeats[counted] = self._repeats.get(counted, 0) + 1
            return False

    def __bool__(self) -> bool:
        with self._lock:
            return bool(self._seen)

    def drain(self) -> list[tuple[str | None, str | None, int]]:
        """The repeats of the period as ``(address, reason, count)``; a new period starts."""
        with self._lock:
            repeats, self._repeats, self._seen = self._repeats, {}, set()
        return [(address, reason, n) for (address, reason), n in repeats.items()]


def shutdown_of(sock: socket.socket) -> Callable[[], None]:
    """A callable that shuts ``sock`` down from any thread (whoever reads it then sees the end).

    A connection's ``close`` in the guard: also right for a TLS socket built on ``sock``, and for a
    connection handed to a receiving process (this process's copy of it ends the connection).
    """

    def shutdown() -> None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    return shutdown
