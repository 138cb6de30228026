"""Database tables: instances, series, studies, jobs, results, deliveries, events, console users.

The schema is created and upgraded by Alembic (``pacs_agent/migrations``); these classes are the
single description of it. Times are timezone-aware UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import ClassVar

from sqlalchemy import (
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

UID = String(64)


class UTCDateTime(TypeDecorator[datetime]):
    """A DateTime that is always stored and returned as aware UTC (SQLite keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: object) -> datetime | None:
        """Refuse naive datetimes; store UTC."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database; use datetime.now(UTC)")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: object) -> datetime | None:
        """Return aware UTC whatever the driver gives back."""
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    """Return the current time as aware UTC."""
    return datetime.now(UTC)


class StudyState(StrEnum):
    """``studies.state``; the transitions live in ``studies/`` (readiness, scheduler) and ``jobs/queue.py``."""

    RECEIVING = "receiving"
    """Instances arriving, or the quiet period running."""
    INCOMPLETE = "incomplete"
    """Quiet, but nothing can be processed (``state_reason`` says why)."""
    QUEUED = "queued"
    """A job is scheduled (or the study waits for its baseline)."""
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"


class JobState(StrEnum):
    """``jobs.state``; the transitions live in ``jobs/queue.py``."""

    PENDING = "pending"
    """Due at ``not_before``; also a job that waits for a passing problem (``wait_reason`` says which)."""
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    """The input cannot be processed (not retried automatically)."""
    DEAD = "dead"
    """Crashed ``max_attempts`` times."""


class DeliveryState(StrEnum):
    """``deliveries.state``; the transitions live in ``send/outbox.py``."""

    PENDING = "pending"
    DONE = "done"
    DEAD = "dead"
    """Given up after ``[delivery] max_age_hours`` (``pacs-agent send retry`` requeues it)."""


class PairingState(StrEnum):
    """``pairings.state``; the transitions live in ``routing/pairing.py`` and ``routing/agent.py``."""

    QUERY = "query"
    RETRIEVING = "retrieving"
    PAIRED = "paired"
    NONE = "none"
    FAILED = "failed"


class Base(DeclarativeBase):
    """Declarative base of all tables."""

    __table__: ClassVar[Table]
    """Every model maps one Table (SQLAlchemy types it as any FromClause, which may be a join)."""


class Study(Base):
    """A DICOM study as seen by the node, with its readiness state.

    States: ``receiving`` (instances arriving or quiet period running), ``incomplete`` (quiet but
    not processable: the reason says why), ``queued`` (a job is scheduled), ``processing``,
    ``done``, ``failed``.
    """

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    issuer_of_patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_birth_date: Mapped[str | None] = mapped_column(String(8))
    patient_sex: Mapped[str | None] = mapped_column(String(16))
    study_date: Mapped[str | None] = mapped_column(String(8))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    study_description: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default="receiving")
    state_reason: Mapped[str | None] = mapped_column(Text)
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    evaluated_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    """When readiness was last decided; the study is re-evaluated when an instance arrives later."""
    series_notes: Mapped[str | None] = mapped_column(Text)
    """JSON list of {series, role, reason}: why each series was chosen or skipped."""
    ct_series_instance_uid: Mapped[str | None] = mapped_column(UID)
    """The CT series chosen by the last "ready" decision (None until the study was ready)."""
    segmentation_sop_instance_uid: Mapped[str | None] = mapped_column(UID)
    """The segmentation chosen with it."""
    method_notes: Mapped[str | None] = mapped_column(Text)
    """JSON list of {method, reason}: enabled methods that do not apply to this study."""
    structure_notes: Mapped[str | None] = mapped_column(Text)
    """JSON list of {segmentation, number, label, role, reason, organ}: which structures are tumours and why."""
    input_warnings: Mapped[str | None] = mapped_column(Text)
    """JSON list of texts: problems of the input that did not stop processing (e.g. stale references)."""

    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    """A series of a study."""

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_description: Mapped[str | None] = mapped_column(String(64))
    frame_of_reference_uid: Mapped[str | None] = mapped_column(UID)
    protocol_name: Mapped[str | None] = mapped_column(String(64))
    image_comments: Mapped[str | None] = mapped_column(String(256))
    contrast_bolus_agent: Mapped[str | None] = mapped_column(String(64))
    contrast_start_time: Mapped[str | None] = mapped_column(String(16))
    acquisition_time: Mapped[str | None] = mapped_column(String(16))
    body_part_examined: Mapped[str | None] = mapped_column(String(16))
    image_orientation: Mapped[str | None] = mapped_column(String(200))
    """Image Orientation (Patient) of the first instance, backslash-separated (images only)."""

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    """A received SOP instance, durably in the spool at ``path`` (relative to the spool dir)."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(String(512))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    referenced_series_uids: Mapped[str] = mapped_column(Text, default="")
    """Space-separated series UIDs a SEG / RTSTRUCT refers to (empty for images)."""
    referenced_instance_uids: Mapped[str] = mapped_column(Text, default="")
    """Space-separated SOP Instance UIDs of the images a SEG / RTSTRUCT was drawn on."""
    calling_ae_title: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    duplicates: Mapped[int] = mapped_column(Integer, default=0)
    """How many more times the same SOP Instance UID was received (kept once)."""
    image_position: Mapped[str | None] = mapped_column(String(100))
    """Image Position (Patient), backslash-separated (single-frame images only)."""
    segmentation_summary: Mapped[str | None] = mapped_column(Text)
    """SEG / RTSTRUCT: its structures and planes as JSON (:class:`inference.structures.SegmentationSummary`),
    read from the stored file when the study is first evaluated; ``{"error": ...}`` when it cannot be read."""

    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    """A processing job: one method on one study.

    States: ``pending`` -> ``running`` -> ``done``; ``failed`` when the input cannot be processed
    (not retried automatically); ``dead`` after ``max_attempts`` crashes or unexpected errors. A
    passing problem (disk full, spool or database away) puts a running job back to ``pending`` with
    ``wait_reason`` and no attempt spent.
    """

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_state_not_before", "state", "not_before"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    method: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16), default="pending")
    inputs: Mapped[str] = mapped_column(Text)
    """JSON: the CT series UID and segmentation SOP instance UID chosen by readiness."""
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    not_before: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    worker_id: Mapped[str | None] = mapped_column(String(128))
    last_error: Mapped[str | None] = mapped_column(Text)
    """One line (``ValueError: ... (log ref 3f2a9c)``); the traceback is in the log under that reference."""
    waits: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """How many times in a row the job went back to wait for a passing problem (the backoff grows with it)."""
    wait_reason: Mapped[str | None] = mapped_column(Text)
    """While the job waits: why, in one line (e.g. ``disk full writing results (free 12 MB < watermark 1024 MB)``)."""
    queue: Mapped[str] = mapped_column(String(32), default="default", server_default="default")
    """The queue the job goes to (``[jobs.queues]``: e.g. ``gpu``); only workers that take this queue run it."""
    queue_job_id: Mapped[int | None] = mapped_column(BigInteger)
    """PostgreSQL: the id of the procrastinate job that carries this job (the latest, after a retry); None on SQLite."""


class Pairing(Base):
    """The search for the baseline of a follow-up study (8-week response method).

    States: ``query`` (no local baseline; the sources are to be asked), ``retrieving`` (a
    baseline was asked for; waiting for it to arrive and become ready), ``paired`` (a response
    job exists), ``none`` (no baseline in the window anywhere; re-opened when one arrives),
    ``failed`` (retrieval failed; ``reason`` says why).
    """

    __tablename__ = "pairings"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    followup_study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), unique=True)
    baseline_study_instance_uid: Mapped[str | None] = mapped_column(UID)
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="")
    source: Mapped[str | None] = mapped_column(String(64))
    """Where the baseline was found: ``local`` or a ``[[sources]]`` name."""
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    deadline: Mapped[datetime | None] = mapped_column(UTCDateTime)
    """While ``retrieving``: when to give up waiting for the baseline."""


class Result(Base):
    """A DICOM object produced by a job, stored under the results dir at ``path``."""

    __tablename__ = "results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    """``sr`` or ``sc``."""
    method: Mapped[str] = mapped_column(String(32))
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_instance_uid: Mapped[str] = mapped_column(UID)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(String(512))
    algorithm_name: Mapped[str] = mapped_column(String(64))
    algorithm_version: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Delivery(Base):
    """The outbox: one row per (result, destination).

    States: ``pending`` (waiting for ``next_attempt_at``), ``done``, ``dead`` (gave up; reason in
    ``last_error``).
    """

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("result_id", "destination"),
        Index("ix_deliveries_state_next", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id"))
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)


class Event(Base):
    """Audit trail: associations, stores, rejections, jobs and sends, with UIDs and AE titles only."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    level: Mapped[str] = mapped_column(String(8), default="INFO")
    study_instance_uid: Mapped[str | None] = mapped_column(UID)
    sop_instance_uid: Mapped[str | None] = mapped_column(UID)
    job_id: Mapped[int | None] = mapped_column(Integer)
    ae_title: Mapped[str | None] = mapped_column(String(16))
    peer: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[int | None] = mapped_column(Integer)
    detail: Mapped[str | None] = mapped_column(Text)
    duration_seconds: Mapped[float | None] = mapped_column(Float)


class WorkerProcess(Base):
    """A ``pacs-agent worker`` process, on this host or another: where it runs, what it takes, its liveness.

    ``heartbeat_at`` is written by the in-process queue (SQLite); on PostgreSQL the liveness is
    procrastinate's own worker heartbeat (``procrastinate_workers.last_heartbeat``, row
    ``queue_worker_id``). ``state``: ``running`` or ``stopped``.
    """

    __tablename__ = "workers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    """``host:pid``, as recorded in ``jobs.worker_id``."""
    host: Mapped[str] = mapped_column(String(128))
    pid: Mapped[int] = mapped_column(Integer)
    device: Mapped[str] = mapped_column(String(32))
    """``cpu`` or ``cuda:N``: where the models of this worker run."""
    queues: Mapped[str] = mapped_column(Text)
    """Space-separated queue names it takes (``*``: every queue)."""
    concurrency: Mapped[int] = mapped_column(Integer)
    backend: Mapped[str] = mapped_column(String(16))
    """``sqlite`` (the in-process queue) or ``procrastinate`` (PostgreSQL)."""
    queue_worker_id: Mapped[int | None] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(16), default="running")
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    current_job_id: Mapped[int | None] = mapped_column(Integer)


class ConsoleRole(StrEnum):
    """What a console user may do: ``viewer`` looks, ``operator`` also acts, ``admin`` too (and more later)."""

    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"


class ConsoleUser(Base):
    """A local user of the web console (``pacs-agent console user add``); the password as an argon2 hash."""

    __tablename__ = "console_users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_login_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    password_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    """Set for a one-time password: refused after this time, and replaced by the user's own at first login."""


class NodeFlag(Base):
    """A node-wide switch kept in the database (so every process and a restart see it), e.g. ``paused``."""

    __tablename__ = "node_flags"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    set_by: Mapped[str] = mapped_column(String(128))
    set_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
