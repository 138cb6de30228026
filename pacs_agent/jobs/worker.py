"""The worker process: takes jobs, runs them, records the outcome; survives bad input.

Jobs come from the database's job queue (:mod:`pacs_agent.jobs.backend`): the in-process queue on
SQLite (this module claims rows itself), procrastinate on PostgreSQL (its worker hands each job to
:meth:`Worker.run_queued_job`). A worker takes the queues of ``[worker] queues`` (or ``pacs-agent
worker --queue``), runs ``[worker] concurrency`` jobs at once, and records itself in the
``workers`` table (host, device, queues; heartbeat) for ``pacs-agent status`` and ``/metrics``.

SIGTERM lets the current job finish and then exits 0. A job whose pipeline raises
:class:`InputError` fails at once with the reason; a passing problem (disk full, spool or database
away: :func:`pacs_agent.jobs.transient.wait_reason`) makes it wait without spending an attempt;
any other exception is retried (bounded) and then the job is dead. Reasons are one line; a crash's
traceback goes to the log under the ``log ref`` its reason names. If the process itself dies, its
heartbeat stops and the job runs again on another worker (SQLite: the lease runs out; PostgreSQL:
procrastinate's stalled-job recovery).

The worker owns one study loader (:class:`inference.pipelines.study.StudyLoader`): the jobs of a
study follow each other, each gets the study as the first one loaded it, and the loader forgets it
when the study has no job left to run (or the queue is empty).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select, update

from pacs_agent.config import Settings
from pacs_agent.db import Database
from pacs_agent.db.tables import JobState, WorkerProcess, utcnow
from pacs_agent.errors import InputError
from pacs_agent.health import WorkerHeartbeat
from pacs_agent.jobs import queue
from pacs_agent.jobs.backend import JobQueue, backend_for
from pacs_agent.jobs.queue import ClaimedJob
from pacs_agent.jobs.transient import error_ref, flatten, one_line, wait_reason
from pacs_agent.pause import current_pause

if TYPE_CHECKING:
    from inference.pipelines.study import StudyLoader

logger = logging.getLogger(__name__)


WORKER_BEAT_SECONDS = 5.0
"""How often the in-process queue (SQLite) refreshes ``workers.heartbeat_at``."""

PAUSE_RECHECK_SECONDS = 10.0
"""While processing is paused, a job the queue engine hands a worker is handed back for this long."""


@dataclass(frozen=True)
class Outcome:
    """What became of one run of a job: its new state and, when pending again, when it is due."""

    state: str
    due: datetime | None = None
    reason: str | None = None


class Worker:
    """Runs jobs from the queue until told to stop.

    Parameters
    ----------
    settings, db
        The node's settings and database.
    poll_seconds
        In-process queue: how long to sleep when no job is due.
    queues
        Queues to take (overrides ``[worker] queues``); empty: every queue.
    device
        ``cpu`` or ``cuda:N`` where the models run (:func:`resolve_device`); recorded for status.
    """

    def __init__(
        self,
        settings: Settings,
        db: Database,
        *,
        poll_seconds: float = 0.5,
        queues: tuple[str, ...] | None = None,
        device: str = "cpu",
    ) -> None:
        self.settings = settings
        self.db = db
        self.poll_seconds = poll_seconds
        self.queues: tuple[str, ...] = settings.worker.queues if queues is None else queues
        self.concurrency = settings.worker.concurrency
        self.device = device
        self.backend: JobQueue = backend_for(db.url)
        self.worker_id = queue.worker_identity()
        self.stop = threading.Event()
        self.heartbeat = WorkerHeartbeat(settings.storage.state_dir, self.worker_id)
        """Heartbeat file read by ``/healthz``; its :meth:`~WorkerHeartbeat.beat` time is our liveness."""
        self.on_status: Callable[[str], object] = lambda _text: None
        """Told what the worker does (``pacs-agent worker`` forwards it to systemd as STATUS)."""
        self.parent_alive: Callable[[], bool] = lambda: True
        """Checked between jobs; False (the ``serve`` that started this worker is gone) stops the loop."""
        self._local = threading.local()
        self._row_id: int | None = None
        self._row_beat = -float("inf")

    @property
    def loader(self) -> StudyLoader:
        """The study loader of the calling thread (created on its first job: it imports the imaging stack).

        One per job thread (``[worker] concurrency``): the loaded studies are not shared.
        """
        loader: StudyLoader | None = getattr(self._local, "loader", None)
        if loader is None:
            from inference.pipelines.study import StudyLoader  # heavy imports live in the worker only

            loader = self._local.loader = StudyLoader()
        return loader

    def forget_studies(self) -> None:
        """Drop the studies this thread's loader keeps (nothing was loaded: nothing to do)."""
        loader: StudyLoader | None = getattr(self._local, "loader", None)
        if loader is not None:
            loader.forget()

    # -- the workers table ---------------------------------------------------------------------

    def _register(self) -> None:
        """Record this process in ``workers`` (host, device, queues), replacing a row of the same name."""
        now = utcnow()
        with self.db.session() as session, session.begin():
            query = select(WorkerProcess).where(WorkerProcess.name == self.worker_id)
            row = session.execute(query).scalar_one_or_none()
            if row is None:
                row = WorkerProcess(name=self.worker_id)
                session.add(row)
            row.host, row.pid = socket.gethostname(), os.getpid()
            row.device, row.queues = self.device, " ".join(self.queues) or "*"
            row.concurrency, row.backend = self.concurrency, self.backend.name
            row.state, row.started_at, row.heartbeat_at = "running", now, now
            row.stopped_at, row.current_job_id, row.queue_worker_id = None, None, None
            session.flush()
            self._row_id = row.id

    def registered(self, *, queue_worker_id: int | None) -> None:
        """The queue engine registered this worker as ``queue_worker_id`` (its heartbeat row)."""
        self._update_row(queue_worker_id=queue_worker_id)

    def _update_row(self, **values: object) -> None:
        if self._row_id is None:
            return
        try:
            with self.db.session() as session, session.begin():
                session.execute(update(WorkerProcess).where(WorkerProcess.id == self._row_id).values(**values))
        except Exception as exc:  # the database away: the row catches up with the next update
            logger.warning("cannot update the workers row of %s: %s", self.worker_id, flatten(str(exc)))

    def warm_up(self) -> None:
        """Import the job pipeline (inference, dicom_sr, pyradiomics) now rather than inside the first job.

        Queue engine (several workers): a worker registers only once warm, so that a job never waits
        for a cold worker's imports while a warm one is idle.
        """
        import pacs_agent.jobs.execute  # noqa: F401  # heavy imports live in the worker only

    def beat_idle(self) -> None:
        """Liveness while waiting for jobs: the heartbeat file; on SQLite also ``workers.heartbeat_at``."""
        self.heartbeat.beat("idle")
        now = time.monotonic()
        if self.backend.job_leases and now - self._row_beat >= WORKER_BEAT_SECONDS:
            self._row_beat = now
            self._update_row(heartbeat_at=utcnow())

    def _heartbeat(self, job_id: int, done: threading.Event) -> None:
        interval = max(self.settings.jobs.lease_seconds / 4, 0.5)
        while not done.wait(interval):
            try:
                with self.db.session() as session, session.begin():
                    queue.heartbeat(session, job_id, self.worker_id)
            except Exception:
                logger.exception("heartbeat of job %d failed", job_id)
            self.heartbeat.beat(f"job {job_id}")
            self._update_row(heartbeat_at=utcnow())  # the workers row: alive while a long job runs

    def run_one(self) -> bool:
        """In-process queue: claim and run one job of our queues; False when there was none (or paused)."""
        with self.db.session() as session, session.begin():
            if current_pause(session) is not None:  # pacs-agent pause: no new job starts
                return False
            job = queue.claim_next(session, self.worker_id, queues=self.queues)
        if job is None:
            return False
        self._execute(job)
        return True

    def run_queued_job(self, job_id: int) -> Outcome:
        """Queue engine (PostgreSQL): run the ``jobs`` row ``job_id`` it handed us; tell it what became of it.

        Raises
        ------
        pacs_agent.jobs.engine.JobAgain
            The row is pending again (a crash with attempts left, or a wait), or processing is paused:
            run it at ``due``.
        pacs_agent.jobs.engine.JobEnded
            The row is failed or dead: no more runs.
        """
        from pacs_agent.jobs.engine import JobAgain, JobEnded

        with self.db.session() as session:
            pause = current_pause(session)
        if pause is not None:  # pacs-agent pause: handed back untouched (no attempt counted), looked at again soon
            logger.info("job %d not started: processing is %s", job_id, pause.describe())
            raise JobAgain(utcnow() + timedelta(seconds=PAUSE_RECHECK_SECONDS))
        try:
            with self.db.session() as session, session.begin():
                job = queue.start_job(session, job_id, self.worker_id)
        except Exception as exc:
            reason = wait_reason(exc)
            if reason is None:
                raise
            logger.warning("job %d cannot start yet: %s", job_id, reason)
            raise JobAgain(utcnow() + timedelta(seconds=queue.WAIT_FIRST_SECONDS)) from exc
        if job is None:
            return Outcome("skipped")
        outcome = self._execute(job)
        if outcome.state == JobState.PENDING:
            raise JobAgain(outcome.due or utcnow())
        if outcome.state in (JobState.FAILED, JobState.DEAD):
            raise JobEnded(outcome.state, outcome.reason or "")
        return outcome

    def _execute(self, job: ClaimedJob) -> Outcome:
        from pacs_agent.jobs.execute import run_job  # heavy imports live in the worker only

        self.heartbeat.beat(f"job {job.id}")
        self.on_status(f"running job {job.id} ({job.method})")
        self._update_row(current_job_id=job.id)
        done = threading.Event()
        beat: threading.Thread | None = None
        if self.backend.job_leases:  # the in-process queue: keep the job's lease
            beat = threading.Thread(target=self._heartbeat, args=(job.id, done), daemon=True)
            beat.start()
        started = time.monotonic()
        try:
            result, result_ids = run_job(job, self.settings, self.db, self.loader)
            with self.db.session() as session, session.begin():
                queue.complete(
                    session,
                    job.id,
                    f"{job.method}: {len(result.lesions)} lesion(s), {len(result_ids)} result object(s)",
                    time.monotonic() - started,
                )
            return Outcome(JobState.DONE)
        except InputError as exc:
            return self._fail(job, flatten(str(exc)), retryable=False, started=started)
        except Exception as exc:
            reason = wait_reason(exc)
            if reason is not None:  # disk full, spool or database away: no crash, the job waits
                logger.warning("job %d waits: %s", job.id, reason, exc_info=logger.isEnabledFor(logging.DEBUG))
                return self._wait(job, reason, started=started)
            ref = error_ref()
            logger.error("job %d crashed (log ref %s)", job.id, ref, exc_info=True)
            return self._fail(job, one_line(exc, ref), retryable=True, started=started)
        finally:
            done.set()
            if beat is not None:
                beat.join(timeout=5)
            self._forget_when_done(job)
            self._update_row(current_job_id=None)
            self.on_status("waiting for jobs")

    def _forget_when_done(self, job: ClaimedJob) -> None:
        """Drop the loaded studies once ``job``'s study has no job left to run (its memory is freed)."""
        try:
            with self.db.session() as session:
                left = queue.open_jobs(session, job.study_id)
        except Exception:
            logger.exception("cannot count the jobs left of study %d; its loaded data is dropped", job.study_id)
            left = 0
        if not left:
            self.forget_studies()

    def _fail(self, job: ClaimedJob, error: str, *, retryable: bool, started: float) -> Outcome:
        delay = self.settings.jobs.retry_delay_seconds
        with self.db.session() as session, session.begin():
            state = queue.fail(
                session,
                job.id,
                error,
                retryable=retryable,
                retry_delay_seconds=delay,
                duration_seconds=time.monotonic() - started,
            )
        due = utcnow() + timedelta(seconds=delay) if state == JobState.PENDING else None
        return Outcome(state, due, error)

    def _wait(self, job: ClaimedJob, reason: str, *, started: float) -> Outcome:
        """Put ``job`` back to wait for a passing problem, without spending an attempt.

        The database may be the problem itself: recording is tried again (1 s, doubling, at most
        30 s apart) until the database answers or the worker is told to stop; meanwhile the
        heartbeat thread keeps the lease, so no stale-job recovery counts the wait as a crash.
        """
        delay = 1.0
        while True:
            try:
                with self.db.session() as session, session.begin():
                    due = queue.wait(session, job.id, reason, duration_seconds=time.monotonic() - started)
                return Outcome(JobState.PENDING, due, reason) if due is not None else Outcome("skipped")
            except Exception as exc:
                still = wait_reason(exc)
                if still is None or self.stop.is_set():
                    raise
                logger.warning("cannot record that job %d waits (%s); trying again in %g s", job.id, still, delay)
            self.stop.wait(delay)
            delay = min(delay * 2, 30.0)

    def run_forever(self, on_ready: Callable[[], object] | None = None) -> None:
        """Take jobs until :attr:`stop` is set (SIGTERM); ``on_ready`` is called once jobs can be taken."""
        removed = remove_stale_result_temps(self.settings.storage.results_dir)
        if removed:
            logger.warning("removed %d result file(s) left half-written by a worker that was killed", removed)
        self.heartbeat.beat("idle")
        self._register()
        takes = ", ".join(self.queues) or "every queue"
        where = f"{socket.gethostname()}, {self.device}"

        def ready() -> None:
            logger.info("worker %s ready (%s; %s; %s)", self.worker_id, where, takes, self.backend.name)
            if on_ready is not None:
                on_ready()

        try:
            self.backend.serve(self, ready)
        finally:
            self._update_row(state="stopped", stopped_at=utcnow(), current_job_id=None)
            self.heartbeat.remove()
            logger.info("worker %s stopped", self.worker_id)


STALE_TEMP_SECONDS = 600.0
"""A result temp file untouched this long belongs to a worker that died while writing it."""


def remove_stale_result_temps(results_dir: Path, older_than_seconds: float = STALE_TEMP_SECONDS) -> int:
    """Delete result files a killed worker left half-written; returns how many.

    Result objects are written to a temp file beside their target (``.<name>.*.tmp``, see
    :func:`dicom_sr.sr.lesions.write_dataset`) and renamed into place. A worker killed in between
    leaves the temp file; its job runs again and writes the object anew. Only files untouched for
    ``older_than_seconds`` are removed, so a file another worker is writing right now is left alone.
    """
    if not results_dir.is_dir():
        return 0
    limit = time.time() - older_than_seconds
    removed = 0
    for path in results_dir.rglob(".*.tmp"):
        try:
            if path.is_file() and path.stat().st_mtime < limit:
                path.unlink()
                removed += 1
        except OSError as exc:  # gone meanwhile, or not ours to remove: say so, go on
            logger.warning("cannot remove stale result temp file %s: %s", path.name, exc)
    return removed
