"""The receiving AE's own DICOM upper layer: association, P-DATA and C-STORE / C-ECHO on one thread.

pynetdicom runs every association on two polling threads (its DUL reader and its association
reactor each sleep 1 ms between looks at their queues), decodes every PDU into objects and
assembles each message through several queues: about 2-3 ms of CPU per instance and one or two
polling delays of wall time, more than Orthanc spends on a whole instance (README, "Where the
receive CPU goes"). The receiving AE only ever acts as an association acceptor for Verification
and Storage, so this module serves that part of PS3.8 / PS3.7 itself, on the connection's own
thread, without polling:

* the association request is decoded, negotiated and answered with pynetdicom's PDU codecs and
  presentation-context negotiation (``pynetdicom.pdu``, ``pynetdicom.presentation``), and admitted
  or rejected by :meth:`ReceiveHandlers.admit` ([security] checks and the association limits);
* P-DATA-TF PDUs are read straight from the socket (a buffered reader: a few system calls per PDU),
  their PDV items parsed in place, and each dataset fragment written to the instance's
  :class:`~pacs_agent.receive.spool.IncomingFile` as it arrives (preamble, file meta with the
  calling AE title as Source Application Entity Title, then the dataset as received - the same
  Part 10 file pynetdicom's streaming wrote);
* the command set (Implicit VR Little Endian, a handful of elements) is decoded and the
  C-STORE-RSP / C-ECHO-RSP encoded here; the C-STORE itself is :meth:`ReceiveHandlers.store`;
* A-RELEASE, A-ABORT, a closed connection, a peer silent for ``[node] network_timeout_seconds``
  and any protocol violation end the association; a violation is answered with A-ABORT (PS3.8
  9.3.8, source "service provider" with the reason) and written to the association's event.

``[node] dicom_stack = "pynetdicom"`` serves associations with pynetdicom instead (the stack before
this module), for a site that meets a sender this one does not get on with.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from io import BufferedReader
from typing import cast

from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from pacs_agent import __version__
from pacs_agent.receive.handlers import STORED, Peer, ReceiveHandlers, StoreRequest, StoreStatus, transport_text
from pacs_agent.receive.spool import IncomingFile

logger = logging.getLogger(__name__)

IMPLEMENTATION_CLASS_UID = "2.25.331611631547348104010965166842470620155"
"""pacs-agent's Implementation Class UID (a UUID-derived UID, PS3.5 B.2), in the A-ASSOCIATE-AC and file meta."""
IMPLEMENTATION_VERSION_NAME = f"PACS_AGENT_{__version__}"[:16]
APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"

# PDU types (PS3.8 9.3)
A_ASSOCIATE_RQ_TYPE = 0x01
P_DATA_TF_TYPE = 0x04
A_RELEASE_RQ_TYPE = 0x05
A_ABORT_TYPE = 0x07
KNOWN_PDU_TYPES = frozenset({0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07})

# A-ABORT reasons of the service provider (PS3.8 Table 9-26)
REASON_NOT_SPECIFIED = 0x00
UNRECOGNIZED_PDU = 0x01
UNEXPECTED_PDU = 0x02
INVALID_PDU_PARAMETER = 0x06

# DIMSE (PS3.7 9.3, E.1)
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_ECHO_RQ = 0x0030
C_ECHO_RSP = 0x8030
C_CANCEL_RQ = 0x0FFF
NO_DATA_SET = 0x0101
PROCESSING_FAILURE = 0x0110
HANDLER_FAILED = 0xC211

MAX_REQUEST_BYTES = 1024 * 1024
"""An A-ASSOCIATE-RQ longer than this is refused (DCMTK's storescu proposing every storage class: ~30 KB)."""
MAX_COMMAND_BYTES = 64 * 1024
"""A command set longer than this is a protocol violation (a C-STORE-RQ is about 200 bytes)."""
CHUNK_BYTES = 1024 * 1024
"""Dataset bytes are read from the socket and written to the incoming file at most this many at a time."""
READ_BUFFER_BYTES = 256 * 1024
ERROR_COMMENT_LENGTH = 64


class ProtocolError(Exception):
    """The peer broke PS3.8 / PS3.7: the association is aborted with ``reason``."""

    def __init__(self, message: str, reason: int = REASON_NOT_SPECIFIED) -> None:
        super().__init__(message)
        self.reason = reason


class ConnectionEnded(Exception):
    """The peer closed the connection (or it was reset)."""


# -- file meta --------------------------------------------------------------------------------


class EncodedFileMeta(bytes):
    """File meta information (group 0002, Explicit VR Little Endian) already encoded."""


def _element(group_element: int, vr: bytes, value: bytes) -> bytes:
    """One Explicit VR Little Endian element of group 0002 (OB with a 4-byte length, the rest 2)."""
    tag = struct.pack("<HH", group_element >> 16, group_element & 0xFFFF)
    if vr == b"OB":
        return tag + vr + b"\0\0" + struct.pack("<I", len(value)) + value
    return tag + vr + struct.pack("<H", len(value)) + value


def _padded(value: str, pad: bytes) -> bytes:
    """``value`` encoded (never raising: a malformed request is refused by the handler), padded to even."""
    data = value.encode("utf-8", "backslashreplace")[:0xFFFE]
    return data + pad if len(data) % 2 else data


def file_meta(
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax: str,
    implementation_class_uid: str = IMPLEMENTATION_CLASS_UID,
    implementation_version_name: str = IMPLEMENTATION_VERSION_NAME,
    source_ae_title: str = "",
) -> EncodedFileMeta:
    """The file meta of a received instance, encoded here, without pydicom's check of the UIDs.

    The meta is built from the C-STORE request as soon as the command arrives, before the
    handler runs; pydicom's check would warn with the raw value of a malformed UID (control
    characters included) into the log, and the handler refuses such a request with its own,
    escaped, reason (0x0117 / 0x0122). The bytes are those pydicom's ``write_file_meta_info``
    writes for the same file meta (a unit test compares them). ``source_ae_title`` - the calling
    AE title - is recorded as Source Application Entity Title (0002,0016).
    """
    elements = [
        _element(0x00020001, b"OB", b"\x00\x01"),
        _element(0x00020002, b"UI", _padded(str(sop_class_uid), b"\0")),
        _element(0x00020003, b"UI", _padded(str(sop_instance_uid), b"\0")),
        _element(0x00020010, b"UI", _padded(str(transfer_syntax), b"\0")),
        _element(0x00020012, b"UI", _padded(implementation_class_uid, b"\0")),
        _element(0x00020013, b"SH", _padded(implementation_version_name, b" ")),
    ]
    if source_ae_title:
        elements.append(_element(0x00020016, b"AE", _padded(source_ae_title[:16], b" ")))
    body = b"".join(elements)
    return EncodedFileMeta(_element(0x00020000, b"UL", struct.pack("<I", len(body))) + body)


# -- command sets -----------------------------------------------------------------------------


def decode_command(data: bytes | bytearray) -> dict[int, bytes]:
    """The elements of a command set (Implicit VR Little Endian, group 0000): element number -> value.

    Raises
    ------
    ProtocolError
        An element of another group, or one that runs past the end.
    """
    elements: dict[int, bytes] = {}
    position, end = 0, len(data)
    while position < end:
        if position + 8 > end:
            raise ProtocolError("a command set ends inside an element header", INVALID_PDU_PARAMETER)
        group, element, length = struct.unpack_from("<HHI", data, position)
        position += 8
        if group != 0 or position + length > end:
            raise ProtocolError("a command set holds an element outside group 0000", INVALID_PDU_PARAMETER)
        elements[element] = bytes(data[position : position + length])
        position += length
    return elements


def _us(elements: dict[int, bytes], element: int) -> int | None:
    value = elements.get(element)
    return struct.unpack("<H", value[:2])[0] if value is not None and len(value) >= 2 else None


def _text(elements: dict[int, bytes], element: int) -> str:
    return elements.get(element, b"").rstrip(b"\0 ").decode("ascii", "backslashreplace")


def encode_command(elements: list[tuple[int, bytes]]) -> bytes:
    """A command set from (element, value) pairs in ascending order, with its group length first."""
    body = b"".join(struct.pack("<HHI", 0, element, len(value)) + value for element, value in elements)
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def _ui(value: str) -> bytes:
    return _padded(value, b"\0")


def _response(
    command_field: int, sop_class_uid: str, message_id: int, status: StoreStatus, sop_instance_uid: str | None
) -> bytes:
    """A C-STORE-RSP / C-ECHO-RSP with the handler's status (and its Error Comment / Offending Element)."""
    elements = [
        (0x0002, _ui(sop_class_uid)),
        (0x0100, struct.pack("<H", command_field)),
        (0x0120, struct.pack("<H", message_id)),
        (0x0800, struct.pack("<H", NO_DATA_SET)),
        (0x0900, struct.pack("<H", status.status)),
    ]
    tag = status.offending_element
    if tag is not None:
        elements.append((0x0901, struct.pack("<HH", tag >> 16, tag & 0xFFFF)))
    if status.comment:
        elements.append((0x0902, _padded(status.comment[:ERROR_COMMENT_LENGTH], b" ")))
    if sop_instance_uid is not None:
        elements.append((0x1000, _ui(sop_instance_uid)))
    return encode_command(elements)


# -- PDUs ---------------------------------------------------------------------------------------


def _abort_pdu(reason: int, source: int = 0x02) -> bytes:
    """An A-ABORT PDU (source 2: the service provider, with ``reason``; source 0: the service user)."""
    return struct.pack(">BBIBBBB", A_ABORT_TYPE, 0, 4, 0, 0, source, reason if source == 0x02 else 0)


RELEASE_RP = struct.pack(">BBII", 0x06, 0, 4, 0)


@dataclass(frozen=True)
class AcceptorSettings:
    """What the receiving AE offers: its title, contexts, advertised PDU size and time limits."""

    ae_title: str
    contexts: list[PresentationContext]
    maximum_pdu_bytes: int
    """Advertised Maximum Length Received (0: no limit)."""
    request_timeout_seconds: float
    """How long a new connection may take to send its A-ASSOCIATE-RQ (a backstop: the guard is first)."""
    network_timeout_seconds: float
    """A peer silent this long in an association is aborted."""


@dataclass
class _Message:
    """A C-STORE whose dataset is arriving."""

    context_id: int
    message_id: int
    request: StoreRequest
    incoming: IncomingFile


class Association:
    """One association on an accepted connection, served by :meth:`run` on the calling thread."""

    def __init__(
        self,
        sock: socket.socket,
        address: str,
        acceptor: AcceptorSettings,
        handlers: ReceiveHandlers,
        on_requested: Callable[[], None] = lambda: None,
    ) -> None:
        self.sock = sock
        self.address = address
        self.acceptor = acceptor
        self.handlers = handlers
        self.on_requested = on_requested
        self._reader = cast(BufferedReader, sock.makefile("rb", buffering=READ_BUFFER_BYTES))
        self._send_lock = threading.Lock()
        self._ended = threading.Event()
        self._peer: Peer | None = None
        self._established = False
        self._contexts: dict[int, PresentationContext] = {}
        self._peer_max_pdu = 0
        self._command = bytearray()
        self._command_context = 0
        self._message: _Message | None = None
        self._chunk = bytearray(CHUNK_BYTES)

    # -- life cycle ---------------------------------------------------------------------

    def is_alive(self) -> bool:
        """True until the association has ended."""
        return not self._ended.is_set()

    def abort(self) -> None:
        """End the association from another thread (the node stops): A-ABORT, then close the connection."""
        if self._ended.is_set():
            return
        self._send(_abort_pdu(0, source=0x00))
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def run(self) -> None:
        """Serve the association until it is released, aborted or its connection closes."""
        how = "aborted"
        try:
            if self._associate():
                how = self._serve()
        except ConnectionEnded:
            how = "aborted (the connection closed)"
        except TimeoutError:
            limit = (
                self.acceptor.network_timeout_seconds if self._established else self.acceptor.request_timeout_seconds
            )
            how = f"aborted (no data for {limit:g} s)"
            self._send(_abort_pdu(REASON_NOT_SPECIFIED))
        except ProtocolError as exc:
            how = f"aborted ({exc})"
            logger.warning("aborting the association from %s: %s", self.address, exc)
            self._send(_abort_pdu(exc.reason))
        except OSError as exc:
            how = f"aborted (connection error: {exc.strerror or type(exc).__name__})"
        except Exception:  # a bug must end this association only, with a record
            logger.exception("the association from %s failed", self.address)
            how = "aborted (internal error, see the log)"
            self._send(_abort_pdu(REASON_NOT_SPECIFIED))
        finally:
            self._ended.set()
            self._finish(how)

    def _finish(self, how: str) -> None:
        message, self._message = self._message, None
        if message is not None:
            message.incoming.discard()
        if self._peer is not None:
            if self._established:
                self.handlers.ended(self._peer, how)
            self.handlers.closed(self._peer)
        with contextlib.suppress(OSError):
            self._reader.close()
        with contextlib.suppress(OSError):
            self.sock.close()

    # -- reading --------------------------------------------------------------------------

    def _read_into(self, view: memoryview) -> None:
        while view:
            count = self._reader.readinto(view)
            if not count:
                raise ConnectionEnded
            view = view[count:]

    def _read(self, length: int) -> bytearray:
        data = bytearray(length)
        self._read_into(memoryview(data))
        return data

    def _pdu_header(self) -> tuple[int, int]:
        header = self._read(6)
        pdu_type, _, length = struct.unpack(">BBI", header)
        return pdu_type, length

    def _send(self, data: bytes) -> None:
        with self._send_lock, contextlib.suppress(OSError):
            self.sock.sendall(data)

    # -- association ----------------------------------------------------------------------

    def _associate(self) -> bool:
        """Read, admit and negotiate the A-ASSOCIATE-RQ; True when the association is established."""
        self.sock.settimeout(self.acceptor.request_timeout_seconds or None)
        pdu_type, length = self._pdu_header()
        if pdu_type != A_ASSOCIATE_RQ_TYPE:
            reason = UNEXPECTED_PDU if pdu_type in KNOWN_PDU_TYPES else UNRECOGNIZED_PDU
            raise ProtocolError(f"PDU type 0x{pdu_type:02X} before an association request", reason)
        if length > MAX_REQUEST_BYTES:
            raise ProtocolError(f"association request of {length} bytes", INVALID_PDU_PARAMETER)
        body = self._read(length)
        self.on_requested()
        request = A_ASSOCIATE_RQ()
        try:
            request.decode(struct.pack(">BBI", pdu_type, 0, length) + bytes(body))
            primitive = request.to_primitive()
        except Exception as exc:
            raise ProtocolError(
                f"cannot decode the association request: {type(exc).__name__}", UNRECOGNIZED_PDU
            ) from exc
        calling = primitive.calling_ae_title.strip()
        called = primitive.called_ae_title.strip()
        self._peer = Peer(id(self), calling, self.address, threading.current_thread())
        if request.protocol_version != 1:
            self._reject(0x01, 0x02, 0x02)  # protocol version not supported
            return False
        if primitive.application_context_name != APPLICATION_CONTEXT_NAME:
            self._reject(0x01, 0x01, 0x02)  # application context name not supported
            return False
        refusal = self.handlers.admit(id(self), calling, called, self.address, self.is_alive)
        if refusal is not None:
            self._reject(refusal.result, refusal.source, refusal.diagnostic)
            return False
        self._accept(primitive)
        return True

    def _reject(self, result: int, source: int, diagnostic: int) -> None:
        reject = A_ASSOCIATE_RJ()
        primitive = A_ASSOCIATE()
        primitive.result, primitive.result_source, primitive.diagnostic = result, source, diagnostic
        reject.from_primitive(primitive)
        self._send(reject.encode())

    def _accept(self, requested: A_ASSOCIATE) -> None:
        user_items = requested.user_information
        for item in user_items:
            if isinstance(item, MaximumLengthNotification):
                self._peer_max_pdu = int(item.maximum_length_received or 0)
        roles = {
            item.sop_class_uid: (item.scu_role, item.scp_role)
            for item in user_items
            if isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid is not None
        }
        results, role_replies = negotiate_as_acceptor(
            requested.presentation_context_definition_list, self.acceptor.contexts, roles or None
        )
        self._contexts = {int(cx.context_id): cx for cx in results if cx.result == 0x00 and cx.context_id is not None}
        maximum = MaximumLengthNotification()
        maximum.maximum_length_received = self.acceptor.maximum_pdu_bytes
        implementation = ImplementationClassUIDNotification()
        implementation.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        reply: list[object] = [maximum, implementation, version, *role_replies]
        if any(isinstance(item, AsynchronousOperationsWindowNegotiation) for item in user_items):
            window = AsynchronousOperationsWindowNegotiation()  # one operation at a time each way
            window.maximum_number_operations_invoked = 1
            window.maximum_number_operations_performed = 1
            reply.append(window)
        primitive = A_ASSOCIATE()
        primitive.application_context_name = APPLICATION_CONTEXT_NAME
        primitive.calling_ae_title = requested.calling_ae_title
        primitive.called_ae_title = requested.called_ae_title
        primitive.result, primitive.result_source = 0x00, 0x01
        primitive.presentation_context_definition_results_list = results
        primitive.user_information = reply  # type: ignore[assignment]  # pynetdicom's list type is invariant
        accept = A_ASSOCIATE_AC()
        accept.from_primitive(primitive)
        assert self._peer is not None
        self.handlers.accepted(id(self), transport_text(self.sock))
        self._established = True
        self._send(accept.encode())

    # -- established ------------------------------------------------------------------------

    def _serve(self) -> str:
        """Serve PDUs until the association ends; returns how it ended."""
        self.sock.settimeout(self.acceptor.network_timeout_seconds or None)
        while True:
            pdu_type, length = self._pdu_header()
            if pdu_type == P_DATA_TF_TYPE:
                self._p_data(length)
            elif pdu_type == A_RELEASE_RQ_TYPE:
                self._read(length)
                if self._peer is not None:  # every instance stored is in the index when the sender is told
                    self.handlers.settle(self._peer)
                self._send(RELEASE_RP)
                return "released"
            elif pdu_type == A_ABORT_TYPE:
                self._read(min(length, 64))
                return "aborted"
            elif pdu_type in KNOWN_PDU_TYPES:
                raise ProtocolError(
                    f"unexpected PDU type 0x{pdu_type:02X} in an established association", UNEXPECTED_PDU
                )
            else:
                raise ProtocolError(f"unrecognised PDU type 0x{pdu_type:02X}", UNRECOGNIZED_PDU)

    def _p_data(self, length: int) -> None:
        """One P-DATA-TF PDU: its PDV items, each read and handled as it arrives."""
        remaining = length
        while remaining:
            if remaining < 6:
                raise ProtocolError("a P-DATA-TF PDU ends inside a PDV item header", INVALID_PDU_PARAMETER)
            header = self._read(6)
            item_length, context_id, control = struct.unpack(">IBB", header)
            if item_length < 2 or item_length + 4 > remaining:
                raise ProtocolError("a PDV item's length does not fit its P-DATA-TF PDU", INVALID_PDU_PARAMETER)
            remaining -= item_length + 4
            if context_id not in self._contexts:
                raise ProtocolError(
                    f"a PDV item names presentation context {context_id}, not accepted", INVALID_PDU_PARAMETER
                )
            data_length = item_length - 2
            if control & 0x01:
                self._command_fragment(context_id, data_length, last=bool(control & 0x02))
            else:
                self._dataset_fragment(context_id, data_length, last=bool(control & 0x02))

    def _command_fragment(self, context_id: int, length: int, *, last: bool) -> None:
        if self._message is not None:
            raise ProtocolError("a command arrived before the previous data set was complete", UNEXPECTED_PDU)
        if self._command and context_id != self._command_context:
            raise ProtocolError("command fragments on different presentation contexts", INVALID_PDU_PARAMETER)
        if len(self._command) + length > MAX_COMMAND_BYTES:
            raise ProtocolError("command set too long", INVALID_PDU_PARAMETER)
        self._command_context = context_id
        self._command += self._read(length)
        if last:
            command, self._command = self._command, bytearray()
            self._on_command(context_id, decode_command(command))

    def _dataset_fragment(self, context_id: int, length: int, *, last: bool) -> None:
        message = self._message
        if message is None:
            raise ProtocolError("a data set fragment arrived without a command that announces one", UNEXPECTED_PDU)
        if context_id != message.context_id:
            raise ProtocolError("a data set on another presentation context than its command", INVALID_PDU_PARAMETER)
        view = memoryview(self._chunk)
        while length:
            part = view[: min(length, CHUNK_BYTES)]
            self._read_into(part)
            message.incoming.write(part)
            length -= len(part)
        if last:
            self._message = None
            self._stored(message)

    # -- DIMSE ------------------------------------------------------------------------------

    def _on_command(self, context_id: int, elements: dict[int, bytes]) -> None:
        field = _us(elements, 0x0100)
        message_id = _us(elements, 0x0110)
        if field is None or message_id is None:
            raise ProtocolError("a command set without Command Field or Message ID", INVALID_PDU_PARAMETER)
        has_data = _us(elements, 0x0800) != NO_DATA_SET
        abstract_syntax = str(self._contexts[context_id].abstract_syntax)
        if field == C_ECHO_RQ and not has_data:
            self._respond(context_id, _response(C_ECHO_RSP, VERIFICATION, message_id, STORED, None))
        elif field == C_STORE_RQ and has_data and abstract_syntax != VERIFICATION:
            request = StoreRequest(_text(elements, 0x0002), _text(elements, 0x1000))
            incoming = self.handlers.incoming.open()
            assert self._peer is not None
            incoming.write(
                b"\0" * 128
                + b"DICM"
                + file_meta(
                    sop_class_uid=request.sop_class_uid,
                    sop_instance_uid=request.sop_instance_uid,
                    transfer_syntax=str(self._contexts[context_id].transfer_syntax[0]),
                    source_ae_title=self._peer.calling,
                )
            )
            self._message = _Message(context_id, message_id, request, incoming)
        elif field == C_CANCEL_RQ:
            return  # nothing of ours can be cancelled: C-STORE and C-ECHO answer at once
        else:
            raise ProtocolError(
                f"DIMSE command 0x{field:04X} on a {'Verification' if abstract_syntax == VERIFICATION else 'Storage'} "
                "presentation context (only C-STORE and C-ECHO are served)",
                UNEXPECTED_PDU,
            )

    def _stored(self, message: _Message) -> None:
        assert self._peer is not None
        self.handlers.incoming.take(message.incoming.name)
        try:
            status = self.handlers.store(self._peer, message.request, message.incoming)
        except Exception:  # the sender gets a failure status, the association goes on
            logger.exception("the C-STORE handler failed")
            message.incoming.discard()
            status = StoreStatus(HANDLER_FAILED, "the receiving node failed to handle the instance")
        self._respond(
            message.context_id,
            _response(
                C_STORE_RSP, message.request.sop_class_uid, message.message_id, status, message.request.sop_instance_uid
            ),
        )

    def _respond(self, context_id: int, command: bytes) -> None:
        """Send a command set as P-DATA-TF PDUs no longer than the peer accepts."""
        room = self._peer_max_pdu - 6 if self._peer_max_pdu >= 8 else len(command)
        room = max(room, 1)
        pdus = []
        for start in range(0, len(command), room):
            fragment = command[start : start + room]
            control = 0x03 if start + room >= len(command) else 0x01
            item = struct.pack(">IBB", len(fragment) + 2, context_id, control) + fragment
            pdus.append(struct.pack(">BBI", P_DATA_TF_TYPE, 0, len(item)) + item)
        with self._send_lock:
            self.sock.sendall(b"".join(pdus))


class NativeStack:
    """Serves associations with :class:`Association` and keeps the running ones (to abort them on stop)."""

    def __init__(self, acceptor: AcceptorSettings, handlers: ReceiveHandlers) -> None:
        self.acceptor = acceptor
        self.handlers = handlers
        self._running: set[Association] = set()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)

    def serve(
        self,
        sock: socket.socket,
        address: str,
        on_requested: Callable[[], None],
        on_started: Callable[[Callable[[], bool]], None] = lambda alive: None,
    ) -> None:
        """Serve one association on ``sock`` on the calling thread; ``on_started`` gets its ``is_alive``."""
        association = Association(sock, address, self.acceptor, self.handlers, on_requested)
        with self._lock:
            self._running.add(association)
        try:
            on_started(association.is_alive)
            association.run()
        finally:
            with self._lock:
                self._running.discard(association)
                self._idle.notify_all()

    def active(self) -> int:
        """Associations (or connections waiting for their request) being served now."""
        with self._lock:
            return len(self._running)

    def abort_all(self, timeout: float = 10.0) -> None:
        """Abort every running association and wait (at most ``timeout`` s) until their threads are done."""
        with self._lock:
            running = list(self._running)
        for association in running:
            association.abort()
        with self._idle:
            self._idle.wait_for(lambda: not self._running, timeout=timeout)
