"""SR template classes (dicom_sr.sr.templates): content, codes and argument validation. No test data needed."""

from __future__ import annotations

import dataclasses

import highdicom as hd
import numpy as np
import pytest
from pydicom import Dataset
from pydicom.sr.codedict import codes as sr_codes

from dicom_sr import codes
from dicom_sr.sr.templates import (
    LESION_CONCEPTS,
    STATUS_CODES,
    KeySliceOutlineGroup,
    LesionMeasurementGroup,
    Prediction,
    PredictionEvaluation,
    PredictionMeasurements,
    ReportEvaluations,
    ResultAlgorithm,
    UsageWarning,
    check_prediction,
    prediction_concepts,
    viewer_label,
)
from dicom_sr.uids import derive_uid
from inference.results import DEMO_WARNING, AlgorithmInfo, FeatureValue, LesionResult, SegmentationSource

SHA = "ab" * 32
ALGORITHM = AlgorithmInfo("kras-resnet2d", "1.0.0", "DEMO", SHA, "demo only")
SEG = SegmentationSource("seg", "1.2.3.1", "1.2.840.10008.5.1.4.1.1.66.4", "1.2.3", 1, "Liver")
RT = SegmentationSource("rtstruct", "1.2.4.1", "1.2.840.10008.5.1.4.1.1.481.3", "1.2.4", 3, "GTV")
KRAS = Prediction("KRAS", "mutant", 0.83, 0.5)


def square(z: float) -> tuple[tuple[float, float, float], ...]:
    return ((0.0, 0.0, z), (10.0, 0.0, z), (10.0, 10.0, z), (0.0, 10.0, z), (0.0, 0.0, z))


def lesion(source: SegmentationSource = SEG, outline: int = 0) -> LesionResult:
    return LesionResult(
        tracking_id=f"{source.label} lesion 1",
        tracking_uid=derive_uid("test", source.label),
        source=source,
        volume_ml=3.25,
        longest_axial_diameter_mm=20.5,
        centroid_mm=(1.5, -2.25, 30.125),
        key_slice_index=7,
        key_slice_sop_instance_uid="1.2.3.4.7",
        features=(FeatureValue("original_firstorder_Mean", 42.5, "[hnsf'U]"),),
        outline_mm=tuple(square(float(z)) for z in range(outline)),
    )


def children(item: hd.sr.ContentItem) -> dict[tuple[str, str], list[str]]:
    found: dict[tuple[str, str], list[str]] = {}
    for child in item.ContentSequence:
        name = child.ConceptNameCodeSequence[0]
        value = str(child.get("TextValue", child.get("ValueType")))
        found.setdefault((str(name.CodeValue), str(name.CodingSchemeDesignator)), []).append(value)
    return found


# --- predictions ----------------------------------------------------------------------------------


def test_prediction_concepts() -> None:
    status, probability, threshold = prediction_concepts("KRAS")
    assert (status.value, status.meaning, status.scheme_designator) == (
        "KRAS-STATUS",
        "KRAS status (predicted)",
        "99PACSAGENT",
    )
    assert (probability.value, threshold.value) == ("KRAS-PROB", "KRAS-THRESH")
    assert all(len(c.value) <= 16 for c in prediction_concepts("ABCDEFGHI"))  # SH limit


@pytest.mark.parametrize("label", ["kras", "", "KRAS GENE", "ABCDEFGHIJ", "K-RAS"])
def test_prediction_label_must_be_a_short_upper_case_token(label: str) -> None:
    with pytest.raises(ValueError, match="1-9 characters"):
        prediction_concepts(label)


def test_prediction_label_type() -> None:
    with pytest.raises(TypeError, match=r'Argument "label" must have type str\.'):
        prediction_concepts(42)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("status", "code", "scheme"),
    [
        ("mutant", "MUTANT", "99PACSAGENT"),
        ("wild type", "WILD-TYPE", "99PACSAGENT"),
        ("high risk", "15508007", "SCT"),
        ("low risk", "75976002", "SCT"),
        ("positive", "10828004", "SCT"),
        ("negative", "260385009", "SCT"),
    ],
)
def test_status_codes(status: str, code: str, scheme: str) -> None:
    assert (STATUS_CODES[status].value, STATUS_CODES[status].scheme_designator) == (code, scheme)


def test_standard_status_codes_match_pydicom() -> None:
    """The SCT codes are the ones DICOM PS3.16 lists (pydicom's dictionary is generated from it)."""
    for status, code in (
        ("high risk", sr_codes.SCT.HighRisk),
        ("low risk", sr_codes.SCT.LowRisk),
        ("positive", sr_codes.SCT.Positive),
        ("negative", sr_codes.SCT.Negative),
    ):
        assert STATUS_CODES[status].value == code.value
        assert STATUS_CODES[status].meaning.lower() == code.meaning.lower()


@pytest.mark.parametrize(
    ("prediction", "error", "match"),
    [
        ("KRAS mutant", TypeError, 'Argument "prediction" must have type Prediction.'),
        (Prediction("KRAS", "mutated", 0.8, 0.5), ValueError, "Unknown prediction status"),
        (Prediction("KRAS", "mutant", 1.5, 0.5), ValueError, "probability"),
        (Prediction("KRAS", "mutant", float("nan"), 0.5), ValueError, "probability"),
        (Prediction("KRAS", "wild type", 0.2, -0.1), ValueError, "threshold"),
        (Prediction("KRAS", "mutant", True, 0.5), TypeError, "probability"),  # type: ignore[arg-type]
        (Prediction("KRAS", "mutant", "0.8", 0.5), TypeError, "probability"),  # type: ignore[arg-type]
        (Prediction("KRAS", "wild type", 0.8, 0.5), ValueError, "contradicts"),
        (Prediction("KRAS", "mutant", 0.3, 0.5), ValueError, "contradicts"),
        (Prediction("Kras", "mutant", 0.8, 0.5), ValueError, "1-9 characters"),
    ],
)
def test_invalid_predictions(prediction: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        check_prediction(prediction)  # type: ignore[arg-type]
    with pytest.raises(error, match=match):
        PredictionEvaluation(prediction)  # type: ignore[arg-type]


def test_threshold_itself_is_positive() -> None:
    assert check_prediction(Prediction("RAS", "high risk", 0.5, 0.5)).status == "high risk"


def test_prediction_evaluation_is_a_code_item() -> None:
    evaluation = PredictionEvaluation(Prediction("EGFR", "wild type", 0.1, 0.4))
    assert evaluation.name.value == "EGFR-STATUS"
    assert evaluation.value.value == "WILD-TYPE"
    assert evaluation[0].ValueType == "CODE"


def test_prediction_measurements() -> None:
    probability, threshold = PredictionMeasurements(KRAS, ALGORITHM)
    assert (probability.name.value, probability.value, probability.unit.value) == ("KRAS-PROB", 0.83, "1")
    assert (threshold.name.value, threshold.value, threshold.unit.value) == ("KRAS-THRESH", 0.5, "1")
    texts = [str(i.TextValue) for i in hd.sr.utils.find_content_items(probability[0], name=sr_codes.DCM.AlgorithmName)]
    assert texts == ["kras-resnet2d"]
    with pytest.raises(TypeError, match=r'Argument "algorithm" must have type AlgorithmInfo\.'):
        PredictionMeasurements(KRAS, "kras-resnet2d")  # type: ignore[arg-type]


# --- algorithm, warning, report evaluations -------------------------------------------------------


def test_result_algorithm_puts_the_weights_first() -> None:
    algorithm = ResultAlgorithm(ALGORITHM, ["window=40/400"])
    params = [str(i.TextValue) for i in algorithm if i.ConceptNameCodeSequence[0].CodeValue == "111002"]
    assert params == [f"weights-sha256={SHA}", "window=40/400"]
    plain = ResultAlgorithm(dataclasses.replace(ALGORITHM, weights_sha256=None))
    assert all(i.ConceptNameCodeSequence[0].CodeValue != "111002" for i in plain)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"algorithm": "kras"}, TypeError, 'Argument "algorithm" must have type AlgorithmInfo.'),
        ({"parameters": "a=b"}, TypeError, '"parameters"'),
        ({"parameters": [1]}, TypeError, '"parameters"'),
        ({"algorithm": dataclasses.replace(ALGORITHM, version="")}, ValueError, "non-empty"),
    ],
)
def test_result_algorithm_validation(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    arguments = {"algorithm": ALGORITHM, **kwargs}
    with pytest.raises(error, match=match):
        ResultAlgorithm(**arguments)  # type: ignore[arg-type]


def test_usage_warning() -> None:
    warning = UsageWarning()
    assert warning.value == DEMO_WARNING
    assert warning.name == codes.USAGE_WARNING
    with pytest.raises(ValueError, match="empty"):
        UsageWarning("  ")
    with pytest.raises(TypeError, match=r'Argument "text" must have type str\.'):
        UsageWarning(None)  # type: ignore[arg-type]


def test_report_evaluations_content_and_order() -> None:
    container = ReportEvaluations(
        ALGORITHM, {"b": "2", "a": "1"}, method="M1", frame_of_reference_uid="1.2.9", segmentation=RT
    )
    names = [str(item.ConceptNameCodeSequence[0].CodeValue) for item in container.ContentSequence]
    assert names == [
        "USAGE-WARNING",
        "VALIDATION-STAT",
        "INTENDED-USE",
        "WEIGHTS-SHA256",
        "PROVENANCE",
        "PROVENANCE",
        "METHOD",
        "112227",
        "SOURCE-UID",
        "SOURCE-NUMBER",
        "SOURCE-LABEL",
    ]
    values = [str(item.TextValue) for item in container.ContentSequence]
    assert values[0] == DEMO_WARNING and values[4:6] == ["a=1", "b=2"] and values[-3:] == ["1.2.4.1", "3", "GTV"]
    research = ReportEvaluations(dataclasses.replace(ALGORITHM, validation_status="RESEARCH"))
    assert [str(i.TextValue) for i in research.ContentSequence][:1] == ["RESEARCH"]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"algorithm": None}, TypeError, '"algorithm"'),
        ({"provenance": [("a", "b")]}, TypeError, '"provenance"'),
        ({"provenance": {"a": 1}}, TypeError, '"provenance"'),
        ({"provenance": {"a=b": "c"}}, ValueError, "Provenance key"),
        ({"method": 1}, TypeError, '"method"'),
        ({"method": ""}, ValueError, '"method"'),
        ({"frame_of_reference_uid": 1.2}, TypeError, '"frame_of_reference_uid"'),
        ({"segmentation": "seg.dcm"}, TypeError, '"segmentation"'),
    ],
)
def test_report_evaluations_validation(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    arguments = {"algorithm": ALGORITHM, **kwargs}
    with pytest.raises(error, match=match):
        ReportEvaluations(**arguments)  # type: ignore[arg-type]


# --- lesion measurement group ---------------------------------------------------------------------


def build_group(**kwargs: object) -> LesionMeasurementGroup:
    arguments: dict[str, object] = {
        "algorithm": ALGORITHM,
        "ct_series_instance_uid": "1.2.5",
        "frame_of_reference_uid": "1.2.6",
        **kwargs,
    }
    target = arguments.pop("lesion", lesion())
    return LesionMeasurementGroup(target, **arguments)  # type: ignore[arg-type]


def test_seg_lesion_group() -> None:
    group = build_group(predictions=[KRAS, Prediction("EGFR", "wild type", 0.2, 0.5)]).group
    assert isinstance(group, hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations)
    assert group.referenced_segment is not None
    names = [m.name.value for m in group.get_measurements()]
    assert names == ["KRAS-PROB", "KRAS-THRESH", "EGFR-PROB", "EGFR-THRESH", "Q4LE", "118565006", "103339001"]
    evaluations = group.get_qualitative_evaluations()
    assert [(e.name.value, e.value.value) for e in evaluations] == [
        ("KRAS-STATUS", "MUTANT"),
        ("EGFR-STATUS", "WILD-TYPE"),
    ]
    texts = children(group[0])
    expected = {
        "source_uid": "1.2.3.1",
        "source_number": "1",
        "source_label": "Liver",
        "centroid_mm": "1.5\\-2.25\\30.125",
        "key_slice_index": "7",
        "key_slice_uid": "1.2.3.4.7",
    }
    for key, value in expected.items():
        concept = LESION_CONCEPTS[key]
        assert texts[(concept.value, concept.scheme_designator)] == [value]


def test_rtstruct_lesion_groups() -> None:
    volumetric = build_group(lesion=lesion(RT, outline=2)).group
    assert isinstance(volumetric.roi, hd.sr.VolumeSurface)
    planar = build_group(lesion=lesion(RT, outline=1)).group
    assert isinstance(planar, hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations)
    assert planar.roi.frame_of_reference_uid == "1.2.6"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lesion": "lesion 1"}, TypeError, 'Argument "lesion" must have type LesionResult.'),
        ({"algorithm": "x"}, TypeError, 'Argument "algorithm" must have type AlgorithmInfo.'),
        ({"ct_series_instance_uid": None}, TypeError, '"ct_series_instance_uid"'),
        ({"frame_of_reference_uid": 1}, TypeError, '"frame_of_reference_uid"'),
        ({"predictions": KRAS}, TypeError, '"predictions"'),
        ({"predictions": ["KRAS"]}, TypeError, "Prediction"),
        ({"predictions": [KRAS, KRAS]}, ValueError, "more than one prediction per label"),
        ({"finding_site": "liver"}, TypeError, '"finding_site"'),
        ({"source_images": ["ct"]}, TypeError, '"source_images"'),
        ({"lesion": lesion(RT)}, ValueError, "outline_mm"),
        ({"lesion": dataclasses.replace(lesion(), volume_ml=float("nan"))}, ValueError, "volume_ml"),
        (
            {"lesion": dataclasses.replace(lesion(), source=dataclasses.replace(SEG, kind="nifti"))},
            ValueError,
            "unknown segmentation kind",
        ),
    ],
)
def test_lesion_group_validation(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        build_group(**kwargs)


# --- the viewer copy (TID 1410 key-slice outline) ---------------------------------------------------

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
OUTLINE = ((10.5, 20.0), (14.0, 20.5), (14.0, 24.5), (10.0, 24.0))


def key_slice(uid: str = "1.2.3.4.7", rows: int = 64, columns: int = 48) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CT_IMAGE
    ds.SOPInstanceUID = uid
    ds.Rows, ds.Columns = rows, columns
    ds.PixelSpacing = [0.5, 0.8]  # rows 0.5 mm apart, columns 0.8 mm
    return ds


def outlined(points: object = OUTLINE, source: SegmentationSource = SEG) -> LesionResult:
    return dataclasses.replace(lesion(source), key_outline_px=points)  # type: ignore[arg-type]


def test_key_slice_outline_group() -> None:
    group = KeySliceOutlineGroup(
        outlined(), algorithm=ALGORITHM, key_slice=key_slice(), finding_site=sr_codes.SCT.Liver
    )
    assert isinstance(group, hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations)
    assert (group.tracking_identifier, group.tracking_uid) == (
        "Cornerstone3DTools@^0.1.0:PlanarFreehandROI:Liver lesion 1",  # OHIF loads it as a freehand ROI
        derive_uid("test", "Liver"),
    )
    assert group.finding_type == sr_codes.SCT.Neoplasm
    assert [site.value for site in group.finding_sites] == [sr_codes.SCT.Liver]
    region = group.roi
    assert isinstance(region, hd.sr.ImageRegion)
    assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE  # what OHIF 3 draws (no POLYGON in SCOORD)
    np.testing.assert_array_equal(region.value, [*OUTLINE, OUTLINE[0]])  # closed: first point repeated
    source = region.ContentSequence[0]
    assert (source.ValueType, source.RelationshipType) == ("IMAGE", "SELECTED FROM")
    assert source.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == "1.2.3.4.7"
    assert source.ReferencedSOPSequence[0].ReferencedSOPClassUID == CT_IMAGE
    measurements = group.get_measurements()
    shoelace_px = 15.125  # the outline's area in pixels
    assert [(m.name.value, m.value, m.unit.value) for m in measurements] == [
        ("42798000", pytest.approx(shoelace_px * 0.5 * 0.8), "mm2"),  # first: OHIF's adapter reads it
        ("118565006", 3.25, "ml"),
        ("103339001", 20.5, "mm"),
    ]
    for measurement in measurements:  # TID 4019 on all
        names = hd.sr.utils.find_content_items(measurement[0], name=sr_codes.DCM.AlgorithmName)
        assert [str(item.TextValue) for item in names] == ["kras-resnet2d"]
    # the area NUM carries the outline (INFERRED FROM SCOORD, SELECTED FROM the key slice, nothing else)
    (scoord,) = [i for i in measurements[0][0].ContentSequence if i.ValueType == "SCOORD"]
    assert (scoord.RelationshipType, scoord.GraphicType) == ("INFERRED FROM", "POLYLINE")
    np.testing.assert_array_equal(np.asarray(scoord.GraphicData).reshape(-1, 2), [*OUTLINE, OUTLINE[0]])
    assert [(c.ValueType, c.RelationshipType) for c in scoord.ContentSequence] == [("IMAGE", "SELECTED FROM")]
    # nothing that would make it a second lesion: no features, qualitative evaluations or per-lesion TEXT items
    texts = [item for item in group[0].ContentSequence if item.ValueType == "TEXT"]
    assert [item.ConceptNameCodeSequence[0].CodeValue for item in texts] == ["112039"]  # Tracking Identifier
    assert group.get_qualitative_evaluations() == []


def test_key_slice_outline_group_labels_the_lesion_with_its_result() -> None:
    prediction = Prediction("KRAS", "mutant", 0.8721, 0.5)
    demo = dataclasses.replace(ALGORITHM, validation_status="DEMO")
    label = viewer_label(outlined(), [prediction], demo)
    assert label == "[DEMO] Liver lesion 1: KRAS mutant (87 %)"
    group = KeySliceOutlineGroup(
        outlined(), algorithm=demo, key_slice=key_slice(), predictions=[prediction], comment=label
    )
    names = [(m.name.meaning, m.value, m.unit.value) for m in group.get_measurements()]
    assert names[1] == ("KRAS probability", pytest.approx(87.21), "%")  # next to the outline, in percent
    texts = [item for item in group[0].ContentSequence if item.ValueType == "TEXT"]
    assert [str(item.TextValue) for item in texts][-1] == label  # the Comment: OHIF's label in its panel
    research = dataclasses.replace(ALGORITHM, validation_status="RESEARCH")
    assert viewer_label(outlined(), [], research) == "Liver lesion 1: 3.2 ml, long axis 20.5 mm"


def test_key_slice_outline_group_keeps_a_closed_outline() -> None:
    closed = (*OUTLINE, OUTLINE[0])
    group = KeySliceOutlineGroup(outlined(closed), algorithm=ALGORITHM, key_slice=key_slice())
    assert len(group.roi.value) == len(closed)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lesion": "lesion 1"}, TypeError, 'Argument "lesion" must have type LesionResult.'),
        ({"algorithm": None}, TypeError, 'Argument "algorithm" must have type AlgorithmInfo.'),
        ({"key_slice": "1.2.3.4.7"}, TypeError, 'Argument "key_slice" must have type pydicom.Dataset.'),
        ({"finding_site": "liver"}, TypeError, '"finding_site"'),
        ({"lesion": outlined(())}, ValueError, 'no "key_outline_px"'),
        ({"key_slice": key_slice("1.2.3.4.8")}, ValueError, "not the key slice"),
        ({"lesion": outlined(((1.0, 1.0), (2.0, 2.0), (1.0, 1.0)))}, ValueError, "at least 3 distinct"),
        ({"lesion": outlined(((1.0, 1.0, 0.0), (2.0, 2.0, 0.0), (3.0, 1.0, 0.0)))}, ValueError, "at least 3"),
        ({"lesion": outlined(((1.0, 1.0), (2.0, "x"), (3.0, 1.0)))}, ValueError, "sequence of"),
        ({"lesion": outlined(((1.0, 1.0), (2.0, float("nan")), (3.0, 1.0)))}, ValueError, "finite"),
        ({"lesion": outlined(((1.0, 1.0), (48.5, 2.0), (3.0, 1.0)))}, ValueError, "leaves the key slice"),
        ({"lesion": outlined(((1.0, -0.5), (2.0, 2.0), (3.0, 1.0)))}, ValueError, "leaves the key slice"),
        ({"lesion": dataclasses.replace(outlined(), volume_ml=float("inf"))}, ValueError, "volume_ml"),
        ({"comment": ""}, ValueError, "1 to 1024 characters"),
        ({"comment": 5}, TypeError, '"comment"'),
        ({"predictions": Prediction("KRAS", "mutant", 0.9, 0.5)}, TypeError, '"predictions"'),
    ],
)
def test_key_slice_outline_group_validation(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    arguments: dict[str, object] = {"lesion": outlined(), "algorithm": ALGORITHM, "key_slice": key_slice(), **kwargs}
    target = arguments.pop("lesion")
    with pytest.raises(error, match=match):
        KeySliceOutlineGroup(target, **arguments)  # type: ignore[arg-type]
    without_class = key_slice()
    del without_class.SOPClassUID
    with pytest.raises(ValueError, match="SOP Class UID"):
        KeySliceOutlineGroup(outlined(), algorithm=ALGORITHM, key_slice=without_class)
