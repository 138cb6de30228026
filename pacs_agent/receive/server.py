"""The receiving AE: which SOP classes and transfer syntaxes it accepts, and its server sockets.

The plain DICOM port (``[node] port``) and the DICOM TLS port (``[node] tls_port``) serve the
same AE with the same handlers. On the TLS port the handshake runs in the connection's own thread
with a time limit, so a slow or hostile client never blocks the accept loop, and a failed
handshake is recorded as a ``tls_refused`` event with the reason.

Both ports count their TCP connections in one :class:`~pacs_agent.receive.access.ConnectionGuard`
from the moment of accept, before any association exists: a host outside ``[security]
allowed_hosts`` is closed at once, one host holds at most ``max_connections_per_host``
connections, and a connection silent for ``association_request_timeout_seconds`` is closed. A
watcher thread closes the late ones and writes the closings as ``connection_refused`` /
``connection_timeout`` events, aggregated per host and period so that a flood writes few rows.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pydicom.uid import (
    JPEGLossless as JPEGLosslessP14,
)
from pynetdicom import (
    AE,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    _config,
    dimse_messages,
    evt,
)
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # pynetdicom sets it via globals()
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer
from pynetdicom.utils import make_target
from sqlalchemy.exc import SQLAlchemyError

from pacs_agent import netfix  # noqa: F401  (closes sockets pynetdicom would leak)
from pacs_agent.audit import record_event
from pacs_agent.config import Settings
from pacs_agent.db import Database
from pacs_agent.receive.access import (
    MAX_WAITING_CONNECTIONS,
    Connection,
    ConnectionClosing,
    ConnectionGuard,
    ConnectionTally,
    RepeatFilter,
    shutdown_of,
)
from pacs_agent.receive.handlers import ReceiveHandlers
from pacs_agent.receive.header import STORAGE_SOP_CLASSES
from pacs_agent.receive.journal import IN_FLIGHT_SECONDS as JOURNAL_IN_FLIGHT_SECONDS
from pacs_agent.receive.journal import replay_logged
from pacs_agent.receive.processes import ReceiveProcesses, process_count
from pacs_agent.receive.spool import IncomingFiles, Spool
from pacs_agent.receive.upper_layer import AcceptorSettings, EncodedFileMeta, NativeStack, file_meta
from pacs_agent.tls import HANDSHAKE_TIMEOUT_SECONDS, describe_tls_error, server_context, warn_about_certificate

logger = logging.getLogger(__name__)

# Everything is stored as received; decoding happens in the worker (pydicom + pylibjpeg).
TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessP14,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]


def _file_meta(*, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> EncodedFileMeta:
    """The file meta of pynetdicom's ``create_file_meta`` (``dicom_stack = "pynetdicom"``), encoded directly.

    See :func:`pacs_agent.receive.upper_layer.file_meta`; the implementation is pynetdicom's here.
    """
    return file_meta(
        sop_class_uid=sop_class_uid,
        sop_instance_uid=sop_instance_uid,
        transfer_syntax=transfer_syntax,
        implementation_class_uid=PYNETDICOM_IMPLEMENTATION_UID,
        implementation_version_name=PYNETDICOM_IMPLEMENTATION_VERSION,
    )


def _write_file_meta_info(fp: Any, file_meta: Any, enforce_standard: bool = True) -> None:
    """Stand in for pynetdicom's ``write_file_meta_info``: an :class:`EncodedFileMeta` is written as it is."""
    if isinstance(file_meta, EncodedFileMeta):
        fp.write(file_meta)
        return
    write_file_meta_info(fp, file_meta, enforce_standard)


def stream_to_spool(incoming: IncomingFiles) -> None:
    """Make pynetdicom stream every received C-STORE dataset into ``incoming`` (process-wide).

    ``_config.STORE_RECV_CHUNKED_DATASET`` is pynetdicom's switch for writing a received dataset
    to a file as its P-DATA fragments arrive, instead of holding it in memory; the handler then
    finds it at ``event.dataset_path``. pynetdicom opens that file with ``NamedTemporaryFile`` in
    the system's temp directory: :meth:`IncomingFiles.open` takes its place, so that the file is in
    the spool's temp directory (renamed into place, never copied) and ``[security]
    max_instance_mb`` and the free-space watermark hold while the bytes arrive.
    """
    _config.STORE_RECV_CHUNKED_DATASET = True
    setattr(dimse_messages, "NamedTemporaryFile", incoming.open)  # noqa: B010 (a module attribute of pynetdicom)
    setattr(dimse_messages, "create_file_meta", _file_meta)  # noqa: B010
    setattr(dimse_messages, "write_file_meta_info", _write_file_meta_info)  # noqa: B010


def build_ae(settings: Settings) -> AE:
    """An AE that accepts Verification and the storage SOP classes of the node."""
    ae = AE(ae_title=settings.node.ae_title)
    ae.maximum_pdu_size = settings.node.max_pdu_bytes
    ae.network_timeout = settings.node.network_timeout_seconds
    # The ConnectionGuard closes a connection without A-ASSOCIATE-RQ after [security]
    # association_request_timeout_seconds; pynetdicom's own wait for the request is a backstop.
    ae.acse_timeout = max(30.0, settings.security.association_request_timeout_seconds + 5)
    ae.dimse_timeout = settings.node.network_timeout_seconds
    # The handlers enforce [security] max_associations (and per calling AE title) and record each
    # refusal. pynetdicom's own limit also counts connections that have not sent their request yet
    # (at most MAX_WAITING_CONNECTIONS, see ConnectionGuard) or are closing; it stays above both
    # as a backstop only, so that it never answers "local limit exceeded" in place of ours.
    ae.maximum_associations = settings.security.max_associations + MAX_WAITING_CONNECTIONS + 64
    ae.add_supported_context(Verification)
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
    return ae


def native_stack(settings: Settings, ae: AE, handlers: ReceiveHandlers) -> NativeStack:
    """The node's own upper layer, offering what ``ae`` (:func:`build_ae`) offers, with ``handlers``."""
    acceptor = AcceptorSettings(
        ae_title=settings.node.ae_title,
        contexts=list(ae.supported_contexts),
        maximum_pdu_bytes=settings.node.max_pdu_bytes,
        request_timeout_seconds=ae.acse_timeout or 0.0,
        network_timeout_seconds=settings.node.network_timeout_seconds,
    )
    handlers.deferred_index = True  # it settles each association's rows before it answers a release
    return NativeStack(acceptor, handlers)


WATCH_TICK_SECONDS = 0.25
"""How often the watcher looks for connections past their request timeout."""
LISTEN_BACKLOG = 128
"""Connections the kernel queues until the accept loop takes them (socketserver's default is 5: a
burst of connections would then wait for SYN retransmissions, seconds each)."""
AUDIT_PERIOD_SECONDS = 10.0
"""Closed connections are written as events at most once per period (the first one at once)."""


class GuardedRequestHandler(RequestHandler):
    """pynetdicom's request handler, plus the connection's bookkeeping in the ConnectionGuard."""

    server: GuardedAssociationServer

    def handle(self) -> None:
        """As pynetdicom's ``handle``; the guard learns of the request and of the closing.

        With the native stack the association runs here, on the connection's thread, to its end.
        """
        connection = self.server.current_connection()
        native = self.server.native
        if native is not None:
            self._handle_native(native, connection)
            return
        assoc = self._create_association()
        if connection is not None:
            assoc.bind(evt.EVT_REQUESTED, self.server.on_requested, [connection])
            assoc.bind(evt.EVT_CONN_CLOSE, self.server.on_connection_closed, [connection])
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()
        if connection is not None:
            connection.alive = assoc.is_alive

    def _handle_native(self, native: NativeStack, connection: Connection | None) -> None:
        def requested() -> None:
            if connection is not None:
                self.server.on_requested(None, connection)

        def started(alive: Callable[[], bool]) -> None:
            if connection is not None:
                connection.alive = alive

        try:
            native.serve(self.request, str(self.client_address[0]), requested, started)
        finally:
            if connection is not None:
                self.server.on_connection_closed(None, connection)


class GuardedAssociationServer(ThreadedAssociationServer):
    """An association server that counts each connection in a ConnectionGuard from accept on.

    ``verify_request`` runs in the accept loop: a refused connection is closed there, before a
    thread or an association exists, so it counts against no limit. Every closing (refused at
    accept, or an older waiting connection closed to make room) goes to ``on_closing``.
    """

    request_queue_size = LISTEN_BACKLOG

    def __init__(
        self,
        *args: Any,
        guard: ConnectionGuard,
        on_closing: Callable[[ConnectionClosing, str], None],
        native: NativeStack | None = None,
        **kwargs: Any,
    ) -> None:
        self.guard = guard
        self.on_closing = on_closing
        self.native = native
        """Serves the associations when ``[node] dicom_stack = "native"``; None: pynetdicom does."""
        if native is not None:
            # Each connection's thread runs its association: server_close must not wait for them
            # (stop aborts them through the native stack instead).
            self.daemon_threads = True
        self._accepted: dict[int, Connection] = {}
        self._accepted_lock = threading.Lock()
        self._local = threading.local()
        kwargs.setdefault("request_handler", GuardedRequestHandler)
        super().__init__(*args, **kwargs)

    # Narrower than the base's signatures, which also cover UDP servers' (bytes, socket) requests:
    # this is a TCP server, so it is always handed a connected socket and an (address, port) pair.
    def verify_request(self, request: socket.socket, client_address: tuple[str, int]) -> bool:  # type: ignore[override]
        """Admit the connection to the guard; False closes it at once (socketserver does that)."""
        address = str(client_address[0])
        try:
            admission = self.guard.open(address, shutdown_of(request))
            for older, closing in admission.evicted:
                older.close()
                self.on_closing(closing, older.address)
        except Exception:  # an exception here would end the accept loop: refuse this one connection only
            logger.exception("cannot admit a connection from %s; closing it", address)
            return False
        if admission.connection is None:
            assert admission.refused is not None
            self.on_closing(admission.refused, address)
            return False
        with self._accepted_lock:
            self._accepted[id(request)] = admission.connection
        return True

    def current_connection(self) -> Connection | None:
        """The guard's record of the connection served by the calling thread."""
        connection: Connection | None = getattr(self._local, "connection", None)
        return connection

    def on_requested(self, event: evt.Event | None, connection: Connection) -> None:
        """``EVT_REQUESTED``: the connection sent its A-ASSOCIATE-RQ in time."""
        self.guard.requested(connection)

    def on_connection_closed(self, event: evt.Event | None, connection: Connection) -> None:
        """``EVT_CONN_CLOSE``: the connection no longer counts."""
        self.guard.closed(connection)

    def process_request_thread(self, request: socket.socket, client_address: tuple[str, int]) -> None:  # type: ignore[override]
        """Serve the connection in its thread; :meth:`unserved` if no association started on it."""
        with self._accepted_lock:
            connection = self._accepted.pop(id(request), None)
        self._local.connection = connection
        try:
            self.serve_connection(request, client_address)
        finally:
            self._local.connection = None
            if connection is not None and connection.alive is None:  # no association thread runs
                self.unserved(connection)

    def unserved(self, connection: Any) -> None:
        """No association thread took ``connection`` over: the guard stops counting it."""
        self.guard.closed(connection)

    def serve_connection(self, request: socket.socket, client_address: tuple[str, int]) -> None:
        """Start the association on the connection (pynetdicom's ``process_request_thread``)."""
        super().process_request_thread(request, client_address)


class HandingAssociationServer(GuardedAssociationServer):
    """The plain port when there are several receiving processes.

    Each admitted connection is served by the least loaded process: this one, or a receiving
    process it is handed to (:mod:`pacs_agent.receive.processes`).
    """

    processes: ReceiveProcesses | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._served_here: list[Connection] = []
        self._local_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def local_load(self) -> int:
        """Connections this process serves itself now."""
        with self._local_lock:
            self._served_here = [c for c in self._served_here if not c.closing and (c.alive is None or c.alive())]
            return len(self._served_here)

    def process_request(self, request: socket.socket, client_address: tuple[str, int]) -> None:  # type: ignore[override]
        """Hand the connection to a receiving process, or serve it here (a thread, as pynetdicom does).

        A connection of the TLS port is handed before its handshake: the receiving process does it.
        """
        link = self.processes.choose() if self.processes is not None else None
        with self._accepted_lock:
            connection = self._accepted.get(id(request))
        if link is not None and connection is not None:
            with self._accepted_lock:
                self._accepted.pop(id(request), None)
            if link.hand_off(request, client_address, connection, tls=isinstance(self, TlsAssociationServer)):
                return
            with self._accepted_lock:
                self._accepted[id(request)] = connection
        if connection is not None:
            with self._local_lock:
                self._served_here.append(connection)
        super().process_request(request, client_address)


def handshake_timeout(network_timeout_seconds: float) -> float:
    """How long a TLS handshake may take: the network timeout, at most :data:`HANDSHAKE_TIMEOUT_SECONDS`."""
    return min(HANDSHAKE_TIMEOUT_SECONDS, network_timeout_seconds)


PLAIN_ASSOCIATE_RQ = b"\x01"
"""The first byte of a plain DICOM association request (PDU type 01); TLS starts with 0x16."""
PLAIN_ON_TLS_PORT = "plain DICOM on the TLS port (the sender must enable TLS, or use the plain port)"
HANDSHAKE_TIMED_OUT = "no TLS handshake within the time limit"


class TlsAssociationServer(GuardedAssociationServer):
    """An association server for the TLS port: handshake per connection thread, failures reported.

    pynetdicom's own ``ssl_context`` wraps the socket in the accept loop, where one client that
    never finishes its handshake would hold up every other connection, and drops a failed
    handshake silently. Here the server accepts plain sockets and each connection thread does
    the handshake (at most ``handshake_timeout`` seconds) before the association starts. A
    connection that closes without sending a byte (a monitoring probe) is not reported. The
    request timeout of the ConnectionGuard starts after the handshake.
    """

    def __init__(
        self,
        *args: Any,
        tls_context: ssl.SSLContext,
        on_tls_refused: Callable[[str, str], None],
        handshake_timeout: float = HANDSHAKE_TIMEOUT_SECONDS,
        **kwargs: Any,
    ) -> None:
        self.tls_context = tls_context
        self.on_tls_refused = on_tls_refused
        self.handshake_timeout = handshake_timeout
        super().__init__(*args, **kwargs)

    def serve_connection(self, request: socket.socket, client_address: tuple[str, int]) -> None:
        """Do the TLS handshake, then run the association on the encrypted socket."""
        address = str(client_address[0])
        connection = self.current_connection()
        if connection is not None:
            self.handshake_started(connection)
        request.settimeout(self.handshake_timeout)
        try:
            first = request.recv(1, socket.MSG_PEEK)  # left in the buffer for the handshake
        except TimeoutError:
            first = None
        except OSError:
            first = b""
        if first == b"":  # closed or reset before a single byte: a port probe, nothing to report
            self.shutdown_request(request)
            return
        if first is None or first == PLAIN_ASSOCIATE_RQ:
            self.on_tls_refused(address, HANDSHAKE_TIMED_OUT if first is None else PLAIN_ON_TLS_PORT)
            self.shutdown_request(request)
            return
        try:
            tls_socket = self.tls_context.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
        except OSError as exc:
            self.on_tls_refused(address, describe_tls_error(exc))
            self.shutdown_request(request)
            return
        try:
            tls_socket.settimeout(self.handshake_timeout)
            tls_socket.do_handshake()
            tls_socket.settimeout(None)
        except (OSError, ValueError) as exc:  # ssl.SSLError, timeout, reset by the peer
            self.on_tls_refused(address, describe_tls_error(exc))
            self.shutdown_request(tls_socket)
            return
        if connection is not None:
            self.handshake_done(connection, tls_socket)
        super().serve_connection(tls_socket, client_address)

    def handshake_started(self, connection: Any) -> None:
        """The connection's TLS handshake starts: the guard holds its request timeout."""
        self.guard.handshaking(connection)

    def handshake_done(self, connection: Any, tls_socket: ssl.SSLSocket) -> None:
        """The handshake succeeded: the request timeout starts afresh, closing goes through TLS."""
        self.guard.restart(connection, shutdown_of(tls_socket))


class HandingTlsAssociationServer(HandingAssociationServer, TlsAssociationServer):
    """The TLS port when there are several receiving processes: handed over as the plain port's are."""


class ReceiveServer:
    """Owns the listening sockets of the receiving AE: plain DICOM and/or DICOM TLS.

    Raises
    ------
    ConfigError
        At construction, when ``[node] tls_port`` is set and the ``[tls]`` files are unusable.
    """

    def __init__(self, settings: Settings, db: Database, spool: Spool) -> None:
        self.settings = settings
        self.db = db
        self.handlers = ReceiveHandlers(settings, db, spool)
        stream_to_spool(self.handlers.incoming)
        self.ae = build_ae(settings)
        self.native = native_stack(settings, self.ae, self.handlers) if settings.node.dicom_stack == "native" else None
        """The node's own upper layer, or None when pynetdicom serves (``[node] dicom_stack``)."""
        self.tls_context = server_context(settings.tls) if settings.node.tls_port else None
        self.guard = ConnectionGuard(settings.security)
        self.tally = ConnectionTally()
        self.tls_repeats = RepeatFilter()
        self._server: ThreadedAssociationServer | None = None
        self._tls_server: ThreadedAssociationServer | None = None
        self._stop_watch = threading.Event()
        self._watcher: threading.Thread | None = None
        self._replayer: threading.Thread | None = None
        count = process_count(settings.node.receive_processes)
        self.processes: ReceiveProcesses | None = None
        """The extra receiving processes (``[node] receive_processes`` > 1), None with one."""
        if count > 1:
            self.processes = ReceiveProcesses(
                count - 1,
                settings,
                self.guard,
                self.handlers.limiter,
                self.handlers.index,
                settings.storage.state_dir,
                on_tls_refused=self.on_tls_refused,
            )

    @property
    def port(self) -> int:
        """The bound plain DICOM port."""
        assert self._server is not None, "plain port not listening"
        return int(self._server.server_address[1])

    @property
    def tls_port(self) -> int:
        """The bound DICOM TLS port."""
        assert self._tls_server is not None, "TLS port not listening"
        return int(self._tls_server.server_address[1])

    def on_closing(self, closing: ConnectionClosing, address: str) -> None:
        """Count a connection the node closed (written by the watcher, never in the accept loop)."""
        self.tally.add(closing, address)

    def on_tls_refused(self, address: str, reason: str) -> None:
        """Record a failed TLS handshake: the first per address and reason of a period at once, repeats summed."""
        if self.tls_repeats.first(address, reason):
            self.handlers.on_tls_refused(address, reason)

    def _serve(
        self, port: int, server_class: type[GuardedAssociationServer], **kwargs: Any
    ) -> GuardedAssociationServer:
        node = self.settings.node
        # make_server is typed as returning "server_class or ThreadedAssociationServer"; it is server_class.
        server = self.ae.make_server(
            (node.host, port),
            evt_handlers=self.handlers.bindings(),
            server_class=server_class,
            guard=self.guard,
            on_closing=self.on_closing,
            native=self.native,
            **kwargs,
        )
        assert isinstance(server, server_class)
        name = "TlsAcceptor" if issubclass(server_class, TlsAssociationServer) else "Acceptor"
        thread = threading.Thread(target=make_target(server.serve_forever), name=name, daemon=True)
        thread.start()
        self.ae._servers.append(server)  # AE.shutdown() and server.shutdown() expect it there
        return server

    def _start_tls(self) -> None:
        node = self.settings.node
        assert self.tls_context is not None
        warn_about_certificate(self.settings.tls)
        server = self._serve(
            node.tls_port,
            TlsAssociationServer if self.processes is None else HandingTlsAssociationServer,
            tls_context=self.tls_context,
            on_tls_refused=self.on_tls_refused,
            handshake_timeout=handshake_timeout(node.network_timeout_seconds),
        )
        self._tls_server = server
        if isinstance(server, HandingTlsAssociationServer):
            self._hand_over(server)
        logger.info("listening as %s on %s:%d with DICOM TLS", node.ae_title, node.host, self.tls_port)

    def _hand_over(self, server: HandingAssociationServer) -> None:
        """Let ``server`` hand connections to the receiving processes; its own count the scp's load."""
        assert self.processes is not None
        server.processes = self.processes
        servers = [s for s in (self._server, self._tls_server) if isinstance(s, HandingAssociationServer)]
        self.processes.local_load = lambda: sum(s.local_load() for s in servers)

    def start(self) -> None:
        """Index what the spool's journal holds, then listen in background threads and start the watcher."""
        node = self.settings.node
        self.replay_journal()
        self._stop_watch.clear()
        self._watcher = threading.Thread(target=self._watch, name="ConnectionWatcher", daemon=True)
        self._watcher.start()
        self._replayer = threading.Thread(target=self._replay_periodically, name="JournalReplay", daemon=True)
        self._replayer.start()
        try:
            if self.processes is not None:
                self.processes.start()
            if node.plain_port_enabled and self.processes is not None:
                server = self._serve(node.port, HandingAssociationServer)
                assert isinstance(server, HandingAssociationServer)
                self._server = server
                self._hand_over(server)
                logger.info(
                    "listening as %s on %s:%d with %d receiving processes",
                    node.ae_title,
                    node.host,
                    self.port,
                    len(self.processes.links) + 1,
                )
            elif node.plain_port_enabled:
                self._server = self._serve(node.port, GuardedAssociationServer)
                logger.info("listening as %s on %s:%d", node.ae_title, node.host, self.port)
            if node.tls_port:
                self._start_tls()
        except BaseException:
            self.stop()
            raise

    def replay_journal(self, older_than_seconds: float = 0.0) -> int:
        """Index the instances of the spool's journal whose rows were not committed (:mod:`.journal`)."""
        return replay_logged(self.handlers.spool, self.handlers.index, self.db, older_than_seconds=older_than_seconds)

    def _replay_periodically(self) -> None:
        """Index, once a period, what the spool's journal holds for longer than a period.

        The period is :data:`~pacs_agent.receive.journal.IN_FLIGHT_SECONDS`; such entries are rows the
        database refused when they were due. A thread of its own: a database that makes the replay
        wait must not hold up the watcher.
        """
        while not self._stop_watch.wait(JOURNAL_IN_FLIGHT_SECONDS):
            try:
                self.replay_journal(JOURNAL_IN_FLIGHT_SECONDS)
            except Exception:  # the spool unreadable for a moment: the next period tries again
                logger.exception("indexing the spool's journal failed; trying again in %g s", JOURNAL_IN_FLIGHT_SECONDS)

    def _watch(self) -> None:
        """Close connections past their request timeout; write the closings, at most once a period."""
        last_written = -AUDIT_PERIOD_SECONDS
        while not self._stop_watch.wait(WATCH_TICK_SECONDS):
            try:
                for connection in self.guard.expired():
                    connection.close()
                    self.tally.add(ConnectionClosing.TIMED_OUT, connection.address)
                if (self.tally or self.tls_repeats) and time.monotonic() - last_written >= AUDIT_PERIOD_SECONDS:
                    self.write_closings()
                    last_written = time.monotonic()
            except Exception:  # the watcher must outlive any one failure, or idle connections stay open
                logger.exception("the connection watcher failed; it goes on")
        self.write_closings()

    def write_closings(self) -> None:
        """Write the connections closed since the last write as events (one per reason and host).

        Repeated TLS refusals of the period become one ``tls_refused`` event per address and reason.
        """
        for address, reason, count in self.tls_repeats.drain():
            what = reason if reason is not None else "a TLS handshake failed"
            source = f"from {address}" if address is not None else "from other hosts"
            plural = "s" if count != 1 else ""
            self.handlers.on_tls_refused(
                address or "",
                f"{what} (and {count} more connection{plural} {source} within {AUDIT_PERIOD_SECONDS:g} s)",
            )
        security = self.settings.security
        for line in self.tally.drain():
            try:
                with self.db.session() as session, session.begin():
                    record_event(
                        session,
                        line.closing.kind,
                        level="WARNING",
                        peer=line.address,
                        detail=line.detail(security),
                        duration_seconds=round(line.last - line.first, 1) if line.count > 1 else None,
                    )
            except SQLAlchemyError:
                logger.exception("could not record %d closed connection(s) as %s", line.count, line.closing.kind)

    def stop(self) -> None:
        """Stop accepting, let running associations end, close the sockets, write the last closings."""
        for server in (self._server, self._tls_server):
            if server is not None:
                server.shutdown()
        self._server = self._tls_server = None
        if self.processes is not None:
            self.processes.stop()
        if self.native is not None:
            self.native.abort_all()
        self.ae.shutdown()
        self.handlers.index.stop()
        self._stop_watch.set()
        for thread in (self._watcher, self._replayer):
            if thread is not None:
                thread.join(timeout=10)
        self._watcher = self._replayer = None
