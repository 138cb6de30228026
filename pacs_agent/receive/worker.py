"""A receiving process: runs the associations the scp process hands it (see :mod:`pacs_agent.receive.processes`).

Started by the scp process as ``python -m pacs_agent.receive.worker <fd>``, where ``fd`` is its end
of a ``SOCK_SEQPACKET`` Unix socket. The first message there is the node's settings; then come
connections (a socket each). Association limits are asked of the scp process, and every
Instance row is written by it; the spool file is written and fsync'ed here. The process ends
when the scp process does (``PR_SET_PDEATHSIG``, or the end of the socket) or asks it to stop.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import ssl
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pacs_agent.config import Settings
from pacs_agent.db import Database
from pacs_agent.logs import configure_logging
from pacs_agent.receive.access import ConnectionGuard, Refusal
from pacs_agent.receive.handlers import ReceiveHandlers
from pacs_agent.receive.index import IndexEntry, Outcome
from pacs_agent.receive.processes import Channel, RemoteIndexError, decode_outcome
from pacs_agent.receive.server import (
    GuardedAssociationServer,
    GuardedRequestHandler,
    TlsAssociationServer,
    build_ae,
    handshake_timeout,
    native_stack,
    stream_to_spool,
)
from pacs_agent.receive.spool import Spool
from pacs_agent.studies.store import StoreOutcome
from pacs_agent.supervision import die_with_parent
from pacs_agent.tls import server_context

logger = logging.getLogger(__name__)

REAP_SECONDS = 1.0
"""How often connections whose association ended without a close event are reported closed."""


class _Calls:
    """Requests to the scp process over the channel, each answered by one reply with its id."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self._ids = itertools.count(1)
        self._waiting: dict[int, list[Any]] = {}
        self._lock = threading.Lock()
        self.closed = False

    def call(self, kind: str, *args: Any) -> Any:
        """Send the request and wait for its reply (raised when it is an exception)."""
        slot: list[Any] = [threading.Event(), None, None]
        self._send(kind, slot, args)
        slot[0].wait()
        if isinstance(slot[1], BaseException):
            raise slot[1]
        return slot[1]

    def call_async(self, kind: str, done: Callable[[Any], None], *args: Any) -> None:
        """Send the request; ``done`` gets its reply (or a ConnectionError) on the channel's thread."""
        slot: list[Any] = [None, None, done]
        try:
            self._send(kind, slot, args)
        except ConnectionError as exc:
            done(exc)

    def _send(self, kind: str, slot: list[Any], args: tuple[Any, ...]) -> None:
        request_id = next(self._ids)
        with self._lock:
            if self.closed:
                raise ConnectionError("the scp process is gone")
            self._waiting[request_id] = slot
        try:
            self.channel.send((kind, request_id, *args))
        except OSError as exc:
            with self._lock:
                self._waiting.pop(request_id, None)
            raise ConnectionError(f"the scp process is gone: {exc}") from None

    def answer(self, request_id: int, value: Any) -> None:
        """Hand a reply to its waiting caller or callback."""
        with self._lock:
            slot = self._waiting.pop(request_id, None)
        if slot is not None:
            self._settle(slot, value)

    def fail_all(self) -> None:
        """The channel is gone: every request still waiting fails."""
        with self._lock:
            self.closed = True
            waiting, self._waiting = list(self._waiting.values()), {}
        for slot in waiting:
            self._settle(slot, ConnectionError("the scp process is gone"))

    @staticmethod
    def _settle(slot: list[Any], value: Any) -> None:
        if slot[2] is not None:
            try:
                slot[2](value)
            except Exception:  # one callback must not stop the channel's thread
                logger.exception("could not hand over a reply of the scp process")
            return
        slot[1] = value
        slot[0].set()


class RemoteIndex:
    """The scp process's :class:`~pacs_agent.receive.index.InstanceIndex`, asked over the channel."""

    def __init__(self, calls: _Calls) -> None:
        self.calls = calls

    def record(self, entry: IndexEntry) -> StoreOutcome:
        """Have the scp process write ``entry``; returns once it is committed (RemoteIndexError if not)."""
        try:
            encoded = self.calls.call("record", entry)
        except ConnectionError as exc:
            raise RemoteIndexError(str(exc)) from None
        return decode_outcome(encoded)

    def record_async(self, entry: IndexEntry, done: Callable[[Outcome], None]) -> None:
        """Have the scp process write ``entry``; ``done`` gets the outcome (RemoteIndexError if not written)."""

        def answered(encoded: Any) -> None:
            outcome: Outcome
            if isinstance(encoded, BaseException):
                outcome = RemoteIndexError(str(encoded))
            else:
                try:
                    outcome = decode_outcome(encoded)
                except RemoteIndexError as exc:
                    outcome = exc
            done(outcome)

        self.calls.call_async("record", answered, entry)

    def stop(self) -> None:
        """Nothing to stop here: the committer runs in the scp process."""


class RemoteLimiter:
    """The scp process's :class:`~pacs_agent.receive.access.AssociationLimiter`, asked over the channel."""

    def __init__(self, calls: _Calls) -> None:
        self.calls = calls

    def admit(self, key: int, calling: str, is_alive: Callable[[], bool]) -> Refusal | None:
        """Take a slot in the node-wide count, or the limit it would exceed."""
        refusal: Refusal | None = self.calls.call("admit", key, calling)
        return refusal

    def release(self, key: int) -> None:
        """Give the slot back (no-op when it holds none)."""
        with contextlib.suppress(OSError):
            self.calls.channel.send(("release", key))


@dataclass
class HandedConnection:
    """A connection the scp process handed over: ``handle`` names it in both processes."""

    handle: int
    alive: Callable[[], bool] | None = None
    reported: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class WorkerAssociationServer(GuardedAssociationServer):
    """Serves handed-over connections: no socket of its own, the guard's notices go to the scp process."""

    def __init__(self, *args: Any, channel: Channel, **kwargs: Any) -> None:
        self.channel = channel
        self.handed: dict[int, HandedConnection] = {}
        self._handed_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        """No listening socket: connections arrive over the channel."""

    def server_activate(self) -> None:
        """No listening socket: connections arrive over the channel."""

    def serve(self, handle: int, request: socket.socket, client_address: tuple[str, int]) -> None:
        """Run the association of a handed-over connection in its own thread (TLS: handshake first)."""
        connection = HandedConnection(handle)
        with self._handed_lock:
            self.handed[handle] = connection
            self._accepted[id(request)] = connection  # type: ignore[assignment]
        self.process_request(request, client_address)

    def handshake_started(self, connection: Any) -> None:
        """The TLS handshake starts: the scp's guard holds the request timeout."""
        self._notify(("handshaking", connection.handle))

    def handshake_done(self, connection: Any, tls_socket: ssl.SSLSocket) -> None:
        """The handshake succeeded: the scp's guard starts the request timeout afresh."""
        self._notify(("handshaken", connection.handle))

    def refuse_tls(self, address: str, reason: str) -> None:
        """A TLS handshake failed: the scp process records it (repeats summed there)."""
        self._notify(("tls_refused", address, reason))

    def _notify(self, message: tuple[Any, ...]) -> None:
        with contextlib.suppress(OSError):  # the scp process is gone: this process ends too
            self.channel.send(message)

    def on_requested(self, event: Any, connection: Any) -> None:
        """The A-ASSOCIATE-RQ arrived: the scp's guard stops its request timeout."""
        with contextlib.suppress(OSError):
            self.channel.send(("requested", connection.handle))

    def on_connection_closed(self, event: Any, connection: Any) -> None:
        """The connection closed: the scp process closes its copy and no longer counts it."""
        self.report_closed(connection)

    def report_closed(self, connection: HandedConnection) -> None:
        """Tell the scp process once that ``connection`` closed."""
        with connection.lock:
            if connection.reported:
                return
            connection.reported = True
        with self._handed_lock:
            self.handed.pop(connection.handle, None)
        with contextlib.suppress(OSError):
            self.channel.send(("closed", connection.handle))

    def unserved(self, connection: Any) -> None:
        """No association thread took ``connection`` over: the scp process is told it closed."""
        if isinstance(connection, HandedConnection):
            self.report_closed(connection)

    def reap(self) -> None:
        """Report connections whose association thread ended without a close event."""
        with self._handed_lock:
            ended = [c for c in self.handed.values() if c.alive is not None and not c.alive()]
        for connection in ended:
            self.report_closed(connection)


class WorkerTlsAssociationServer(WorkerAssociationServer, TlsAssociationServer):
    """Serves handed-over connections of the TLS port: the handshake is done here, reported to the scp."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, on_tls_refused=self.refuse_tls, **kwargs)


def run(fd: int) -> int:
    """The receiving process: serve handed-over connections until told to stop or the scp process ends."""
    parent = os.getppid()
    die_with_parent(parent)
    channel = Channel(socket.socket(fileno=fd))
    first = channel.receive()
    if first is None or first[0][0] != "settings":
        return 1
    settings: Settings = first[0][1]
    configure_logging(settings.logging.level)
    db = Database(settings.database_url, run_migrations=False)
    spool = Spool(settings.storage.spool_dir, settings.storage.min_free_mb)
    calls = _Calls(channel)
    handlers = ReceiveHandlers(settings, db, spool)
    handlers.index = RemoteIndex(calls)  # type: ignore[assignment]
    handlers.limiter = RemoteLimiter(calls)  # type: ignore[assignment]
    stream_to_spool(handlers.incoming)
    ae = build_ae(settings)
    native = native_stack(settings, ae, handlers) if settings.node.dicom_stack == "native" else None
    common: dict[str, Any] = {
        "evt_handlers": handlers.bindings(),
        "request_handler": GuardedRequestHandler,
        "guard": ConnectionGuard(settings.security),  # unused: the scp process's guard counts
        "on_closing": lambda closing, address: None,
        "channel": channel,
        "native": native,
    }
    where = (ae, (settings.node.host, 0), ae.ae_title, ae.supported_contexts, None)
    server = WorkerAssociationServer(*where, **common)
    servers = [server]
    tls_server: WorkerTlsAssociationServer | None = None
    if settings.node.tls_port:
        tls_server = WorkerTlsAssociationServer(
            *where,
            tls_context=server_context(settings.tls),
            handshake_timeout=handshake_timeout(settings.node.network_timeout_seconds),
            **common,
        )
        servers.append(tls_server)
    ae._servers.extend(servers)
    stop = threading.Event()

    def reap() -> None:
        while not stop.wait(REAP_SECONDS):
            for each in servers:
                each.reap()

    threading.Thread(target=reap, name="reaper", daemon=True).start()
    logger.info("receive process %d serving connections handed over by the scp process %d", os.getpid(), parent)
    while True:
        received = channel.receive()
        if received is None:
            break
        message, fds = received
        kind = message[0]
        if kind == "connection" and fds:
            _, handle, address, port, tls = message
            serving = tls_server if tls and tls_server is not None else server
            serving.serve(handle, socket.socket(fileno=fds[0]), (address, port))
            for extra in fds[1:]:
                os.close(extra)
            continue
        for extra in fds:
            os.close(extra)
        if kind in ("recorded", "admitted"):
            calls.answer(message[1], message[2])
        elif kind == "stop":
            break
    stop.set()
    calls.fail_all()
    for assoc in list(ae.active_associations):
        assoc.abort()
    if native is not None:
        native.abort_all()
    db.dispose()
    channel.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m pacs_agent.receive.worker <fd>``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m pacs_agent.receive.worker <fd> (started by pacs-agent scp)", file=sys.stderr)
        return 2
    return run(int(args[0]))


if __name__ == "__main__":
    sys.exit(main())
