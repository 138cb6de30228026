"""Pair a follow-up study with its baseline for the 8-week response method (M5).

A baseline is a study of the same patient (PatientID and, when both give one, the issuer;
birth date and sex must not contradict) acquired within ``[response] window_weeks`` before the
follow-up, holding a CT series and a segmentation the readiness check accepted. The candidate
nearest to ``target_weeks`` wins; on a tie, the earlier study (then the lower UID), and the tie is
recorded. The search looks in the node's own database first, then asks the ``[[sources]]``.

Both arrival orders end in one scored pair: a ready follow-up looks for its baseline, and a
ready study also completes every open pairing it is the baseline of.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from inference.methods import pair_method
from inference.structures import StructureSelection
from pacs_agent.audit import record_event
from pacs_agent.config import Settings
from pacs_agent.db.tables import Job, Pairing, PairingState, Study, StudyState, utcnow
from pacs_agent.jobs.queue import schedule_job

logger = logging.getLogger(__name__)

RESPONSE_METHOD = pair_method()
"""The method run on a baseline + follow-up pair (from the registry)."""
OPEN_STATES = ("query", "retrieving", "none", "failed")


@dataclass(frozen=True)
class Candidate:
    """A study that may be the baseline."""

    study_instance_uid: str
    study_date: date | None
    patient_birth_date: str | None
    patient_sex: str | None
    source: str
    """``local`` or the name of the ``[[sources]]`` entry that holds it."""


@dataclass(frozen=True)
class Choice:
    """The outcome of :func:`choose_baseline`."""

    candidate: Candidate | None
    reason: str


def parse_da(value: str | None) -> date | None:
    """A DICOM DA value (YYYYMMDD) as a date, or None when absent or malformed."""
    if not value:
        return None
    try:
        return datetime.strptime(value.strip()[:8], "%Y%m%d").date()
    except ValueError:
        return None


def window_dates(followup_date: date, window_weeks: tuple[float, float]) -> tuple[date, date]:
    """The first and last acceptable baseline dates for a follow-up on ``followup_date``."""
    earliest = followup_date - timedelta(days=round(window_weeks[1] * 7))
    latest = followup_date - timedelta(days=round(window_weeks[0] * 7))
    return earliest, latest


def choose_baseline(
    followup_uid: str,
    followup_date: date,
    birth_date: str | None,
    sex: str | None,
    candidates: Sequence[Candidate],
    *,
    window_weeks: tuple[float, float],
    target_weeks: float,
) -> Choice:
    """Pick the baseline among ``candidates`` (pure; the reason names every exclusion)."""
    earliest, latest = window_dates(followup_date, window_weeks)
    eligible: list[tuple[float, Candidate]] = []
    excluded: list[str] = []
    for cand in candidates:
        if cand.study_instance_uid == followup_uid:
            continue
        if cand.study_date is None:
            excluded.append(f"{cand.study_instance_uid}: no StudyDate")
            continue
        if not earliest <= cand.study_date <= latest:
            continue
        if birth_date and cand.patient_birth_date and birth_date != cand.patient_birth_date:
            excluded.append(f"{cand.study_instance_uid}: birth date differs (not the same patient?)")
            continue
        if sex and cand.patient_sex and sex.upper()[:1] != cand.patient_sex.upper()[:1]:
            excluded.append(f"{cand.study_instance_uid}: sex differs (not the same patient?)")
            continue
        weeks = (followup_date - cand.study_date).days / 7
        eligible.append((weeks, cand))
    window = f"{window_weeks[0]:g}-{window_weeks[1]:g} weeks before {followup_date.isoformat()}"
    if not eligible:
        reason = f"no baseline study with a CT and a segmentation {window}"
        if excluded:
            reason += f" (excluded: {'; '.join(excluded)})"
        return Choice(None, reason)
    ranked = sorted(
        eligible,
        key=lambda e: (abs(e[0] - target_weeks), e[1].study_date, e[1].study_instance_uid),
    )
    weeks, best = ranked[0]
    reason = f"baseline {best.study_instance_uid} ({best.source}), {weeks:.1f} weeks before the follow-up"
    ties = [c for w, c in ranked[1:] if abs(abs(w - target_weeks) - abs(weeks - target_weeks)) < 1e-9]
    if ties:
        reason += (
            f"; {len(ties) + 1} candidates are equally near {target_weeks:g} weeks "
            f"({', '.join(c.study_instance_uid for c in ties)} too): the earliest was chosen"
        )
    elif len(ranked) > 1:
        reason += f"; nearest to {target_weeks:g} weeks among {len(ranked)} candidates"
    return Choice(best, reason)


def _same_patient(study: Study, other: Study) -> bool:
    if not study.patient_id or study.patient_id != other.patient_id:
        return False
    return not (
        study.issuer_of_patient_id
        and other.issuer_of_patient_id
        and study.issuer_of_patient_id != other.issuer_of_patient_id
    )


def local_candidates(session: Session, followup: Study) -> list[Candidate]:
    """Stored studies of the same patient with a chosen CT series: baseline candidates found locally."""
    rows = session.execute(
        select(Study).where(
            Study.patient_id == followup.patient_id,
            Study.id != followup.id,
            Study.ct_series_instance_uid.is_not(None),
        )
    ).scalars()
    return [
        Candidate(s.study_instance_uid, parse_da(s.study_date), s.patient_birth_date, s.patient_sex, "local")
        for s in rows
        if _same_patient(followup, s)
    ]


def update_pairing(
    session: Session, pairing: Pairing, followup: Study, state: str, reason: str, **values: object
) -> None:
    """Set a pairing's state and reason (and other columns); record an event when they change."""
    changed = (pairing.state, pairing.reason) != (state, reason)
    pairing.state = state
    pairing.reason = reason
    pairing.updated_at = utcnow()
    for key, value in values.items():
        setattr(pairing, key, value)
    if changed:
        record_event(
            session,
            f"pairing_{state}",
            level="WARNING" if state == "failed" else "INFO",
            study_instance_uid=followup.study_instance_uid,
            detail=reason,
        )


def study_selection(study: Study) -> StructureSelection | None:
    """The tumour / organ selection of the study's chosen segmentation, from its structure notes."""
    if not study.structure_notes or not study.segmentation_sop_instance_uid:
        return None
    notes = [
        n
        for n in json.loads(study.structure_notes)
        if n.get("segmentation_sop_instance_uid") == study.segmentation_sop_instance_uid
    ]
    if not notes:
        return None
    return StructureSelection(
        tumours=tuple(int(n["number"]) for n in notes if n["role"] == "tumour"),
        organs=tuple(
            (int(n["number"]), str(n.get("organ") or n["label"]).lower()) for n in notes if n["role"] == "organ"
        ),
    )


def baseline_of(session: Session, study: Study) -> list[str]:
    """Study Instance UIDs of the follow-ups whose response job uses ``study`` as their baseline."""
    rows = session.execute(
        select(Study.study_instance_uid)
        .join(Pairing, Pairing.followup_study_id == Study.id)
        .where(Pairing.baseline_study_instance_uid == study.study_instance_uid, Pairing.state == "paired")
        .order_by(Study.study_instance_uid)
    ).scalars()
    return list(rows)


def _selection_dict(study: Study) -> dict[str, object] | None:
    selection = study_selection(study)
    return None if selection is None else selection.to_dict()


def schedule_response(session: Session, pairing: Pairing, followup: Study, baseline: Study, settings: Settings) -> None:
    """Create (or refresh) the response job of a complete pair."""
    inputs = {
        "ct_series_instance_uid": followup.ct_series_instance_uid,
        "segmentation_sop_instance_uid": followup.segmentation_sop_instance_uid,
        "baseline_study_instance_uid": baseline.study_instance_uid,
        "baseline_ct_series_instance_uid": baseline.ct_series_instance_uid,
        "baseline_segmentation_sop_instance_uid": baseline.segmentation_sop_instance_uid,
        "structures": _selection_dict(followup),
        "baseline_structures": _selection_dict(baseline),
    }
    job = schedule_job(
        session,
        followup.id,
        RESPONSE_METHOD,
        inputs,
        settings.jobs.max_attempts,
        settings.jobs.queue_for(RESPONSE_METHOD),
    )
    if followup.state in ("done", "failed", "incomplete", "receiving"):
        followup.state = StudyState.QUEUED
    if (
        baseline.state in ("queued", "done")
        and not session.execute(select(Job.id).where(Job.study_id == baseline.id)).first()
    ):
        # a study that is only a baseline: say what it is for instead of leaving it queued
        baseline.state = StudyState.DONE
        baseline.state_reason = f"used as baseline for {followup.study_instance_uid} (response method)"
    record_event(
        session,
        "job_scheduled",
        study_instance_uid=followup.study_instance_uid,
        job_id=job.id,
        detail=f"{RESPONSE_METHOD}: {pairing.reason}",
    )


def pair_followup(session: Session, followup: Study, settings: Settings, now: datetime | None = None) -> Pairing:
    """Look for the baseline of a ready study; schedule the response job when found locally.

    Without a local baseline the pairing goes to ``query`` (the sources are asked by the
    pairing loop of the scp process) or to ``none``.
    """
    now = now or utcnow()
    pairing = session.execute(select(Pairing).where(Pairing.followup_study_id == followup.id)).scalar_one_or_none()
    if pairing is None:
        pairing = Pairing(
            followup_study_id=followup.id, state=PairingState.NONE, reason="", created_at=now, updated_at=now
        )
        session.add(pairing)
        session.flush()
    followup_date = parse_da(followup.study_date)
    if not followup.patient_id or followup_date is None:
        missing = "PatientID" if not followup.patient_id else "StudyDate"
        update_pairing(session, pairing, followup, "none", f"the study has no {missing}; it cannot be paired")
        return pairing
    retrieved_for = session.execute(
        select(Pairing).where(
            Pairing.baseline_study_instance_uid == followup.study_instance_uid, Pairing.state == "retrieving"
        )
    ).first()
    response = settings.response
    choice = choose_baseline(
        followup.study_instance_uid,
        followup_date,
        followup.patient_birth_date,
        followup.patient_sex,
        local_candidates(session, followup),
        window_weeks=response.window_weeks,
        target_weeks=response.target_weeks,
    )
    if choice.candidate is not None:
        baseline = session.execute(
            select(Study).where(Study.study_instance_uid == choice.candidate.study_instance_uid)
        ).scalar_one()
        update_pairing(
            session,
            pairing,
            followup,
            "paired",
            f"found locally: {choice.reason}",
            baseline_study_instance_uid=baseline.study_instance_uid,
            source="local",
            deadline=None,
        )
        schedule_response(session, pairing, followup, baseline, settings)
    elif retrieved_for is not None:
        update_pairing(
            session, pairing, followup, "none", "retrieved as the baseline of another study; not searched further"
        )
    elif pairing.state == "retrieving" and pairing.deadline is not None and pairing.deadline > now:
        pass  # the baseline asked for is on its way
    elif response.query_sources and settings.sources:
        names = ", ".join(s.name for s in settings.sources)
        update_pairing(session, pairing, followup, "query", f"none stored here ({choice.reason}); asking {names}")
    else:
        update_pairing(session, pairing, followup, "none", choice.reason)
    return pairing


def complete_open_pairings(session: Session, baseline: Study, settings: Settings) -> int:
    """A study became ready: pair every waiting follow-up it is the baseline of; returns how many."""
    if not baseline.patient_id:
        return 0
    waiting = session.execute(
        select(Pairing, Study)
        .join(Study, Study.id == Pairing.followup_study_id)
        .where(Pairing.state.in_(OPEN_STATES), Study.patient_id == baseline.patient_id, Study.id != baseline.id)
    ).all()
    paired = 0
    for pairing, followup in waiting:
        if followup.ct_series_instance_uid is None or not _same_patient(followup, baseline):
            continue
        before = pairing.state
        pair_followup(session, followup, settings)
        if pairing.state == "paired" and before != "paired":
            paired += 1
    return paired


def expire_retrievals(session: Session, now: datetime | None = None) -> int:
    """Fail pairings whose retrieved baseline did not become ready in time; returns how many."""
    now = now or utcnow()
    late = session.execute(
        select(Pairing, Study)
        .join(Study, Study.id == Pairing.followup_study_id)
        .where(Pairing.state == "retrieving", Pairing.deadline < now)
    ).all()
    for pairing, followup in late:
        baseline = session.execute(
            select(Study).where(Study.study_instance_uid == pairing.baseline_study_instance_uid)
        ).scalar_one_or_none()
        if baseline is None:
            why = "none of its instances arrived (check that the source knows this node's AE title)"
        else:
            why = f"it arrived but is {baseline.state}: {baseline.state_reason or 'no reason recorded'}"
        update_pairing(
            session,
            pairing,
            followup,
            "failed",
            f"baseline {pairing.baseline_study_instance_uid} from {pairing.source} did not become ready in time: {why}",
        )
    return len(late)
