"""The response SR (dicom_sr.sr.response): content, codes, evidence, UIDs, dciodvfy.

Input: small phantom pairs with planted change (volume x0.2, texture homogenised: RECIST PR), run
through the real response pipeline with the committed DEMO package and without a model; pairs with a
lesion segmented at one time point only; an RTSTRUCT pair.
"""

from __future__ import annotations

import copy
import dataclasses
import io
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from dicom_sr.sr.lesions import write_dataset
from dicom_sr.sr.response import (
    NO_MODEL_NOTE,
    RECIST_CATEGORY_CODES,
    build_response_report,
    lesion_result,
    response_series_description,
)
from dicom_sr.sr.text import render_sr_text
from inference.phantom import PhantomStudy, generate_follow_up, generate_study
from inference.pipelines.response import run_response
from inference.radiomics.delta import FEATURE_NAMES
from inference.response import ResponseResult
from inference.response.signature import load_signature
from inference.results import DEMO_WARNING
from tests.unit.response_helpers import (
    DEMO_PACKAGE,
    Evidence,
    all_groups,
    code,
    codes_in,
    dciodvfy,
    dsr2html_text,
    evidence,
    groups,
    is_viewer_copy,
    lesion_count,
    nums,
    segmentation_file,
    texts,
    tracking_uid,
    walk,
)
from tests.unit.test_response_pipeline import blank_segments

BASELINE_TP = ("C1442488", "UMLS")
FOLLOW_UP_TP = ("126074", "DCM")
TIME_POINT = ("126072", "DCM")
DERIVATION = ("121401", "DCM")
FRACTIONAL = ("125314", "DCM")
FEATURE_CODES = {
    "si4": ("SI4", "99PACSAGENT"),
    "log_z_entropy": ("LOGZ-ENTROPY", "99PACSAGENT"),
    "log_x_entropy": ("LOGX-ENTROPY", "99PACSAGENT"),
    "ngtdm_contrast": ("65HE", "IBSI"),
}
VOLUME = ("118565006", "SCT")
PROBABILITY = ("INSENS-PROB", "99PACSAGENT")
RISK_GROUP = ("RISK-GROUP", "99PACSAGENT")
CURRENT_RESPONSE = ("112048", "DCM")
LESION_STATUS = ("LESION-STATUS", "99PACSAGENT")


@dataclasses.dataclass(frozen=True)
class Pair:
    baseline: PhantomStudy
    follow_up: PhantomStudy


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("response-sr")


@pytest.fixture(scope="module")
def pair(work: Path) -> Pair:
    baseline = generate_study(
        work / "b", seed=11, lesions=2, slices=40, rows=128, columns=128, segmentation="seg", seg_per_lesion=True
    )
    return Pair(baseline, generate_follow_up(baseline, work / "f", shrink=0.2, texture_change="homogenise"))


@pytest.fixture(scope="module")
def ev_std(pair: Pair) -> Evidence:
    """The headers of the standard pair (read once)."""
    return evidence(pair.baseline, pair.follow_up)


@pytest.fixture(scope="module")
def demo_result(pair: Pair) -> ResponseResult:
    return run(pair, model=load_signature(DEMO_PACKAGE))


@pytest.fixture(scope="module")
def plain_result(pair: Pair) -> ResponseResult:
    return run(pair)


@pytest.fixture(scope="module")
def disappeared(pair: Pair, work: Path) -> tuple[ResponseResult, Path]:
    """Lesion 2 segmented at baseline only."""
    seg = blank_segments(pair.follow_up, {2}, work / "follow-blank2.dcm")
    return run(pair, follow_seg=seg), seg


@pytest.fixture(scope="module")
def appeared(pair: Pair, work: Path) -> tuple[ResponseResult, Path]:
    """Lesion 2 segmented at follow-up only (blanked at baseline): a new lesion."""
    seg = blank_segments(pair.baseline, {2}, work / "base-blank2.dcm")
    result = run_response(pair.baseline.ct_files, seg, pair.follow_up.ct_files, segmentation_file(pair.follow_up))
    return result, seg


def run(pair: Pair, *, follow_seg: Path | None = None, **kwargs: object) -> ResponseResult:
    return run_response(
        pair.baseline.ct_files,
        segmentation_file(pair.baseline),
        pair.follow_up.ct_files,
        follow_seg or segmentation_file(pair.follow_up),
        **kwargs,  # type: ignore[arg-type]
    )


def build(result: ResponseResult, ev: Evidence) -> hd.sr.Comprehensive3DSR:
    return build_response_report(result, ev.follow_up_ct, ev.follow_up_seg, ev.baseline_ct, ev.baseline_seg)


def roundtrip(sr: pydicom.Dataset) -> pydicom.Dataset:
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def patient_group(sr: pydicom.Dataset) -> pydicom.Dataset:
    """The patient-level group: the content of "Derived Imaging Measurements" (not an image annotation)."""
    derived = next(i for i in sr.ContentSequence if code(i) == ("126011", "DCM"))
    (group,) = derived.ContentSequence
    return group


# --- standard conformance -------------------------------------------------------------------


@pytest.mark.parametrize("case", ["demo", "plain", "disappeared", "appeared"])
def test_sr_passes_dciodvfy(
    case: str,
    pair: Pair,
    demo_result: ResponseResult,
    plain_result: ResponseResult,
    disappeared: tuple[ResponseResult, Path],
    appeared: tuple[ResponseResult, Path],
    tmp_path: Path,
    ev_std: Evidence,
) -> None:
    if case == "disappeared":
        result, ev = disappeared[0], evidence(pair.baseline, pair.follow_up, follow_seg=disappeared[1])
    elif case == "appeared":
        ev = ev_std
        ev = dataclasses.replace(ev, baseline_seg=pydicom.dcmread(appeared[1]))
        result = appeared[0]
    else:
        result, ev = (demo_result if case == "demo" else plain_result), ev_std
    path = write_dataset(build(result, ev), tmp_path / "sr.dcm")
    errors, warnings = dciodvfy(path)
    assert not errors, "\n".join(errors + warnings)
    # the only warnings: the private coding scheme, which dciodvfy cannot know
    assert all("99PACSAGENT" in w for w in warnings), "\n".join(warnings)


def test_document_renderers_name_every_item(demo_result: ResponseResult, ev_std: Evidence, tmp_path: Path) -> None:
    """dsr2html prints each item with its concept name (ContinuityOfContent SEPARATE), not bare numbers."""
    sr = build(demo_result, ev_std)
    assert {item.ContinuityOfContent for item in walk(sr) if item.get("ValueType") == "CONTAINER"} == {"SEPARATE"}
    text = dsr2html_text(write_dataset(sr, tmp_path / "sr.dcm"))
    for name in ("Tracking Identifier", "Volume:", "Long Axis:", "Response Evaluation", "DEMO MODEL"):
        assert name in text, name
    assert "Low risk Target Lesion Stable Disease" not in text  # the numbers-without-names rendering


def test_each_lesion_has_a_key_slice_group_viewers_draw_and_label(
    demo_result: ResponseResult, ev_std: Evidence
) -> None:
    """OHIF loads the response SR like the others: a freehand ROI per lesion, labelled with its change."""
    sr = roundtrip(build(demo_result, ev_std))
    everything = all_groups(sr)
    copies = [g for g in everything if is_viewer_copy(g)]
    assert len(copies) == lesion_count(demo_result)
    for viewer in copies:  # each right before the record of the same lesion
        assert tracking_uid(everything[everything.index(viewer) + 1]) == tracking_uid(viewer)
        first_num = next(i for i in viewer.ContentSequence if i.ValueType == "NUM")
        assert code(first_num) == ("42798000", "SCT")  # Area, with the outline under it
        assert any(i.ValueType == "SCOORD" and i.GraphicType == "POLYLINE" for i in first_num.ContentSequence)
    labels = [t for viewer in copies for t in texts(viewer) if t.startswith("[DEMO] ")]
    assert len(labels) == len(copies)
    pair = demo_result.pairs[0]
    change = 100 * (pair.follow_up.volume_ml - pair.baseline.volume_ml) / pair.baseline.volume_ml
    assert any(f"{pair.baseline.tracking_id}: volume {change:+.0f} %" in label for label in labels), labels


def test_rtstruct_pair_passes_dciodvfy(tmp_path: Path) -> None:
    baseline = generate_study(
        tmp_path / "b", seed=12, lesions=2, slices=40, rows=128, columns=128, segmentation="rtstruct"
    )
    follow = generate_follow_up(baseline, tmp_path / "f", shrink=0.5)
    assert baseline.rtstruct_file is not None and follow.rtstruct_file is not None
    result = run_response(baseline.ct_files, baseline.rtstruct_file, follow.ct_files, follow.rtstruct_file)
    assert result.pairs
    sr = roundtrip(build(result, evidence(baseline, follow)))
    # RTSTRUCT lesions are outlined as SCOORD3D; the baseline ROI is referenced as a COMPOSITE item
    for group in groups(sr):
        assert any(i.ValueType == "SCOORD3D" for i in walk(group))
        composite = [i for i in group.ContentSequence if i.ValueType == "COMPOSITE"]
        assert [str(c.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for c in composite] == [
            str(pydicom.dcmread(baseline.rtstruct_file).SOPInstanceUID)
        ]
    errors, warnings = dciodvfy(write_dataset(sr, tmp_path / "sr.dcm"))
    assert not errors, "\n".join(errors + warnings)


# --- content ---------------------------------------------------------------------------------


def test_sr_joins_the_follow_up_study_and_cites_both_studies(
    pair: Pair, demo_result: ResponseResult, ev_std: Evidence
) -> None:
    ev = ev_std
    sr = roundtrip(build(demo_result, ev))
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.StudyInstanceUID == pair.follow_up.study_instance_uid
    assert sr.PatientID == ev.follow_up_ct[0].PatientID
    assert sr.StudyDate == ev.follow_up_ct[0].StudyDate
    current = {s.StudyInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence}
    other = {s.StudyInstanceUID for s in sr.PertinentOtherEvidenceSequence}
    assert current == {pair.follow_up.study_instance_uid}
    assert other == {pair.baseline.study_instance_uid}

    def cited(seq: pydicom.Sequence) -> set[str]:
        return {
            str(i.ReferencedSOPInstanceUID)
            for s in seq
            for series in s.ReferencedSeriesSequence
            for i in series.ReferencedSOPSequence
        }

    assert str(ev.follow_up_seg.SOPInstanceUID) in cited(sr.CurrentRequestedProcedureEvidenceSequence)
    assert str(ev.baseline_seg.SOPInstanceUID) in cited(sr.PertinentOtherEvidenceSequence)
    assert len(cited(sr.PertinentOtherEvidenceSequence)) == len(ev.baseline_ct) + 1
    assert (sr.SeriesDescription, sr.SeriesNumber) == ("AI Response 8w M5 - DEMO, not for clinical use", 907)


def test_one_group_per_matched_lesion_with_both_time_points_and_deltas(
    pair: Pair, demo_result: ResponseResult, ev_std: Evidence
) -> None:
    sr = roundtrip(build(demo_result, ev_std))
    lesion_groups = groups(sr)
    assert len(demo_result.pairs) == 2 and len(lesion_groups) == 2
    for group, lesion_pair in zip(lesion_groups, demo_result.pairs, strict=True):
        assert tracking_uid(group) == lesion_pair.tracking_uid
        assert codes_in(group)[LESION_STATUS] == ("MATCHED", "99PACSAGENT")
        values = nums(group)
        volumes = {n.modifiers.get(TIME_POINT): n.value for n in values if n.concept == VOLUME and n.unit == "ml"}
        assert volumes[BASELINE_TP] == lesion_pair.baseline.volume_ml
        assert volumes[FOLLOW_UP_TP] == lesion_pair.follow_up.volume_ml
        change = next(n for n in values if n.concept == VOLUME and n.unit == "%")
        assert change.modifiers[DERIVATION] == FRACTIONAL
        assert change.value == pytest.approx(lesion_pair.volume_change_percent)
        assert lesion_pair.baseline.features is not None and lesion_pair.deltas is not None
        for name in FEATURE_NAMES:
            found = {
                n.modifiers.get(TIME_POINT) or n.modifiers.get(DERIVATION): n.value
                for n in values
                if n.concept == FEATURE_CODES[name]
            }
            assert found[BASELINE_TP] == lesion_pair.baseline.features.values()[name]
            delta = lesion_pair.deltas[name]
            key = FRACTIONAL if delta.is_relative else ("ABS-CHANGE", "99PACSAGENT")
            assert found[key] == delta.value
        # the same lesion at baseline: its SEG segment, referenced by an IMAGE item
        refs = [i for i in group.ContentSequence if code(i) == ("BASELINE-SEGMENT", "99PACSAGENT")]
        assert len(refs) == 1
        ref = refs[0].ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == lesion_pair.baseline.source.sop_instance_uid
        assert int(ref.ReferencedSegmentNumber) == lesion_pair.baseline.source.number


def test_patient_level_score_risk_group_and_comparators(
    pair: Pair, demo_result: ResponseResult, ev_std: Evidence
) -> None:
    assert demo_result.score is not None and demo_result.deltas is not None
    sr = roundtrip(build(demo_result, ev_std))
    group = patient_group(sr)
    values = nums(group)
    probability = next(n for n in values if n.concept == PROBABILITY)
    assert probability.value == demo_result.score.probability
    threshold = next(n for n in values if n.concept == ("DECISION-THRESH", "99PACSAGENT"))
    assert threshold.value == demo_result.score.threshold == 0.5
    # shrunk and homogenised: the DEMO signature says sensitive (low risk)
    assert demo_result.score.probability < 0.5
    coded = codes_in(group)
    assert coded[RISK_GROUP] == ("75976002", "SCT")  # Low risk
    assert demo_result.recist.category == "PR"
    assert coded[CURRENT_RESPONSE] == ("112042", "DCM")  # Target Lesion Partial Response
    sums = {
        n.modifiers.get(TIME_POINT) or (n.modifiers.get(DERIVATION), n.unit): n.value
        for n in values
        if n.concept == ("SUM-DIAMETERS", "99PACSAGENT")
    }
    assert sums[BASELINE_TP] == demo_result.recist.baseline_sum_mm
    assert sums[FOLLOW_UP_TP] == demo_result.recist.follow_up_sum_mm
    assert sums[(FRACTIONAL, "%")] == demo_result.recist.percent_change
    volumetric = next(
        n for n in values if n.concept == ("TOTAL-VOLUME", "99PACSAGENT") and n.modifiers.get(DERIVATION) == FRACTIONAL
    )
    assert volumetric.value == demo_result.volumetric_change_percent
    deltas = {
        n.concept: n.value for n in values if n.modifiers.get(DERIVATION) in (FRACTIONAL, ("ABS-CHANGE", "99PACSAGENT"))
    }
    for name in FEATURE_NAMES:
        assert deltas[FEATURE_CODES[name]] == demo_result.deltas[name].value
    interval = next(n for n in values if n.concept == ("INTERVAL", "99PACSAGENT"))
    assert interval.value == (pair.follow_up.study_date - pair.baseline.study_date).days

    # the model made the score; the pipeline measured everything else (TID 4019 Algorithm Name)
    def algorithm_of(concept: tuple[str, str]) -> set[str]:
        return {
            str(c.TextValue)
            for i in group.ContentSequence
            if i.ValueType == "NUM" and code(i) == concept
            for c in i.ContentSequence
            if code(c) == ("111001", "DCM")
        }

    assert algorithm_of(PROBABILITY) == {demo_result.algorithm.name} == {"response-demo"}
    assert algorithm_of(("TOTAL-VOLUME", "99PACSAGENT")) == {"pacs-agent response"}
    assert algorithm_of(FEATURE_CODES["ngtdm_contrast"]) == {"pacs-agent response"}
    # algorithm identity and the DEMO warning at report level
    report_texts = texts(sr)
    assert DEMO_WARNING in report_texts
    assert "DEMO" in report_texts
    assert demo_result.algorithm.weights_sha256 in report_texts
    assert pair.baseline.study_instance_uid in report_texts


def test_without_a_model_the_sr_keeps_deltas_and_says_why_there_is_no_score(
    pair: Pair, plain_result: ResponseResult, ev_std: Evidence
) -> None:
    sr = roundtrip(build(plain_result, ev_std))
    group = patient_group(sr)
    assert NO_MODEL_NOTE in texts(group)
    assert not [n for n in nums(group) if n.concept == PROBABILITY]
    assert RISK_GROUP not in codes_in(group)
    assert codes_in(group)[CURRENT_RESPONSE] == ("112042", "DCM")
    assert len([n for n in nums(group) if n.modifiers.get(DERIVATION) == FRACTIONAL]) >= 4
    assert not sr.SeriesDescription.startswith("DEMO")
    text = render_sr_text(sr)
    assert "Result note: no response model installed - score not computed" in text
    assert "Current Response: Target Lesion Partial Response" in text


def test_lesion_at_baseline_only_is_reported_as_disappeared(
    pair: Pair, disappeared: tuple[ResponseResult, Path]
) -> None:
    result, seg = disappeared
    assert len(result.pairs) == 1 and len(result.disappeared_lesions) == 1
    ev = evidence(pair.baseline, pair.follow_up, follow_seg=seg)
    sr = roundtrip(build(result, ev))
    lesion_groups = groups(sr)
    assert len(lesion_groups) == lesion_count(result) == 2
    gone = lesion_groups[-1]
    assert codes_in(gone)[LESION_STATUS] == ("DISAPPEARED", "99PACSAGENT")
    assert tracking_uid(gone) == result.disappeared_lesions[0].tracking_uid
    # measured at baseline only, referencing the baseline SEG
    assert {n.modifiers.get(TIME_POINT) for n in nums(gone)} == {BASELINE_TP}
    segment = next(i for i in gone.ContentSequence if code(i) == ("121191", "DCM"))
    assert segment.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ev.baseline_seg.SOPInstanceUID
    assert any("disappeared" in t for t in texts(patient_group(sr)))


def test_lesion_at_follow_up_only_is_new_and_progression(
    pair: Pair, appeared: tuple[ResponseResult, Path], ev_std: Evidence
) -> None:
    result, seg = appeared
    assert len(result.new_lesions) == 1
    ev = dataclasses.replace(ev_std, baseline_seg=pydicom.dcmread(seg))
    sr = roundtrip(build(result, ev))
    new = groups(sr)[-1]
    assert codes_in(new)[LESION_STATUS] == ("NEW", "99PACSAGENT")
    assert {n.modifiers.get(TIME_POINT) for n in nums(new)} == {FOLLOW_UP_TP}
    assert codes_in(patient_group(sr))[CURRENT_RESPONSE] == ("112043", "DCM")  # Target Lesion Progressive Disease
    assert "new lesion" in " ".join(texts(patient_group(sr)))


def test_not_evaluable_uses_the_private_code() -> None:
    assert RECIST_CATEGORY_CODES["NE"].scheme_designator == "99PACSAGENT"
    assert {k: c.value for k, c in RECIST_CATEGORY_CODES.items() if k != "NE"} == {
        "CR": "112041",
        "PR": "112042",
        "PD": "112043",
        "SD": "112044",
    }


def test_text_rendering_shows_category_and_score(pair: Pair, demo_result: ResponseResult, ev_std: Evidence) -> None:
    assert demo_result.score is not None
    text = render_sr_text(roundtrip(build(demo_result, ev_std)))
    assert "Current Response: Target Lesion Partial Response" in text
    assert f"Probability of treatment insensitivity: {demo_result.score.probability:.6g}" in text
    assert "Treatment insensitivity risk group: Low risk" in text
    assert "Time Point Type: Baseline" in text and "Time Point Type: Posttreatment" in text
    assert pair.follow_up.patient_id not in text


# --- identity ----------------------------------------------------------------------------------


def test_uids_are_deterministic_and_depend_on_the_model(
    pair: Pair, demo_result: ResponseResult, plain_result: ResponseResult, ev_std: Evidence
) -> None:
    ev = ev_std
    first, again = build(demo_result, ev), build(demo_result, ev)
    assert first.SOPInstanceUID == again.SOPInstanceUID and first.SeriesInstanceUID == again.SeriesInstanceUID
    plain = build(plain_result, ev)
    assert plain.SOPInstanceUID != first.SOPInstanceUID
    other_model = dataclasses.replace(
        demo_result, algorithm=dataclasses.replace(demo_result.algorithm, version="9.9.9")
    )
    assert build(other_model, ev).SOPInstanceUID != first.SOPInstanceUID
    assert response_series_description(plain_result) == "AI Response 8w M5"


# --- validation ----------------------------------------------------------------------------------


def test_wrong_types_are_refused(pair: Pair, demo_result: ResponseResult, ev_std: Evidence) -> None:
    ev = ev_std
    with pytest.raises(TypeError, match='"result"'):
        build_response_report("result", ev.follow_up_ct, ev.follow_up_seg, ev.baseline_ct, ev.baseline_seg)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match='"follow_up_ct"'):
        build_response_report(demo_result, ev.follow_up_ct[0], ev.follow_up_seg, ev.baseline_ct, ev.baseline_seg)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match='"baseline_segmentation"'):
        build_response_report(demo_result, ev.follow_up_ct, ev.follow_up_seg, ev.baseline_ct, None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match='"series_number"'):
        build_response_report(
            demo_result,
            ev.follow_up_ct,
            ev.follow_up_seg,
            ev.baseline_ct,
            ev.baseline_seg,
            series_number="1",  # type: ignore[arg-type]
        )
    with pytest.raises(TypeError, match='"lesion"'):
        lesion_result("lesion")  # type: ignore[arg-type]


def test_time_points_swapped_are_refused(pair: Pair, demo_result: ResponseResult, ev_std: Evidence) -> None:
    ev = ev_std
    with pytest.raises(ValueError, match="follow_up dataset is not from the follow_up study"):
        build_response_report(demo_result, ev.baseline_ct, ev.baseline_seg, ev.follow_up_ct, ev.follow_up_seg)


def test_studies_of_two_patients_are_refused(pair: Pair, demo_result: ResponseResult, ev_std: Evidence) -> None:
    ev = ev_std
    other = [copy.deepcopy(ds) for ds in ev.baseline_ct]
    for ds in other:
        ds.PatientID = "SOMEONE-ELSE"
    with pytest.raises(ValueError, match="different Patient IDs") as raised:
        build_response_report(demo_result, ev.follow_up_ct, ev.follow_up_seg, other, ev.baseline_seg)
    assert "SOMEONE-ELSE" not in str(raised.value)  # no patient identifiers in messages


def test_follow_up_header_without_patient_attributes_is_refused(
    pair: Pair, demo_result: ResponseResult, ev_std: Evidence
) -> None:
    ev = ev_std
    first = copy.deepcopy(ev.follow_up_ct[0])
    del first.PatientName
    with pytest.raises(ValueError, match="PatientName"):
        build_response_report(
            demo_result, [first, *ev.follow_up_ct[1:]], ev.follow_up_seg, ev.baseline_ct, ev.baseline_seg
        )


def test_result_without_lesions_is_refused(pair: Pair, demo_result: ResponseResult, ev_std: Evidence) -> None:
    ev = ev_std
    empty = dataclasses.replace(demo_result, pairs=(), new_lesions=(), disappeared_lesions=())
    with pytest.raises(ValueError, match="at least one lesion"):
        build_response_report(empty, ev.follow_up_ct, ev.follow_up_seg, ev.baseline_ct, ev.baseline_seg)


def test_lesion_result_keeps_identity_and_size(demo_result: ResponseResult) -> None:
    measurement = demo_result.pairs[0].follow_up
    converted = lesion_result(measurement)
    assert converted.tracking_uid == measurement.tracking_uid == demo_result.pairs[0].tracking_uid
    assert (converted.volume_ml, converted.key_slice_index) == (measurement.volume_ml, measurement.key_slice_index)
    assert converted.features == ()
