"""Pairing a follow-up with its baseline: the choice rule, and both arrival orders, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import date

import pytest
from sqlalchemy import select

from pacs_agent.config import Settings, settings_from_mapping
from pacs_agent.db import Database
from pacs_agent.db.tables import Event, Job, Pairing, Study
from pacs_agent.routing.pairing import Candidate, choose_baseline, parse_da, window_dates
from pacs_agent.status import collect_status, format_status
from pacs_agent.studies.readiness import ReadinessRules
from pacs_agent.studies.scheduler import run_once
from pacs_agent.studies.store import record_instance
from tests.dicom_factory import record_summary
from tests.unit.test_store_and_queue import CT

F = date(2026, 3, 2)
WINDOW = (6.0, 10.0)


def cand(uid: str, days_before: int, **kw: object) -> Candidate:
    return Candidate(uid, date.fromordinal(F.toordinal() - days_before), kw.get("birth"), kw.get("sex"), "local")


def choose(*cands: Candidate, birth: str | None = "19600101", sex: str | None = "F"):
    return choose_baseline("9.9", F, birth, sex, cands, window_weeks=WINDOW, target_weeks=8.0)


def test_nearest_to_eight_weeks_wins() -> None:
    choice = choose(cand("1.1", 43), cand("1.2", 57), cand("1.3", 69))
    assert choice.candidate.study_instance_uid == "1.2"
    assert "8.1 weeks" in choice.reason and "among 3 candidates" in choice.reason


def test_outside_the_window_is_ignored() -> None:
    choice = choose(cand("1.1", 41), cand("1.2", 71), cand("1.3", 400))
    assert choice.candidate is None
    assert "no baseline study" in choice.reason and "6-10 weeks before 2026-03-02" in choice.reason


def test_window_is_inclusive() -> None:
    assert window_dates(F, WINDOW) == (date(2025, 12, 22), date(2026, 1, 19))
    assert choose(cand("1.1", 42)).candidate is not None
    assert choose(cand("1.1", 70)).candidate is not None


def test_equally_near_candidates_are_decided_deterministically_and_recorded() -> None:
    a, b = cand("1.7", 49), cand("1.3", 63)  # 7 and 9 weeks: both 1 week from 8
    first, second = choose(a, b), choose(b, a)
    assert first == second
    assert first.candidate.study_instance_uid == "1.3"  # the earlier study
    assert "2 candidates are equally near 8 weeks" in first.reason


def test_contradicting_birth_date_or_sex_excludes() -> None:
    choice = choose(cand("1.1", 56, birth="19700101"), cand("1.2", 56, sex="M"))
    assert choice.candidate is None
    assert "birth date differs" in choice.reason and "sex differs" in choice.reason
    assert choose(cand("1.1", 56, birth=None, sex=None)).candidate is not None  # unknown is no contradiction


def test_parse_da() -> None:
    assert parse_da("20260302") == F
    assert parse_da("") is None and parse_da(None) is None and parse_da("2026-3") is None


# -- database flows -------------------------------------------------------------------------

SETTINGS = settings_from_mapping({"jobs": {"methods": ["radiomics", "response"]}})
RULES = ReadinessRules(quiet_seconds=0)


def add_study(
    db: Database,
    study_uid: str,
    study_date: str,
    patient: str = "P1",
    birth: str = "19600101",
    settings: Settings = SETTINGS,
) -> None:
    header = replace(
        CT, study_instance_uid=study_uid, study_date=study_date, patient_id=patient, patient_birth_date=birth
    )
    ct_series = f"{study_uid}.100"
    seg = replace(
        header,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4",
        sop_instance_uid=f"{study_uid}.200.1",
        series_instance_uid=f"{study_uid}.200",
        modality="SEG",
        referenced_series_uids=(ct_series,),
    )
    with db.session() as session, session.begin():
        for n in range(3):
            record_instance(
                session,
                replace(header, series_instance_uid=ct_series, sop_instance_uid=f"{ct_series}.{n}"),
                path="x",
                size_bytes=1,
                calling_ae_title="CT",
            )
        record_instance(session, seg, path="x", size_bytes=1, calling_ae_title="CT")
        record_summary(session, seg)
    with db.session() as session, session.begin():
        run_once(session, RULES, settings.jobs.methods, 3, settings=settings)


def pairing_of(db: Database, study_uid: str) -> Pairing:
    with db.session() as session:
        return session.execute(
            select(Pairing)
            .join(Study, Study.id == Pairing.followup_study_id)
            .where(Study.study_instance_uid == study_uid)
        ).scalar_one()


def response_jobs(db: Database) -> list[dict]:
    with db.session() as session:
        return [json.loads(j.inputs) for j in session.execute(select(Job).where(Job.method == "response")).scalars()]


def test_baseline_first_then_followup(any_db: Database) -> None:
    add_study(any_db, "1.1", "20260105")
    assert pairing_of(any_db, "1.1").state == "none"  # nothing 6-10 weeks before it
    assert response_jobs(any_db) == []
    add_study(any_db, "1.2", "20260302")  # 8 weeks later
    pairing = pairing_of(any_db, "1.2")
    assert pairing.state == "paired" and pairing.source == "local"
    assert pairing.baseline_study_instance_uid == "1.1"
    jobs = response_jobs(any_db)
    assert len(jobs) == 1
    assert jobs[0]["baseline_study_instance_uid"] == "1.1"
    assert jobs[0]["baseline_ct_series_instance_uid"] == "1.1.100"
    assert jobs[0]["ct_series_instance_uid"] == "1.2.100"


def test_followup_first_then_baseline(any_db: Database) -> None:
    add_study(any_db, "1.2", "20260302")
    assert pairing_of(any_db, "1.2").state == "none"
    add_study(any_db, "1.1", "20260105")  # the baseline arrives later
    assert pairing_of(any_db, "1.2").state == "paired"
    assert len(response_jobs(any_db)) == 1
    with any_db.session() as session:
        kinds = session.execute(select(Event.kind)).scalars().all()
    assert "pairing_paired" in kinds


def study_state(db: Database, study_uid: str) -> tuple[str, str]:
    with db.session() as session:
        study = session.execute(select(Study).where(Study.study_instance_uid == study_uid)).scalar_one()
        return study.state, study.state_reason or ""


@pytest.mark.parametrize("baseline_first", [True, False])
def test_a_study_that_is_only_a_baseline_says_so_instead_of_staying_queued(
    any_db: Database, baseline_first: bool
) -> None:
    response_only = settings_from_mapping({"jobs": {"methods": ["response"]}})
    order = [("1.1", "20260105"), ("1.2", "20260302")]
    for uid, day in order if baseline_first else order[::-1]:
        add_study(any_db, uid, day, settings=response_only)
    state, reason = study_state(any_db, "1.1")
    assert state == "done"
    assert "used as baseline for 1.2 (response method)" in reason
    assert study_state(any_db, "1.2")[0] == "queued"  # its response job is pending
    status = format_status(collect_status(any_db, 10))
    assert "used as baseline for 1.2 (response method)" in status
    assert "study 1.1  [done]" in status


def test_a_study_no_method_applies_to_is_done_with_the_reason(any_db: Database) -> None:
    chest_only = settings_from_mapping({"jobs": {"methods": ["m2"]}})
    add_study(any_db, "1.1", "20260105", settings=chest_only)  # an abdominal CT
    state, reason = study_state(any_db, "1.1")
    assert state == "done" and "nothing to run: no enabled method applies to this study" in reason


def test_other_patients_never_pair(any_db: Database) -> None:
    add_study(any_db, "1.1", "20260105", patient="P1")
    add_study(any_db, "1.2", "20260302", patient="P2")
    assert pairing_of(any_db, "1.2").state == "none"
    add_study(any_db, "1.3", "20260105", patient="P2", birth="19990101")  # same ID, other birth date
    assert "birth date differs" in pairing_of(any_db, "1.2").reason
    assert response_jobs(any_db) == []


def test_sources_are_asked_when_nothing_is_local(any_db: Database) -> None:
    settings = settings_from_mapping(
        {
            "jobs": {"methods": ["radiomics", "response"]},
            "sources": [{"name": "pacs", "ae_title": "PACS", "host": "h", "port": 104}],
        }
    )
    add_study(any_db, "1.2", "20260302")
    with any_db.session() as session, session.begin():
        from pacs_agent.routing.pairing import pair_followup

        study = session.execute(select(Study).where(Study.study_instance_uid == "1.2")).scalar_one()
        pairing = pair_followup(session, study, settings)
        assert pairing.state == "query"
        assert "asking pacs" in pairing.reason


def test_missing_study_date_is_explained(any_db: Database) -> None:
    add_study(any_db, "1.5", "")
    assert "no StudyDate" in pairing_of(any_db, "1.5").reason


@pytest.mark.parametrize("methods", [("radiomics",)])
def test_no_pairing_without_the_response_method(any_db: Database, methods: tuple[str, ...]) -> None:
    with any_db.session() as session, session.begin():
        run_once(session, RULES, methods, 3)
    with any_db.session() as session:
        assert session.execute(select(Pairing)).first() is None


def test_status_shows_the_baseline_search(any_db: Database) -> None:
    from pacs_agent.status import collect_status, format_status

    add_study(any_db, "1.1", "20260105")
    add_study(any_db, "1.2", "20260302")
    text = format_status(collect_status(any_db))
    assert "baseline search: paired - found locally: baseline 1.1 (local), 8.0 weeks" in text
    assert "P1" not in text and "19600101" not in text
