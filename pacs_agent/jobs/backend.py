"""One small job-queue interface, two backends: the in-process queue (SQLite) and procrastinate (PostgreSQL).

The ``jobs`` table is the record on both: a job row's state, attempts, worker and reasons tell its
story, and ``pacs-agent status`` reads only that. What differs is who moves the jobs:

- :class:`InProcessQueue` (SQLite, one host, no extra service): the jobs table is the queue; a
  worker claims the oldest due row with one atomic UPDATE, keeps a lease by heart-beating, and a
  job whose worker went silent is given back (:mod:`pacs_agent.jobs.queue`).
- :class:`EngineQueue` (PostgreSQL, any number of hosts): procrastinate carries each job; it is
  deferred in the transaction that writes the row, and procrastinate's workers, locks, retries,
  heartbeats and stalled-job recovery do the rest (:mod:`pacs_agent.jobs.engine`). Nothing of the
  in-process claiming, leasing or heart-beating runs on this path.

The backend follows the database: :func:`backend_for` (by URL) and :func:`session_backend`.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

from sqlalchemy.orm import Session

from pacs_agent.errors import StorageError
from pacs_agent.jobs.protocol import QueueWorker

if TYPE_CHECKING:
    from pacs_agent.db.tables import Job

logger = logging.getLogger(__name__)


class JobQueue(ABC):
    """What the scheduler, ``retry`` and the worker need from a job queue."""

    name: ClassVar[str]
    job_leases: ClassVar[bool]
    """True when a running job's lease is kept by the worker (the in-process queue only)."""

    @abstractmethod
    def enqueue(self, session: Session, job: Job) -> None:
        """Hand the pending ``job`` (flushed, with its id) to the queue, in ``session``'s transaction."""

    @abstractmethod
    def recover(self, session: Session, lease_seconds: float) -> int:
        """Give back jobs whose worker died (the scheduler's pass); returns how many."""

    @abstractmethod
    def serve(self, worker: QueueWorker, on_ready: Callable[[], object]) -> None:
        """Run ``worker``'s jobs until ``worker.stop`` is set; ``on_ready`` once jobs can be taken."""


class InProcessQueue(JobQueue):
    """The jobs table as the queue (SQLite): claim with one UPDATE, lease by heartbeat, requeue stale."""

    name = "sqlite"
    job_leases = True

    def enqueue(self, session: Session, job: Job) -> None:
        """Nothing to do: a pending row is the queue entry."""

    def recover(self, session: Session, lease_seconds: float) -> int:
        """Requeue running jobs without a heartbeat within the lease (or with a dead local pid)."""
        from pacs_agent.jobs.queue import requeue_stale

        return requeue_stale(session, lease_seconds)

    def serve(self, worker: QueueWorker, on_ready: Callable[[], object]) -> None:
        """Poll for due jobs on ``worker.concurrency`` threads until stopped."""
        with worker.db.session() as session, session.begin():
            self.recover(session, worker.settings.jobs.lease_seconds)
        on_ready()
        threads = [
            threading.Thread(target=self._loop, args=(worker,), name=f"jobs-{n}", daemon=True)
            for n in range(1, worker.concurrency)
        ]
        for thread in threads:
            thread.start()
        self._loop(worker)
        for thread in threads:
            thread.join()

    @staticmethod
    def _loop(worker: QueueWorker) -> None:
        while not worker.stop.is_set():
            if not worker.parent_alive():
                logger.warning("worker %s: the pacs-agent serve that started it is gone; stopping", worker.worker_id)
                worker.stop.set()
                break
            worker.beat_idle()
            try:
                busy = worker.run_one()
            except Exception:
                logger.exception("worker loop error; continuing")
                busy = False
            if not busy:
                worker.forget_studies()
                worker.stop.wait(worker.poll_seconds)


class EngineQueue(JobQueue):
    """procrastinate on PostgreSQL (:mod:`pacs_agent.jobs.engine`)."""

    name = "procrastinate"
    job_leases = False

    def __init__(self, url: str) -> None:
        self.url = url

    def enqueue(self, session: Session, job: Job) -> None:
        """Defer the job's procrastinate job in the same transaction."""
        from pacs_agent.jobs.engine import defer

        defer(session, job)

    def recover(self, session: Session, lease_seconds: float) -> int:
        """Nothing here: procrastinate's workers hand back the jobs of silent workers."""
        return 0

    def serve(self, worker: QueueWorker, on_ready: Callable[[], object]) -> None:
        """Run procrastinate's worker on the queues of ``worker``."""
        from pacs_agent.jobs.engine_worker import run_engine_worker

        run_engine_worker(self.url, worker, on_ready)


def _engine_available() -> None:
    try:
        import procrastinate  # noqa: F401
    except ImportError as exc:  # the postgres extra is missing
        raise StorageError(
            "[database] url is PostgreSQL, whose job queue is procrastinate, but procrastinate is not "
            "installed; install pacs-agent with the postgres extra: pip install 'pacs-agent[postgres]'"
        ) from exc


def backend_for(url: str) -> JobQueue:
    """The job queue of the database at ``url``: procrastinate on PostgreSQL, else the in-process queue.

    Raises
    ------
    StorageError
        PostgreSQL without procrastinate installed.
    """
    if url.startswith("postgresql"):
        _engine_available()
        return EngineQueue(url)
    return InProcessQueue()


def session_backend(session: Session) -> JobQueue:
    """The job queue of the database ``session`` is bound to."""
    bind = session.get_bind()
    if bind.dialect.name == "postgresql":
        _engine_available()
        return EngineQueue(bind.engine.url.render_as_string(hide_password=False))
    return InProcessQueue()
