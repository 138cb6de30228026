"""Query and retrieve a study from a PACS: C-FIND (study root), C-MOVE to this node or C-GET."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date

from pydicom import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # pynetdicom sets its SOP classes via globals()
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from pacs_agent import netfix  # noqa: F401  (closes sockets pynetdicom would leak)
from pacs_agent.config import Source
from pacs_agent.errors import DeliveryError
from pacs_agent.receive.header import STORAGE_SOP_CLASSES
from pacs_agent.receive.server import TRANSFER_SYNTAXES

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


def _associate(source: Source, calling_ae_title: str, timeout: float, contexts: list[str]) -> AE:
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = min(timeout, 10.0)
    for context in contexts:
        ae.add_requested_context(context)
    return ae


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
    ae = _associate(source, calling_ae_title, timeout, [StudyRootQueryRetrieveInformationModelFind])
    assoc = ae.associate(source.host, source.port, ae_title=source.ae_title)
    if not assoc.is_established:
        raise RetrieveError(f"source {source.name} ({source.host}:{source.port}) refused or did not answer the query")
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
    ae = _associate(source, calling_ae_title, timeout, [StudyRootQueryRetrieveInformationModelMove])
    assoc = ae.associate(source.host, source.port, ae_title=source.ae_title)
    if not assoc.is_established:
        raise RetrieveError(f"source {source.name} ({source.host}:{source.port}) refused or did not answer the C-MOVE")
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
    ae = _associate(source, calling_ae_title, timeout, [StudyRootQueryRetrieveInformationModelGet])
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_requested_context(sop_class, TRANSFER_SYNTAXES)
    assoc = ae.associate(
        source.host,
        source.port,
        ae_title=source.ae_title,
        ext_neg=[build_role(sop_class, scp_role=True) for sop_class in STORAGE_SOP_CLASSES],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    if not assoc.is_established:
        raise RetrieveError(f"source {source.name} ({source.host}:{source.port}) refused or did not answer the C-GET")
    try:
        return _outcome(
            source,
            "C-GET",
            assoc.send_c_get(_study_identifier(study_instance_uid), StudyRootQueryRetrieveInformationModelGet),
        )
    finally:
        if assoc.is_established:
            assoc.release()
