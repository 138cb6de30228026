"""Readiness is a pure function: snapshots, a clock and rules; no network, no database."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from inference.structures import CodedTerm, SegmentationSummary, StructureInfo, StructureRules
from pacs_agent.receive.header import CT_IMAGE, ENHANCED_CT_IMAGE, RT_STRUCTURE_SET, SEGMENTATION
from pacs_agent.routing.phase import PhaseRules, SeriesPhaseInfo
from pacs_agent.routing.references import CTGeometry
from pacs_agent.studies.readiness import (
    ReadinessRules,
    SegmentationSnapshot,
    SeriesSnapshot,
    StudySnapshot,
    decide,
)

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
MORPH_ABNORMAL = CodedTerm("SCT", "49755003", "Morphologically Abnormal Structure")
NEOPLASM = CodedTerm("SCT", "108369006", "Neoplasm")
ANATOMY = CodedTerm("SCT", "91723000", "Anatomical Structure")
LIVER = CodedTerm("SCT", "10200004", "Liver")
RULES = ReadinessRules(quiet_seconds=30, min_ct_instances=3, phase=None)  # phase rules tested below
PV = SeriesPhaseInfo(series_description="ABDOMEN PORTAL VENOUS", contrast_bolus_agent="IOHEXOL")
ARTERIAL = SeriesPhaseInfo(series_description="ABDOMEN ARTERIAL", contrast_bolus_agent="IOHEXOL")


def ct(uid: str = "1.2.3", count: int = 60, sop: str = CT_IMAGE, phase: SeriesPhaseInfo = PV) -> SeriesSnapshot:
    return SeriesSnapshot(uid, "CT", frozenset({sop}), count, phase=phase)


TUMOUR = StructureInfo(1, "Liver lesions", "seg", MORPH_ABNORMAL, NEOPLASM)


def summary(
    uid: str,
    refs: set[str] | tuple[str, ...],
    structures: tuple[StructureInfo, ...] = (TUMOUR,),
    *,
    frames: tuple[str, ...] = (),
    images: tuple[str, ...] = (),
    sop: str = SEGMENTATION,
) -> SegmentationSummary:
    kind = "rtstruct" if sop == RT_STRUCTURE_SET else "seg"
    return SegmentationSummary(uid, sop, kind, frames, tuple(sorted(refs)), images, structures)  # type: ignore[arg-type]


def seg(uid: str, refs: set[str], sop: str = SEGMENTATION, at: datetime = T0) -> SegmentationSnapshot:
    return SegmentationSnapshot(uid, sop, uid + ".s", frozenset(refs), at, summary=summary(uid, refs, sop=sop))


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
        summary=summary("9.1", {"1.2.3"}, images=("i1", "i2", "i3", "i4", "i5")),
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


# --- which structures are tumours ------------------------------------------------------------------------------

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
QUIET = T0 + timedelta(minutes=1)


def ct_with_slices(uid: str, zs: list[float], frame: str = "for.1", instances: tuple[str, ...] = ()) -> SeriesSnapshot:
    """A CT series with known geometry: axial slices at ``zs`` (mm)."""
    return SeriesSnapshot(
        uid,
        "CT",
        frozenset({CT_IMAGE}),
        len(zs),
        phase=PV,
        instance_uids=frozenset(instances or tuple(f"{uid}.{i}" for i in range(len(zs)))),
        frame_of_reference_uid=frame,
        geometry=CTGeometry(AXIAL, tuple((0.0, 0.0, z) for z in zs)),
    )


def rt(uid: str, refs: set[str], structures: tuple[StructureInfo, ...], **kwargs: object) -> SegmentationSnapshot:
    return SegmentationSnapshot(
        uid,
        RT_STRUCTURE_SET,
        uid + ".s",
        frozenset(refs),
        T0,
        summary=summary(uid, refs, structures, sop=RT_STRUCTURE_SET, **kwargs),  # type: ignore[arg-type]
    )


def roi(number: int, name: str, kind: str | None, zs: tuple[float, ...] = (10.0,)) -> StructureInfo:
    return StructureInfo(number, name, "rtstruct", interpreted_type=kind, plane_points=tuple((5.0, 5.0, z) for z in zs))


ZS = [float(z) for z in range(0, 60, 3)]  # 20 slices, 3 mm apart


def test_only_the_gtv_of_a_radiotherapy_structure_set_is_a_tumour() -> None:
    structures = (
        roi(1, "BODY", "EXTERNAL"),
        roi(2, "Liver", "ORGAN"),
        roi(3, "GTV_Mass", "GTV", (9.0, 12.0)),
        roi(4, "CTV_60", "CTV"),
        roi(5, "PTV_60", "PTV"),
    )
    decision = decide(study([ct_with_slices("1.2.3", ZS)], [rt("9.1", {"1.2.3"}, structures)]), QUIET, RULES)
    assert decision.state == "ready"
    assert decision.selection is not None
    assert decision.selection.tumours == (3,)
    assert decision.selection.organs == ((2, "liver"),)
    roles = {n.label: (n.role, n.reason) for n in decision.structure_notes}
    assert roles["GTV_Mass"][0] == "tumour"
    assert roles["BODY"] == ("other", "RT ROI Interpreted Type EXTERNAL: body outline")
    assert roles["PTV_60"][0] == "other" and roles["CTV_60"][0] == "other"
    assert "tumour structure(s): GTV_Mass (4 other structure(s) not analysed as lesions)" in decision.reason


def test_a_segmentation_without_tumour_makes_the_study_incomplete_with_every_structure_listed() -> None:
    liver = StructureInfo(
        1, "Liver", "seg", CodedTerm("SRT", "T-D0050", "Tissue"), CodedTerm("SRT", "T-62000", "Liver")
    )
    snap = study(
        [ct()],
        [
            SegmentationSnapshot(
                "9.1", SEGMENTATION, "9.s", frozenset({"1.2.3"}), T0, summary=summary("9.1", {"1.2.3"}, (liver,))
            )
        ],
    )
    decision = decide(snap, QUIET, RULES)
    assert decision.state == "incomplete"
    assert "no tumour structure: Liver (organ, coded Tissue / Liver)" in decision.reason
    assert "[routing.tumour]" in decision.reason
    assert [(n.label, n.role) for n in decision.structure_notes] == [("Liver", "organ")]


def test_tumour_rules_come_from_the_configuration() -> None:
    snap = study([ct_with_slices("1.2.3", ZS)], [rt("9.1", {"1.2.3"}, (roi(1, "T1", None), roi(2, "BODY", None)))])
    assert decide(snap, QUIET, RULES).state == "incomplete"
    site = replace(RULES, structures=StructureRules(include_labels=(r"^T\d+$",)))
    decision = decide(snap, QUIET, site)
    assert decision.state == "ready" and decision.selection is not None and decision.selection.tumours == (1,)


def test_an_unreadable_segmentation_is_named_with_the_reason() -> None:
    broken = SegmentationSnapshot("9.1", SEGMENTATION, "9.s", frozenset({"1.2.3"}), T0, summary_problem="truncated")
    decision = decide(study([ct()], [broken]), QUIET, RULES)
    assert decision.state == "incomplete"
    assert "segmentation 9.1 cannot be used: truncated" in decision.reason


# --- references matched by geometry ------------------------------------------------------------------------------


def test_stale_per_image_references_are_a_warning_when_the_slices_cover_the_contours() -> None:
    gtv = roi(1, "GTV", "GTV", (9.0, 12.0, 15.0))
    stale = rt("9.1", {"1.2.3"}, (gtv,), images=("old.1", "old.2", "old.3"), frames=("for.1",))
    decision = decide(study([ct_with_slices("1.2.3", ZS)], [stale]), T0 + timedelta(seconds=31), RULES)
    assert decision.state == "ready"  # after the quiet period, not after the 300 s reference wait
    assert decision.ct_series_instance_uid == "1.2.3"
    (warning,) = decision.warnings
    assert "3 of its 3 per-image reference(s) name instances that are not here" in warning


def test_images_still_on_their_way_are_awaited_even_when_the_tumour_planes_are_covered() -> None:
    """A sender that re-sends failed slices last: the SEG is here before slices it references (live refs)."""
    gtv = roi(1, "GTV", "GTV", (9.0, 12.0))
    arrived = tuple(f"1.2.3.{i}" for i in range(15))
    refs = (*arrived, *(f"1.2.3.{i}" for i in range(15, 20)))
    seg = rt("9.1", {"1.2.3"}, (gtv,), images=refs, frames=("for.1",))
    snap = study([ct_with_slices("1.2.3", ZS[:15], instances=arrived)], [seg])
    waiting = decide(snap, QUIET, RULES)
    assert waiting.state == "waiting"
    assert "drawn on 20 image(s), 5 of which have not arrived; waiting for them" in waiting.reason
    late = decide(snap, T0 + timedelta(seconds=301), RULES)  # they never came: the geometry decides
    assert late.state == "ready"
    assert any("5 of its 20 per-image reference(s)" in w for w in late.warnings)


def test_a_series_of_the_same_frame_of_reference_stands_in_for_a_series_that_did_not_arrive() -> None:
    gtv = roi(1, "GTV", "GTV", (9.0, 12.0))
    moved = rt("9.1", {"7.7.7"}, (gtv,), frames=("for.1",))
    other_frame = ct_with_slices("1.2.4", ZS, frame="for.2")
    decision = decide(study([ct_with_slices("1.2.3", ZS), other_frame], [moved]), QUIET, RULES)
    assert decision.state == "ready"
    assert decision.ct_series_instance_uid == "1.2.3"
    assert any("references series 7.7.7, which did not arrive" in w for w in decision.warnings)


def test_contours_outside_the_received_volume_wait_then_give_a_precise_reason() -> None:
    gtv = roi(1, "GTV", "GTV", (9.0, 90.0, 93.0))
    snap = study([ct_with_slices("1.2.3", ZS)], [rt("9.1", {"1.2.3"}, (gtv,), frames=("for.1",))])
    waiting = decide(snap, QUIET, RULES)
    assert waiting.state == "waiting"
    assert "waiting for the missing slices" in waiting.reason
    late = decide(snap, T0 + timedelta(seconds=301), RULES)
    assert late.state == "incomplete"
    assert "2 of 3 plane(s) have no CT slice (2 outside the received volume" in late.reason
    assert "received slices from 0.0 to 57.0 mm every 3.00 mm" in late.reason


def test_missing_slices_inside_the_series_are_named_as_gaps() -> None:
    gtv = roi(1, "GTV", "GTV", (9.0, 12.0, 15.0))
    holes = [z for z in ZS if z not in (12.0,)]
    late = decide(
        study([ct_with_slices("1.2.3", holes)], [rt("9.1", {"1.2.3"}, (gtv,))]), T0 + timedelta(hours=1), RULES
    )
    assert late.state == "incomplete"
    assert "1 in gaps between received slices" in late.reason


def test_contours_between_slices_within_half_a_slice_are_covered() -> None:
    gtv = roi(1, "GTV", "GTV", (10.4, 11.6))  # 1.4 mm and 0.4 mm from slices 9 and 12: under 1.5 mm
    decision = decide(study([ct_with_slices("1.2.3", ZS)], [rt("9.1", {"1.2.3"}, (gtv,))]), QUIET, RULES)
    assert decision.state == "ready"


def test_only_tumour_planes_must_be_covered() -> None:
    body = roi(1, "BODY", "EXTERNAL", (-300.0, 900.0))  # a body outline far beyond the cropped CT
    gtv = roi(2, "GTV", "GTV", (9.0,))
    decision = decide(study([ct_with_slices("1.2.3", ZS)], [rt("9.1", {"1.2.3"}, (body, gtv))]), QUIET, RULES)
    assert decision.state == "ready"


def test_no_series_and_no_frame_of_reference_match_is_named() -> None:
    gtv = roi(1, "GTV", "GTV")
    snap = study([ct_with_slices("1.2.3", ZS)], [rt("9.1", {"7.7.7"}, (gtv,), frames=("for.9",))])
    decision = decide(snap, QUIET, RULES)
    assert decision.state == "incomplete"
    assert "references 7.7.7, which is not a CT series of this study, and its frame of reference (for.9)" in (
        decision.reason
    )
