"""pynetdicom event handlers: association checks, C-ECHO and C-STORE.

Handlers are thin. C-STORE answers Success only after the object is fsync'ed into the spool and
its Instance row is committed (grouped with those of concurrent associations, see
:mod:`pacs_agent.receive.index`), and only for a complete dataset whose UIDs are well-formed. Every
refusal is recorded as a ``store_refused`` Event with the reason and answered with a failure status
whose Error Comment (0000,0902) says why in short.

The dataset arrives as an :class:`~pacs_agent.receive.spool.IncomingFile` (streamed into the
spool's temp directory while it arrives, see :func:`pacs_agent.receive.server.stream_to_spool`),
or, when streaming is off (a C-GET of another process), as bytes in pynetdicom's memory.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import cast

from pydicom import Dataset
from pydicom.uid import UID
from pynetdicom import _config, evt
from pynetdicom.dimse_primitives import C_STORE
from sqlalchemy.exc import SQLAlchemyError

from pacs_agent.audit import record_event, uid_hash
from pacs_agent.config import Settings
from pacs_agent.db import Database
from pacs_agent.receive.access import AssociationLimiter, Refusal, check_request
from pacs_agent.receive.header import (
    IMAGE_SOP_CLASSES,
    HeaderError,
    IncompleteDatasetError,
    InstanceHeader,
    InvalidUIDError,
    PixelDataMismatchError,
    read_header,
    shown,
    uid_problem,
)
from pacs_agent.receive.index import IndexEntry, InstanceIndex
from pacs_agent.receive.journal import IN_FLIGHT_SECONDS as JOURNAL_REPLAY_SECONDS
from pacs_agent.receive.spool import IncomingFile, IncomingFiles, Spool
from pacs_agent.studies.store import StoreOutcome, is_known_instance

logger = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC210
PROCESSING_FAILURE = 0x0110
INVALID_SOP_INSTANCE = 0x0117
"""PS3.7 C.4.2 (general status, listed for C-STORE): the SOP Instance UID violates the UID construction rules."""
SOP_CLASS_NOT_SUPPORTED = 0x0122
MEGABYTE = 1024 * 1024
IN_MEMORY_BYTES = 8 * MEGABYTE
"""An instance up to this size is received in memory and written once; a larger one streams to its file."""
SETTLE_SECONDS = 60.0
"""How long an ending association waits for the rows of the instances it stored (normally milliseconds)."""
ERROR_COMMENT_LENGTH = 64
"""Error Comment (0000,0902) is an LO: at most 64 characters."""


def _any_uid(value: UID) -> tuple[bool, str]:
    """The UI validator of pynetdicom without its 64-character limit (see :func:`let_long_uids_reach_the_handler`)."""
    return (True, "") if len(value) > 0 else (False, "must not be an empty str")


def let_long_uids_reach_the_handler() -> None:
    """Make pynetdicom hand a C-STORE with an over-long UID to the handler instead of aborting.

    pynetdicom checks the command set's UIDs while it turns a received message into a primitive
    (``utils.set_uid`` with ``_config.VALIDATORS["UI"]``); a UID over 64 characters raises there and
    ``DIMSEServiceProvider.receive_primitive`` aborts the association: no status, no handler, no
    event. ``_config.VALIDATORS`` is pynetdicom's documented hook for that check (process-wide);
    with this validator any non-empty UID reaches :meth:`ReceiveHandlers.on_store`, which refuses
    a malformed one with 0x0117 and a ``store_refused`` event. UIDs this process sends are derived
    by the node and always valid, so relaxing the check there changes nothing.
    """
    _config.VALIDATORS["UI"] = _any_uid


@dataclass(frozen=True)
class StoreStatus:
    """A C-STORE response status: the value, the Error Comment (0000,0902) and Offending Element (0000,0901)."""

    status: int
    comment: str = ""
    """Printable ASCII, at most 64 characters (an LO); empty for none."""
    offending_element: int | None = None

    def dataset(self) -> Dataset:
        """The status as pynetdicom takes it from a handler."""
        response = Dataset()
        response.Status = self.status
        if self.comment:
            response.ErrorComment = self.comment
        if self.offending_element is not None:
            response.OffendingElement = [self.offending_element]
        return response


STORED = StoreStatus(SUCCESS)


def _status(status: int, reason: str, tag: int | None = None) -> StoreStatus:
    """A C-STORE response status with the reason as Error Comment and the offending element, if known."""
    comment = "".join(c for c in reason if " " <= c <= "~")[:ERROR_COMMENT_LENGTH]
    return StoreStatus(status, comment, tag)


@dataclass
class AssociationStats:
    """Counters of one association, logged when it ends."""

    started: float = field(default_factory=time.monotonic)
    stored: int = 0
    duplicates: int = 0
    rejected: int = 0
    transport: str = ""
    """Empty for plain TCP; e.g. ``over TLSv1.3, client certificate CN=pacs.example.org``."""


@dataclass(frozen=True)
class Peer:
    """The association a request came on, as every DICOM stack sees it."""

    key: int
    """Names the association in the limiter and the counters (unique while it is open)."""
    calling: str
    """Calling AE title, stripped."""
    address: str
    owner: object = None
    """What received its datasets (the key of :meth:`IncomingFiles.discard_of`)."""


@dataclass(frozen=True)
class StoreRequest:
    """The C-STORE-RQ command's UIDs, as received (possibly malformed)."""

    sop_class_uid: str
    sop_instance_uid: str


def _peer(event: evt.Event) -> Peer:
    """The :class:`Peer` of a pynetdicom event."""
    assoc = event.assoc
    return Peer(id(assoc), assoc.requestor.ae_title.strip(), assoc.requestor.address, assoc.dul)


def transport_text(sock: object) -> str:
    """How a connection is secured, for the association event: empty for plain TCP."""
    if not isinstance(sock, ssl.SSLSocket):
        return ""
    text = f"over {sock.version()}"
    # The certificate dict's values are typed as any of its value shapes; "subject" is always the
    # tuple of relative distinguished names, each a tuple of (attribute, value) pairs.
    rdns = cast("tuple[tuple[tuple[str, str], ...], ...]", (sock.getpeercert() or {}).get("subject", ()))
    subject = dict(rdn[0] for rdn in rdns if rdn)
    if "commonName" in subject:
        text += f", client certificate CN={subject['commonName']}"
    return text


def _transport(event: evt.Event) -> str:
    return transport_text(getattr(getattr(event.assoc.dul, "socket", None), "socket", None))


def _store_request(event: evt.Event) -> C_STORE:
    """The request of an ``EVT_C_STORE`` event (pynetdicom types ``Event.request`` as any DIMSE primitive)."""
    return cast(C_STORE, event.request)


def _received_bytes(event: evt.Event) -> int:
    """Size of the received dataset, without copying or decoding it."""
    stream = _store_request(event).DataSet
    if isinstance(stream, BytesIO):
        with stream.getbuffer() as view:
            return view.nbytes
    return len(event.encoded_dataset(include_meta=False))


class ReceiveHandlers:
    """The handlers of one receiving AE, sharing the settings, database and spool."""

    def __init__(self, settings: Settings, db: Database, spool: Spool) -> None:
        self.settings = settings
        self.db = db
        self.spool = spool
        self._stats: dict[int, AssociationStats] = {}
        self.index = InstanceIndex(db)
        """The durable index write, grouped across concurrent associations."""
        self._lock = threading.Lock()
        security = settings.security
        self.limiter = AssociationLimiter(security.max_associations, security.max_associations_per_aet)
        self.incoming = IncomingFiles(
            spool, limit_bytes=security.max_instance_mb * MEGABYTE, memory_bytes=IN_MEMORY_BYTES
        )
        """The files pynetdicom streams received datasets into (when enabled by the server)."""
        self.deferred_index = False
        """True when the stack waits for :meth:`settle` before it answers an A-RELEASE-RQ (the native
        upper layer): a C-STORE is then answered once its file and journal entry are durable, and its
        Instance row is committed just after (:mod:`pacs_agent.receive.journal`). False: Success
        waits for the row's commit."""
        self._in_flight: dict[int, int] = {}
        """Association key -> instances acknowledged whose rows are not committed yet."""
        self._settled = threading.Condition()
        let_long_uids_reach_the_handler()

    def bindings(self) -> list[evt.EventHandlerType]:
        """The ``evt_handlers`` list for ``AE.start_server``."""
        return [
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_ACCEPTED, self.on_accepted),
            (evt.EVT_RELEASED, self.on_ended),
            (evt.EVT_ABORTED, self.on_ended),
            (evt.EVT_CONN_CLOSE, self.on_closed),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store_response),
        ]

    def _event(
        self,
        kind: str,
        *,
        level: str,
        peer: str,
        detail: str,
        ae_title: str | None = None,
        sop_instance_uid: str | None = None,
        status: int | None = None,
        duration_seconds: float | None = None,
    ) -> None:
        try:
            with self.db.session() as session, session.begin():
                record_event(
                    session,
                    kind,
                    level=level,
                    peer=peer,
                    detail=detail,
                    ae_title=ae_title,
                    sop_instance_uid=sop_instance_uid,
                    status=status,
                    duration_seconds=duration_seconds,
                )
        except SQLAlchemyError:
            logger.exception("could not record event %s", kind)

    # -- association ---------------------------------------------------------------------

    def admit(self, key: int, calling: str, called: str, address: str, is_alive: Callable[[], bool]) -> Refusal | None:
        """Check an association request against ``[security]`` and the limits; the refusal, if any.

        Checked in order: source host, calling AE title (and the hosts of its ``peers`` entry),
        called AE title, then the association limits (total and per calling AE title). A refusal
        is recorded as an ``association_rejected`` event before it is returned, so that the event
        exists by the time the sender reads the A-ASSOCIATE-RJ.
        """
        refusal = check_request(self.settings.security, self.settings.node.ae_title, calling, called, address)
        if refusal is None:
            refusal = self.limiter.admit(key, calling, is_alive)
        if refusal is not None:
            self._event(
                "association_rejected", level="WARNING", ae_title=calling[:16], peer=address, detail=refusal.reason
            )
        return refusal

    def on_requested(self, event: evt.Event) -> None:
        """``EVT_REQUESTED`` (pynetdicom): reject an association that :meth:`admit` refuses."""
        assoc = event.assoc
        primitive = assoc.requestor.primitive
        calling = primitive.calling_ae_title.strip() if primitive else ""
        called = primitive.called_ae_title.strip() if primitive else ""
        refusal = self.admit(id(assoc), calling, called, assoc.requestor.address, assoc.is_alive)
        if refusal is None:
            return
        assoc.acse.send_reject(refusal.result, refusal.source, refusal.diagnostic)
        # As pynetdicom's own rejections do: wait until the A-ASSOCIATE-RJ has gone out. Otherwise
        # the server may close the socket first and the sender sees an abort instead of the reason.
        assoc.kill()

    def on_tls_refused(self, address: str, reason: str) -> None:
        """Record a connection to the TLS port whose handshake failed (no association was possible)."""
        self._event("tls_refused", level="WARNING", peer=address, detail=reason)

    def accepted(self, key: int, transport: str = "") -> None:
        """Start counting what association ``key`` stores."""
        with self._lock:
            self._stats[key] = AssociationStats(transport=transport)

    def on_accepted(self, event: evt.Event) -> None:
        """``EVT_ACCEPTED`` (pynetdicom): :meth:`accepted`."""
        self.accepted(id(event.assoc), _transport(event))

    def ended(self, peer: Peer, how: str) -> None:
        """Record one event per association with what it stored.

        ``how`` is ``released`` or ``aborted``, the latter optionally with its reason (``aborted
        (no data for 60 s)``).
        """
        self.settle(peer)
        self.limiter.release(peer.key)
        with self._lock:
            stats = self._stats.pop(peer.key, None)
        if stats is None:
            return
        transport = f" ({stats.transport})" if stats.transport else ""
        self._event(
            "association",
            level="INFO" if how == "released" else "WARNING",
            ae_title=peer.calling,
            peer=peer.address,
            detail=f"{how}{transport}: {stats.stored} stored, {stats.duplicates} duplicate(s), "
            f"{stats.rejected} refused",
            duration_seconds=time.monotonic() - stats.started,
        )

    def on_ended(self, event: evt.Event) -> None:
        """``EVT_RELEASED`` / ``EVT_ABORTED`` (pynetdicom): :meth:`ended`."""
        self.ended(_peer(event), "released" if event.event is evt.EVT_RELEASED else "aborted")

    def closed(self, peer: Peer) -> None:
        """Free the association's slot when its connection closes; remove a dataset it left half-received."""
        self.limiter.release(peer.key)
        left = self.incoming.discard_of(peer.owner)
        if left:
            logger.info("removed %d instance(s) received in part from %s", left, peer.address)

    def on_closed(self, event: evt.Event) -> None:
        """``EVT_CONN_CLOSE`` (pynetdicom): :meth:`closed`."""
        self.closed(_peer(event))

    def _count(self, peer: Peer, what: str) -> None:
        with self._lock:
            stats = self._stats.get(peer.key)
            if stats is not None:
                setattr(stats, what, getattr(stats, what) + 1)

    # -- services ------------------------------------------------------------------------

    def on_echo(self, event: evt.Event) -> int:
        """C-ECHO: always Success."""
        return SUCCESS

    def _refuse(
        self, peer: Peer, status: int, reason: str, sop_uid: str | None = None, tag: int | None = None
    ) -> StoreStatus:
        """Record a ``store_refused`` event and answer ``status`` with ``reason`` as Error Comment."""
        self._count(peer, "rejected")
        self._event(
            "store_refused",
            level="WARNING",
            ae_title=peer.calling,
            peer=peer.address,
            sop_instance_uid=sop_uid if sop_uid and uid_problem(sop_uid) is None else None,
            status=status,
            detail=reason,
        )
        return _status(status, reason, tag)

    def _check_request(self, peer: Peer, request: StoreRequest) -> StoreStatus | None:
        """Refuse a C-STORE request whose Affected SOP Instance / Class UID is malformed, before its data are read."""
        instance = request.sop_instance_uid
        problem = uid_problem(instance)
        if problem is not None:
            return self._refuse(
                peer,
                INVALID_SOP_INSTANCE,
                f"Affected SOP Instance UID '{shown(instance)}' is not a valid UID: it {problem} (PS3.5 9.1)",
                tag=0x00001000,
            )
        sop_class = request.sop_class_uid
        problem = uid_problem(sop_class)
        if problem is not None:
            return self._refuse(
                peer,
                SOP_CLASS_NOT_SUPPORTED,
                f"Affected SOP Class UID '{shown(sop_class)}' is not a valid UID: it {problem} (PS3.5 9.1)",
                instance,
                tag=0x00000002,
            )
        return None

    @staticmethod
    def _check(request: StoreRequest, header: InstanceHeader) -> tuple[int, str] | None:
        if header.sop_class_uid != request.sop_class_uid:
            return (
                DATASET_DOES_NOT_MATCH_SOP_CLASS,
                f"dataset SOP Class {header.sop_class_uid} differs from the requested {request.sop_class_uid}",
            )
        if header.sop_instance_uid != request.sop_instance_uid:
            return (
                DATASET_DOES_NOT_MATCH_SOP_CLASS,
                "dataset SOP Instance UID differs from the one in the C-STORE request",
            )
        if header.sop_class_uid in IMAGE_SOP_CLASSES and not header.has_pixel_data:
            return DATASET_DOES_NOT_MATCH_SOP_CLASS, "image object without Pixel Data"
        return None

    def on_store(self, event: evt.Event) -> int:
        """C-STORE: check, spool durably, record, then answer the status (see :meth:`on_store_response`)."""
        return int(self._on_store(event).status)

    def on_store_response(self, event: evt.Event) -> Dataset:
        """C-STORE: check, spool durably, record, then answer; a refusal carries its reason as Error Comment.

        Refused, with nothing spooled: a malformed Affected SOP Instance UID (0x0117) or SOP Class
        UID (0x0122); an instance over ``max_instance_mb`` or a full spool (0xA700, already while it
        arrived: what came beyond was not written); bytes that end before the dataset does or cannot
        be decoded (0xC210, the element cut short as Offending Element); a malformed SOP Instance
        UID in the dataset (0x0117); another malformed UID, Pixel Data of the wrong length, a
        dataset that differs from the request (0xA900). The incoming file is always gone afterwards:
        renamed into the spool, or removed.
        """
        return self._on_store(event).dataset()

    def _on_store(self, event: evt.Event) -> StoreStatus:
        peer = _peer(event)
        command = _store_request(event)
        request = StoreRequest(str(command.AffectedSOPClassUID or ""), str(command.AffectedSOPInstanceUID or ""))
        try:
            incoming = self._incoming(event)
        except LookupError:
            return self._refuse(
                peer,
                PROCESSING_FAILURE,
                "the received data are gone (the association ended while they were stored)",
                request.sop_instance_uid,
            )
        if incoming is not None:
            return self.store(peer, request, incoming)
        return self._store(
            peer, request, None, lambda: event.encoded_dataset(include_meta=True), _received_bytes(event)
        )

    def store(self, peer: Peer, request: StoreRequest, incoming: IncomingFile) -> StoreStatus:
        """C-STORE of a dataset received into ``incoming``: the status to answer (see :meth:`on_store_response`).

        ``incoming`` is always gone afterwards: renamed into the spool, or removed.
        """
        try:
            return self._store(peer, request, incoming, None, incoming.size)
        finally:
            incoming.discard()

    def _incoming(self, event: evt.Event) -> IncomingFile | None:
        """The file the request's dataset was streamed into; None when it is in pynetdicom's memory."""
        try:
            path = event.dataset_path
        except AttributeError:
            return None
        if path is None:
            return None
        incoming = self.incoming.take(path)
        if incoming is None:
            raise LookupError(path)
        return incoming

    def _known(self, sop_instance_uid: str) -> bool:
        """True when the instance is recorded already (a read connection: never queues behind writers)."""
        with self.db.reader.connect() as reader:
            return is_known_instance(reader, sop_instance_uid)

    def _no_room_reason(self) -> str:
        return f"free disk space under the spool is below [storage] min_free_mb = {self.settings.storage.min_free_mb}"

    def _store(
        self,
        peer: Peer,
        request: StoreRequest,
        incoming: IncomingFile | None,
        encoded: Callable[[], bytes] | None,
        size: int,
    ) -> StoreStatus:
        """:meth:`store` for a dataset in ``incoming``, or (None) one ``encoded`` returns, of ``size`` bytes."""
        refused = self._check_request(peer, request)
        if refused is not None:
            return refused
        requested_uid = request.sop_instance_uid
        limit_mb = self.settings.security.max_instance_mb
        if limit_mb and size > limit_mb * MEGABYTE:
            return self._refuse(
                peer,
                OUT_OF_RESOURCES,
                f"instance of {size / MEGABYTE:.1f} MB is larger than [security] max_instance_mb = {limit_mb}",
                requested_uid,
            )
        if incoming is not None and incoming.no_room:
            return self._refuse(peer, OUT_OF_RESOURCES, self._no_room_reason(), requested_uid)
        if incoming is not None and incoming.write_error is not None:
            reason = incoming.write_error.strerror or type(incoming.write_error).__name__
            return self._refuse(peer, OUT_OF_RESOURCES, f"cannot write to the spool: {reason}", requested_uid)
        source: bytes | Path
        try:
            if incoming is None:
                assert encoded is not None
                source = encoded()
            elif incoming.in_memory:
                source = incoming.getvalue()
            else:
                source = incoming.path
            header = read_header(source)
        except InvalidUIDError as exc:
            status = INVALID_SOP_INSTANCE if exc.keyword == "SOPInstanceUID" else DATASET_DOES_NOT_MATCH_SOP_CLASS
            return self._refuse(peer, status, str(exc), requested_uid)
        except PixelDataMismatchError as exc:
            return self._refuse(peer, DATASET_DOES_NOT_MATCH_SOP_CLASS, str(exc), requested_uid, exc.tag)
        except IncompleteDatasetError as exc:
            return self._refuse(peer, CANNOT_UNDERSTAND, f"incomplete dataset: {exc}", requested_uid, exc.tag)
        except HeaderError as exc:
            return self._refuse(peer, CANNOT_UNDERSTAND, str(exc), requested_uid)
        except Exception as exc:  # pynetdicom can fail to build the file meta of garbage
            return self._refuse(
                peer,
                CANNOT_UNDERSTAND,
                f"cannot decode the dataset: {type(exc).__name__}",
                requested_uid,
            )
        problem = self._check(request, header)
        if problem is not None:
            return self._refuse(peer, problem[0], problem[1], header.sop_instance_uid)
        size = len(source) if isinstance(source, bytes) else size
        # A streamed file already takes its room on the disk.
        if not self.spool.has_room(size if isinstance(source, bytes) else 0):
            return self._refuse(peer, OUT_OF_RESOURCES, self._no_room_reason(), header.sop_instance_uid)
        calling = peer.calling
        relative = self.spool.relative_path(
            header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid
        )
        written = False
        deferred = self.deferred_index
        try:
            # Every stored instance has its file at this path (rows and files are never removed
            # apart): no file, no stored instance - the database is asked only when there is one.
            # One whose row is on its way has its journal entry.
            known = self.spool.absolute(relative).exists() and (
                self._known(header.sop_instance_uid) or self.spool.is_pending(relative)
            )
            if known:
                outcome = self.index.record(IndexEntry(header, None, size, calling))
            else:
                # The file is durable before the row exists; the row (or, deferred, the journal
                # entry made durable with the file) is what makes it "received".
                if isinstance(source, bytes):
                    self.spool.write(relative, source, journal=deferred)
                else:
                    assert incoming is not None
                    self.spool.commit(incoming, relative, journal=deferred)  # renamed, never copied
                written = True
                entry = IndexEntry(header, str(relative), size, calling)
                if deferred:
                    self._defer(peer, entry, relative)
                    return STORED
                outcome = self.index.record(entry)
        except OSError as exc:
            return self._refuse(
                peer, OUT_OF_RESOURCES, f"cannot write to the spool: {exc.strerror}", header.sop_instance_uid
            )
        except SQLAlchemyError as exc:
            logger.exception(
                "database error while recording an instance of study %s", uid_hash(header.study_instance_uid)
            )
            if written:  # not acknowledged, not recorded: leave no orphan file behind
                self.spool.absolute(relative).unlink(missing_ok=True)
            return self._refuse(
                peer, PROCESSING_FAILURE, f"database error: {type(exc).__name__}", header.sop_instance_uid
            )
        self._count(peer, "stored" if outcome is StoreOutcome.STORED else "duplicates")
        if outcome is StoreOutcome.DUPLICATE:
            logger.debug("duplicate instance of study %s kept once", uid_hash(header.study_instance_uid))
        return STORED

    # -- the deferred index write ----------------------------------------------------------

    def _defer(self, peer: Peer, entry: IndexEntry, relative: Path) -> None:
        """Have ``entry``'s row committed after Success; its journal entry goes once it is."""
        with self._settled:
            self._in_flight[peer.key] = self._in_flight.get(peer.key, 0) + 1

        def done(outcome: StoreOutcome | BaseException) -> None:
            try:
                self._indexed(peer, entry, relative, outcome)
            finally:
                with self._settled:
                    left = self._in_flight.get(peer.key, 1) - 1
                    if left > 0:
                        self._in_flight[peer.key] = left
                    else:
                        self._in_flight.pop(peer.key, None)
                    self._settled.notify_all()

        self.index.record_async(entry, done)

    def _indexed(self, peer: Peer, entry: IndexEntry, relative: Path, outcome: StoreOutcome | BaseException) -> None:
        if isinstance(outcome, BaseException):
            # Acknowledged and durable in the spool: the journal keeps it until a replay indexes it.
            logger.error(
                "an instance of study %s is stored but could not be indexed yet (%s); it is indexed "
                "from the spool's journal within %g s",
                uid_hash(entry.header.study_instance_uid),
                type(outcome).__name__,
                JOURNAL_REPLAY_SECONDS,
            )
            self._count(peer, "stored")
            return
        self.spool.settled(relative)
        self._count(peer, "stored" if outcome is StoreOutcome.STORED else "duplicates")

    def settle(self, peer: Peer, timeout: float = SETTLE_SECONDS) -> bool:
        """Wait until the rows of every instance ``peer`` stored are committed (or failed); False on time-out.

        The native upper layer calls it before it answers an A-RELEASE-RQ: a sender that released
        its association finds every instance it sent in the index.
        """
        with self._settled:
            return self._settled.wait_for(lambda: peer.key not in self._in_flight, timeout)
