"""What a job queue backend needs of a worker (:class:`pacs_agent.jobs.worker.Worker` is one).

A module of its own so that the backends (:mod:`pacs_agent.jobs.backend`,
:mod:`pacs_agent.jobs.engine_worker`) do not import the worker that imports them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

from pacs_agent.config import Settings
from pacs_agent.db import Database


class QueueWorker(Protocol):
    """A worker process as the job queues drive it."""

    settings: Settings
    db: Database
    stop: threading.Event
    worker_id: str
    queues: tuple[str, ...]
    concurrency: int
    poll_seconds: float
    parent_alive: Callable[[], bool]

    def warm_up(self) -> None:
        """Load what every job needs (the imaging stack) before taking the first job."""

    def beat_idle(self) -> None:
        """Liveness while waiting for jobs."""

    def run_one(self) -> bool:
        """In-process queue: claim and run one job; False when there was none."""

    def forget_studies(self) -> None:
        """Drop the studies this thread keeps loaded."""

    def run_queued_job(self, job_id: int) -> Any:
        """Queue engine: run the jobs row the engine handed over."""

    def registered(self, *, queue_worker_id: int | None) -> None:
        """The queue engine registered this worker under ``queue_worker_id``."""
