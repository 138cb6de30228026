"""Operations commands on a temporary SQLite database: ``status``, ``events`` and ``retry``."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from pacs_agent.audit import record_event
from pacs_agent.cli import main
from pacs_agent.config import load_settings
from pacs_agent.db import Database
from pacs_agent.db.tables import Delivery, Event, Job, Result, Study, utcnow
from pacs_agent.events_cli import EventQuery, RetryRefused, parse_since, query_events, retry_job, retry_study
from pacs_agent.jobs import queue
from pacs_agent.receive.header import CT_IMAGE, SEGMENTATION, InstanceHeader
from pacs_agent.status import collect_status, format_status
from pacs_agent.studies.readiness import ReadinessRules
from pacs_agent.studies.scheduler import run_once
from pacs_agent.studies.store import record_instance
from tests.dicom_factory import record_summary

STUDY = "1.2.826.0.1.3680043.10.99.1"
SECRET_PATIENT_ID = "PAT-SECRET-4711"
RULES = ReadinessRules(quiet_seconds=0)
CT = InstanceHeader(
    sop_class_uid=CT_IMAGE,
    sop_instance_uid=f"{STUDY}.1.1",
    study_instance_uid=STUDY,
    series_instance_uid=f"{STUDY}.1",
    transfer_syntax_uid="1.2.840.10008.1.2.1",
    modality="CT",
    series_description="PV 70s",
    frame_of_reference_uid=f"{STUDY}.9",
    patient_id=SECRET_PATIENT_ID,
    issuer_of_patient_id=None,
    patient_birth_date="19510203",
    patient_sex="F",
    study_date="20260101",
    accession_number="ACC-SECRET",
    referenced_series_uids=(),
    has_pixel_data=True,
    contrast_bolus_agent="IOPAMIDOL",
)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "pacs-agent.toml"
    path.write_text(f'[storage]\nstate_dir = "{tmp_path / "state"}"\n')
    return path


@pytest.fixture
def db(config: Path) -> Database:
    database = Database(load_settings(config, environ={}).database_url)
    yield database  # type: ignore[misc]
    database.dispose()


def receive_ready_study(db: Database, study: str = STUDY) -> int:
    """Three CT slices and a SEG from CT1 (plus a duplicate), evaluated: returns the scheduled job id."""
    ct = replace(CT, study_instance_uid=study, series_instance_uid=f"{study}.1")
    headers = [replace(ct, sop_instance_uid=f"{study}.1.{n}") for n in (1, 2, 3)]
    seg = replace(
        ct,
        sop_class_uid=SEGMENTATION,
        sop_instance_uid=f"{study}.2.1",
        series_instance_uid=f"{study}.2",
        modality="SEG",
        referenced_series_uids=(f"{study}.1",),
    )
    with db.session() as session, session.begin():
        for header in [*headers, seg, headers[0]]:
            record_instance(session, header, path="x", size_bytes=1000, calling_ae_title="CT1")
        record_summary(session, seg)
    with db.session() as session, session.begin():
        run_once(session, RULES, ("radiomics",), 3)
    with db.session() as session:
        return session.execute(select(Job.id).order_by(Job.id.desc())).scalars().first()  # type: ignore[return-value]


def run_and_fail(db: Database, *, retryable: bool) -> int:
    with db.session() as session, session.begin():
        claimed = queue.claim_next(session, "host:1")
        assert claimed is not None
        queue.fail(session, claimed.id, "segment 1 is empty", retryable=retryable, retry_delay_seconds=0)
    return claimed.id


def run_and_complete(db: Database) -> int:
    with db.session() as session, session.begin():
        claimed = queue.claim_next(session, "host:1")
        assert claimed is not None
        queue.complete(session, claimed.id, "1 lesion", duration_seconds=2.5)
    return claimed.id


# -- events ---------------------------------------------------------------------------------------


def test_parse_since() -> None:
    now = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    assert parse_since("30m", now) == now - timedelta(minutes=30)
    assert parse_since("2h", now) == now - timedelta(hours=2)
    assert parse_since("7d", now) == now - timedelta(days=7)
    assert parse_since("1w", now) == now - timedelta(weeks=1)
    assert parse_since("2026-11-20", now) == datetime(2026, 11, 20, tzinfo=UTC)
    assert parse_since("2026-11-20T14:30", now) == datetime(2026, 11, 20, 14, 30, tzinfo=UTC)
    assert parse_since("2026-11-20T14:30+01:00", now) == datetime(2026, 11, 20, 13, 30, tzinfo=UTC)
    for bad in ("yesterday", "2h30", "-1d", "2026-13-01"):
        with pytest.raises(ValueError, match="not an ISO date"):
            parse_since(bad, now)


def add_events(db: Database) -> None:
    base = utcnow() - timedelta(hours=5)
    rows = [
        ("association_rejected", "WARNING", None, None, "INTRUDER", "host 10.9.9.9 is not in [security] allowed_hosts"),
        ("association", "INFO", None, None, "CT1", "released: 4 stored, 1 duplicate(s), 0 refused"),
        ("job_scheduled", "INFO", STUDY, 1, None, "radiomics: ready"),
        ("job_dead", "ERROR", STUDY, 1, None, "attempt 3 of 3: worker crashed"),
        ("delivered", "INFO", "1.2.3.other", None, "PACS", "pacs: sr.dcm: Success"),
    ]
    with db.session() as session, session.begin():
        for n, (kind, level, study, job, aet, detail) in enumerate(rows):
            event = record_event(
                session, kind, level=level, study_instance_uid=study, job_id=job, ae_title=aet, detail=detail, log=False
            )
            event.at = base + timedelta(hours=n)
            if kind == "association_rejected":
                event.peer = "10.9.9.9"


def test_event_queries(db: Database) -> None:
    add_events(db)

    def kinds(**criteria: object) -> list[str]:
        return [e["kind"] for e in query_events(db, EventQuery(**criteria))]  # type: ignore[arg-type]

    assert kinds() == ["association_rejected", "association", "job_scheduled", "job_dead", "delivered"]
    assert kinds(limit=2) == ["job_dead", "delivered"]  # the newest two, oldest first
    assert kinds(study_instance_uid=STUDY) == ["job_scheduled", "job_dead"]
    assert kinds(kinds=("job_dead", "association")) == ["association", "job_dead"]
    assert kinds(job_id=1) == ["job_scheduled", "job_dead"]
    assert kinds(min_level="WARNING") == ["association_rejected", "job_dead"]
    assert kinds(min_level="ERROR") == ["job_dead"]
    assert kinds(since=utcnow() - timedelta(hours=2, minutes=30)) == ["job_dead", "delivered"]


def test_events_command(db: Database, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    receive_ready_study(db)
    add_events(db)
    assert main(["events", "--config", str(config), "--kind", "association_rejected,job_dead"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert "WARNING association_rejected aet=INTRUDER peer=10.9.9.9 - host 10.9.9.9 is not in" in lines[0]
    assert f"ERROR   job_dead study={STUDY} job=1 - attempt 3 of 3: worker crashed" in lines[1]
    assert main(["events", "--config", str(config), "--study", STUDY, "--json"]) == 0
    out = capsys.readouterr().out
    rows = json.loads(out)
    assert [r["kind"] for r in rows] == ["structures_chosen", "job_scheduled", "job_scheduled", "job_dead"]
    assert all(r["study_instance_uid"] == STUDY for r in rows)
    assert main(["events", "--config", str(config), "--since", "2h", "--level", "warning"]) == 0
    assert capsys.readouterr().out.strip() == "no matching events"
    assert main(["events", "--config", str(config)]) == 0
    everything = capsys.readouterr().out
    assert SECRET_PATIENT_ID not in everything and "ACC-SECRET" not in everything and "19510203" not in everything
    assert main(["events", "--config", str(config), "--since", "last tuesday"]) == 2
    assert "--since: 'last tuesday' is not an ISO date" in capsys.readouterr().err


# -- retry ----------------------------------------------------------------------------------------


def test_retry_of_a_failed_job(db: Database) -> None:
    receive_ready_study(db)
    job_id = run_and_fail(db, retryable=False)
    with db.session() as session, session.begin():
        message = retry_job(session, job_id, operator="alice")
    assert message.startswith(f"job {job_id} (radiomics, study {STUDY}) is pending again (was failed after 1 attempt")
    with db.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert (job.state, job.attempts, job.last_error, job.worker_id) == ("pending", 0, None, None)
        study = session.execute(select(Study)).scalar_one()
        assert (study.state, study.state_reason) == ("queued", None)
        event = session.execute(select(Event).where(Event.kind == "job_retry_requested")).scalar_one()
        assert event.job_id == job_id and event.study_instance_uid == STUDY
        assert event.detail.startswith("by alice: radiomics job was failed after 1 attempt(s): segment 1 is empty")
    with db.session() as session, session.begin():
        claimed = queue.claim_next(session, "host:2")  # a worker takes it again, as attempt 1
        assert claimed is not None and claimed.id == job_id and claimed.attempt == 1


def test_retry_of_a_dead_job_resets_its_attempts(db: Database) -> None:
    receive_ready_study(db)
    for _ in range(3):
        job_id = run_and_fail(db, retryable=True)
    with db.session() as session:
        assert session.get(Job, job_id).state == "dead"  # type: ignore[union-attr]
    with db.session() as session, session.begin():
        retry_job(session, job_id, operator="bob")
    with db.session() as session:
        job = session.get(Job, job_id)
        assert job is not None and (job.state, job.attempts, job.max_attempts) == ("pending", 0, 3)


def test_retry_refuses_what_it_cannot_do(db: Database) -> None:
    job_id = receive_ready_study(db)
    with db.session() as session, pytest.raises(RetryRefused, match=f"job {job_id} is pending already"):
        retry_job(session, job_id, operator="x")
    with db.session() as session, pytest.raises(RetryRefused, match=r"job \d+ of this study is pending; wait"):
        retry_study(session, STUDY, operator="x")
    run_and_complete(db)
    with db.session() as session, pytest.raises(RetryRefused, match=rf"is done; .* retry --study {re.escape(STUDY)}"):
        retry_job(session, job_id, operator="x")
    with db.session() as session, pytest.raises(RetryRefused, match="there is no job 999"):
        retry_job(session, 999, operator="x")
    with db.session() as session, pytest.raises(RetryRefused, match=r"there is no study 9\.9\.9"):
        retry_study(session, "9.9.9", operator="x")


def test_retry_of_a_study_schedules_new_jobs(db: Database) -> None:
    receive_ready_study(db)
    first = run_and_complete(db)
    with db.session() as session, session.begin():
        message = retry_study(session, STUDY, operator="carol")
    assert "will be evaluated again" in message
    with db.session() as session, session.begin():
        outcome = run_once(session, RULES, ("radiomics",), 3)
    assert outcome.jobs_created == 1
    with db.session() as session:
        jobs = session.execute(select(Job.id, Job.state).order_by(Job.id)).all()
        assert jobs == [(first, "done"), (first + 1, "pending")]
        assert session.execute(select(Study.state)).scalar_one() == "queued"
        event = session.execute(select(Event).where(Event.kind == "study_retry_requested")).scalar_one()
        assert event.detail == "by carol: evaluate again (was done); new jobs follow when it is ready"


def test_retry_command(db: Database, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    receive_ready_study(db)
    job_id = run_and_fail(db, retryable=False)
    assert main(["retry", str(job_id), "--config", str(config)]) == 0
    assert "is pending again" in capsys.readouterr().out
    assert main(["retry", str(job_id), "--config", str(config)]) == 1
    assert f"pacs-agent retry: job {job_id} is pending already" in capsys.readouterr().err
    assert main(["retry", "--study", "1.2.3.4", "--config", str(config)]) == 1
    assert "there is no study 1.2.3.4" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # neither a job nor a study
        main(["retry", "--config", str(config)])
    assert info.value.code == 2
    with pytest.raises(SystemExit):  # not both
        main(["retry", "3", "--study", STUDY, "--config", str(config)])


# -- status ---------------------------------------------------------------------------------------


def test_status_tells_the_whole_story(db: Database, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    receive_ready_study(db)
    job_id = run_and_complete(db)
    with db.session() as session, session.begin():
        study = session.execute(select(Study)).scalar_one()
        done_at = utcnow()
        for n, kind in enumerate(("sr", "sc", "sc")):
            result = Result(
                job_id=job_id,
                study_id=study.id,
                kind=kind,
                method="radiomics",
                sop_instance_uid=f"2.25.{n}",
                series_instance_uid="2.25.100",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
                path=f"r{n}.dcm",
                algorithm_name="pacs-agent radiomics",
                algorithm_version="0.1.0",
            )
            session.add(result)
            session.flush()
            session.add(
                Delivery(result_id=result.id, destination="pacs", state="done", attempts=1, delivered_at=done_at)
            )
            session.add(
                Delivery(
                    result_id=result.id,
                    destination="research",
                    state="pending",
                    attempts=2,
                    next_attempt_at=done_at + timedelta(minutes=5),
                    last_error="cannot connect to 10.0.0.5:104",
                )
            )
        record_event(
            session,
            "association_rejected",
            level="WARNING",
            ae_title="INTRUDER",
            peer="10.9.9.9",
            detail="calling AE title 'INTRUDER' is not in [security] allowed_calling_aets",
            log=False,
        )
    receive_ready_study(db, "1.2.826.0.1.3680043.10.99.2")
    failed = run_and_fail(db, retryable=False)
    text = format_status(collect_status(db))
    assert f"study {STUDY}  [done]" in text
    assert "from CT1: 4 instance(s) in 2 series, 1 duplicate(s) kept once" in text
    assert f"  job {job_id} radiomics: done (attempt 1/3), " in text
    assert "  results: 1 SR, 2 SC (radiomics 0.1.0)" in text
    assert "  -> pacs: 3 done, last at " in text
    assert "  -> research: 3 pending (2 attempt(s), next " in text and "- cannot connect to 10.0.0.5:104" in text
    assert f"job {failed} radiomics: failed (attempt 1/3), " in text and f"[pacs-agent retry {failed}]" in text
    assert "association_rejected aet=INTRUDER peer=10.9.9.9: calling AE title 'INTRUDER'" in text
    assert main(["status", "--json", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    data = json.loads(out)
    story = next(s for s in data["studies"] if s["study_instance_uid"] == STUDY)
    assert story["senders"] == ["CT1"] and story["instances"] == 4 and story["duplicates"] == 1
    assert story["jobs"][0]["duration_seconds"] is not None and story["jobs"][0]["worker_id"] == "host:1"
    assert {d["destination"] for d in story["deliveries"]} == {"pacs", "research"}
    for secret in (SECRET_PATIENT_ID, "ACC-SECRET", "19510203"):
        assert secret not in text and secret not in out
