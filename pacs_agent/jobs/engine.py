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
is created by migration 0009 (:func:`apply_engine_schema`). Imported only on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import procrastinate
import procrastinate.schema
import procrastinate.worker
from sqlalchemy import Connection, make_url
from sqlalchemy.orm import Session

if TYPE_CHECKING:
    from pacs_agent.db.tables import Job
    from pacs_agent.jobs.worker import Worker

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
    deferrer = _deferring_app().configure_task(
        TASK_NAME,
        queue=job.queue,
        lock=f"study-{job.study_id}",
        schedule_at=job.not_before,
        connection=raw,
    )
    queue_job_id = int(deferrer.defer(job_id=job.id))
    job.queue_job_id = queue_job_id
    return queue_job_id


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


def worker_app(url: str, worker: Worker) -> procrastinate.App:
    """The procrastinate App of a worker process, with the task that runs ``jobs`` rows on ``worker``."""
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=conninfo(url)))

    def run_job(job_id: int) -> None:
        worker.run_queued_job(job_id)

    app.task(name=TASK_NAME, retry=EngineRetry())(run_job)
    return app


async def recover_stalled(app: procrastinate.App, lease_seconds: float) -> int:
    """Hand back the jobs of workers whose heartbeat stopped ``lease_seconds`` ago; returns how many."""
    stalled = await app.job_manager.get_stalled_jobs(seconds_since_heartbeat=lease_seconds)
    count = 0
    for job in stalled:
        try:
            await app.job_manager.retry_job(job)
        except Exception as exc:  # another worker handed it back first
            logger.debug("stalled job %s not handed back here: %s", job.id, exc)
            continue
        logger.warning(
            "queue job %s (pacs-agent job %s) was held by a worker silent for %g s; it runs again",
            job.id,
            job.task_kwargs.get("job_id"),
            lease_seconds,
        )
        count += 1
    return count


def run_engine_worker(url: str, worker: Worker, on_ready: Callable[[], object]) -> None:
    """Run procrastinate's worker for ``worker`` until ``worker.stop`` is set; the current jobs finish first."""
    asyncio.run(_run(url, worker, on_ready))


async def _run(url: str, worker: Worker, on_ready: Callable[[], object]) -> None:
    lease = worker.settings.jobs.lease_seconds
    app = worker_app(url, worker)
    async with app.open_async():
        engine_worker = procrastinate.worker.Worker(
            app=app,
            queues=list(worker.queues) or None,
            name=worker.worker_id,
            concurrency=worker.concurrency,
            install_signal_handlers=False,
            listen_notify=True,
            update_heartbeat_interval=max(lease / 4, 0.5),
            stalled_worker_timeout=lease,
            shutdown_graceful_timeout=None,  # SIGTERM: the jobs running finish first
        )
        running = asyncio.create_task(engine_worker.run(), name="procrastinate worker")
        while engine_worker.worker_id is None and not running.done():
            await asyncio.sleep(0.05)
        if running.done():
            await running  # raises what stopped it
        worker.registered(queue_worker_id=engine_worker.worker_id)
        on_ready()
        stop = asyncio.create_task(asyncio.to_thread(worker.stop.wait), name="stop")
        period = max(lease / 4, 0.5)
        while not running.done() and not stop.done():
            try:
                await recover_stalled(app, lease)
            except Exception:
                logger.exception("looking for stalled jobs failed; trying again")
            worker.beat_idle()
            if not worker.parent_alive():
                logger.warning("worker %s: the pacs-agent serve that started it is gone; stopping", worker.worker_id)
                break
            await asyncio.wait({running, stop}, timeout=period, return_when=asyncio.FIRST_COMPLETED)
        engine_worker.stop()
        worker.stop.set()
        await running
        await stop
