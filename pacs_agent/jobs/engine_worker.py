"""A worker process on PostgreSQL: procrastinate's worker runs the ``jobs`` rows it is handed.

Wake-ups come by LISTEN/NOTIFY; procrastinate sends the worker's heartbeat every ``[jobs]
lease_seconds / 4`` and each worker looks for stalled jobs (a worker silent for ``lease_seconds``)
as often, handing them back to run elsewhere (:func:`recover_stalled`). Nothing here claims,
leases or heart-beats by itself. See :mod:`pacs_agent.jobs.engine` for the deferral side.

The LISTEN connection: procrastinate opens it again when it dies, but when PostgreSQL refuses the
new connection (a restart still under way) its listener ends for good and the worker finds jobs
only by polling from then on. :class:`ListeningConnector` keeps trying, with a back-off, and says
so in the log; a notification sent while nobody listened is made up for by procrastinate's
polling (every ``FETCH_JOB_POLLING_INTERVAL``, 5 s).

A connection lost in the middle of one of the worker's own statements (PostgreSQL restarted or the
connection dropped by a firewall or an operator): procrastinate's pool checks a connection before
it lends it, but a statement already under way fails. Two of those statements matter, and
:class:`EngineWorker` tries them again on a new connection instead of giving up:

- the record of a job's end (succeeded, failed, due again): left undone, the queue entry stays
  ``doing`` under a live worker, holding its study's lock, so no later job of that study would
  start until that worker stopped;
- the heartbeat: in procrastinate 3.10 one failed beat ends the heartbeat task for good, and its
  worker goes on without one (its side-task monitor has already returned when the periodic
  deferrer, with no periodic task, ended at once). ``[jobs] lease_seconds`` later every worker
  took that worker's jobs for stalled and handed them back, again and again, while it ran them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

import procrastinate
import procrastinate.worker
import psycopg
from procrastinate.connector import Notify
from procrastinate.exceptions import ConnectorException
from procrastinate.job_context import JobContext, JobResult
from procrastinate.jobs import Job, Status
from procrastinate.retry import RetryDecision

from pacs_agent.jobs.engine import TASK_NAME, EngineRetry, conninfo
from pacs_agent.jobs.protocol import QueueWorker
from pacs_agent.jobs.transient import flatten

logger = logging.getLogger(__name__)


LISTEN_RETRY_SECONDS = (0.5, 10.0)
"""First and longest wait between attempts to open the LISTEN connection again."""

RECORD_RETRY_SECONDS = (0.5, 10.0)
"""First and longest wait between attempts to record a job's end after its connection was lost."""

RECORD_TRIES_WHEN_STOPPING = 3
"""A stopping worker gives up recording a job's end after this many tries (stalled recovery takes over)."""


def connection_lost(exc: BaseException) -> bool:
    """True when the queue engine's statement failed because its connection to PostgreSQL was lost."""
    cause = exc.__cause__ if isinstance(exc, ConnectorException) else exc
    return isinstance(cause, (psycopg.OperationalError, psycopg.InterfaceError))


class ListeningConnector(procrastinate.PsycopgConnector):
    """procrastinate's psycopg connector whose LISTEN connection comes back after PostgreSQL refused it."""

    async def listen_notify(self, on_notification: Notify, channels: Iterable[str]) -> None:
        """LISTEN on ``channels`` until cancelled; a refused (re)connection is tried again, never the end."""
        channels = list(channels)
        first, longest = LISTEN_RETRY_SECONDS
        delay = first
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                await super().listen_notify(on_notification=on_notification, channels=channels)
                return
            except ConnectorException as exc:
                if loop.time() - started > longest:  # it listened for a while: a new outage
                    delay = first
                cause = exc.__cause__ or exc
                logger.warning(
                    "the LISTEN connection to PostgreSQL failed (%s); jobs are found by polling until it is "
                    "back; trying again in %g s",
                    flatten(str(cause)),
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, longest)


class EngineWorker(procrastinate.worker.Worker):
    """procrastinate's worker whose record of a job's end and whose heartbeat survive a lost connection.

    Both override procrastinate 3.10's own methods (the version is pinned in pyproject.toml); see
    the module's docstring for what goes wrong without them.
    """

    async def _persist_job_status(
        self,
        job: Job,
        status: Status,
        retry_decision: RetryDecision | None,
        context: JobContext,
        job_result: JobResult | None,
    ) -> None:
        """Record the end of a job, again on a new connection while its connection is lost."""
        delay, longest = RECORD_RETRY_SECONDS
        tries = 0
        while True:
            tries += 1
            try:
                await super()._persist_job_status(job, status, retry_decision, context, job_result)
                return
            except ConnectorException as exc:
                cause = flatten(str(exc.__cause__ or exc))
                if not connection_lost(exc):
                    if tries == 1:
                        raise
                    # the statement whose connection was lost had been carried out: nothing is left to record
                    logger.warning(
                        "queue job %s: its end was recorded before its connection was lost (%s)", job.id, cause
                    )
                    return
                if self._stop_event.is_set() and tries >= RECORD_TRIES_WHEN_STOPPING:
                    logger.warning(
                        "queue job %s: its end could not be recorded (%s); the worker is stopping, so another "
                        "worker hands the job back once this one's heartbeat is %g s old",
                        job.id,
                        cause,
                        self.stalled_worker_timeout,
                    )
                    raise
                logger.warning(
                    "queue job %s: recording its end failed, the connection to PostgreSQL was lost (%s); "
                    "trying again in %g s",
                    job.id,
                    cause,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, longest)

    async def _update_heartbeat(self) -> None:
        """Beat every ``update_heartbeat_interval`` for as long as the worker runs; a failed beat is logged."""
        while True:
            await asyncio.sleep(self.update_heartbeat_interval)
            assert self.worker_id is not None
            try:
                await self.app.job_manager.update_heartbeat(self.worker_id)
            except Exception as exc:
                if not connection_lost(exc):
                    logger.exception("worker %s: its heartbeat failed; beating again", self.worker_name)
                    continue
                logger.warning(
                    "worker %s: its heartbeat failed, the connection to PostgreSQL was lost (%s); beating again "
                    "in %g s",
                    self.worker_name,
                    flatten(str(exc.__cause__ or exc)),
                    self.update_heartbeat_interval,
                )


def worker_app(url: str, worker: QueueWorker) -> procrastinate.App:
    """The procrastinate App of a worker process, with the task that runs ``jobs`` rows on ``worker``."""
    app = procrastinate.App(connector=ListeningConnector(conninfo=conninfo(url)))

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


def run_engine_worker(url: str, worker: QueueWorker, on_ready: Callable[[], object]) -> None:
    """Run procrastinate's worker for ``worker`` until ``worker.stop`` is set; the current jobs finish first."""
    asyncio.run(_run(url, worker, on_ready))


async def _run(url: str, worker: QueueWorker, on_ready: Callable[[], object]) -> None:
    lease = worker.settings.jobs.lease_seconds
    app = worker_app(url, worker)
    await asyncio.to_thread(worker.warm_up)  # take no job before the pipeline is loaded
    stop = asyncio.create_task(asyncio.to_thread(worker.stop.wait), name="stop")
    first, longest = LISTEN_RETRY_SECONDS
    delay = first
    try:
        async with app.open_async():
            ready: Callable[[], object] | None = on_ready
            while True:
                ended = await _serve(app, worker, lease, stop, ready)
                ready = None
                if ended is None:  # asked to stop, or the serve that started us is gone
                    return
                # procrastinate's worker ends for good when one of its own queries fails (e.g. fetching
                # the next job on a connection PostgreSQL dropped): start a new one, the process lives on
                logger.warning(
                    "worker %s: the queue engine's worker stopped (%s); starting it again in %g s",
                    worker.worker_id,
                    flatten(str(ended)),
                    delay,
                )
                await asyncio.wait({stop}, timeout=delay)
                if stop.done():
                    return
                delay = min(delay * 2, longest)
    finally:
        worker.stop.set()
        await stop


async def _serve(
    app: procrastinate.App,
    worker: QueueWorker,
    lease: float,
    stop: asyncio.Task[bool],
    on_ready: Callable[[], object] | None,
) -> BaseException | None:
    """Run one procrastinate worker; None when told to stop, else what ended it on its own.

    At the first start (``on_ready`` given) a failure to start is raised: the process does not come up.
    """
    engine_worker = EngineWorker(
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
        if on_ready is not None:
            await running  # raises what stopped it
        return running.exception() or RuntimeError("it ended at its start")
    worker.registered(queue_worker_id=engine_worker.worker_id)
    if on_ready is not None:
        on_ready()
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
    if running.done() and not stop.done():
        return running.exception() or RuntimeError("it ended with no error")
    engine_worker.stop()
    await running
    return None
