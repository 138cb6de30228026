"""Passing failures are not crashes, reasons are one line, and a waiting study says what it waits for.

Issue 15, findings 6 and 7: a full disk while writing results burned a job's three attempts and
``status`` showed a traceback; a study waiting for referenced images showed ``[receiving]`` and
nothing else. The queue tests run on SQLite and PostgreSQL; the worker tests run a real worker on a
phantom study in a real spool and SQLite database.
"""

from __future__ import annotations

import errno
import logging
import re
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import create_engine, select, text, update
from sqlalchemy.exc import DBAPIError, OperationalError, ProgrammingError

from inference.phantom import PhantomStudy, generate_study
from pacs_agent.config import Settings, settings_from_mapping
from pacs_agent.db import Database
from pacs_agent.db.tables import Event, Job, JobState, Study, utcnow
from pacs_agent.jobs import files, queue
from pacs_agent.jobs.transient import ResourceUnavailable, one_line, wait_reason
from pacs_agent.jobs.worker import Worker
from pacs_agent.receive.header import SEGMENTATION, InstanceHeader, read_header
from pacs_agent.status import collect_status, format_status
from pacs_agent.studies.readiness import ReadinessRules
from pacs_agent.studies.scheduler import run_once
from pacs_agent.studies.store import record_instance
from tests.conftest import POSTGRES_ADMIN_URL
from tests.dicom_factory import record_summary
from tests.unit.test_store_and_queue import CT as STORE_CT

# --- which failures pass --------------------------------------------------------------------------------------


def test_full_disk_io_error_and_a_lost_database_are_passing_failures() -> None:
    assert wait_reason(OSError(errno.ENOSPC, "No space left on device")) == "disk full (ENOSPC)"
    assert wait_reason(OSError(errno.EIO, "Input/output error")) == "input/output error (EIO)"
    assert wait_reason(ResourceUnavailable("disk full writing results (free 3 MB < watermark 1024 MB)")) == (
        "disk full writing results (free 3 MB < watermark 1024 MB)"
    )
    try:  # a passing failure behind another exception (a library wrapping the OSError) still counts
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as exc:
            raise RuntimeError("could not save") from exc
    except RuntimeError as wrapped:
        assert wait_reason(wrapped) == "disk full (ENOSPC)"
    locked = OperationalError("INSERT ...", None, sqlite3.OperationalError("database is locked"))
    assert wait_reason(locked) == "database unavailable (database is locked)"


def test_bad_input_and_programming_errors_are_no_passing_failures() -> None:
    assert wait_reason(ValueError("empty mask")) is None
    assert wait_reason(FileNotFoundError(errno.ENOENT, "No such file or directory")) is None
    assert wait_reason(PermissionError(errno.EACCES, "Permission denied")) is None
    no_table = OperationalError("SELECT ...", None, sqlite3.OperationalError("no such table: jobs"))
    assert wait_reason(no_table) is None
    assert wait_reason(ProgrammingError("SELECT ...", None, sqlite3.ProgrammingError("syntax"))) is None


def test_a_lost_postgresql_connection_is_a_passing_failure(postgres_url: str) -> None:
    engine = create_engine(postgres_url)
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
            with admin.connect() as other:
                other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            with pytest.raises(DBAPIError) as lost:
                conn.execute(text("SELECT 1"))
        reason = wait_reason(lost.value)
        assert reason is not None and reason.startswith("database unavailable (")
        assert "\n" not in reason
    finally:
        admin.dispose()
        engine.dispose()


def test_a_crash_reason_is_one_line_with_its_log_reference() -> None:
    crash = ValueError("first line\n  Traceback (most recent call last):\n    File x")
    assert (
        one_line(crash, "3f2a9c") == "ValueError: first line Traceback (most recent call last): File x (log ref 3f2a9c)"
    )
    long = one_line(RuntimeError("x" * 1000), "abc123")
    assert len(long) < 330 and long.endswith("... (log ref abc123)")
    assert one_line(KeyError()) == "KeyError"


# --- the queue: a wait spends no attempt, its delay grows to a cap, one event per transition ------------------


def _running_job(db: Database, max_attempts: int = 3) -> int:
    with db.session() as session, session.begin():
        study = Study(study_instance_uid="1.2.3")
        session.add(study)
        session.flush()
        queue.schedule_job(session, study.id, "radiomics", {}, max_attempts)
    with db.session() as session, session.begin():
        job = queue.claim_next(session, "host:1")
    assert job is not None
    return job.id


def _events(db: Database, kind: str) -> list[str]:
    with db.session() as session:
        return list(session.execute(select(Event.detail).where(Event.kind == kind).order_by(Event.id)).scalars())


def test_a_waiting_job_spends_no_attempt_and_waits_longer_each_time_up_to_a_cap(any_db: Database) -> None:
    job_id = _running_job(any_db, max_attempts=3)
    now = utcnow()
    delays = []
    for spin in range(8):  # more spins than attempts: waiting never makes a job dead
        with any_db.session() as session, session.begin():
            due = queue.wait(
                session, job_id, f"disk full writing results (free {10 - spin} MB < watermark 1024 MB)", now=now
            )
            assert due is not None
            delays.append((due - now).total_seconds())
            job = session.get(Job, job_id)
            assert (job.state, job.attempts, job.waits) == (JobState.PENDING, 0, spin + 1)
            assert session.execute(select(Study.state)).scalar_one() == "queued"
        with any_db.session() as session, session.begin():
            assert queue.claim_next(session, "host:1", now=due - timedelta(seconds=1)) is None  # not yet
            again = queue.claim_next(session, "host:1", now=due)
        assert again is not None and again.attempt == 1
        now = due
    assert delays == [10, 20, 40, 80, 160, 300, 300, 300]
    assert len(_events(any_db, "job_started")) == 1  # a wait tried again is no new start ...
    waiting = _events(any_db, "job_waiting")
    assert len(waiting) == 1  # ... and the same problem with other figures no new transition
    assert waiting[0].startswith("waiting: disk full writing results (free 10 MB < watermark 1024 MB); retrying at ")
    with any_db.session() as session, session.begin():
        queue.complete(session, job_id, "radiomics: 1 lesion(s), 3 result object(s)", 1.0)
    with any_db.session() as session:
        job = session.get(Job, job_id)
        assert (job.state, job.attempts, job.waits, job.wait_reason, job.last_error) == ("done", 1, 0, None, None)
        assert session.execute(select(Study.state)).scalar_one() == "done"
    (done,) = _events(any_db, "job_done")
    assert "after 8 wait(s), the last for: disk full writing results" in done


def test_waiting_for_another_problem_is_a_new_transition(any_db: Database) -> None:
    job_id = _running_job(any_db)
    reasons = ["disk full (ENOSPC)", "disk full (ENOSPC)", "database unavailable (database is locked)"]
    for reason in reasons:
        with any_db.session() as session, session.begin():
            due = queue.wait(session, job_id, reason)
        assert due is not None
        with any_db.session() as session, session.begin():
            assert queue.claim_next(session, "host:1", now=due) is not None
    assert [d.split(";")[0] for d in _events(any_db, "job_waiting")] == [
        "waiting: disk full (ENOSPC)",
        "waiting: database unavailable (database is locked)",
    ]


def test_a_crash_after_waiting_spends_an_attempt_and_ends_the_wait(any_db: Database) -> None:
    job_id = _running_job(any_db, max_attempts=2)
    with any_db.session() as session, session.begin():
        due = queue.wait(session, job_id, "disk full (ENOSPC)")
    assert due is not None
    with any_db.session() as session, session.begin():
        assert queue.claim_next(session, "host:1", now=due) is not None
        assert queue.fail(
            session, job_id, "ValueError: boom (log ref 000001)", retryable=True, retry_delay_seconds=0
        ) == ("pending")
        job = session.get(Job, job_id)
        assert (job.attempts, job.waits, job.wait_reason) == (1, 0, None)
    with any_db.session() as session, session.begin():
        assert queue.claim_next(session, "host:1", now=due) is not None
        assert queue.fail(
            session, job_id, "ValueError: boom (log ref 000002)", retryable=True, retry_delay_seconds=0
        ) == ("dead")


def test_a_wait_recorded_after_the_job_was_taken_back_changes_nothing(any_db: Database) -> None:
    job_id = _running_job(any_db)
    with any_db.session() as session, session.begin():
        assert queue.requeue_stale(session, lease_seconds=60, now=utcnow() + timedelta(minutes=5)) == 1
    with any_db.session() as session, session.begin():
        assert queue.wait(session, job_id, "disk full (ENOSPC)") is None
        job = session.get(Job, job_id)
        assert (job.state, job.waits, job.wait_reason) == ("pending", 0, None)
    assert _events(any_db, "job_waiting") == []


# --- the worker: a real job meets a full disk, a missing spool, a crash -------------------------------------------


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> PhantomStudy:
    return generate_study(tmp_path_factory.mktemp("transient"), seed=3, slices=24, rows=64, columns=64, lesions=1)


def _settings(state_dir: Path, min_free_mb: int = 0) -> Settings:
    return settings_from_mapping({"storage": {"state_dir": str(state_dir), "min_free_mb": min_free_mb}})


@pytest.fixture
def node(tmp_path: Path, phantom: PhantomStudy) -> Iterator[tuple[Settings, Database, int]]:
    """A node database and spool holding ``phantom``, with one pending radiomics job; (settings, db, job id)."""
    settings = _settings(tmp_path / "state")
    settings.storage.state_dir.mkdir(parents=True)
    db = Database(settings.database_url)
    series: dict[str, tuple[int, int]] = {}
    with db.session() as session, session.begin():
        for path in [*phantom.ct_files, phantom.seg_file]:
            relative = Path(phantom.study_instance_uid) / path.name
            target = settings.storage.spool_dir / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
            record_instance(
                session,
                read_header(target.read_bytes()),
                path=str(relative),
                size_bytes=target.stat().st_size,
                calling_ae_title="TEST",
                series_ids=series,
            )
        study_id = next(iter(series.values()))[0]
        ct = pydicom.dcmread(phantom.ct_files[0], stop_before_pixels=True)
        seg = pydicom.dcmread(phantom.seg_file, stop_before_pixels=True)
        inputs = {
            "ct_series_instance_uid": str(ct.SeriesInstanceUID),
            "segmentation_sop_instance_uid": str(seg.SOPInstanceUID),
        }
        job_id = queue.schedule_job(session, study_id, "radiomics", inputs, max_attempts=3).id
    yield settings, db, job_id
    db.dispose()


def _job(db: Database, job_id: int) -> Job:
    with db.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        session.expunge(job)
        return job


def _time_passes(db: Database, job_id: int) -> None:
    """The waiting job's delay is over (the database clock, not the test, moves on)."""
    with db.session() as session, session.begin():
        session.execute(update(Job).where(Job.id == job_id).values(not_before=utcnow()))


def _status_line(db: Database, job_id: int) -> str:
    lines = [line for line in format_status(collect_status(db)).splitlines() if line.startswith(f"  job {job_id} ")]
    assert len(lines) == 1
    return lines[0]


def test_a_full_disk_while_writing_results_makes_the_job_wait_then_it_completes_with_its_attempt(
    node: tuple[Settings, Database, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, db, job_id = node
    real_write = files.write_dataset
    failures = {"left": 2}

    def full_disk_twice(ds: pydicom.Dataset, path: Any) -> Path:
        # the one stand-in of these tests: a full disk cannot be made safely on a shared machine
        if failures["left"]:
            failures["left"] -= 1
            if failures["left"]:  # as the OS says it
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            try:  # as pydicom passes it on: no number, the OS's error as the cause
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError as exc:
                raise OSError("With tag (7FE0,0010) got exception: [Errno 28] No space left on device") from exc
        return real_write(ds, path)

    monkeypatch.setattr(files, "write_dataset", full_disk_twice)
    worker = Worker(settings, db)
    for spin in (1, 2):
        assert worker.run_one()
        job = _job(db, job_id)
        assert (job.state, job.attempts, job.waits, job.last_error) == ("pending", 0, spin, None)
        assert re.fullmatch(r"disk full writing results \(ENOSPC, free \d+ MB\)", job.wait_reason or "")
        assert job.not_before > utcnow()
        assert not worker.run_one()  # not before its delay
        line = _status_line(db, job_id)
        assert re.fullmatch(
            rf"  job {job_id} radiomics: pending \(attempt 0/3\) - waiting: disk full writing results "
            r"\(ENOSPC, free \d+ MB\); retrying at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC",
            line,
        ), line
        _time_passes(db, job_id)
    assert worker.run_one()
    job = _job(db, job_id)
    assert (job.state, job.attempts, job.waits, job.wait_reason, job.last_error) == ("done", 1, 0, None, None)
    assert len(_events(db, "job_waiting")) == 1
    assert len(_events(db, "job_started")) == 1
    (done,) = _events(db, "job_done")
    assert "after 2 wait(s)" in done
    assert list((settings.storage.results_dir).rglob("*.dcm"))


@pytest.fixture
def full_results_disk(node: tuple[Settings, Database, int]) -> Iterator[Path]:
    """A real full filesystem (an 8 MB tmpfs, filled) mounted as the results directory; the filler's path.

    Needs the right to mount (root in this machine's containers); skipped elsewhere.
    """
    settings, _db, _job = node
    results = settings.storage.results_dir
    results.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(results)], capture_output=True, text=True, check=False
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        filler = results / "filler"
        with filler.open("wb") as fh:
            try:
                while True:
                    fh.write(b"\0" * 65536)
                    fh.flush()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
        yield filler
    finally:
        subprocess.run(["umount", "--lazy", str(results)], check=True)


def test_a_really_full_disk_makes_the_job_wait_until_space_is_freed(
    node: tuple[Settings, Database, int], full_results_disk: Path
) -> None:
    settings, db, job_id = node
    worker = Worker(settings, db)
    assert worker.run_one()
    job = _job(db, job_id)
    assert (job.state, job.attempts, job.last_error) == ("pending", 0, None)
    assert re.fullmatch(r"disk full writing results \(ENOSPC, free 0 MB\)", job.wait_reason or ""), job.wait_reason
    assert not [p for p in settings.storage.results_dir.rglob("*") if p.is_file() and p != full_results_disk]
    full_results_disk.unlink()  # the operator frees space
    _time_passes(db, job_id)
    assert worker.run_one()
    job = _job(db, job_id)
    assert (job.state, job.attempts, job.wait_reason) == ("done", 1, None)
    assert list(settings.storage.results_dir.rglob("*.dcm"))


def test_results_are_not_written_under_the_disk_watermark(node: tuple[Settings, Database, int]) -> None:
    settings, db, job_id = node
    crowded = _settings(settings.storage.state_dir, min_free_mb=10**9)  # more than any disk here has free
    assert Worker(crowded, db).run_one()
    job = _job(db, job_id)
    assert (job.state, job.attempts) == ("pending", 0)
    assert re.fullmatch(r"disk full writing results \(free \d+ MB < watermark 1000000000 MB\)", job.wait_reason or "")
    assert not list(settings.storage.results_dir.rglob("*.dcm"))  # nothing half-written
    (waiting,) = _events(db, "job_waiting")
    assert waiting.startswith("waiting: disk full writing results (free ")
    _time_passes(db, job_id)
    assert Worker(settings, db).run_one()  # room again
    assert (_job(db, job_id).state, _job(db, job_id).attempts) == ("done", 1)


def test_a_spool_that_is_gone_makes_the_job_wait_a_file_that_is_gone_fails_it(
    node: tuple[Settings, Database, int],
) -> None:
    settings, db, job_id = node
    spool = settings.storage.spool_dir
    unmounted = spool.with_name("spool-unmounted")
    spool.rename(unmounted)  # the shared filesystem went away: the mount point is missing
    try:
        assert Worker(settings, db).run_one()
    finally:
        unmounted.rename(spool)
    job = _job(db, job_id)
    assert (job.state, job.attempts) == ("pending", 0)
    assert (job.wait_reason or "").startswith(f"the spool {spool} is not available")
    _time_passes(db, job_id)
    next(spool.rglob("*.dcm")).unlink()  # the spool is back, but a file the database names is gone
    assert Worker(settings, db).run_one()
    job = _job(db, job_id)
    assert (job.state, job.attempts, job.wait_reason) == ("failed", 1, None)
    assert "missing from the spool" in (job.last_error or "")


def test_a_crash_reason_is_one_line_and_its_traceback_is_in_the_log_under_its_reference(
    node: tuple[Settings, Database, int], caplog: pytest.LogCaptureFixture
) -> None:
    settings, db, job_id = node
    with db.session() as session, session.begin():  # a job row damaged by hand: a crash, not bad input
        session.execute(update(Job).where(Job.id == job_id).values(inputs='{"structures": {"tumours": ["one"]}}'))
    with caplog.at_level(logging.ERROR, logger="pacs_agent.jobs.worker"):
        assert Worker(settings, db).run_one()
    job = _job(db, job_id)
    assert (job.state, job.attempts, job.wait_reason) == ("pending", 1, None)
    match = re.fullmatch(r"ValueError: .+ \(log ref ([0-9a-f]{6})\)", job.last_error or "")
    assert match is not None and "\n" not in (job.last_error or ""), job.last_error
    (record,) = [r for r in caplog.records if f"log ref {match.group(1)}" in r.getMessage()]
    assert record.exc_info is not None  # the traceback, in the log only
    assert _status_line(db, job_id).endswith(f" - {job.last_error}")


# --- a study waiting for the images its segmentation was drawn on says so in `status` ------------------------

CT = replace(STORE_CT, sop_instance_uid="1.2.3.100.1")
SEG = replace(
    CT,
    sop_class_uid=SEGMENTATION,
    sop_instance_uid="1.2.3.200.1",
    series_instance_uid="1.2.3.200",
    modality="SEG",
    referenced_series_uids=("1.2.3.100",),
    referenced_instance_uids=tuple(f"1.2.3.100.{n}" for n in range(1, 41)),
)
RULES = ReadinessRules(quiet_seconds=0, phase=None, reference_wait_seconds=300)


def _receive(db: Database, *headers: InstanceHeader) -> None:
    with db.session() as session, session.begin():
        for header in headers:
            record_instance(session, header, path="x", size_bytes=10, calling_ae_title="CT1")
            if header.sop_class_uid == SEGMENTATION:
                record_summary(session, header)


def _why(db: Database) -> list[str]:
    status = format_status(collect_status(db)).splitlines()
    assert "study 1.2.3  [receiving]" in status
    return [line for line in status if line.startswith("  why: ")]


def test_status_says_which_referenced_images_a_receiving_study_waits_for(any_db: Database) -> None:
    ct = [replace(CT, sop_instance_uid=f"1.2.3.100.{n}") for n in range(1, 29)]  # 28 of the 40 it was drawn on
    _receive(any_db, *ct, SEG)
    with any_db.session() as session, session.begin():
        assert run_once(session, RULES, ("radiomics",), 3).jobs_created == 0
        last = session.execute(select(Study.last_received_at)).scalar_one()
    expected = (
        "  why: segmentation 1.2.3.200.1 was drawn on 40 image(s), 12 of which have not arrived; waiting for them "
        f"since {last:%H:%M:%S} UTC (the last arrival); incomplete after 300 s without them"
    )
    assert _why(any_db) == [expected]
    with any_db.session() as session, session.begin():  # looked at again a minute later: the same words
        run_once(session, RULES, ("radiomics",), 3, now=last + timedelta(minutes=1))
    assert _why(any_db) == [expected]
    _receive(any_db, replace(CT, sop_instance_uid="1.2.3.100.29"))  # one more arrives: the wait starts again
    assert _why(any_db) == []
    with any_db.session() as session, session.begin():
        run_once(session, RULES, ("radiomics",), 3)
    (why,) = _why(any_db)
    assert "11 of which have not arrived" in why


def test_status_says_a_study_is_in_its_quiet_period(any_db: Database) -> None:
    _receive(any_db, CT)
    with any_db.session() as session, session.begin():
        run_once(session, replace(RULES, quiet_seconds=30), ("radiomics",), 3)
        last = session.execute(select(Study.last_received_at)).scalar_one()
    assert _why(any_db) == [
        f"  why: receiving: last instance at {last:%H:%M:%S} UTC; readiness is decided after 30 s without new instances"
    ]
