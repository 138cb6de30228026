"""Recording received instances: grouping by Study / Series Instance UID.

One short transaction per instance, or per group of concurrent instances. Inserts that may race
between associations use the database's "insert or ignore" so two senders of the same study never
collide.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import MutableMapping, Sequence
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import Connection, Insert, Table, bindparam, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from pacs_agent.audit import record_event
from pacs_agent.db.tables import Instance, Job, JobState, Series, Study, StudyState, utcnow
from pacs_agent.jobs.queue import RetryRefused
from pacs_agent.receive.header import InstanceHeader


class StoreOutcome(enum.Enum):
    """What recording an instance did."""

    STORED = "stored"
    DUPLICATE = "duplicate"


Executor = Session | Connection
"""Both run the statements; the receive hot path uses a bare Connection (no ORM unit of work)."""


def _dialect(executor: Executor) -> str:
    bind = executor.get_bind() if isinstance(executor, Session) else executor
    return bind.dialect.name


@functools.cache
def _insert_ignore_statement(dialect: str, table: Table, columns: tuple[str, ...], returning: str = "id") -> Insert:
    """INSERT .. ON CONFLICT DO NOTHING RETURNING ``returning`` with one bound parameter per column.

    Built once per dialect and table: the statement's compiled form is then cached by SQLAlchemy,
    so an instance costs an execution, not a statement construction and compilation.
    """
    values = {name: bindparam(name, type_=table.c[name].type) for name in columns}
    stmt: postgresql.Insert | sqlite.Insert
    if dialect == "postgresql":
        stmt = postgresql.insert(table).values(values).on_conflict_do_nothing()
    elif dialect == "sqlite":
        stmt = sqlite.insert(table).values(values).on_conflict_do_nothing()
    else:  # pragma: no cover - only SQLite and PostgreSQL are supported
        raise RuntimeError(f"unsupported database dialect {dialect}")
    # RETURNING, not rowcount: psycopg reports -1 for INSERT .. ON CONFLICT with returning ids.
    return stmt.returning(table.c[returning])


def _insert_ignore(executor: Executor, model: type[Any], values: dict[str, Any]) -> bool:
    """INSERT that does nothing when a unique key already exists; True when a row was added."""
    stmt = _insert_ignore_statement(_dialect(executor), model.__table__, tuple(values))
    return executor.execute(stmt, values).first() is not None


_KNOWN_INSTANCE = select(Instance.id).where(Instance.sop_instance_uid == bindparam("uid"))
_COUNT_DUPLICATE = (
    update(Instance).where(Instance.sop_instance_uid == bindparam("uid")).values(duplicates=Instance.duplicates + 1)
)
_STUDY_RECEIVING = (
    update(Study)
    .where(Study.id == bindparam("study_id"))
    .values(
        last_received_at=bindparam("now", type_=Study.__table__.c.last_received_at.type),
        state=StudyState.RECEIVING,
        state_reason=None,
    )
)


def is_known_instance(executor: Executor, sop_instance_uid: str) -> bool:
    """True when an instance with this SOP Instance UID is already stored."""
    return executor.execute(_KNOWN_INSTANCE, {"uid": sop_instance_uid}).first() is not None


def count_duplicate(executor: Executor, sop_instance_uid: str) -> None:
    """Count one more receipt of an instance that is already stored."""
    executor.execute(_COUNT_DUPLICATE, {"uid": sop_instance_uid})


def record_instance(
    session: Executor,
    header: InstanceHeader,
    *,
    path: str,
    size_bytes: int,
    calling_ae_title: str | None,
    now: datetime | None = None,
    series_ids: MutableMapping[str, tuple[int, int]] | None = None,
) -> StoreOutcome:
    """Record a durably spooled instance and (re)open its study; the caller commits.

    A study that was already processed goes back to ``receiving``: the readiness check sees an
    instance newer than its last evaluation and schedules new jobs after the quiet period.
    ``series_ids`` caches Series Instance UID -> (study id, series id) across calls, so the
    instances of a series after the first skip the study and series look-ups (rows are never
    deleted, so a cached id stays valid).
    """
    [outcome] = record_instances(
        session, [NewInstance(header, path, size_bytes, calling_ae_title)], now=now, series_ids=series_ids
    )
    return outcome


class NewInstance(NamedTuple):
    """One durably spooled instance to record (:func:`record_instances`)."""

    header: InstanceHeader
    path: str
    size_bytes: int
    calling_ae_title: str | None


def record_instances(
    session: Executor,
    instances: Sequence[NewInstance],
    *,
    now: datetime | None = None,
    series_ids: MutableMapping[str, tuple[int, int]] | None = None,
) -> list[StoreOutcome]:
    """Record several durably spooled instances at once (:func:`record_instance` for each); the caller commits.

    One INSERT for all their rows and one UPDATE per study, whatever their number (the group
    committer writes concurrent associations' instances so). An instance whose SOP Instance UID
    is recorded already - or earlier in ``instances`` - is counted as a duplicate. Returns one
    outcome per instance, in order.
    """
    if not instances:
        return []
    now = now or utcnow()
    rows = []
    study_ids = []
    for item in instances:
        header = item.header
        cached = series_ids.get(header.series_instance_uid) if series_ids is not None else None
        if cached is None:
            cached = _study_and_series(session, header, now)
            if series_ids is not None:
                series_ids[header.series_instance_uid] = cached
        study_ids.append(cached[0])
        rows.append(
            {
                "series_id": cached[1],
                "sop_instance_uid": header.sop_instance_uid,
                "sop_class_uid": header.sop_class_uid,
                "transfer_syntax_uid": header.transfer_syntax_uid,
                "path": item.path,
                "size_bytes": item.size_bytes,
                "referenced_series_uids": " ".join(header.referenced_series_uids),
                "referenced_instance_uids": " ".join(header.referenced_instance_uids),
                "calling_ae_title": item.calling_ae_title,
                "received_at": now,
                "duplicates": 0,
                "image_position": header.image_position,
            }
        )
    statement = _insert_ignore_statement(_dialect(session), Instance.__table__, tuple(rows[0]), "sop_instance_uid")
    # One row: one execution; several: one executemany, which SQLAlchemy sends as one
    # INSERT .. VALUES (..), (..) .. RETURNING ("insertmanyvalues").
    inserted = {uid for (uid,) in session.execute(statement, rows[0] if len(rows) == 1 else rows)}
    outcomes = []
    studies: dict[int, None] = {}  # ordered: the UPDATEs run in the order the studies came
    for item, study_id in zip(instances, study_ids, strict=True):
        uid = item.header.sop_instance_uid
        if uid in inserted:
            inserted.discard(uid)  # a second copy in the same group is a duplicate
            outcomes.append(StoreOutcome.STORED)
            studies[study_id] = None
        else:
            count_duplicate(session, uid)
            outcomes.append(StoreOutcome.DUPLICATE)
    for study_id in studies:  # one by one: a list of parameters is an ORM bulk UPDATE for a Session
        session.execute(_STUDY_RECEIVING, {"study_id": study_id, "now": now})
    return outcomes


def _study_and_series(session: Executor, header: InstanceHeader, now: datetime) -> tuple[int, int]:
    """Insert the study and series of ``header`` unless they exist; return their ids."""
    _insert_ignore(
        session,
        Study,
        {
            "study_instance_uid": header.study_instance_uid,
            "patient_id": header.patient_id,
            "issuer_of_patient_id": header.issuer_of_patient_id,
            "patient_birth_date": header.patient_birth_date,
            "patient_sex": header.patient_sex,
            "study_date": header.study_date,
            "accession_number": header.accession_number,
            "study_description": header.study_description,
            "state": StudyState.RECEIVING,
            "first_received_at": now,
            "last_received_at": now,
        },
    )
    study_id = session.execute(
        select(Study.id).where(Study.study_instance_uid == header.study_instance_uid)
    ).scalar_one()
    _insert_ignore(
        session,
        Series,
        {
            "study_id": study_id,
            "series_instance_uid": header.series_instance_uid,
            "modality": header.modality,
            "series_description": header.series_description,
            "frame_of_reference_uid": header.frame_of_reference_uid,
            "protocol_name": header.protocol_name,
            "image_comments": header.image_comments,
            "contrast_bolus_agent": header.contrast_bolus_agent,
            "contrast_start_time": header.contrast_start_time,
            "acquisition_time": header.acquisition_time,
            "body_part_examined": header.body_part_examined,
            "image_orientation": header.image_orientation,
        },
    )
    series_id = session.execute(
        select(Series.id).where(Series.series_instance_uid == header.series_instance_uid)
    ).scalar_one()
    return study_id, series_id


def retry_study(session: Session, study_instance_uid: str, *, operator: str) -> str:
    """Have the receiver evaluate a study again at its next pass, which schedules new jobs.

    Returns
    -------
    str
        What was done, for the terminal.

    Raises
    ------
    RetryRefused
        Unknown study, or a study with a job pending or running (it would be processed twice).
    """
    study = session.execute(select(Study).where(Study.study_instance_uid == study_instance_uid)).scalar_one_or_none()
    if study is None:
        raise RetryRefused(f"there is no study {study_instance_uid} (pacs-agent status lists the recent ones)")
    active = session.execute(
        select(Job.id, Job.state)
        .where(Job.study_id == study.id, Job.state.in_([JobState.PENDING, JobState.RUNNING]))
        .order_by(Job.id)
    ).first()
    if active is not None:
        raise RetryRefused(f"job {active[0]} of this study is {active[1]}; wait until it ends, then retry")
    previous = study.state
    study.evaluated_at = None
    study.state_reason = f"evaluation requested by {operator} (was {previous})"
    record_event(
        session,
        "study_retry_requested",
        study_instance_uid=study.study_instance_uid,
        detail=f"by {operator}: evaluate again (was {previous}); new jobs follow when it is ready",
        log=False,
    )
    return (
        f"study {study_instance_uid} (was {previous}) will be evaluated again within seconds by the running "
        "receiver (pacs-agent scp/serve); follow it with pacs-agent status"
    )
