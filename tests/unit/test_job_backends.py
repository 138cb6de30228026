"""The job-queue interface, the same tests on both backends: in-process (SQLite) and procrastinate (PostgreSQL).

A real worker runs real jobs (a small phantom study, the radiomics method) from a thread; the
jobs table must tell the same story on either backend, and on PostgreSQL procrastinate's own job
rows must agree with it (queue, the study's lock, final status).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Connection, select, text
from sqlalchemy.orm import Session

from inference.phantom import PhantomStudy, generate_study
from pacs_agent.config import Settings, settings_from_mapping
from pacs_agent.db import Database
from pacs_agent.db.tables import Event, Job, Result, Study, WorkerProcess
from pacs_agent.jobs import queue
from pacs_agent.jobs.worker import Worker
from pacs_agent.status import collect_status, format_status
from tests.unit.test_study_reuse import _inputs, _spool

DEADLINE_SECONDS = 180.0
"""A guard against a hung test, not a speed check: jobs of this phantom take a few seconds."""


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> PhantomStudy:
    return generate_study(tmp_path_factory.mktemp("backends"), seed=3, slices=16, rows=64, columns=64, lesions=1)


def _node(tmp_path: Path, url: str | None = None, lease_seconds: float = 4.0) -> tuple[Settings, Database]:
    """Settings (the radiomics method, state under ``tmp_path``) and the database at ``url`` (None: SQLite)."""
    data: dict[str, object] = {
        "storage": {"state_dir": str(tmp_path / "state")},
        "jobs": {"methods": ["radiomics"], "lease_seconds": lease_seconds, "retry_delay_seconds": 0},
    }
    if url is not None:
        data["database"] = {"url": url}
    settings = settings_from_mapping(data)
    settings.storage.state_dir.mkdir(parents=True)
    return settings, Database(settings.database_url)


@pytest.fixture(params=["sqlite", "postgresql"])
def node(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Settings, Database]]:
    url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    settings, db = _node(tmp_path, url)
    yield settings, db
    db.dispose()


def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting after {DEADLINE_SECONDS:g} s for {what}")
        time.sleep(0.2)


class RunningWorker:
    """A worker's :meth:`~Worker.run_forever` on a thread, stopped (current job finished) on exit."""

    def __init__(self, settings: Settings, db: Database, queues: tuple[str, ...] | None = None) -> None:
        self.worker = Worker(settings, db, queues=queues, poll_seconds=0.1)
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.worker.run_forever, args=(self.ready.set,), daemon=True)

    def __enter__(self) -> Worker:
        self.thread.start()
        assert self.ready.wait(60), "the worker did not start"
        return self.worker

    def __exit__(self, *_exc: object) -> None:
        self.worker.stop.set()
        self.thread.join(60)
        assert not self.thread.is_alive(), "the worker did not stop"


def _job(db: Database, job_id: int) -> Job:
    with db.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def _schedule(
    db: Database, study_id: int, phantom: PhantomStudy, method: str = "radiomics", queue_name: str = "default"
) -> int:
    with db.session() as session, session.begin():
        return queue.schedule_job(session, study_id, method, _inputs(phantom), 3, queue_name).id


def _engine_jobs(db: Database) -> list[tuple[str, str | None, str, dict[str, object]]]:
    """procrastinate's job rows: queue, lock, status, arguments (PostgreSQL only)."""
    with db.session() as session:
        rows = session.execute(text("SELECT queue_name, lock, status, args FROM procrastinate_jobs ORDER BY id")).all()
    return [(r[0], r[1], r[2], r[3]) for r in rows]


def test_a_job_runs_once_on_the_worker_of_either_backend(
    node: tuple[Settings, Database], phantom: PhantomStudy
) -> None:
    settings, db = node
    study_id = _spool(settings, db, phantom)
    job_id = _schedule(db, study_id, phantom)
    with RunningWorker(settings, db) as worker:
        _until(lambda: _job(db, job_id).state == "done", "the job to be done")
        with db.session() as session:
            row = session.execute(select(WorkerProcess)).scalar_one()
            assert (row.name, row.state, row.device, row.queues) == (worker.worker_id, "running", "cpu", "*")
            assert row.backend == worker.backend.name
    job = _job(db, job_id)
    assert (job.state, job.attempts, job.worker_id, job.last_error) == ("done", 1, worker.worker_id, None)
    with db.session() as session:
        assert session.execute(select(Result.id).where(Result.job_id == job_id)).first() is not None
        assert session.execute(select(Study.state)).scalar_one() == "done"
        started = session.execute(select(Event.detail).where(Event.kind == "job_started")).scalars().all()
        assert started == [f"radiomics, attempt 1 of 3, worker {worker.worker_id}"]
        assert session.execute(select(WorkerProcess.state)).scalar_one() == "stopped"
    if db.url.startswith("postgresql"):
        assert worker.backend.name == "procrastinate"
        assert job.queue_job_id is not None
        assert _engine_jobs(db) == [("default", f"study-{study_id}", "succeeded", {"job_id": job_id})]
    else:
        assert worker.backend.name == "sqlite"
    status = collect_status(db)
    assert [(w["name"], w["state"]) for w in status["workers"]] == [(worker.worker_id, "stopped")]
    assert f"worker {worker.worker_id}" in format_status(status)


def test_a_job_waits_until_a_worker_of_its_queue_runs(node: tuple[Settings, Database], phantom: PhantomStudy) -> None:
    settings, db = node
    study_id = _spool(settings, db, phantom)
    gpu_job = _schedule(db, study_id, phantom, "radiomics", "gpu")
    with db.session() as session, session.begin():  # another study (nothing received), default queue, later
        other = Study(study_instance_uid="1.2.826.0.1.3680043.10.99.77")
        session.add(other)
        session.flush()
        later = queue.schedule_job(session, other.id, "radiomics", {}, 1, "default").id
    with RunningWorker(settings, db, queues=("default",)):
        _until(lambda: _job(db, later).state != "pending", "the later default-queue job")
    assert _job(db, later).state == "failed"  # it ran (and found no input), while ...
    assert _job(db, gpu_job).state == "pending"  # passed over: no worker of its queue ran
    assert _job(db, gpu_job).attempts == 0
    with RunningWorker(settings, db, queues=("gpu",)) as gpu:
        _until(lambda: _job(db, gpu_job).state == "done", "the gpu job once a gpu worker runs")
    assert _job(db, gpu_job).worker_id == gpu.worker_id
    if db.url.startswith("postgresql"):
        assert [(q, s) for q, _, s, _ in _engine_jobs(db)] == [("gpu", "succeeded"), ("default", "failed")]


def test_a_paused_node_starts_no_job_on_either_backend_until_resumed(
    node: tuple[Settings, Database], phantom: PhantomStudy, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pacs_agent.jobs import worker as worker_module
    from pacs_agent.pause import pause_processing, resume_processing

    monkeypatch.setattr(worker_module, "PAUSE_RECHECK_SECONDS", 0.5)
    settings, db = node
    with db.session() as session, session.begin():
        pause_processing(session, by="test", reason="model update")
    study_id = _spool(settings, db, phantom)
    job_id = _schedule(db, study_id, phantom)
    with RunningWorker(settings, db):
        time.sleep(3)  # the worker is up and has been handed (PostgreSQL) or has looked for (SQLite) the job
        job = _job(db, job_id)
        assert (job.state, job.attempts) == ("pending", 0)
        with db.session() as session, session.begin():
            resume_processing(session, by="test")
        _until(lambda: _job(db, job_id).state == "done", "the job once processing resumed")
    assert _job(db, job_id).attempts == 1


def test_a_job_held_by_a_dead_worker_counts_its_attempt_then_is_dead(node: tuple[Settings, Database]) -> None:
    _settings, db = node
    with db.session() as session, session.begin():
        study = Study(study_instance_uid="1.2.3.4")
        session.add(study)
        session.flush()
        job_id = queue.schedule_job(session, study.id, "radiomics", {}, 2).id
    with db.session() as session, session.begin():
        first = queue.start_job(session, job_id, "gone-host:11")
        assert first is not None and first.attempt == 1
    with db.session() as session, session.begin():  # handed back: gone-host:11 stopped heart-beating
        again = queue.start_job(session, job_id, "hostB:22")
        assert again is not None and again.attempt == 2
    with db.session() as session, session.begin():
        assert queue.start_job(session, job_id, "hostC:33") is None
    job = _job(db, job_id)
    assert (job.state, job.attempts) == ("dead", 2)
    assert job.last_error == "worker hostB:22 stopped while running this job (its heartbeat stopped)"
    with db.session() as session:
        retried = session.execute(select(Event.detail).where(Event.kind == "job_retry")).scalars().all()
        assert retried == ["attempt 1 of 2: worker gone-host:11 stopped while running this job (its heartbeat stopped)"]
        assert queue.start_job(session, job_id, "hostD:44") is None  # dead stays dead


def test_postgresql_defers_the_job_in_the_transaction_that_records_it(postgres_url: str) -> None:
    db = Database(postgres_url)
    try:
        with db.session() as session:
            with session.begin():
                study = Study(study_instance_uid="1.2.3.5")
                session.add(study)
                session.flush()
                study_id = study.id
            session.begin()
            queue.schedule_job(session, study_id, "radiomics", {}, 3, "gpu")
            session.rollback()  # the decision is taken back: its queue entry goes with it
        assert _engine_jobs(db) == []
        with db.session() as session:
            assert session.execute(select(Job.id)).first() is None
        with db.session() as session, session.begin():
            job = queue.schedule_job(session, study_id, "radiomics", {}, 3, "gpu")
        assert _engine_jobs(db) == [("gpu", f"study-{study_id}", "todo", {"job_id": job.id})]
        assert _job(db, job.id).queue_job_id is not None
    finally:
        db.dispose()


def test_the_upgrade_hands_unfinished_jobs_to_procrastinate(postgres_url: str) -> None:
    """Migration 0009 on a database of 0008 with a pending and a running job: both end up in the queue engine."""
    from alembic import command

    from pacs_agent.db import alembic_config, make_engine, migrate

    engine = make_engine(postgres_url)
    try:
        command.upgrade(alembic_config(engine), "0008")
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO studies (id, study_instance_uid, state, first_received_at, last_received_at) "
                    "VALUES (1, '1.2.3.6', 'processing', now(), now())"
                )
            )
            for job_id, state in ((1, "pending"), (2, "running"), (3, "done")):
                conn.execute(
                    text(
                        "INSERT INTO jobs (id, study_id, method, state, inputs, attempts, max_attempts, not_before, "
                        "created_at, worker_id, waits) VALUES (:id, 1, 'radiomics', :state, '{}', :attempts, 3, "
                        "now(), now(), :worker, 0)"
                    ),
                    {"id": job_id, "state": state, "attempts": int(state != "pending"), "worker": "old-host:1"},
                )
        migrate(engine)
        with engine.connect() as conn:
            jobs = conn.execute(text("SELECT id, state, worker_id, attempts, queue FROM jobs ORDER BY id")).all()
            queued = conn.execute(text("SELECT args, lock, queue_name, status FROM procrastinate_jobs ORDER BY id"))
            queued_rows = [tuple(q) for q in queued.all()]
        assert [tuple(j) for j in jobs] == [
            (1, "pending", None, 0, "default"),
            (2, "pending", None, 1, "default"),  # its worker was stopped for the upgrade; the attempt stays counted
            (3, "done", "old-host:1", 1, "default"),
        ]
        assert queued_rows == [
            ({"job_id": 1}, "study-1", "default", "todo"),
            ({"job_id": 2}, "study-1", "default", "todo"),
        ]
    finally:
        engine.dispose()


class Interruption:
    """Kills a connection of the worker in the middle of a statement on rows the test holds locked.

    :meth:`start` locks the rows of ``lock_query`` in a transaction of the test; the worker's next
    statement on them waits for the lock, that waiting backend is terminated (as a PostgreSQL
    restart or a dropped connection would end it), then the lock is let go.
    """

    def __init__(self, url: str, lock_query: str, statement: str = "") -> None:
        from sqlalchemy import create_engine

        self.engine = create_engine(url)
        self.lock_query = text(lock_query)
        self.statement = statement  # only a waiting statement whose text holds this is terminated
        self.terminated = 0
        self.released = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self, then: Callable[[Session], object] | None = None) -> None:
        """Lock the rows (and do ``then`` in the same transaction); wait, on a thread, for the statement."""
        holder = self.engine.connect()
        holder.begin()
        holder.execute(self.lock_query)
        if then is not None:
            then(Session(bind=holder))
        self.thread = threading.Thread(target=self._terminate_waiter, args=(holder,), daemon=True)
        self.thread.start()

    def after_first_job(self, run: Callable[[Worker, int], object]) -> Callable[[Worker, int], object]:
        """``run`` (:meth:`Worker.run_queued_job`), starting the interruption once its first call has run."""

        def run_then_interrupt(worker: Worker, job_id: int) -> object:
            outcome = run(worker, job_id)
            if self.thread is None:
                self.start()
            return outcome

        return run_then_interrupt

    def _terminate_waiter(self, holder: Connection) -> None:
        query = text(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid() AND strpos(query, :statement) > 0"
        )
        try:
            deadline = time.monotonic() + 60
            while not self.terminated and time.monotonic() < deadline:
                with self.engine.connect() as conn:
                    self.terminated += len(conn.execute(query, {"statement": self.statement}).all())
                time.sleep(0.05)
        finally:
            holder.commit()  # what ``then`` did becomes visible (a row lock alone: nothing)
            holder.close()
            self.released.set()

    def close(self) -> None:
        """Wait for the interruption to end and close its connections."""
        if self.thread is not None:
            self.thread.join(90)
        self.engine.dispose()


def test_a_connection_lost_while_recording_a_jobs_end_leaves_the_outcome_in_the_queue_engine(
    postgres_url: str, tmp_path: Path, phantom: PhantomStudy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL drops the connection on which procrastinate is recording that a job succeeded.

    The lease is long, so the stalled-job recovery cannot mend it: the worker itself must record
    the outcome again on a new connection. Left ``doing``, the entry would hold the study's lock
    and no later job of that study would ever start.
    """
    settings, db = _node(tmp_path, postgres_url, lease_seconds=600.0)
    interrupt = Interruption(postgres_url, "SELECT id FROM procrastinate_jobs WHERE status = 'doing' FOR UPDATE")
    monkeypatch.setattr(Worker, "run_queued_job", interrupt.after_first_job(Worker.run_queued_job))
    try:
        study_id = _spool(settings, db, phantom)
        first = _schedule(db, study_id, phantom)
        with RunningWorker(settings, db):
            _until(lambda: _job(db, first).state == "done", "the job to be done")
            _until(lambda: [s for _, _, s, _ in _engine_jobs(db)] == ["succeeded"], "the queue engine's record")
            assert interrupt.terminated == 1
            second = _schedule(db, study_id, phantom)  # the study's lock is free again
            _until(lambda: _job(db, second).state == "done", "a later job of the same study")
            _until(lambda: [s for _, _, s, _ in _engine_jobs(db)] == ["succeeded"] * 2, "its record")
    finally:
        interrupt.close()
        db.dispose()


def _engine_workers(db: Database) -> list[tuple[int, datetime]]:
    """procrastinate's worker rows: id, last heartbeat."""
    with db.session() as session:
        rows = session.execute(text("SELECT id, last_heartbeat FROM procrastinate_workers ORDER BY id")).all()
    return [(r[0], r[1]) for r in rows]


def test_a_connection_lost_during_a_heartbeat_keeps_the_worker_and_its_heartbeat(
    postgres_url: str, tmp_path: Path
) -> None:
    """PostgreSQL drops the connection of a heartbeat: the worker beats again, it is not stopped and replaced.

    A worker stopped by a failed beat sends no beat while its current job finishes, and after
    ``lease_seconds`` another worker runs that job a second time.
    """
    settings, db = _node(tmp_path, postgres_url, lease_seconds=4.0)
    interrupt = Interruption(postgres_url, "SELECT id FROM procrastinate_workers FOR UPDATE")
    try:
        with RunningWorker(settings, db):
            _until(lambda: len(_engine_workers(db)) == 1, "the worker to register with the queue engine")
            [(registered, _)] = _engine_workers(db)
            interrupt.start()
            _until(interrupt.released.is_set, "a heartbeat to wait for the lock and be terminated")
            assert interrupt.terminated == 1
            released = datetime.now(UTC)
            _until(lambda: _engine_workers(db)[-1][1] > released + timedelta(seconds=2), "two more heartbeats")
            assert [w for w, _ in _engine_workers(db)] == [registered]  # the same worker, not a new one
    finally:
        interrupt.close()
        db.dispose()


def test_a_connection_lost_while_fetching_a_job_restarts_the_queue_engines_worker_in_the_same_process(
    postgres_url: str, tmp_path: Path, phantom: PhantomStudy, caplog: pytest.LogCaptureFixture
) -> None:
    """procrastinate's worker ends for good when its fetch of the next job fails: the worker process starts a new one.

    The test locks procrastinate's job table and defers a job in that transaction; the worker's
    fetch (by polling: the NOTIFY goes at commit) waits for the lock and its connection is killed.
    """
    settings, db = _node(tmp_path, postgres_url, lease_seconds=600.0)
    interrupt = Interruption(postgres_url, "LOCK TABLE procrastinate_jobs IN ACCESS EXCLUSIVE MODE", "fetch_job")
    try:
        study_id = _spool(settings, db, phantom)
        jobs: list[int] = []
        with RunningWorker(settings, db) as worker:
            _until(lambda: len(_engine_workers(db)) == 1, "the worker to register with the queue engine")
            [(registered, _)] = _engine_workers(db)
            interrupt.start(
                lambda session: jobs.append(queue.schedule_job(session, study_id, "radiomics", _inputs(phantom), 3).id)
            )
            _until(interrupt.released.is_set, "the worker's fetch to wait for the lock and be terminated")
            assert interrupt.terminated == 1
            _until(lambda: _job(db, jobs[0]).state == "done", "the job, taken by the new queue-engine worker")
            assert [w for w, _ in _engine_workers(db)] != [registered]  # the old one unregistered, a new one runs
            assert len(_engine_workers(db)) == 1
        assert "the queue engine's worker stopped" in caplog.text
        assert _job(db, jobs[0]).worker_id == worker.worker_id  # the same process
    finally:
        interrupt.close()
        db.dispose()
