"""The worker process: claims jobs, runs them, records the outcome; survives bad input.

SIGTERM lets the current job finish and then exits 0. A job whose pipeline raises
:class:`InputError` fails at once with the reason; a passing problem (disk full, spool or database
away: :func:`pacs_agent.jobs.transient.wait_reason`) makes it wait without spending an attempt;
any other exception is retried (bounded) and then the job is dead. Reasons are one line; a crash's
traceback goes to the log under the ``log ref`` its reason names. If the process itself dies, the
lease runs out and the job is requeued.

The worker owns one study loader (:class:`inference.pipelines.study.StudyLoader`): the jobs of a
study follow each other, each gets the study as the first one loaded it, and the loader forgets it
when the study has no job left to run (or the queue is empty).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pacs_agent.config import Settings
from pacs_agent.db import Database
from pacs_agent.errors import InputError
from pacs_agent.health import WorkerHeartbeat
from pacs_agent.jobs import queue
from pacs_agent.jobs.queue import ClaimedJob
from pacs_agent.jobs.transient import error_ref, flatten, one_line, wait_reason
from pacs_agent.pause import current_pause

if TYPE_CHECKING:
    from inference.pipelines.study import StudyLoader

logger = logging.getLogger(__name__)


class Worker:
    """Runs jobs from the queue until told to stop."""

    def __init__(self, settings: Settings, db: Database, *, poll_seconds: float = 0.5) -> None:
        self.settings = settings
        self.db = db
        self.poll_seconds = poll_seconds
        self.worker_id = queue.worker_identity()
        self.stop = threading.Event()
        self.heartbeat = WorkerHeartbeat(settings.storage.state_dir, self.worker_id)
        """Heartbeat file read by ``/healthz``; its :meth:`~WorkerHeartbeat.beat` time is our liveness."""
        self.on_status: Callable[[str], object] = lambda _text: None
        """Told what the worker does (``pacs-agent worker`` forwards it to systemd as STATUS)."""
        self.parent_alive: Callable[[], bool] = lambda: True
        """Checked between jobs; False (the ``serve`` that started this worker is gone) stops the loop."""
        self._loader: StudyLoader | None = None

    @property
    def loader(self) -> StudyLoader:
        """The worker's study loader (created on the first job: it imports the imaging stack)."""
        if self._loader is None:
            from inference.pipelines.study import StudyLoader  # heavy imports live in the worker only

            self._loader = StudyLoader()
        return self._loader

    def forget_studies(self) -> None:
        """Drop the studies the loader keeps (nothing was loaded: nothing to do)."""
        if self._loader is not None:
            self._loader.forget()

    def _heartbeat(self, job_id: int, done: threading.Event) -> None:
        interval = max(self.settings.jobs.lease_seconds / 4, 0.5)
        while not done.wait(interval):
            try:
                with self.db.session() as session, session.begin():
                    queue.heartbeat(session, job_id, self.worker_id)
            except Exception:
                logger.exception("heartbeat of job %d failed", job_id)
            self.heartbeat.beat(f"job {job_id}")

    def run_one(self) -> bool:
        """Claim and run one job; returns False when there was nothing to do (or processing is paused)."""
        with self.db.session() as session, session.begin():
            if current_pause(session) is not None:  # pacs-agent pause: no new job starts
                return False
            job = queue.claim_next(session, self.worker_id)
        if job is None:
            return False
        self._execute(job)
        return True

    def _execute(self, job: ClaimedJob) -> None:
        from pacs_agent.jobs.execute import run_job  # heavy imports live in the worker only

        self.heartbeat.beat(f"job {job.id}")
        self.on_status(f"running job {job.id} ({job.method})")
        done = threading.Event()
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
        except InputError as exc:
            self._fail(job, flatten(str(exc)), retryable=False, started=started)
        except Exception as exc:
            reason = wait_reason(exc)
            if reason is not None:  # disk full, spool or database away: no crash, the job waits
                logger.warning("job %d waits: %s", job.id, reason, exc_info=logger.isEnabledFor(logging.DEBUG))
                self._wait(job, reason, started=started)
            else:
                ref = error_ref()
                logger.error("job %d crashed (log ref %s)", job.id, ref, exc_info=True)
                self._fail(job, one_line(exc, ref), retryable=True, started=started)
        finally:
            done.set()
            beat.join(timeout=5)
            self._forget_when_done(job)
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

    def _fail(self, job: ClaimedJob, error: str, *, retryable: bool, started: float) -> None:
        with self.db.session() as session, session.begin():
            queue.fail(
                session,
                job.id,
                error,
                retryable=retryable,
                retry_delay_seconds=self.settings.jobs.retry_delay_seconds,
                duration_seconds=time.monotonic() - started,
            )

    def _wait(self, job: ClaimedJob, reason: str, *, started: float) -> None:
        """Put ``job`` back to wait for a passing problem, without spending an attempt.

        The database may be the problem itself: recording is tried again (1 s, doubling, at most
        30 s apart) until the database answers or the worker is told to stop; meanwhile the
        heartbeat thread keeps the lease, so no stale-job recovery counts the wait as a crash.
        """
        delay = 1.0
        while True:
            try:
                with self.db.session() as session, session.begin():
                    queue.wait(session, job.id, reason, duration_seconds=time.monotonic() - started)
                return
            except Exception as exc:
                still = wait_reason(exc)
                if still is None or self.stop.is_set():
                    raise
                logger.warning("cannot record that job %d waits (%s); trying again in %g s", job.id, still, delay)
            self.stop.wait(delay)
            delay = min(delay * 2, 30.0)

    def run_forever(self, on_ready: Callable[[], object] | None = None) -> None:
        """Loop until :attr:`stop` is set (SIGTERM); ``on_ready`` is called once jobs can be claimed."""
        with self.db.session() as session, session.begin():
            queue.requeue_stale(session, self.settings.jobs.lease_seconds)
        removed = remove_stale_result_temps(self.settings.storage.results_dir)
        if removed:
            logger.warning("removed %d result file(s) left half-written by a worker that was killed", removed)
        self.heartbeat.beat("idle")
        logger.info("worker %s ready", self.worker_id)
        if on_ready is not None:
            on_ready()
        while not self.stop.is_set():
            if not self.parent_alive():
                logger.warning("worker %s: the pacs-agent serve that started it is gone; stopping", self.worker_id)
                break
            self.heartbeat.beat("idle")
            try:
                busy = self.run_one()
            except Exception:
                logger.exception("worker loop error; continuing")
                busy = False
            if not busy:
                self.forget_studies()
                self.stop.wait(self.poll_seconds)
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
