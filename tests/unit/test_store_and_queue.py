"""Grouping by UID, duplicate handling, scheduling and the job queue, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from datetime import timedelta

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import func, select

from pacs_agent.db import Database, include_in_comparison
from pacs_agent.db.tables import Base, Event, Instance, Job, Series, Study, StudyState, utcnow
from pacs_agent.jobs import queue
from pacs_agent.receive.header import CT_IMAGE, SEGMENTATION, InstanceHeader
from pacs_agent.studies.readiness import ReadinessRules
from pacs_agent.studies.scheduler import run_once
from pacs_agent.studies.store import (
    NewInstance,
    StoreOutcome,
    count_duplicate,
    is_known_instance,
    record_instance,
    record_instances,
)
from tests.dicom_factory import record_summary

CT = InstanceHeader(
    sop_class_uid=CT_IMAGE,
    sop_instance_uid="1.2.3.1",
    study_instance_uid="1.2.3",
    series_instance_uid="1.2.3.100",
    transfer_syntax_uid="1.2.840.10008.1.2.1",
    modality="CT",
    series_description="PV",
    frame_of_reference_uid="1.2.3.9",
    patient_id="PID",
    issuer_of_patient_id=None,
    patient_birth_date="19600101",
    patient_sex="F",
    study_date="20260101",
    accession_number="A1",
    referenced_series_uids=(),
    has_pixel_data=True,
    contrast_bolus_agent="IOPAMIDOL",
)
RULES = ReadinessRules(quiet_seconds=0)


def ct_slice(n: int, series: str = "1.2.3.100", study: str = "1.2.3") -> InstanceHeader:
    return replace(CT, sop_instance_uid=f"{series}.{n}", series_instance_uid=series, study_instance_uid=study)


def seg_object(refs: tuple[str, ...] = ("1.2.3.100",), uid: str = "1.2.3.200.1") -> InstanceHeader:
    return replace(
        CT,
        sop_class_uid=SEGMENTATION,
        sop_instance_uid=uid,
        series_instance_uid="1.2.3.200",
        modality="SEG",
        referenced_series_uids=refs,
    )


def store(db: Database, *headers: InstanceHeader) -> list[StoreOutcome]:
    outcomes = []
    with db.session() as session, session.begin():
        for header in headers:
            outcomes.append(record_instance(session, header, path="x", size_bytes=10, calling_ae_title="CT1"))
            if header.sop_class_uid == SEGMENTATION:
                record_summary(session, header)
    return outcomes


def test_migration_matches_models(any_db: Database) -> None:
    with any_db.engine.connect() as conn:
        options = {"compare_type": True, "include_object": include_in_comparison}
        diff = compare_metadata(MigrationContext.configure(conn, opts=options), Base.metadata)
    assert diff == []


def test_grouping_by_study_and_series(any_db: Database) -> None:
    store(any_db, ct_slice(1), ct_slice(2), ct_slice(1, series="1.2.3.101"), ct_slice(1, "1.5.1", "1.5"))
    with any_db.session() as session:
        assert session.scalar(select(func.count(Study.id))) == 2
        assert session.scalar(select(func.count(Series.id))) == 3
        assert session.scalar(select(func.count(Instance.id))) == 4


def test_duplicate_sop_instance_kept_once_and_counted(any_db: Database) -> None:
    assert store(any_db, ct_slice(1), ct_slice(1), ct_slice(1)) == [
        StoreOutcome.STORED,
        StoreOutcome.DUPLICATE,
        StoreOutcome.DUPLICATE,
    ]
    with any_db.session() as session:
        instance = session.execute(select(Instance)).scalar_one()
        assert instance.duplicates == 2


def test_receive_hot_path_on_bare_connections(any_db: Database) -> None:
    """The C-STORE handler's way: a read-only look-up, then one write transaction per instance, no ORM session."""
    series_ids: dict[str, tuple[int, int]] = {}
    before = utcnow()
    for n in (1, 2, 3):
        header = ct_slice(n)
        with any_db.reader.connect() as reader:
            assert not is_known_instance(reader, header.sop_instance_uid)
        with any_db.engine.begin() as connection:
            outcome = record_instance(
                connection, header, path=f"p{n}", size_bytes=n, calling_ae_title="CT1", series_ids=series_ids
            )
        assert outcome is StoreOutcome.STORED
    assert list(series_ids) == ["1.2.3.100"]  # looked up once, then cached
    with any_db.reader.connect() as reader:
        assert is_known_instance(reader, "1.2.3.100.2")
    with any_db.engine.begin() as connection:
        count_duplicate(connection, "1.2.3.100.2")
    with any_db.session() as session:
        rows = session.scalars(select(Instance).order_by(Instance.path)).all()
        assert [(i.path, i.size_bytes, i.duplicates) for i in rows] == [("p1", 1, 0), ("p2", 2, 1), ("p3", 3, 0)]
        assert all(i.received_at >= before and i.received_at.tzinfo is not None for i in rows)
        study = session.scalars(select(Study)).one()
        assert study.state == "receiving" and study.last_received_at >= rows[-1].received_at


def test_concurrent_senders_of_one_study(any_db: Database) -> None:
    errors: list[BaseException] = []

    def send(offset: int) -> None:
        try:
            for n in range(15):
                store(any_db, ct_slice(offset * 100 + n))
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with any_db.session() as session:
        assert session.scalar(select(func.count(Instance.id))) == 60
        assert session.scalar(select(func.count(Study.id))) == 1


def test_scheduler_creates_one_job_when_ready(any_db: Database) -> None:
    store(any_db, ct_slice(1), ct_slice(2), ct_slice(3), seg_object())
    with any_db.session() as session, session.begin():
        outcome = run_once(session, RULES, ("radiomics",), max_attempts=3)
    assert outcome.jobs_created == 1
    with any_db.session() as session, session.begin():
        assert run_once(session, RULES, ("radiomics",), 3).jobs_created == 0  # nothing changed
        job = session.execute(select(Job)).scalar_one()
        assert json.loads(job.inputs) == {
            "ct_series_instance_uid": "1.2.3.100",
            "segmentation_sop_instance_uid": "1.2.3.200.1",
            "structures": {"tumours": [1], "organs": []},
        }
        assert session.execute(select(Study.state)).scalar_one() == "queued"


def test_incomplete_study_records_reason(any_db: Database) -> None:
    other_frame = replace(seg_object(refs=("9.9.9",)), frame_of_reference_uid="9.9.8")
    store(any_db, ct_slice(1), ct_slice(2), ct_slice(3), other_frame)
    with any_db.session() as session, session.begin():
        assert run_once(session, RULES, ("radiomics",), 3).jobs_created == 0
    with any_db.session() as session:
        study = session.execute(select(Study)).scalar_one()
        assert study.state == "incomplete"
        assert "references 9.9.9" in (study.state_reason or "")
        kinds = session.execute(select(Event.kind)).scalars().all()
        assert "study_incomplete" in kinds


def test_late_instance_reopens_a_processed_study(any_db: Database) -> None:
    store(any_db, ct_slice(1), ct_slice(2), ct_slice(3), seg_object())
    worker = "host:1"
    with any_db.session() as session, session.begin():
        run_once(session, RULES, ("radiomics",), 3)
    with any_db.session() as session, session.begin():
        job = queue.claim_next(session, worker)
        assert job is not None
    with any_db.session() as session, session.begin():
        queue.complete(session, job.id, "ok", 1.0)
    with any_db.session() as session:
        assert session.execute(select(Study.state)).scalar_one() == "done"
    store(any_db, ct_slice(4))
    with any_db.session() as session:
        assert session.execute(select(Study.state)).scalar_one() == "receiving"
    with any_db.session() as session, session.begin():
        assert run_once(session, RULES, ("radiomics",), 3).jobs_created == 1
        assert session.scalar(select(func.count(Job.id))) == 2


def test_claim_is_exclusive_between_workers(any_db: Database) -> None:
    store(any_db, ct_slice(1), ct_slice(2), ct_slice(3), seg_object())
    with any_db.session() as session, session.begin():
        run_once(session, RULES, ("radiomics",), 3)
    claimed: list[object] = []

    def claim(name: str) -> None:
        with any_db.session() as session, session.begin():
            claimed.append(queue.claim_next(session, name))

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(1 for c in claimed if c is not None) == 1


def _one_running_job(db: Database, worker: str, max_attempts: int = 2) -> queue.ClaimedJob:
    store(db, ct_slice(1), ct_slice(2), ct_slice(3), seg_object())
    with db.session() as session, session.begin():
        run_once(session, RULES, ("radiomics",), max_attempts)
    with db.session() as session, session.begin():
        job = queue.claim_next(session, worker)
    assert job is not None
    return job


def test_input_error_fails_at_once(any_db: Database) -> None:
    job = _one_running_job(any_db, "host:1")
    with any_db.session() as session, session.begin():
        state = queue.fail(session, job.id, "empty mask", retryable=False, retry_delay_seconds=0)
    assert state == "failed"
    with any_db.session() as session:
        study = session.execute(select(Study)).scalar_one()
        assert (study.state, study.state_reason) == ("failed", "empty mask")


def test_retry_then_dead(any_db: Database) -> None:
    job = _one_running_job(any_db, "host:1", max_attempts=2)
    with any_db.session() as session, session.begin():
        assert queue.fail(session, job.id, "boom", retryable=True, retry_delay_seconds=3600) == "pending"
    with any_db.session() as session, session.begin():
        assert queue.claim_next(session, "host:2") is None  # not before the retry delay
        again = queue.claim_next(session, "host:2", now=utcnow() + timedelta(hours=2))
    assert again is not None and again.attempt == 2
    with any_db.session() as session, session.begin():
        assert queue.fail(session, job.id, "boom again", retryable=True, retry_delay_seconds=0) == "dead"
        assert session.get(Job, job.id).last_error == "boom again"


def test_stale_job_of_a_dead_worker_is_requeued(any_db: Database) -> None:
    job = _one_running_job(any_db, "otherhost:12345", max_attempts=3)
    with any_db.session() as session, session.begin():
        assert queue.requeue_stale(session, lease_seconds=60) == 0  # heartbeat is fresh
        assert queue.requeue_stale(session, lease_seconds=60, now=utcnow() + timedelta(minutes=5)) == 1
        requeued = session.get(Job, job.id)
        assert requeued.state == "pending"
        assert "no heartbeat" in (requeued.last_error or "")


def test_local_dead_pid_is_requeued_without_waiting(any_db: Database) -> None:
    import socket
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    job = _one_running_job(any_db, f"{socket.gethostname()}:{proc.pid}")
    with any_db.session() as session, session.begin():
        assert queue.requeue_stale(session, lease_seconds=3600) == 1
        assert "worker process exited" in (session.get(Job, job.id).last_error or "")


def test_a_group_of_instances_is_recorded_in_one_insert_with_each_outcome(any_db: Database) -> None:
    store(any_db, ct_slice(1))  # recorded before the group
    group = [ct_slice(2), ct_slice(1), ct_slice(3, "1.5.1", "1.5"), ct_slice(2), ct_slice(4)]
    with any_db.engine.begin() as connection:
        outcomes = record_instances(
            connection, [NewInstance(h, f"p{n}", 10, "CT2") for n, h in enumerate(group)], series_ids={}
        )
    assert outcomes == [
        StoreOutcome.STORED,
        StoreOutcome.DUPLICATE,  # recorded before
        StoreOutcome.STORED,
        StoreOutcome.DUPLICATE,  # earlier in the same group
        StoreOutcome.STORED,
    ]
    with any_db.session() as session:
        rows = dict(session.execute(select(Instance.sop_instance_uid, Instance.path)).all())
        assert rows == {"1.2.3.100.1": "x", "1.2.3.100.2": "p0", "1.5.1.3": "p2", "1.2.3.100.4": "p4"}
        duplicates = dict(session.execute(select(Instance.sop_instance_uid, Instance.duplicates)).all())
        assert duplicates["1.2.3.100.1"] == 1 and duplicates["1.2.3.100.2"] == 1
        assert {s.study_instance_uid: s.state for s in session.scalars(select(Study))} == {
            "1.2.3": StudyState.RECEIVING,
            "1.5": StudyState.RECEIVING,
        }
    with any_db.engine.begin() as connection:
        assert record_instances(connection, []) == []
