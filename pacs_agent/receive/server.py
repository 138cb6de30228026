"""The receiving AE: which SOP classes and transfer syntaxes it accepts, and its server sockets.

The plain DICOM port (``[node] port``) and the DICOM TLS port (``[node] tls_port``) serve the
same AE with the same handlers. On the TLS port the handshake runs in the connection's own thread
with a time limit, so a slow or hostile client never blocks the accept loop, and a failed
handshake is recorded as a ``tls_refused`` event with the reason.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

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
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # pynetdicom sets it via globals()
from pynetdicom.transport import ThreadedAssociationServer
from pynetdicom.utils import make_target

from pacs_agent import netfix  # noqa: F401  (closes sockets pynetdicom would leak)
from pacs_agent.config import Settings
from pacs_agent.db import Database
from pacs_agent.receive.handlers import ReceiveHandlers
from pacs_agent.receive.header import STORAGE_SOP_CLASSES
from pacs_agent.receive.spool import Spool
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


def build_ae(settings: Settings) -> AE:
    """An AE that accepts Verification and the storage SOP classes of the node."""
    ae = AE(ae_title=settings.node.ae_title)
    ae.maximum_pdu_size = settings.node.max_pdu_bytes
    ae.network_timeout = settings.node.network_timeout_seconds
    ae.acse_timeout = 30
    ae.dimse_timeout = settings.node.network_timeout_seconds
    # The handlers enforce [security] max_associations (and per calling AE title) and record each
    # refusal. pynetdicom's own limit also counts connections that have not sent their request yet
    # or are closing; it stays well above ours as a backstop only.
    ae.maximum_associations = settings.security.max_associations + 64
    ae.add_supported_context(Verification)
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
    return ae


PLAIN_ASSOCIATE_RQ = b"\x01"
"""The first byte of a plain DICOM association request (PDU type 01); TLS starts with 0x16."""
PLAIN_ON_TLS_PORT = "plain DICOM on the TLS port (the sender must enable TLS, or use the plain port)"
HANDSHAKE_TIMED_OUT = "no TLS handshake within the time limit"


class TlsAssociationServer(ThreadedAssociationServer):
    """An association server for the TLS port: handshake per connection thread, failures reported.

    pynetdicom's own ``ssl_context`` wraps the socket in the accept loop, where one client that
    never finishes its handshake would hold up every other connection, and drops a failed
    handshake silently. Here the server accepts plain sockets and each connection thread does
    the handshake (at most ``handshake_timeout`` seconds) before the association starts. A
    connection that closes without sending a byte (a monitoring probe) is not reported.
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

    # Narrower than the base's signature, which also covers UDP servers' (bytes, socket) requests:
    # this is a TCP server, so it is always handed a connected socket and an (address, port) pair.
    def process_request_thread(self, request: socket.socket, client_address: tuple[str, int]) -> None:  # type: ignore[override]
        """Do the TLS handshake, then run the association on the encrypted socket."""
        address = str(client_address[0])
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
        super().process_request_thread(tls_socket, client_address)


class ReceiveServer:
    """Owns the listening sockets of the receiving AE: plain DICOM and/or DICOM TLS.

    Raises
    ------
    ConfigError
        At construction, when ``[node] tls_port`` is set and the ``[tls]`` files are unusable.
    """

    def __init__(self, settings: Settings, db: Database, spool: Spool) -> None:
        self.settings = settings
        self.handlers = ReceiveHandlers(settings, db, spool)
        self.ae = build_ae(settings)
        self.tls_context = server_context(settings.tls) if settings.node.tls_port else None
        self._server: ThreadedAssociationServer | None = None
        self._tls_server: ThreadedAssociationServer | None = None

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

    def _start_tls(self) -> None:
        node = self.settings.node
        assert self.tls_context is not None
        warn_about_certificate(self.settings.tls)
        server = self.ae.make_server(
            (node.host, node.tls_port),
            evt_handlers=self.handlers.bindings(),
            server_class=TlsAssociationServer,
            tls_context=self.tls_context,
            on_tls_refused=self.handlers.on_tls_refused,
            handshake_timeout=min(HANDSHAKE_TIMEOUT_SECONDS, node.network_timeout_seconds),
        )
        thread = threading.Thread(target=make_target(server.serve_forever), name="TlsAcceptor", daemon=True)
        thread.start()
        self.ae._servers.append(server)  # AE.shutdown() and server.shutdown() expect it there
        self._tls_server = server
        logger.info("listening as %s on %s:%d with DICOM TLS", node.ae_title, node.host, self.tls_port)

    def start(self) -> None:
        """Start listening in background threads."""
        node = self.settings.node
        if node.plain_port_enabled:
            self._server = self.ae.start_server(
                (node.host, node.port),
                block=False,
                evt_handlers=self.handlers.bindings(),
            )
            logger.info("listening as %s on %s:%d", node.ae_title, node.host, self.port)
        if node.tls_port:
            try:
                self._start_tls()
            except BaseException:
                self.stop()
                raise

    def stop(self) -> None:
        """Stop accepting, let running associations end, close the sockets."""
        for server in (self._server, self._tls_server):
            if server is not None:
                server.shutdown()
        self._server = self._tls_server = None
        self.ae.shutdown()
