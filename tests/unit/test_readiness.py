"""Readiness is a pure function: snapshots, a clock and rules; no network, no database."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from pacs_agent.receive.header import CT_IMAGE, ENHANCED_CT_IMAGE, RT_STRUCTURE_SET, SEGMENTATION
from pacs_agent.routing.phase import PhaseRules, SeriesPhaseInfo
from pacs_agent.studies.readiness import (
    ReadinessRules,
    SegmentationSnapshot,
    SeriesSnapshot,
    StudySnapshot,
    decide,
)

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
RULES = ReadinessRules(quiet_seconds=30, min_ct_instances=3, phase=None)  # phase rules tested below
PV = SeriesPhaseInfo(series_description="ABDOMEN PORTAL VENOUS", contrast_bolus_agent="IOHEXOL")
ARTERIAL = SeriesPhaseInfo(series_description="ABDOMEN ARTERIAL", contrast_bolus_agent="IOHEXOL")


def ct(uid: str = "1.2.3", count: int = 60, sop: str = CT_IMAGE, phase: SeriesPhaseInfo = PV) -> SeriesSnapshot:
    return SeriesSnapshot(uid, "CT", frozenset({sop}), count, phase=phase)


def seg(uid: str, refs: set[str], sop: str = SEGMENTATION, at: datetime = T0) -> SegmentationSnapshot:
    return SegmentationSnapshot(uid, sop, uid + ".s", frozenset(refs), at)


def study(series: list[SeriesSnapshot], segs: list[SegmentationSnapshot], last: datetime = T0) -> StudySnapshot:
    return StudySnapshot("1.2.9", last, tuple(series), tuple(segs))


def test_waits_for_quiet_period() -> None:
    snap = study([ct()], [seg("9.1", {"1.2.3"})])
    decision = decide(snap, T0 + timedelta(seconds=10), RULES)
    assert decision.state == "waiting"
    assert decision.recheck_after_seconds == 20


def test_ready_after_quiet_with_ct_and_referencing_seg() -> None:
    decision = decide(study([ct()], [seg("9.1", {"1.2.3"})]), T0 + timedelta(seconds=30), RULES)
    assert decision.state == "ready"
    assert decision.ct_series_instance_uid == "1.2.3"
    assert decision.segmentation_sop_instance_uid == "9.1"
    assert "60 images" in decision.reason


def test_zero_quiet_period_is_immediately_ready() -> None:
    decision = decide(study([ct()], [seg("9.1", {"1.2.3"})]), T0, ReadinessRules(quiet_seconds=0))
    assert decision.state == "ready"


def test_incomplete_without_ct() -> None:
    decision = decide(study([], [seg("9.1", {"1.2.3"})]), T0 + timedelta(minutes=5), RULES)
    assert decision.state == "incomplete"
    assert "no CT image series" in decision.reason


def test_incomplete_without_segmentation() -> None:
    decision = decide(study([ct()], []), T0 + timedelta(minutes=5), RULES)
    assert decision.state == "incomplete"
    assert "no segmentation" in decision.reason


def test_segmentation_referencing_unknown_series_is_named() -> None:
    decision = decide(study([ct()], [seg("9.1", {"7.7.7"})]), T0 + timedelta(minutes=5), RULES)
    assert decision.state == "incomplete"
    assert "references 7.7.7" in decision.reason
    assert "1.2.3" in decision.reason


def test_too_few_slices() -> None:
    decision = decide(study([ct(count=2)], [seg("9.1", {"1.2.3"})]), T0 + timedelta(minutes=5), RULES)
    assert decision.state == "incomplete"
    assert "only 2 image(s)" in decision.reason


def test_single_enhanced_ct_instance_is_enough() -> None:
    snap = study([ct(count=1, sop=ENHANCED_CT_IMAGE)], [seg("9.1", {"1.2.3"})])
    assert decide(snap, T0 + timedelta(minutes=5), RULES).state == "ready"


def test_seg_preferred_over_rtstruct_then_newest() -> None:
    rt = seg("9.1", {"1.2.3"}, sop=RT_STRUCTURE_SET, at=T0 + timedelta(seconds=5))
    old = seg("9.2", {"1.2.3"}, at=T0)
    new = seg("9.3", {"1.2.3"}, at=T0 + timedelta(seconds=3))
    decision = decide(study([ct()], [rt, old, new], last=T0 + timedelta(seconds=5)), T0 + timedelta(minutes=1), RULES)
    assert decision.segmentation_sop_instance_uid == "9.3"
    assert "chosen among 3" in decision.reason


def test_choice_is_deterministic_on_ties() -> None:
    a = seg("9.5", {"1.2.3"})
    b = seg("9.4", {"1.2.3"})
    first = decide(study([ct()], [a, b]), T0 + timedelta(minutes=1), RULES)
    second = decide(study([ct()], [b, a]), T0 + timedelta(minutes=1), RULES)
    assert first == second
    assert first.segmentation_sop_instance_uid == "9.4"


def test_picks_the_referenced_ct_among_several() -> None:
    snap = study([ct("1.2.3"), ct("1.2.4")], [seg("9.1", {"1.2.4"})])
    assert decide(snap, T0 + timedelta(minutes=1), RULES).ct_series_instance_uid == "1.2.4"


PHASE_RULES = ReadinessRules(quiet_seconds=0, phase=PhaseRules())


def test_portal_venous_series_is_chosen_among_phases() -> None:
    snap = study([ct("1.2.3", phase=ARTERIAL), ct("1.2.4", phase=PV)], [seg("9.1", {"1.2.3", "1.2.4"})])
    decision = decide(snap, T0, PHASE_RULES)
    assert decision.state == "ready"
    assert decision.ct_series_instance_uid == "1.2.4"
    notes = {n.series_instance_uid: n for n in decision.series_notes}
    assert notes["1.2.4"].role == "chosen"
    assert "PORTAL VENOUS" in notes["1.2.4"].reason
    assert notes["1.2.3"].role == "skipped"
    assert "exclusion pattern 'arterial'" in notes["1.2.3"].reason


def test_segmentation_on_a_non_portal_venous_series_is_explained() -> None:
    snap = study([ct("1.2.3", phase=ARTERIAL), ct("1.2.4", phase=PV)], [seg("9.1", {"1.2.3"})])
    decision = decide(snap, T0, PHASE_RULES)
    assert decision.state == "incomplete"
    assert "not the portal-venous phase" in decision.reason
    notes = {n.series_instance_uid: n for n in decision.series_notes}
    assert "no usable segmentation refers to it" in notes["1.2.4"].reason


def test_non_portal_venous_can_be_processed_when_configured() -> None:
    rules = ReadinessRules(quiet_seconds=0, phase=PhaseRules(), when_not_portal_venous="process")
    decision = decide(study([ct("1.2.3", phase=ARTERIAL)], [seg("9.1", {"1.2.3"})]), T0, rules)
    assert decision.state == "ready"
    assert "NOT portal-venous" in decision.reason


def test_waits_for_images_the_segmentation_was_drawn_on() -> None:
    partial = SeriesSnapshot(
        "1.2.3", "CT", frozenset({CT_IMAGE}), 3, phase=PV, instance_uids=frozenset({"i1", "i2", "i3"})
    )
    segmentation = SegmentationSnapshot(
        "9.1",
        SEGMENTATION,
        "9.1.s",
        frozenset({"1.2.3"}),
        T0,
        referenced_instance_uids=frozenset({"i1", "i2", "i3", "i4", "i5"}),
    )
    snap = study([partial], [segmentation])
    rules = ReadinessRules(quiet_seconds=30, phase=None, reference_wait_seconds=300)
    waiting = decide(snap, T0 + timedelta(seconds=60), rules)
    assert waiting.state == "waiting"
    assert "drawn on 5 image(s), 2 of which have not arrived" in waiting.reason
    assert waiting.recheck_after_seconds == 240
    given_up = decide(snap, T0 + timedelta(seconds=301), rules)
    assert given_up.state == "incomplete"
    assert "send the complete CT series" in given_up.reason
    complete = replace(partial, instance_uids=frozenset({"i1", "i2", "i3", "i4", "i5"}), instance_count=5)
    assert decide(study([complete], [segmentation]), T0 + timedelta(seconds=60), rules).state == "ready"
