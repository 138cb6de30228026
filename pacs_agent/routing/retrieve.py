"""Query and retrieve a study from a PACS: C-FIND (study root), C-MOVE to this node or C-GET.

A source with ``tls = true`` is reached over DICOM TLS (:func:`pacs_agent.tls.client_context`,
the same checks as a destination's). Every failure to open an association raises
:class:`RetrieveError` with the reason in words: TLS handshake refused (and why), association
rejected, connection closed without an answer (a hint at TLS when the source is configured without
it), or no connection at all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any

from pydicom import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # pynetdicom sets its SOP classes via globals()
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from pacs_agent import netfix  # noqa: F401  (closes sockets pynetdicom would leak)
from pacs_agent.config import Source
from pacs_agent.errors import ConfigError, DeliveryError
from pacs_agent.receive.header import STORAGE_SOP_CLASSES
from pacs_agent.receive.server import TRANSFER_SYNTAXES
from pacs_agent.tls import RecordingContext, client_context, describe_tls_error

logger = logging.getLogger(__name__)

PENDING = (0xFF00, 0xFF01)


class RetrieveError(DeliveryError):
    """A source could not be queried or did not deliver the study."""


@dataclass(frozen=True)
class RemoteStudy:
    """One study-level C-FIND match."""

    study_instance_uid: str
    study_date: str | None
    patient_birth_date: str | None
    patient_sex: str | None
    modalities: tuple[str, ...]


@dataclass(frozen=True)
class RetrieveOutcome:
    """Sub-operation counts of a C-MOVE / C-GET."""

    completed: int
    failed: int
    warning: int


def _associate(
    source: Source,
    what: str,
    *,
    calling_ae_title: str,
    timeout: float,
    contexts: Sequence[str],
    storage_contexts: Iterable[str] = (),
    ext_neg: list[Any] | None = None,
    evt_handlers: list[Any] | None = None,
) -> Association:
    """An established association to ``source`` (over TLS when ``source.tls``) for ``what`` (e.g. ``C-FIND``).

    Raises
    ------
    RetrieveError
        The association could not be established; the message says why.
    """
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = min(timeout, 10.0)
    for context in contexts:
        ae.add_requested_context(context)
    for sop_class in storage_contexts:
        ae.add_requested_context(sop_class, TRANSFER_SYNTAXES)
    where = f"source {source.name} ({source.host}:{source.port})"
    tls: RecordingContext | None = None
    if source.tls:
        try:  # built per association: renewed certificate files are used without a restart
            tls = client_context(source)
        except ConfigError as exc:
            raise RetrieveError(f"{where}: {what} not attempted: TLS configuration: {'; '.join(exc.problems)}") from exc
    connected: list[bool] = []  # pynetdicom reports a refused TCP connection as an abort: tell them apart
    assoc = ae.associate(
        source.host,
        source.port,
        ae_title=source.ae_title,
        ext_neg=ext_neg,
        evt_handlers=[*(evt_handlers or []), (evt.EVT_CONN_OPEN, lambda _event: connected.append(True))],
        tls_args=(tls, source.host) if tls is not None else None,
    )
    if assoc.is_established:
        return assoc
    if tls is not None and tls.last_error is not None:
        reason = f"TLS handshake failed: {describe_tls_error(tls.last_error)}"
    elif assoc.is_rejected:
        reason = (
            f"rejected the association (does it know this node's AE title {calling_ae_title} and "
            f"its own AE title {source.ae_title}?)"
        )
    elif connected and not source.tls:
        reason = (
            "closed the connection without answering the association request "
            "(if it accepts only DICOM TLS, set tls = true for this source)"
        )
    elif connected:
        reason = "aborted the association"
    else:
        reason = "cannot connect"
    raise RetrieveError(f"{where}: {what} failed: {reason}")


def find_studies(
    source: Source,
    *,
    calling_ae_title: str,
    patient_id: str,
    issuer_of_patient_id: str | None,
    dates: tuple[date, date],
    timeout: float = 30.0,
) -> list[RemoteStudy]:
    """C-FIND at study level for the CT studies of a patient within ``dates``.

    Raises
    ------
    RetrieveError
        The source refused the association or the query, or did not answer.
    """
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.PatientID = patient_id
    if issuer_of_patient_id:
        query.IssuerOfPatientID = issuer_of_patient_id
    query.StudyDate = f"{dates[0]:%Y%m%d}-{dates[1]:%Y%m%d}"
    query.ModalitiesInStudy = "CT"
    query.StudyInstanceUID = ""
    query.PatientBirthDate = ""
    query.PatientSex = ""
    assoc = _associate(
        source,
        "C-FIND",
        calling_ae_title=calling_ae_title,
        timeout=timeout,
        contexts=[StudyRootQueryRetrieveInformationModelFind],
    )
    found: list[RemoteStudy] = []
    try:
        for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            code = int(status.Status) if status is not None and "Status" in status else None
            if code is None:
                raise RetrieveError(f"source {source.name} stopped answering the query")
            if code in PENDING and identifier is not None:
                modalities = identifier.get("ModalitiesInStudy", "")
                values = tuple(str(m) for m in modalities) if not isinstance(modalities, str) else (modalities,)
                if values and values != ("",) and "CT" not in values:
                    continue  # a source that ignores the ModalitiesInStudy key
                found.append(
                    RemoteStudy(
                        study_instance_uid=str(identifier.get("StudyInstanceUID", "")),
                        study_date=str(identifier.get("StudyDate", "")) or None,
                        patient_birth_date=str(identifier.get("PatientBirthDate", "")) or None,
                        patient_sex=str(identifier.get("PatientSex", "")) or None,
                        modalities=values,
                    )
                )
            elif code != 0x0000:
                raise RetrieveError(f"source {source.name} answered the query with status 0x{code:04X}")
    finally:
        if assoc.is_established:
            assoc.release()
    return [study for study in found if study.study_instance_uid]


def _outcome(source: Source, what: str, responses: Iterator[tuple[Dataset, Dataset | None]]) -> RetrieveOutcome:
    last = None
    for status, _identifier in responses:
        if status is None or "Status" not in status:
            raise RetrieveError(f"source {source.name} stopped answering the {what}")
        last = status
    if last is None:
        raise RetrieveError(f"source {source.name} sent no response to the {what}")
    code = int(last.Status)
    outcome = RetrieveOutcome(
        completed=int(last.get("NumberOfCompletedSuboperations", 0) or 0),
        failed=int(last.get("NumberOfFailedSuboperations", 0) or 0),
        warning=int(last.get("NumberOfWarningSuboperations", 0) or 0),
    )
    if code not in (0x0000, 0xB000):
        hint = " (does the source know this node's AE title as a move destination?)" if code == 0xA801 else ""
        raise RetrieveError(f"source {source.name} answered the {what} with status 0x{code:04X}{hint}")
    return outcome


def _study_identifier(study_instance_uid: str) -> Dataset:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_instance_uid
    return identifier


def move_study(
    source: Source, study_instance_uid: str, *, calling_ae_title: str, destination_ae_title: str, timeout: float = 600.0
) -> RetrieveOutcome:
    """C-MOVE a study to ``destination_ae_title`` (normally this node); blocks until it is done."""
    assoc = _associate(
        source,
        "C-MOVE",
        calling_ae_title=calling_ae_title,
        timeout=timeout,
        contexts=[StudyRootQueryRetrieveInformationModelMove],
    )
    try:
        return _outcome(
            source,
            "C-MOVE",
            assoc.send_c_move(
                _study_identifier(study_instance_uid), destination_ae_title, StudyRootQueryRetrieveInformationModelMove
            ),
        )
    finally:
        if assoc.is_established:
            assoc.release()


def get_study(
    source: Source,
    study_instance_uid: str,
    *,
    calling_ae_title: str,
    on_store: Callable[[evt.Event], int],
    timeout: float = 600.0,
) -> RetrieveOutcome:
    """C-GET a study; every instance goes through ``on_store`` (the node's C-STORE handler)."""
    assoc = _associate(
        source,
        "C-GET",
        calling_ae_title=calling_ae_title,
        timeout=timeout,
        contexts=[StudyRootQueryRetrieveInformationModelGet],
        storage_contexts=STORAGE_SOP_CLASSES,
        ext_neg=[build_role(sop_class, scp_role=True) for sop_class in STORAGE_SOP_CLASSES],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    try:
        return _outcome(
            source,
            "C-GET",
            assoc.send_c_get(_study_identifier(study_instance_uid), StudyRootQueryRetrieveInformationModelGet),
        )
    finally:
        if assoc.is_established:
            assoc.release()
