"""Which enabled methods apply to a study: the body-region rules, and the scheduler using them."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from sqlalchemy import select

from pacs_agent.config import settings_from_mapping
from pacs_agent.db import Database
from pacs_agent.db.tables import Event, Job, Study
from pacs_agent.errors import ConfigError
from pacs_agent.routing.methods import (
    DEFAULT_METHOD_REGIONS,
    DEFAULT_REGION_PATTERNS,
    StudyText,
    select_methods,
)
from pacs_agent.studies.readiness import ReadinessRules
from pacs_agent.studies.scheduler import run_once
from pacs_agent.studies.store import record_instance
from tests.dicom_factory import record_summary
from tests.unit.test_store_and_queue import CT, seg_object

ALL = ("radiomics", "m1", "m2", "m3", "m4", "response")


def choose(text: StudyText) -> tuple[tuple[str, ...], dict[str, str]]:
    choice = select_methods(ALL, text, DEFAULT_METHOD_REGIONS, DEFAULT_REGION_PATTERNS)
    return choice.selected, dict(choice.skipped)


def test_abdominal_ct_runs_the_colorectal_methods() -> None:
    selected, skipped = choose(StudyText(body_part_examined="ABDOMEN"))
    assert selected == ("radiomics", "m1", "m3", "response")
    assert set(skipped) == {"m2", "m4"}
    assert "m2 is for chest CT" in skipped["m2"] and "BodyPartExamined 'ABDOMEN'" in skipped["m2"]


def test_chest_ct_runs_the_lung_methods() -> None:
    selected, _ = choose(StudyText(study_description="CT THORAX W CONTRAST"))
    assert selected == ("radiomics", "m2", "m4", "response")


@pytest.mark.parametrize(
    "text",
    [
        StudyText(series_description="LIVER PV"),
        StudyText(protocol_name="Abd/Pelvis"),
        StudyText(study_description="ABD"),
    ],
)
def test_any_descriptive_field_can_name_the_region(text: StudyText) -> None:
    assert "m1" in choose(text)[0]


def test_unknown_region_runs_only_the_unmapped_methods() -> None:
    selected, skipped = choose(StudyText())
    assert selected == ("radiomics", "response")
    assert "no descriptive header text" in skipped["m1"]


def test_routing_settings_validate() -> None:
    with pytest.raises(ConfigError, match="does not define"):
        settings_from_mapping({"routing": {"method_regions": {"m1": "brain"}}})
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        settings_from_mapping({"routing": {"region_patterns": {"abdomen": ["("], "chest": []}}})


def test_scheduler_skips_methods_of_another_region(sqlite_db: Database) -> None:
    header = replace(CT, body_part_examined="CHEST", series_description="LUNG", study_description="CT CHEST")
    with sqlite_db.session() as session, session.begin():
        for n in range(3):
            record_instance(
                session,
                replace(header, sop_instance_uid=f"1.2.3.100.{n}"),
                path="x",
                size_bytes=1,
                calling_ae_title="CT",
            )
        record_instance(session, seg_object(), path="x", size_bytes=1, calling_ae_title="CT")
        record_summary(session, seg_object())
    with sqlite_db.session() as session, session.begin():
        run_once(session, ReadinessRules(quiet_seconds=0, phase=None), ("radiomics", "m1", "m2"), 3)
    with sqlite_db.session() as session:
        assert sorted(session.execute(select(Job.method)).scalars().all()) == ["m2", "radiomics"]
        notes = json.loads(session.execute(select(Study.method_notes)).scalar_one())
        assert [n["method"] for n in notes] == ["m1"]
        assert "method_skipped" in session.execute(select(Event.kind)).scalars().all()
