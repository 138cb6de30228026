"""Is this study ready? A pure function of a snapshot, the clock and the rules.

A study is ready when no instance arrived for ``quiet_seconds`` and it holds a CT series plus a
segmentation (SEG or RTSTRUCT) that has at least one tumour structure and fits the series: the
series it references (by Series Instance UID, else by Frame of Reference) holds a slice on every
plane its tumour contours / frames lie on (:mod:`pacs_agent.routing.references`). Stale per-image
references are a warning, not a refusal. Which structures are tumours is decided here with a
reason per structure (:mod:`inference.structures`). A quiet study that cannot be processed is
``incomplete``, with a reason an imaging IT person can act on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from inference.structures import (
    SegmentationSummary,
    StructureRules,
    StructureSelection,
    StructureVerdict,
    classify_structures,
    no_tumour_message,
)
from pacs_agent.receive.header import CT_IMAGE, ENHANCED_CT_IMAGE, SEGMENTATION
from pacs_agent.routing.phase import PhaseRules, PhaseVerdict, SeriesPhaseInfo, classify
from pacs_agent.routing.references import CTGeometry, coverage

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
    frame_of_reference_uid: str | None = None
    geometry: CTGeometry | None = None
    """Slice positions and orientation; None when unknown (Enhanced CT, or recorded by an older version)."""


@dataclass(frozen=True)
class SegmentationSnapshot:
    """One SEG or RTSTRUCT instance, what it references and what it holds."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    referenced_series_uids: frozenset[str]
    received_at: datetime
    referenced_instance_uids: frozenset[str] = frozenset()
    summary: SegmentationSummary | None = None
    """Its structures and their planes (read from the stored file); None when it could not be read."""
    summary_problem: str | None = None
    """Why ``summary`` is None."""


@dataclass(frozen=True)
class StudySnapshot:
    """What the database knows of a study at one moment."""

    study_instance_uid: str
    last_received_at: datetime
    series: tuple[SeriesSnapshot, ...]
    segmentations: tuple[SegmentationSnapshot, ...]


@dataclass(frozen=True)
class ReadinessRules:
    """The knobs of :func:`decide` (from ``[readiness]`` and ``[routing]``)."""

    quiet_seconds: float = 30.0
    min_ct_instances: int = 3
    phase: PhaseRules | None = field(default_factory=PhaseRules)
    """Portal-venous rules; None turns phase selection off."""
    when_not_portal_venous: Literal["skip", "process"] = "skip"
    reference_wait_seconds: float = 300.0
    """How long to wait for CT slices a segmentation was drawn on but that have not arrived."""
    structures: StructureRules = field(default_factory=StructureRules)
    """Which structures are tumours (``[routing.tumour]``)."""


@dataclass(frozen=True)
class SeriesNote:
    """Why a series was used or not (shown by ``pacs-agent status``)."""

    series_instance_uid: str
    role: Literal["chosen", "skipped"]
    reason: str


@dataclass(frozen=True)
class StructureNote:
    """The role of one structure of a segmentation, and why (shown by ``pacs-agent status``)."""

    segmentation_sop_instance_uid: str
    number: int
    label: str
    role: Literal["tumour", "organ", "other"]
    reason: str
    organ: str | None = None


@dataclass(frozen=True)
class Decision:
    """The outcome for one study.

    ``waiting``: instances may still arrive (check again after ``recheck_after_seconds``; the
    reason names no running figures, so it stays the same text until something arrives);
    ``ready``: run the methods on ``ct_series_instance_uid`` + ``segmentation_sop_instance_uid``,
    analysing the structures of ``selection``; ``incomplete``: quiet, but nothing can be processed;
    ``reason`` says why. ``warnings`` are things to fix at the source that did not stop processing
    (stale per-image references, a series matched by frame of reference).
    """

    state: Literal["waiting", "ready", "incomplete"]
    reason: str
    ct_series_instance_uid: str | None = None
    segmentation_sop_instance_uid: str | None = None
    recheck_after_seconds: float | None = None
    series_notes: tuple[SeriesNote, ...] = ()
    structure_notes: tuple[StructureNote, ...] = ()
    warnings: tuple[str, ...] = ()
    selection: StructureSelection | None = None


@dataclass(frozen=True)
class _Pairing:
    """A segmentation that fits a CT series, with the warnings of how it was matched."""

    segmentation: SegmentationSnapshot
    ct: SeriesSnapshot
    by_series_uid: bool
    warnings: tuple[str, ...]


@dataclass
class _Findings:
    """What the look at every segmentation found (collected by :func:`_pair_segmentation`)."""

    pairs: list[_Pairing] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    awaited: list[str] = field(default_factory=list)
    notes: list[StructureNote] = field(default_factory=list)
    verdicts: dict[str, tuple[StructureVerdict, ...]] = field(default_factory=dict)


def _usable_ct(series: SeriesSnapshot, rules: ReadinessRules) -> bool:
    if ENHANCED_CT_IMAGE in series.sop_class_uids:
        return series.instance_count >= 1
    return series.instance_count >= rules.min_ct_instances


def decide(snapshot: StudySnapshot, now: datetime, rules: ReadinessRules) -> Decision:
    """Decide whether ``snapshot`` is ready to process at time ``now``.

    Among several segmentations that fit a usable CT series, the portal-venous series wins, then a
    SEG over an RTSTRUCT, then a series referenced by UID over one matched by frame of reference,
    then the most recently received segmentation, then the lowest SOP Instance UID (so the choice
    is deterministic).
    """
    quiet_for = (now - snapshot.last_received_at).total_seconds()
    if quiet_for < rules.quiet_seconds:
        remaining = rules.quiet_seconds - quiet_for
        return Decision(
            "waiting",
            f"receiving: last instance at {_clock(snapshot.last_received_at)}; readiness is decided after "
            f"{rules.quiet_seconds:g} s without new instances",
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
    received = frozenset().union(*(series.instance_uids for series in snapshot.series))
    found = _Findings()
    for seg in snapshot.segmentations:
        _pair_segmentation(seg, ct_series, received, snapshot.last_received_at, quiet_for, rules, found)
    candidates: list[_Pairing] = []
    for pair in found.pairs:
        ct = pair.ct
        verdict = phases[ct.series_instance_uid]
        if not _usable_ct(ct, rules):
            found.problems.append(
                f"CT series {ct.series_instance_uid} has only {ct.instance_count} image(s); "
                f"at least {rules.min_ct_instances} are needed"
            )
        elif not verdict.portal_venous and rules.when_not_portal_venous == "skip":
            found.problems.append(
                f"CT series {ct.series_instance_uid} referenced by the segmentation is not the "
                f"portal-venous phase ({verdict.reason}); see [routing] in the configuration"
            )
        else:
            candidates.append(pair)
    if not candidates and found.awaited:
        return Decision(
            "waiting",
            "; ".join(found.awaited),
            recheck_after_seconds=rules.reference_wait_seconds - quiet_for,
            series_notes=_notes(ct_series, phases, None),
            structure_notes=tuple(found.notes),
        )
    if not candidates:
        return Decision(
            "incomplete",
            "; ".join(dict.fromkeys(found.problems)),
            series_notes=_notes(ct_series, phases, None),
            structure_notes=tuple(found.notes),
        )
    best = min(
        candidates,
        key=lambda c: (
            not phases[c.ct.series_instance_uid].portal_venous,
            c.segmentation.sop_class_uid != SEGMENTATION,
            not c.by_series_uid,
            -c.segmentation.received_at.timestamp(),
            c.segmentation.sop_instance_uid,
            c.ct.series_instance_uid,
        ),
    )
    seg, ct = best.segmentation, best.ct
    verdicts = found.verdicts[seg.sop_instance_uid]
    kind = "SEG" if seg.sop_class_uid == SEGMENTATION else "RTSTRUCT"
    tumours = [v.label for v in verdicts if v.role == "tumour"]
    reason = (
        f"CT series {ct.series_instance_uid} ({ct.instance_count} images) with {kind} {seg.sop_instance_uid}; "
        f"tumour structure(s): {', '.join(tumours)}"
    )
    skipped = len(verdicts) - len(tumours)
    if skipped:
        reason += f" ({skipped} other structure(s) not analysed as lesions)"
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
        structure_notes=tuple(n for n in found.notes if n.segmentation_sop_instance_uid == seg.sop_instance_uid),
        warnings=best.warnings,
        selection=StructureSelection.from_verdicts(verdicts),
    )


def _clock(when: datetime) -> str:
    """``10:31:02 UTC``: a time of day in a reason (status shows the date of the study next to it)."""
    return f"{when.astimezone(UTC):%H:%M:%S} UTC"


def _pair_segmentation(
    seg: SegmentationSnapshot,
    ct_series: dict[str, SeriesSnapshot],
    received: frozenset[str],
    last_received_at: datetime,
    quiet_for: float,
    rules: ReadinessRules,
    found: _Findings,
) -> None:
    """Classify the structures of ``seg`` and find the CT series it fits; record into ``found``.

    A wait is told with the time it counts from (the last arrival) and its limit, never with a
    running figure, so the reason recorded on the study changes only when something arrives.
    """
    until = (
        f"since {_clock(last_received_at)} (the last arrival); incomplete after "
        f"{rules.reference_wait_seconds:g} s without them"
    )
    name = f"segmentation {seg.sop_instance_uid}"
    summary = seg.summary
    if summary is None:
        found.problems.append(f"{name} cannot be used: {seg.summary_problem or 'its content could not be read'}")
        return
    verdicts = classify_structures(summary, rules.structures)
    found.verdicts[seg.sop_instance_uid] = verdicts
    found.notes.extend(
        StructureNote(seg.sop_instance_uid, v.number, v.label, v.role, v.reason, v.organ) for v in verdicts
    )
    tumours = {v.number for v in verdicts if v.role == "tumour"}
    if not tumours:
        found.problems.append(f"{name}: {no_tumour_message(verdicts)}")
        return
    planes = [p for s in summary.structures if s.number in tumours for p in s.plane_points]
    referenced_series = summary.referenced_series_uids or tuple(sorted(seg.referenced_series_uids))
    by_uid = [ct_series[uid] for uid in referenced_series if uid in ct_series]
    frames = set(summary.frame_of_reference_uids)
    same_frame = [s for s in ct_series.values() if s.frame_of_reference_uid and s.frame_of_reference_uid in frames]
    series = by_uid or sorted(same_frame, key=lambda s: s.series_instance_uid)
    if not series:
        refs = ", ".join(referenced_series) or "no series"
        found.problems.append(
            f"{name} references {refs}, which is not a CT series of this study, and its frame of reference "
            f"({', '.join(sorted(frames)) or 'none given'}) matches no CT series here "
            f"(CT series here: {', '.join(sorted(ct_series))})"
        )
        return
    images = frozenset(summary.referenced_instance_uids) or seg.referenced_instance_uids
    stale = images - received
    if stale and images & received and quiet_for < rules.reference_wait_seconds:
        # Some of the images it was drawn on are here, so its references are live: the others are
        # still on their way (a sender retrying, slices out of order). Only references of which none
        # arrived are stale ones (a re-exported series), for the slice geometry to decide at once.
        found.awaited.append(
            f"{name} was drawn on {len(images)} image(s), {len(stale)} of which have not arrived; "
            f"waiting for them {until}"
        )
        return
    uncovered: list[str] = []
    for ct in series:
        warnings = []
        if not by_uid:
            warnings.append(
                f"{name} references series {', '.join(referenced_series) or '(none)'}, which did not arrive; "
                f"CT series {ct.series_instance_uid} of the same frame of reference holds its planes"
            )
        if ct.geometry is not None and planes:
            covered = coverage(ct.geometry, planes)
            if not covered.complete:
                uncovered.append(f"CT series {ct.series_instance_uid}: {covered.describe()}")
                continue
            if stale:
                warnings.append(
                    f"{name}: {len(stale)} of its {len(images)} per-image reference(s) name instances that are "
                    f"not here (stale references, e.g. a re-exported or anonymised series); matched to CT series "
                    f"{ct.series_instance_uid} by {'series' if by_uid else 'frame of reference'} and slice geometry"
                )
        elif stale:  # no geometry to decide by: every image it was drawn on must be here
            note = f"{name} was drawn on {len(images)} image(s), {len(stale)} of which have not arrived"
            if quiet_for < rules.reference_wait_seconds:
                found.awaited.append(f"{note}; waiting for them {until}")
            else:
                found.problems.append(f"{note} after {rules.reference_wait_seconds:g} s: send the complete CT series")
            continue
        found.pairs.append(_Pairing(seg, ct, bool(by_uid), tuple(warnings)))
    if uncovered and not any(p.segmentation is seg for p in found.pairs):
        note = f"{name}: its tumour planes are not covered by the received CT slices: {'; '.join(uncovered)}"
        if quiet_for < rules.reference_wait_seconds:
            found.awaited.append(f"{note}; waiting for the missing slices {until}")
        else:
            found.problems.append(
                f"{note}, after {rules.reference_wait_seconds:g} s: send the complete CT series the segmentation "
                "was drawn on"
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
