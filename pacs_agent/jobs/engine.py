"""The job queue on PostgreSQL: procrastinate carries the jobs, the ``jobs`` table keeps their story.

A job row is written by the scheduler and, in the same transaction and on the same connection, a
procrastinate job ``pacs_agent.run_job(job_id=...)`` is deferred (:func:`defer`): no second source
of truth, no dual write. procrastinate then does what a home-made queue would get wrong:

- claiming: each worker fetches from the queues it takes (``[worker] queues``), woken at once by
  LISTEN/NOTIFY when a job is deferred (polling only as a fallback for jobs due later);
- one study at a time: every job of a study carries the lock ``study-<id>``, so two methods of the
  same study never run at once, on one worker or on two;
- retries with backoff: a crashed attempt, or a job that waits for a passing problem, is retried at
  the time the ``jobs`` row names (:class:`EngineRetry`);
- stalled jobs: each worker sends procrastinate's heartbeat; a worker silent for ``[jobs]
  lease_seconds`` is taken as dead and the job it held is handed back (:func:`recover_stalled`), to
  run on another worker; the ``jobs`` row counts that attempt, and after ``max_attempts`` the job is
  dead with the reason.

procrastinate's schema (``procrastinate_*`` tables and functions) lives in the node's database; it
is created by migration 0009 (:func:`apply_engine_schema`). The worker side (procrastinate's worker
running our task) is :mod:`pacs_agent.jobs.engine_worker`. Imported only on PostgreSQL.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import procrastinate
import procrastinate.schema
from sqlalchemy import Connection, make_url
from sqlalchemy.orm import Session

if TYPE_CHECKING:
    from pacs_agent.db.tables import Job

logger = logging.getLogger(__name__)

TASK_NAME = "pacs_agent.run_job"
"""The one procrastinate task: run the ``jobs`` row ``job_id``."""
ENGINE_RETRY_LIMIT = 50
"""Engine-level retries of a task whose own bookkeeping failed (the row's attempts are not touched)."""


def apply_engine_schema(bind: Connection) -> None:
    """Create procrastinate's tables and functions in the database of ``bind`` (once; migration 0009)."""
    exists = bind.exec_driver_sql("SELECT to_regclass('procrastinate_jobs')").scalar()
    if exists is not None:
        return
    raw = bind.connection.driver_connection
    assert raw is not None
    raw.execute(procrastinate.schema.SchemaManager.get_schema())  # several statements, no parameters


def conninfo(url: str) -> str:
    """A libpq connection string for procrastinate's own pool from the node's SQLAlchemy URL."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


_defer_app: procrastinate.App | None = None
_defer_lock = threading.Lock()


def _deferring_app() -> procrastinate.App:
    """An App used only to defer on a connection we hand it (its own pool is never opened)."""
    global _defer_app
    with _defer_lock:
        if _defer_app is None:
            _defer_app = procrastinate.App(connector=procrastinate.SyncPsycopgConnector())
        return _defer_app


def defer(session: Session, job: Job) -> int:
    """Defer the procrastinate job of ``job`` inside ``session``'s transaction; returns its id.

    The job goes to ``job.queue`` with the lock of its study and is due at ``job.not_before``. It
    becomes visible to workers (and their NOTIFY arrives) when the caller commits; a rollback takes
    both the row and the queue entry away.
    """
    raw = session.connection().connection.driver_connection
    job.queue_job_id = defer_on(raw, job.id, job.study_id, job.queue, job.not_before)
    return job.queue_job_id


def defer_on(raw_connection: Any, job_id: int, study_id: int, queue: str, due: datetime) -> int:
    """Defer ``run_job(job_id)`` on ``queue`` with the study's lock, in the transaction of ``raw_connection``."""
    deferrer = _deferring_app().configure_task(
        TASK_NAME, queue=queue, lock=f"study-{study_id}", schedule_at=due, connection=raw_connection
    )
    return int(deferrer.defer(job_id=job_id))


def defer_open_jobs(bind: Connection) -> int:
    """Hand the jobs not finished when the engine arrives (migration 0009) to procrastinate; returns how many.

    A job still ``running`` had a worker of the old version, which the upgrade stopped (operations
    guide: workers first): it is pending again (its attempt stays counted) and runs on a new worker.
    """
    raw = bind.connection.driver_connection
    rows = bind.exec_driver_sql(
        "SELECT id, study_id, queue, not_before FROM jobs WHERE state IN ('pending', 'running') ORDER BY id"
    ).all()
    for job_id, study_id, queue, due in rows:
        queue_job_id = defer_on(raw, job_id, study_id, queue, due)
        bind.exec_driver_sql(
            "UPDATE jobs SET state = 'pending', worker_id = NULL, queue_job_id = %(q)s WHERE id = %(id)s",
            {"q": queue_job_id, "id": job_id},
        )
    return len(rows)


@dataclass
class JobAgain(Exception):
    """The ``jobs`` row is pending again (a retry or a wait): procrastinate runs it again at ``due``."""

    due: datetime


@dataclass
class JobEnded(Exception):
    """The ``jobs`` row is ``failed`` or ``dead``: procrastinate marks its job failed, no retry."""

    state: str
    reason: str


class EngineRetry(procrastinate.BaseRetryStrategy):
    """Retries as the ``jobs`` row says: :class:`JobAgain` at its due time, :class:`JobEnded` never.

    Anything else (the task's own bookkeeping failed, e.g. the database went away before the row
    could be read) is tried again with a doubling delay, at most 5 min apart.
    """

    def get_retry_decision(self, *, exception: BaseException, job: Any) -> procrastinate.RetryDecision | None:
        """The decision for one failed run of a task."""
        if isinstance(exception, JobAgain):
            return procrastinate.RetryDecision(retry_at=exception.due)
        if isinstance(exception, JobEnded) or job.attempts >= ENGINE_RETRY_LIMIT:
            return None
        return procrastinate.RetryDecision(retry_in={"seconds": min(300, 2 ** min(job.attempts, 9))})
