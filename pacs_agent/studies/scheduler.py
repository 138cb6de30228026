"""Turn recorded instances into jobs: snapshot each changed study, :func:`decide`, schedule.

Runs in the scp process, once a second. A study is looked at again only when an instance arrived
after its last evaluation, so a late instance re-opens a processed study and schedules new jobs.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import asdict, dataclass
from datetime import datetime

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from pacs_agent.audit import record_event
from pacs_agent.config import Settings
from pacs_agent.jobs.queue import schedule_job
from pacs_agent.models import Instance, Series, Study, utcnow
from pacs_agent.receive.header import SEGMENTATION_SOP_CLASSES
from pacs_agent.routing.methods import (
    DEFAULT_METHOD_REGIONS,
    DEFAULT_REGION_PATTERNS,
    MethodChoice,
    StudyText,
    select_methods,
)
from pacs_agent.routing.pairing import RESPONSE_METHOD, complete_open_pairings, pair_followup
from pacs_agent.routing.phase import SeriesPhaseInfo
from pacs_agent.studies.readiness import (
    Decision,
    ReadinessRules,
    SegmentationSnapshot,
    SeriesSnapshot,
    StudySnapshot,
    decide,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerOutcome:
    """What one pass did, per Study Instance UID."""

    decisions: dict[str, Decision]
    jobs_created: int


def readiness_rules(settings: Settings) -> ReadinessRules:
    """The readiness and routing rules of a node's settings."""
    return ReadinessRules(
        quiet_seconds=settings.readiness.quiet_seconds,
        min_ct_instances=settings.readiness.min_ct_instances,
        phase=settings.routing.phase_rules(),
        when_not_portal_venous=settings.routing.when_not_portal_venous,
        reference_wait_seconds=settings.readiness.reference_wait_seconds,
    )


def snapshot_study(session: Session, study: Study) -> StudySnapshot:
    """Collect the readiness-relevant facts of ``study`` from the database."""
    all_series = {
        series.id: series for series in session.execute(select(Series).where(Series.study_id == study.id)).scalars()
    }
    rows = session.execute(
        select(
            Instance.series_id,
            Instance.sop_instance_uid,
            Instance.sop_class_uid,
            Instance.referenced_series_uids,
            Instance.received_at,
            Instance.referenced_instance_uids,
        ).where(Instance.series_id.in_(list(all_series)))
    ).all()
    classes: dict[int, set[str]] = defaultdict(set)
    counts: dict[int, int] = defaultdict(int)
    segmentations = []
    uids: dict[int, set[str]] = defaultdict(set)
    for series_id, sop_uid, sop_class, refs, received_at, images in rows:
        classes[series_id].add(sop_class)
        counts[series_id] += 1
        uids[series_id].add(sop_uid)
        if sop_class in SEGMENTATION_SOP_CLASSES:
            segmentations.append(
                SegmentationSnapshot(
                    sop_instance_uid=sop_uid,
                    sop_class_uid=sop_class,
                    series_instance_uid=all_series[series_id].series_instance_uid,
                    referenced_series_uids=frozenset(refs.split()),
                    received_at=received_at,
                    referenced_instance_uids=frozenset(images.split()),
                )
            )
    series = tuple(
        sorted(
            (
                SeriesSnapshot(
                    series_instance_uid=row.series_instance_uid,
                    modality=row.modality,
                    sop_class_uids=frozenset(classes[series_id]),
                    instance_count=counts[series_id],
                    description=row.series_description,
                    instance_uids=frozenset(uids[series_id]),
                    phase=SeriesPhaseInfo(
                        series_description=row.series_description,
                        protocol_name=row.protocol_name,
                        image_comments=row.image_comments,
                        contrast_bolus_agent=row.contrast_bolus_agent,
                        contrast_start_time=row.contrast_start_time,
                        acquisition_time=row.acquisition_time,
                    ),
                )
                for series_id, row in all_series.items()
                if counts[series_id]
            ),
            key=lambda s: s.series_instance_uid,
        )
    )
    return StudySnapshot(
        study_instance_uid=study.study_instance_uid,
        last_received_at=study.last_received_at,
        series=series,
        segmentations=tuple(sorted(segmentations, key=lambda s: s.sop_instance_uid)),
    )


def _applicable_methods(
    session: Session, study: Study, decision: Decision, methods: tuple[str, ...], settings: Settings | None
) -> MethodChoice:
    ct = session.execute(
        select(Series).where(Series.series_instance_uid == decision.ct_series_instance_uid)
    ).scalar_one_or_none()
    text = StudyText(
        body_part_examined=ct.body_part_examined if ct else None,
        study_description=study.study_description,
        series_description=ct.series_description if ct else None,
        protocol_name=ct.protocol_name if ct else None,
    )
    if settings is None:
        return select_methods(methods, text, DEFAULT_METHOD_REGIONS, DEFAULT_REGION_PATTERNS)
    return select_methods(methods, text, settings.routing.method_regions, settings.routing.region_patterns)


def run_once(
    session: Session,
    rules: ReadinessRules,
    methods: tuple[str, ...],
    max_attempts: int,
    now: datetime | None = None,
    *,
    settings: Settings | None = None,
) -> SchedulerOutcome:
    """Evaluate every study changed since its last evaluation; the caller commits.

    Single-study methods get one job each. The pair method ``response`` (needs ``settings``)
    looks for the study's baseline and completes open pairings the study is the baseline of.
    """
    now = now or utcnow()
    studies = (
        session.execute(
            select(Study).where(or_(Study.evaluated_at.is_(None), Study.last_received_at > Study.evaluated_at))
        )
        .scalars()
        .all()
    )
    decisions: dict[str, Decision] = {}
    created = 0
    for study in studies:
        snapshot = snapshot_study(session, study)
        decision = decide(snapshot, now, rules)
        decisions[study.study_instance_uid] = decision
        if decision.state == "waiting":
            continue
        # Evaluated as of the newest instance seen: one arriving meanwhile makes it dirty again.
        study.evaluated_at = snapshot.last_received_at
        study.state_reason = decision.reason
        study.series_notes = json.dumps([asdict(note) for note in decision.series_notes])
        if decision.state == "incomplete":
            study.state = "incomplete"
            record_event(
                session,
                "study_incomplete",
                level="WARNING",
                study_instance_uid=study.study_instance_uid,
                detail=decision.reason,
            )
            continue
        study.state = "queued"
        study.ct_series_instance_uid = decision.ct_series_instance_uid
        study.segmentation_sop_instance_uid = decision.segmentation_sop_instance_uid
        inputs = {
            "ct_series_instance_uid": decision.ct_series_instance_uid,
            "segmentation_sop_instance_uid": decision.segmentation_sop_instance_uid,
        }
        choice = _applicable_methods(session, study, decision, methods, settings)
        study.method_notes = json.dumps([{"method": m, "reason": r} for m, r in choice.skipped])
        for _method, reason in choice.skipped:
            record_event(session, "method_skipped", study_instance_uid=study.study_instance_uid, detail=reason)
        if RESPONSE_METHOD in choice.selected:
            if settings is None:
                raise ValueError("the response method needs the settings for pairing")
            pair_followup(session, study, settings, now)
            complete_open_pairings(session, study, settings)
        for method in (m for m in choice.selected if m != RESPONSE_METHOD):
            job = schedule_job(session, study.id, method, inputs, max_attempts)
            created += 1
            record_event(
                session,
                "job_scheduled",
                study_instance_uid=study.study_instance_uid,
                job_id=job.id,
                detail=f"{method}: {decision.reason}",
            )
    return SchedulerOutcome(decisions=decisions, jobs_created=created)
