"""Is this study ready? A pure function of a snapshot, the clock and the rules.

A study is ready when no instance arrived for ``quiet_seconds`` and it holds a CT series plus a
segmentation (SEG or RTSTRUCT) that references it. A quiet study that cannot be processed is
``incomplete``, with a reason an imaging IT person can act on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from pacs_agent.receive.header import CT_IMAGE, ENHANCED_CT_IMAGE, SEGMENTATION
from pacs_agent.routing.phase import PhaseRules, PhaseVerdict, SeriesPhaseInfo, classify

CT_SOP_CLASSES = frozenset({CT_IMAGE, ENHANCED_CT_IMAGE})


@dataclass(frozen=True)
class SeriesSnapshot:
    """One series of the study as recorded so far."""

    series_instance_uid: str
    modality: str | None
    sop_class_uids: frozenset[str]
    instance_count: int
    description: str | None = None
    phase: SeriesPhaseInfo = field(default_factory=SeriesPhaseInfo)
    instance_uids: frozenset[str] = frozenset()


@dataclass(frozen=True)
class SegmentationSnapshot:
    """One SEG or RTSTRUCT instance and the series it references."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    referenced_series_uids: frozenset[str]
    received_at: datetime
    referenced_instance_uids: frozenset[str] = frozenset()


@dataclass(frozen=True)
class StudySnapshot:
    """What the database knows of a study at one moment."""

    study_instance_uid: str
    last_received_at: datetime
    series: tuple[SeriesSnapshot, ...]
    segmentations: tuple[SegmentationSnapshot, ...]


@dataclass(frozen=True)
class ReadinessRules:
    """The knobs of :func:`decide` (from ``[readiness]``)."""

    quiet_seconds: float = 30.0
    min_ct_instances: int = 3
    phase: PhaseRules | None = field(default_factory=PhaseRules)
    """Portal-venous rules; None turns phase selection off."""
    when_not_portal_venous: Literal["skip", "process"] = "skip"
    reference_wait_seconds: float = 300.0
    """How long to wait for images a segmentation references but that have not arrived."""


@dataclass(frozen=True)
class SeriesNote:
    """Why a series was used or not (shown by ``pacs-agent status``)."""

    series_instance_uid: str
    role: Literal["chosen", "skipped"]
    reason: str


@dataclass(frozen=True)
class Decision:
    """The outcome for one study.

    ``waiting``: instances may still arrive (check again after ``recheck_after_seconds``);
    ``ready``: run the methods on ``ct_series_instance_uid`` + ``segmentation_sop_instance_uid``;
    ``incomplete``: quiet, but nothing can be processed; ``reason`` says why.
    """

    state: Literal["waiting", "ready", "incomplete"]
    reason: str
    ct_series_instance_uid: str | None = None
    segmentation_sop_instance_uid: str | None = None
    recheck_after_seconds: float | None = None
    series_notes: tuple[SeriesNote, ...] = ()


def _usable_ct(series: SeriesSnapshot, rules: ReadinessRules) -> bool:
    if ENHANCED_CT_IMAGE in series.sop_class_uids:
        return series.instance_count >= 1
    return series.instance_count >= rules.min_ct_instances


def decide(snapshot: StudySnapshot, now: datetime, rules: ReadinessRules) -> Decision:
    """Decide whether ``snapshot`` is ready to process at time ``now``.

    Among several segmentations referencing a usable CT series, a SEG wins over an RTSTRUCT, then
    the most recently received, then the lowest SOP Instance UID (so the choice is deterministic).
    """
    quiet_for = (now - snapshot.last_received_at).total_seconds()
    if quiet_for < rules.quiet_seconds:
        remaining = rules.quiet_seconds - quiet_for
        return Decision(
            "waiting",
            f"instances arrived {quiet_for:.1f} s ago; waiting {rules.quiet_seconds:g} s of quiet",
            recheck_after_seconds=remaining,
        )
    ct_series = {s.series_instance_uid: s for s in snapshot.series if s.sop_class_uids & CT_SOP_CLASSES}
    if not ct_series:
        return Decision("incomplete", "the study holds no CT image series")
    if not snapshot.segmentations:
        return Decision(
            "incomplete",
            "the study holds no segmentation (DICOM SEG or RTSTRUCT) of the tumour; send the segmentation to this node",
        )
    phases = {
        uid: classify(series.phase, rules.phase) if rules.phase else PhaseVerdict(True, "phase selection is off")
        for uid, series in ct_series.items()
    }
    candidates: list[tuple[SegmentationSnapshot, SeriesSnapshot]] = []
    problems: list[str] = []
    received = frozenset().union(*(series.instance_uids for series in snapshot.series))
    awaited: list[str] = []
    for seg in snapshot.segmentations:
        missing = seg.referenced_instance_uids - received
        if missing:
            note = (
                f"segmentation {seg.sop_instance_uid} was drawn on {len(seg.referenced_instance_uids)} image(s), "
                f"{len(missing)} of which have not arrived"
            )
            if quiet_for < rules.reference_wait_seconds:
                awaited.append(note)
            else:
                problems.append(f"{note} after {rules.reference_wait_seconds:g} s: send the complete CT series")
            continue
        referenced = [ct_series[uid] for uid in sorted(seg.referenced_series_uids) if uid in ct_series]
        if not referenced:
            refs = ", ".join(sorted(seg.referenced_series_uids)) or "no series"
            problems.append(
                f"segmentation {seg.sop_instance_uid} references {refs}, which is not a CT series "
                f"of this study (CT series here: {', '.join(sorted(ct_series))})"
            )
            continue
        for ct in referenced:
            verdict = phases[ct.series_instance_uid]
            if not _usable_ct(ct, rules):
                problems.append(
                    f"CT series {ct.series_instance_uid} has only {ct.instance_count} image(s); "
                    f"at least {rules.min_ct_instances} are needed"
                )
            elif not verdict.portal_venous and rules.when_not_portal_venous == "skip":
                problems.append(
                    f"CT series {ct.series_instance_uid} referenced by the segmentation is not the "
                    f"portal-venous phase ({verdict.reason}); see [routing] in the configuration"
                )
            else:
                candidates.append((seg, ct))
    if not candidates and awaited:
        return Decision(
            "waiting",
            "; ".join(awaited),
            recheck_after_seconds=rules.reference_wait_seconds - quiet_for,
            series_notes=_notes(ct_series, phases, None),
        )
    if not candidates:
        return Decision("incomplete", "; ".join(problems), series_notes=_notes(ct_series, phases, None))
    seg, ct = min(
        candidates,
        key=lambda c: (
            not phases[c[1].series_instance_uid].portal_venous,
            c[0].sop_class_uid != SEGMENTATION,
            -c[0].received_at.timestamp(),
            c[0].sop_instance_uid,
            c[1].series_instance_uid,
        ),
    )
    kind = "SEG" if seg.sop_class_uid == SEGMENTATION else "RTSTRUCT"
    reason = f"CT series {ct.series_instance_uid} ({ct.instance_count} images) with {kind} {seg.sop_instance_uid}"
    if not phases[ct.series_instance_uid].portal_venous:
        reason += " - NOT portal-venous, processed because [routing] when_not_portal_venous = 'process'"
    if len(candidates) > 1:
        reason += f" (chosen among {len(candidates)} segmentation/CT pairs: portal-venous, then SEG, then newest)"
    return Decision(
        "ready",
        reason,
        ct_series_instance_uid=ct.series_instance_uid,
        segmentation_sop_instance_uid=seg.sop_instance_uid,
        series_notes=_notes(ct_series, phases, ct.series_instance_uid),
    )


def _notes(
    ct_series: dict[str, SeriesSnapshot], phases: dict[str, PhaseVerdict], chosen: str | None
) -> tuple[SeriesNote, ...]:
    notes = []
    for uid in sorted(ct_series):
        verdict = phases[uid]
        phase = ("portal-venous: " if verdict.portal_venous else "not portal-venous: ") + verdict.reason
        if uid == chosen:
            notes.append(SeriesNote(uid, "chosen", phase))
        elif verdict.portal_venous:
            notes.append(SeriesNote(uid, "skipped", f"{phase}; no usable segmentation refers to it"))
        else:
            notes.append(SeriesNote(uid, "skipped", phase))
    return tuple(notes)
