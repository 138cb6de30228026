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
from pathlib import Path

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from inference.structures import SegmentationSummary, read_summary
from pacs_agent.audit import record_event
from pacs_agent.config import Settings
from pacs_agent.db.tables import Instance, Job, Pairing, Series, Study, StudyState, utcnow
from pacs_agent.jobs.queue import schedule_job
from pacs_agent.receive.header import ENHANCED_CT_IMAGE, SEGMENTATION_SOP_CLASSES
from pacs_agent.routing.methods import (
    DEFAULT_METHOD_REGIONS,
    DEFAULT_REGION_PATTERNS,
    MethodChoice,
    StudyText,
    select_methods,
)
from pacs_agent.routing.pairing import RESPONSE_METHOD, baseline_of, complete_open_pairings, pair_followup
from pacs_agent.routing.phase import SeriesPhaseInfo
from pacs_agent.routing.references import CTGeometry, parse_vector
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
        structures=settings.routing.tumour,
    )


def segmentation_summary(
    session: Session, instance_id: int, path: str, stored: str | None, spool_dir: Path | None
) -> tuple[SegmentationSummary | None, str | None]:
    """The summary of a stored SEG / RTSTRUCT (read from its file once, then kept in its Instance row).

    Returns the summary, or None and the reason it cannot be read.
    """
    if stored is None:
        if spool_dir is None:
            return None, "the spool directory is not known, so the file cannot be read"
        try:
            stored = read_summary(spool_dir / path).to_json()
        except (OSError, ValueError) as exc:
            stored = json.dumps({"error": str(exc)})
        session.execute(update(Instance).where(Instance.id == instance_id).values(segmentation_summary=stored))
    data = json.loads(stored)
    if "error" in data:
        return None, f"its content cannot be read ({data['error']}); export it again from the segmentation software"
    return SegmentationSummary.from_json(stored), None


def _geometry(orientation: str | None, positions: list[str | None]) -> CTGeometry | None:
    iop = parse_vector(orientation, 6)
    points = [parse_vector(p, 3) for p in positions]
    present = tuple(p for p in points if p is not None)
    if iop is None or not points or len(present) != len(points):
        return None
    return CTGeometry(orientation=iop, positions=present)


def snapshot_study(session: Session, study: Study, spool_dir: Path | None = None) -> StudySnapshot:
    """Collect the readiness-relevant facts of ``study`` from the database (and its segmentations' files).

    A segmentation's structures and planes are read from its file in ``spool_dir`` the first time and
    kept in its Instance row.
    """
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
            Instance.id,
            Instance.path,
            Instance.segmentation_summary,
            Instance.image_position,
        ).where(Instance.series_id.in_(list(all_series)))
    ).all()
    classes: dict[int, set[str]] = defaultdict(set)
    counts: dict[int, int] = defaultdict(int)
    segmentations = []
    uids: dict[int, set[str]] = defaultdict(set)
    positions: dict[int, list[str | None]] = defaultdict(list)
    for series_id, sop_uid, sop_class, refs, received_at, images, row_id, path, stored, position in rows:
        classes[series_id].add(sop_class)
        counts[series_id] += 1
        uids[series_id].add(sop_uid)
        positions[series_id].append(position)
        if sop_class in SEGMENTATION_SOP_CLASSES:
            summary, problem = segmentation_summary(session, row_id, path, stored, spool_dir)
            segmentations.append(
                SegmentationSnapshot(
                    sop_instance_uid=sop_uid,
                    sop_class_uid=sop_class,
                    series_instance_uid=all_series[series_id].series_instance_uid,
                    referenced_series_uids=frozenset(refs.split()),
                    received_at=received_at,
                    referenced_instance_uids=frozenset(images.split()),
                    summary=summary,
                    summary_problem=problem,
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
                    frame_of_reference_uid=row.frame_of_reference_uid,
                    geometry=None
                    if ENHANCED_CT_IMAGE in classes[series_id]
                    else _geometry(row.image_orientation, positions[series_id]),
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


def chosen_series_text(session: Session, study: Study, decision: Decision) -> StudyText:
    """The text the method regions are matched on: the study's and the chosen CT series' descriptions."""
    ct = session.execute(
        select(Series).where(Series.series_instance_uid == decision.ct_series_instance_uid)
    ).scalar_one_or_none()
    return StudyText(
        body_part_examined=ct.body_part_examined if ct else None,
        study_description=study.study_description,
        series_description=ct.series_description if ct else None,
        protocol_name=ct.protocol_name if ct else None,
    )


def applicable_methods(
    session: Session, study: Study, decision: Decision, methods: tuple[str, ...], settings: Settings | None
) -> MethodChoice:
    """Which of ``methods`` apply to the CT series ``decision`` chose (``[routing] method_regions``)."""
    text = chosen_series_text(session, study, decision)
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
    spool_dir: Path | None = None,
) -> SchedulerOutcome:
    """Evaluate every study changed since its last evaluation; the caller commits.

    Single-study methods get one job each. The pair method ``response`` (needs ``settings``)
    looks for the study's baseline and completes open pairings the study is the baseline of.
    Segmentation files are read from ``spool_dir`` (default: the settings' spool directory).
    """
    if spool_dir is None and settings is not None:
        spool_dir = settings.storage.spool_dir
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
        snapshot = snapshot_study(session, study, spool_dir)
        decision = decide(snapshot, now, rules)
        decisions[study.study_instance_uid] = decision
        if decision.state == "waiting":
            # why it waits, for `pacs-agent status`; the text changes only when something arrives
            if study.state == StudyState.RECEIVING and study.state_reason != decision.reason:
                study.state_reason = decision.reason
            continue
        # Evaluated as of the newest instance seen: one arriving meanwhile makes it dirty again.
        study.evaluated_at = snapshot.last_received_at
        study.state_reason = decision.reason
        study.series_notes = json.dumps([asdict(note) for note in decision.series_notes])
        _record_inputs(session, study, decision)
        if decision.state == "incomplete":
            study.state = StudyState.INCOMPLETE
            record_event(
                session,
                "study_incomplete",
                level="WARNING",
                study_instance_uid=study.study_instance_uid,
                detail=decision.reason,
            )
            continue
        study.state = StudyState.QUEUED
        study.ct_series_instance_uid = decision.ct_series_instance_uid
        study.segmentation_sop_instance_uid = decision.segmentation_sop_instance_uid
        inputs = {
            "ct_series_instance_uid": decision.ct_series_instance_uid,
            "segmentation_sop_instance_uid": decision.segmentation_sop_instance_uid,
            "structures": decision.selection.to_dict() if decision.selection else None,
        }
        choice = applicable_methods(session, study, decision, methods, settings)
        study.method_notes = json.dumps([{"method": m, "reason": r} for m, r in choice.skipped])
        for _method, reason in choice.skipped:
            record_event(session, "method_skipped", study_instance_uid=study.study_instance_uid, detail=reason)
        if RESPONSE_METHOD in choice.selected:
            if settings is None:
                raise ValueError("the response method needs the settings for pairing")
            pair_followup(session, study, settings, now)
            complete_open_pairings(session, study, settings)
        for method in (m for m in choice.selected if m != RESPONSE_METHOD):
            queue = settings.jobs.queue_for(method) if settings is not None else "default"
            job = schedule_job(session, study.id, method, inputs, max_attempts, queue)
            created += 1
            record_event(
                session,
                "job_scheduled",
                study_instance_uid=study.study_instance_uid,
                job_id=job.id,
                detail=f"{method}: {decision.reason}" + (f" (queue {queue})" if queue != "default" else ""),
            )
        _settle_without_jobs(session, study, choice)
    return SchedulerOutcome(decisions=decisions, jobs_created=created)


def _settle_without_jobs(session: Session, study: Study, choice: MethodChoice) -> None:
    """A ready study with nothing to run is ``done`` with the reason, not ``queued`` for ever.

    A study that only serves as the baseline of a follow-up says so; one still waiting for its own
    baseline (response method) stays ``queued`` with the baseline search in its reason.
    """
    if (
        study.state != "queued"
        or session.execute(
            select(Job.id).where(Job.study_id == study.id, Job.state.in_(("pending", "running")))
        ).first()
    ):
        return
    follow_ups = baseline_of(session, study)
    pairing = session.execute(select(Pairing).where(Pairing.followup_study_id == study.id)).scalar_one_or_none()
    if follow_ups:
        why = f"used as baseline for {', '.join(follow_ups)} (response method)"
    elif pairing is not None and pairing.state in ("query", "retrieving"):
        study.state_reason = f"{study.state_reason}; waiting for its baseline: {pairing.reason}"
        return
    elif not choice.selected:
        why = "nothing to run: no enabled method applies to this study (see 'method skipped')"
    elif pairing is not None:
        why = f"nothing to run: response method: {pairing.reason}"
    else:
        why = "nothing to run"
    study.state = StudyState.DONE
    study.state_reason = f"{study.state_reason}; {why}"


def _record_inputs(session: Session, study: Study, decision: Decision) -> None:
    """Keep the structure notes and input warnings of a decision on the study, with events for what changed."""
    notes = json.dumps([asdict(note) for note in decision.structure_notes])
    warnings = json.dumps(list(decision.warnings))
    if notes != (study.structure_notes or "[]") and decision.structure_notes:
        tumours = [n.label for n in decision.structure_notes if n.role == "tumour"]
        others = [
            f"{n.label} ({n.role if n.role == 'organ' else 'not a tumour'}: {n.reason})"
            for n in decision.structure_notes
            if n.role != "tumour"
        ]
        detail = f"tumour structure(s): {', '.join(tumours) or 'none'}"
        if others:
            detail += f"; not analysed as lesions: {'; '.join(others)}"
        record_event(session, "structures_chosen", study_instance_uid=study.study_instance_uid, detail=detail)
    if warnings != (study.input_warnings or "[]"):
        for warning in decision.warnings:
            record_event(
                session, "input_warning", level="WARNING", study_instance_uid=study.study_instance_uid, detail=warning
            )
    study.structure_notes = notes
    study.input_warnings = warnings
