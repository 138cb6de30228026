"""Job rows: create, start, finish, wait, retry, dead-letter; and on SQLite the queue itself.

The state of record is in SQL, so the scp process and every worker, on this host or another,
agree. Which queue moves the rows depends on the database (:mod:`pacs_agent.jobs.backend`):

- SQLite: the rows are the queue. :func:`claim_next` claims with one atomic UPDATE, the worker
  heart-beats its lease (:func:`heartbeat`), and a worker that dies mid-job stops heart-beating;
  :func:`requeue_stale` then gives the job back or, after ``max_attempts``, marks it dead.
- PostgreSQL: :func:`schedule_job` and :func:`retry_job` also defer a procrastinate job in the same
  transaction; procrastinate's worker calls :func:`start_job` for the row (which counts the
  attempt of a worker that died holding it) and the outcome goes through the same functions.

A job that meets a passing problem (disk full, spool or database away) waits (:func:`wait`):
pending again later, with a growing delay, without spending an attempt.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, exists, or_, select, update
from sqlalchemy.orm import Session, aliased

from pacs_agent.audit import record_event
from pacs_agent.db.tables import Job, JobState, Study, StudyState, utcnow
from pacs_agent.errors import PacsAgentError

PENDING, RUNNING, DONE, FAILED, DEAD = JobState.PENDING, JobState.RUNNING, JobState.DONE, JobState.FAILED, JobState.DEAD

WAIT_FIRST_SECONDS = 10.0
"""Delay before a waiting job is tried again the first time; it doubles with each wait in a row ..."""
WAIT_MAX_SECONDS = 300.0
"""... up to this."""


def worker_identity() -> str:
    """``host:pid`` of this process, recorded on the jobs it runs."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class ClaimedJob:
    """A job this worker now owns."""

    id: int
    study_id: int
    study_instance_uid: str
    method: str
    inputs: dict[str, Any]
    attempt: int
    max_attempts: int


def schedule_job(
    session: Session, study_id: int, method: str, inputs: dict[str, Any], max_attempts: int, queue: str = "default"
) -> Job:
    """Add a pending job on ``queue``, or refresh the inputs of a pending one for the same study and method.

    A new job is handed to the database's job queue in the same transaction (PostgreSQL:
    procrastinate; SQLite: the row is the queue entry).
    """
    existing = session.execute(
        select(Job).where(Job.study_id == study_id, Job.method == method, Job.state == PENDING)
    ).scalar_one_or_none()
    if existing is not None:
        existing.inputs = json.dumps(inputs, sort_keys=True)
        return existing
    job = Job(
        study_id=study_id,
        method=method,
        state=PENDING,
        inputs=json.dumps(inputs, sort_keys=True),
        attempts=0,
        max_attempts=max_attempts,
        not_before=utcnow(),
        created_at=utcnow(),
        queue=queue,
    )
    session.add(job)
    session.flush()
    _enqueue(session, job)
    return job


def _enqueue(session: Session, job: Job) -> None:
    """PostgreSQL: defer the job's procrastinate job in this transaction; SQLite: the row is the queue entry."""
    if session.get_bind().dialect.name == "postgresql":
        from pacs_agent.jobs.engine import defer  # procrastinate: the postgres extra

        defer(session, job)


def claim_next(
    session: Session, worker_id: str, now: datetime | None = None, queues: tuple[str, ...] = ()
) -> ClaimedJob | None:
    """Claim the oldest due pending job (of ``queues``; empty: any); safe against concurrent workers.

    The in-process queue (SQLite) only; the caller commits.
    """
    now = now or utcnow()
    while True:
        query = select(Job.id).where(Job.state == PENDING, Job.not_before <= now)
        # One study at a time, in order, as procrastinate's lock per study does on PostgreSQL: not
        # while a job of the study runs, nor before an earlier pending job of it (even one not yet due).
        before = aliased(Job)
        query = query.where(
            ~exists().where(
                before.study_id == Job.study_id,
                before.id != Job.id,
                or_(before.state == RUNNING, and_(before.state == PENDING, before.id < Job.id)),
            )
        )
        if queues:
            query = query.where(Job.queue.in_(queues))
        candidate = session.execute(query.order_by(Job.id).limit(1)).scalar_one_or_none()
        if candidate is None:
            return None
        claimed = session.execute(
            update(Job)
            .where(Job.id == candidate, Job.state == PENDING)
            .values(
                state=RUNNING,
                worker_id=worker_id,
                started_at=now,
                heartbeat_at=now,
                attempts=Job.attempts + 1,
            )
        )
        if claimed.rowcount == 1:  # type: ignore[attr-defined]  # an UPDATE gives a CursorResult; Session.execute is typed Result
            break
    job = session.get(Job, candidate, populate_existing=True)
    assert job is not None
    return _started(session, job, worker_id)


def start_job(session: Session, job_id: int, worker_id: str, now: datetime | None = None) -> ClaimedJob | None:
    """Start the job the queue engine (PostgreSQL) handed to this worker; None when there is nothing to run.

    The row is locked for the transaction. A row that is already done, failed or dead is left alone
    (a queue entry delivered again). A row still ``running`` was held by a worker that died (the
    engine handed its job back): that attempt is recorded as failed with the reason, and when it was
    the last one the job is dead and None is returned. The caller commits.
    """
    now = now or utcnow()
    job = session.get(Job, job_id, with_for_update=True, populate_existing=True)
    if job is None or job.state in (DONE, FAILED, DEAD):
        return None
    if job.state == RUNNING:
        state = fail(
            session,
            job.id,
            f"worker {job.worker_id} stopped while running this job (its heartbeat stopped)",
            retryable=True,
            retry_delay_seconds=0,
        )
        if state != PENDING:
            return None
    job.state = RUNNING
    job.worker_id = worker_id
    job.started_at = now
    job.attempts += 1
    return _started(session, job, worker_id)


def _started(session: Session, job: Job, worker_id: str) -> ClaimedJob:
    """Mark ``job``'s study processing, record the start; the job as the worker sees it."""
    study = session.get(Study, job.study_id)
    assert study is not None
    study.state = StudyState.PROCESSING
    if job.wait_reason is None:  # a waiting job tried again is no new start (its wait had its event)
        record_event(
            session,
            "job_started",
            study_instance_uid=study.study_instance_uid,
            job_id=job.id,
            detail=f"{job.method}, attempt {job.attempts} of {job.max_attempts}, worker {worker_id}",
        )
    return ClaimedJob(
        id=job.id,
        study_id=job.study_id,
        study_instance_uid=study.study_instance_uid,
        method=job.method,
        inputs=json.loads(job.inputs),
        attempt=job.attempts,
        max_attempts=job.max_attempts,
    )


def heartbeat(session: Session, job_id: int, worker_id: str) -> bool:
    """Refresh the lease of a running job; False when the job is no longer ours."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.worker_id == worker_id, Job.state == RUNNING)
        .values(heartbeat_at=utcnow())
    )
    return result.rowcount == 1  # type: ignore[attr-defined]  # an UPDATE gives a CursorResult; Session.execute is typed Result


def open_jobs(session: Session, study_id: int) -> int:
    """How many jobs of the study are pending or running (a worker keeps the study loaded until 0)."""
    return len(session.execute(select(Job.id).where(Job.study_id == study_id, Job.state.in_([PENDING, RUNNING]))).all())


def _finish_study(session: Session, job: Job, state: str, reason: str | None) -> Study:
    study = session.get(Study, job.study_id)
    assert study is not None
    active = session.execute(
        select(Job.id).where(Job.study_id == job.study_id, Job.state.in_([PENDING, RUNNING]), Job.id != job.id)
    ).first()
    if active is None and study.state in ("queued", "processing"):
        study.state = state
        study.state_reason = reason
    return study


def complete(session: Session, job_id: int, detail: str, duration_seconds: float) -> None:
    """Mark a job done (the caller has recorded its results in the same transaction)."""
    job = session.get(Job, job_id)
    assert job is not None
    job.state = DONE
    job.finished_at = utcnow()
    job.last_error = None
    if job.wait_reason is not None:
        detail += f" (after {job.waits} wait(s), the last for: {job.wait_reason})"
    job.waits, job.wait_reason = 0, None
    study = _finish_study(session, job, "done", None)
    record_event(
        session,
        "job_done",
        study_instance_uid=study.study_instance_uid,
        job_id=job_id,
        detail=detail,
        duration_seconds=duration_seconds,
    )


def fail(
    session: Session,
    job_id: int,
    error: str,
    *,
    retryable: bool,
    retry_delay_seconds: float,
    duration_seconds: float | None = None,
) -> str:
    """Record a failed attempt; returns the new state (pending, failed or dead).

    ``retryable=False`` (bad input) fails the job at once; otherwise the job goes back to the
    queue after ``retry_delay_seconds`` until ``max_attempts`` is reached, then it is dead.
    """
    job = session.get(Job, job_id)
    assert job is not None
    job.last_error = error
    job.finished_at = utcnow()
    job.waits, job.wait_reason = 0, None
    if not retryable:
        job.state = FAILED
    elif job.attempts >= job.max_attempts:
        job.state = DEAD
    else:
        job.state = PENDING
        job.worker_id = None
        job.not_before = utcnow() + timedelta(seconds=retry_delay_seconds)
    study = session.get(Study, job.study_id)
    assert study is not None
    if job.state in (FAILED, DEAD):
        _finish_study(session, job, "failed", error)
    else:
        study.state = StudyState.QUEUED
    record_event(
        session,
        f"job_{job.state}" if job.state != PENDING else "job_retry",
        level="ERROR" if job.state in (FAILED, DEAD) else "WARNING",
        study_instance_uid=study.study_instance_uid,
        job_id=job_id,
        detail=f"attempt {job.attempts} of {job.max_attempts}: {error}",
        duration_seconds=duration_seconds,
    )
    return job.state


def _reason_key(reason: str) -> str:
    """What a wait reason is about, without its figures (the part before a parenthesis).

    ``disk full writing results (free 12 MB ...)`` and ``(free 9 MB ...)`` are the same problem:
    no new transition, no new event.
    """
    return reason.split("(", 1)[0].strip()


def wait(
    session: Session,
    job_id: int,
    reason: str,
    *,
    first_delay_seconds: float = WAIT_FIRST_SECONDS,
    max_delay_seconds: float = WAIT_MAX_SECONDS,
    duration_seconds: float | None = None,
    now: datetime | None = None,
) -> datetime | None:
    """Put a running job back to wait for a passing problem (``reason``, one line); the caller commits.

    The job is pending again at ``now`` + ``first_delay_seconds`` doubled for each wait in a row,
    at most ``max_delay_seconds``; the attempt its claim counted is given back, so waiting never
    makes a job dead. One ``job_waiting`` event when the job starts waiting or waits for another
    problem, none while it keeps waiting for the same one. Returns when the job is due again, or
    None when it is no longer running (a stale-job recovery took it meanwhile): nothing changed.
    """
    now = now or utcnow()
    job = session.get(Job, job_id)
    assert job is not None
    if job.state != RUNNING:
        return None
    previous = job.wait_reason
    job.attempts = max(job.attempts - 1, 0)
    job.waits += 1
    delay = min(max_delay_seconds, first_delay_seconds * 2 ** min(job.waits - 1, 32))
    job.state = PENDING
    job.worker_id = None
    job.heartbeat_at = None
    job.not_before = now + timedelta(seconds=delay)
    job.wait_reason = reason
    study = session.get(Study, job.study_id)
    assert study is not None
    study.state = StudyState.QUEUED
    if previous is None or _reason_key(previous) != _reason_key(reason):
        record_event(
            session,
            "job_waiting",
            level="WARNING",
            study_instance_uid=study.study_instance_uid,
            job_id=job_id,
            detail=f"waiting: {reason}; retrying at {job.not_before:%H:%M:%S} UTC, then less often "
            f"(every {max_delay_seconds:g} s at most) until it passes; no attempt is spent",
            duration_seconds=duration_seconds,
        )
    return job.not_before


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def requeue_stale(session: Session, lease_seconds: float, now: datetime | None = None) -> int:
    """Give back running jobs whose worker died (no heartbeat within the lease, or a dead local pid).

    Returns how many jobs were requeued or marked dead. The caller commits.
    """
    now = now or utcnow()
    host = socket.gethostname()
    running = session.execute(select(Job).where(Job.state == RUNNING)).scalars().all()
    count = 0
    for job in running:
        lease_expired = job.heartbeat_at is None or job.heartbeat_at < now - timedelta(seconds=lease_seconds)
        worker_host, _, pid = (job.worker_id or "").rpartition(":")
        local_dead = worker_host == host and pid.isdigit() and not _pid_alive(int(pid))
        if not (lease_expired or local_dead):
            continue
        why = "the worker process exited" if local_dead else f"no heartbeat for {lease_seconds:g} s"
        fail(
            session,
            job.id,
            f"worker {job.worker_id} stopped while running this job ({why})",
            retryable=True,
            retry_delay_seconds=0,
        )
        count += 1
    return count


class RetryRefused(PacsAgentError):
    """``retry`` cannot do what was asked (unknown id, job still running, ...); the message says why."""


def retry_job(session: Session, job_id: int, *, operator: str) -> str:
    """Put a ``failed`` or ``dead`` job back to ``pending`` with its attempts reset (the caller commits).

    Returns
    -------
    str
        What was done, for the terminal.

    Raises
    ------
    RetryRefused
        Unknown job, or a job that is pending, running or done.
    """
    job = session.get(Job, job_id)
    if job is None:
        raise RetryRefused(f"there is no job {job_id} (pacs-agent status lists the jobs of each study)")
    study = session.get(Study, job.study_id)
    assert study is not None
    if job.state == DONE:
        raise RetryRefused(
            f"job {job_id} is done; to process the study again: pacs-agent retry --study {study.study_instance_uid}"
        )
    if job.state not in (FAILED, DEAD):
        raise RetryRefused(f"job {job_id} is {job.state} already; nothing to retry")
    was = f"{job.state} after {job.attempts} attempt(s)" + (f": {job.last_error}" if job.last_error else "")
    now = utcnow()
    job.state = PENDING
    job.attempts = 0
    job.not_before = now
    job.worker_id = None
    job.heartbeat_at = None
    job.started_at = None
    job.finished_at = None
    job.last_error = None
    job.waits, job.wait_reason = 0, None
    study.state = StudyState.QUEUED
    study.state_reason = None
    _enqueue(session, job)
    record_event(
        session,
        "job_retry_requested",
        study_instance_uid=study.study_instance_uid,
        job_id=job_id,
        detail=f"by {operator}: {job.method} job was {was}; pending again with attempts reset",
        log=False,
    )
    return f"job {job_id} ({job.method}, study {study.study_instance_uid}) is pending again (was {was})"
