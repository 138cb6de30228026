"""TID 1500 SR writer, codes and text rendering (dicom_sr.sr.lesions, dicom_sr.codes, dicom_sr.sr.text).

Evidence is the real 3-slice liver CT + SEG from dcmqi (../shared/data); the tests skip when that
folder is absent. DCMTK (dsrdump, dsr2html) and dicom3tools (dciodvfy) checks skip when the tool is
not installed.
"""

from __future__ import annotations

import dataclasses
import io
import re
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.sr.codedict import codes as sr_codes

from dicom_sr import codes
from dicom_sr.series import DEMO_SUFFIX
from dicom_sr.sr.lesions import build_measurement_report, write_dataset
from dicom_sr.sr.text import render_sr_text
from dicom_sr.uids import derive_uid
from inference.results import (
    DEMO_WARNING,
    AlgorithmInfo,
    FeatureValue,
    LesionResult,
    SegmentationSource,
    StudyResult,
)
from tests.unit.response_helpers import dsr2html_text

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "dicom_ct_seg" / "dcmqi_ct3slice_liver"
RTSTRUCT_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
SHA = "0123456789abcdef" * 4
FEATURES = (
    FeatureValue("original_shape_VoxelVolume", 12345.5, "mm3"),
    FeatureValue("original_shape_MeshVolume", 12001.25, "mm3"),
    FeatureValue("original_shape_SurfaceArea", 2750.5, "mm2"),
    FeatureValue("original_shape_Sphericity", 0.8125, "1"),
    FeatureValue("original_shape_Maximum3DDiameter", 41.5, "mm"),
    FeatureValue("original_shape_Maximum2DDiameterSlice", 38.25, "mm"),
    FeatureValue("original_firstorder_Mean", 87.375, "[hnsf'U]"),
    FeatureValue("original_firstorder_Entropy", 3.21875, "1"),
    FeatureValue("original_firstorder_Kurtosis", 4.0625, "1"),
    FeatureValue("original_glcm_Contrast", 9.5, "1"),
    FeatureValue("original_ngtdm_Contrast", 0.03125, "1"),
)


SEG_OUTLINE = ((250.5, 300.0), (262.0, 300.5), (262.0, 312.5), (250.0, 312.0), (250.5, 300.0))
"""Key-slice outline (SCOORD column, row) of "Liver lesion 1"; half-pixel values, exact in FL."""
RT_OUTLINE = ((100.0, 120.0), (120.0, 120.0), (120.0, 140.0), (100.0, 140.0))
"""Key-slice outline of "GTV lesion 1", open: the SR closes it."""


def _square(z: float, x0: float = -40.0, size: float = 20.0) -> tuple[tuple[float, float, float], ...]:
    return ((x0, 10.0, z), (x0 + size, 10.0, z), (x0 + size, 10.0 + size, z), (x0, 10.0 + size, z))


@pytest.fixture(scope="module")
def ct() -> list[Dataset]:
    if not DATA.is_dir():
        pytest.skip(f"test data not found: {DATA} (../shared/data is not part of the repository)")
    return [pydicom.dcmread(DATA / name) for name in ("01.dcm", "02.dcm", "03.dcm")]


@pytest.fixture(scope="module")
def seg(ct: list[Dataset]) -> Dataset:
    return pydicom.dcmread(DATA / "liver.dcm")


def make_result(
    ct: list[Dataset], seg: Dataset, status: str = "DEMO", *, single_slice_lesion: bool = False
) -> StudyResult:
    seg_source = SegmentationSource(
        kind="seg",
        sop_instance_uid=str(seg.SOPInstanceUID),
        sop_class_uid=str(seg.SOPClassUID),
        series_instance_uid=str(seg.SeriesInstanceUID),
        number=1,
        label="Liver",
    )
    rt_source = SegmentationSource(
        kind="rtstruct",
        sop_instance_uid=derive_uid("test rtstruct instance"),
        sop_class_uid=RTSTRUCT_CLASS,
        series_instance_uid=derive_uid("test rtstruct series"),
        number=2,
        label="GTV",
    )
    z = [float(ds.ImagePositionPatient[2]) for ds in ct]
    lesions = [
        LesionResult(
            tracking_id="Liver lesion 1",
            tracking_uid=derive_uid("test", "Liver lesion 1"),
            source=seg_source,
            volume_ml=123.5,
            longest_axial_diameter_mm=61.25,
            centroid_mm=(10.0, 20.0, z[1]),
            key_slice_index=1,
            key_slice_sop_instance_uid=str(ct[1].SOPInstanceUID),
            features=FEATURES,
            key_outline_px=SEG_OUTLINE,
        ),
        LesionResult(
            tracking_id="GTV lesion 1",
            tracking_uid=derive_uid("test", "GTV lesion 1"),
            source=rt_source,
            volume_ml=0.75,
            longest_axial_diameter_mm=19.5,
            centroid_mm=(-30.0, 20.0, z[1]),
            key_slice_index=0,
            key_slice_sop_instance_uid=str(ct[0].SOPInstanceUID),
            features=FEATURES[:3],
            outline_mm=(_square(z[0]), (*_square(z[1]), _square(z[1])[0])),  # 2nd one closed already
            key_outline_px=RT_OUTLINE,
        ),
    ]
    if single_slice_lesion:
        lesions.append(
            dataclasses.replace(
                lesions[1],
                tracking_id="GTV lesion 2",
                tracking_uid=derive_uid("test", "GTV lesion 2"),
                outline_mm=(_square(z[2], x0=60.0, size=5.0),),
                key_outline_px=(),  # no key-slice outline: no viewer copy
            )
        )
    return StudyResult(
        method="M5",
        study_instance_uid=str(ct[0].StudyInstanceUID),
        ct_series_instance_uid=str(ct[0].SeriesInstanceUID),
        frame_of_reference_uid=str(ct[0].FrameOfReferenceUID),
        segmentation=seg_source,
        algorithm=AlgorithmInfo(
            name="pacs-agent radiomics",
            version="1.2.0",
            validation_status=status,  # type: ignore[arg-type]
            weights_sha256=SHA,
            intended_use="research only",
        ),
        lesions=tuple(lesions),
        provenance={"pyradiomics": "3.0.1", "params_sha256": "abc123"},
    )


def build(ct: list[Dataset], seg: Dataset, status: str = "DEMO", **kwargs: object) -> hd.sr.Comprehensive3DSR:
    single = bool(kwargs.pop("single_slice_lesion", False))
    result = make_result(ct, seg, status, single_slice_lesion=single)
    return build_measurement_report(result, [*ct, seg], segmentation_dataset=seg, **kwargs)  # type: ignore[arg-type]


def roundtrip(sr: Dataset) -> hd.sr.Comprehensive3DSR:
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return hd.sr.srread(buffer)


def text_values(sr: Dataset) -> list[str]:
    items = hd.sr.utils.find_content_items(sr, value_type=hd.sr.ValueTypeValues.TEXT, recursive=True)
    return [str(item.TextValue) for item in items]


def algorithm_of(measurement: hd.sr.Measurement, name: pydicom.sr.coding.Code) -> list[str]:
    """TID 4019 Algorithm Identification values attached to a TID 300 measurement."""
    return [str(item.TextValue) for item in hd.sr.utils.find_content_items(measurement[0], name=name)]


@pytest.fixture(scope="module")
def sr_file(ct: list[Dataset], seg: Dataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    sr = build(ct, seg, "DEMO", single_slice_lesion=True, finding_site=sr_codes.SCT.Liver)
    return write_dataset(sr, tmp_path_factory.mktemp("sr") / "nested" / "sr.dcm")


# --- external validators ---------------------------------------------------------------------------


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def test_sr_passes_dciodvfy(sr_file: Path) -> None:
    run = subprocess.run([_tool("dciodvfy"), str(sr_file)], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    warnings = [line for line in lines if line.startswith("Warning")]
    assert not errors, "dciodvfy errors:\n" + "\n".join(errors) + "\nwarnings:\n" + "\n".join(warnings)


@pytest.mark.parametrize("tool", ["dsrdump", "dsr2html"])
def test_sr_is_read_by_dcmtk(sr_file: Path, tool: str) -> None:
    run = subprocess.run([_tool(tool), str(sr_file)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    if tool == "dsrdump":
        assert '"Imaging Measurement Report"' in run.stdout
        assert '"Tracking Identifier")="Liver lesion 1"' in run.stdout
        assert 'SCOORD:(,,"Image Region")=(POLYLINE,250.5/300,' in run.stdout  # the viewer copy's outline


def test_document_renderers_name_every_item(sr_file: Path) -> None:
    """ContinuityOfContent SEPARATE: dsr2html prints "Volume: 12.9 ml", not a bare "12.9 ml"."""
    text = dsr2html_text(sr_file)
    for name in ("Tracking Identifier", "Finding:", "Volume:", "Long Axis:", "Image Region", "Validation status"):
        assert name in text, name


# --- content ------------------------------------------------------------------------------------


def test_roundtrip_finds_groups_tracking_uids_and_values(ct: list[Dataset], seg: Dataset) -> None:
    result = make_result(ct, seg, "RESEARCH", single_slice_lesion=True)
    sr = build_measurement_report(result, [*ct, seg], segmentation_dataset=seg, finding_site=sr_codes.SCT.Liver)
    read = roundtrip(sr)
    assert read.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert read.StudyInstanceUID == ct[0].StudyInstanceUID
    assert read.PatientID == ct[0].PatientID
    assert read.Modality == "SR"
    report = read.content
    assert isinstance(report, hd.sr.MeasurementReport)

    seg_lesion, rt_lesion, single = result.lesions
    groups = report.get_volumetric_roi_measurement_groups(tracking_uid=seg_lesion.tracking_uid)
    assert len(groups) == 1
    group = groups[0]
    assert group.tracking_identifier == "Liver lesion 1"
    assert group.finding_type == sr_codes.SCT.Neoplasm
    assert [site.value for site in group.finding_sites] == [sr_codes.SCT.Liver]
    segment = group.referenced_segment
    assert segment is not None
    assert segment.referenced_sop_instance_uid == seg.SOPInstanceUID
    assert segment.referenced_sop_class_uid == seg.SOPClassUID
    assert segment.referenced_segment_numbers == [1]
    assert segment.source_series_for_segmentation.value == ct[0].SeriesInstanceUID

    values = {(m.name.value, m.name.scheme_designator): (m.value, m.unit.value) for m in group.get_measurements()}
    assert values[("118565006", "SCT")] == (pytest.approx(123.5), "ml")
    assert values[("103339001", "SCT")] == (pytest.approx(61.25), "mm")
    assert values[("YEKZ", "IBSI")] == (pytest.approx(12345.5), "mm3")
    assert values[("Q4LE", "IBSI")] == (pytest.approx(87.375), "[hnsf'U]")
    assert values[("65HE", "IBSI")] == (pytest.approx(0.03125), "1")
    assert values[("KURTOSIS-PYRAD", "99PACSAGENT")] == (pytest.approx(4.0625), "1")
    assert len(values) == 2 + len(FEATURES)
    for measurement in group.get_measurements():
        assert algorithm_of(measurement, sr_codes.DCM.AlgorithmName) == ["pacs-agent radiomics"]
        assert algorithm_of(measurement, sr_codes.DCM.AlgorithmVersion) == ["1.2.0"]
        assert f"weights-sha256={SHA}" in algorithm_of(measurement, sr_codes.DCM.AlgorithmParameters)

    rt_group = report.get_volumetric_roi_measurement_groups(tracking_uid=rt_lesion.tracking_uid)[0]
    assert rt_group.reference_type == sr_codes.DCM.VolumeSurface
    surface = rt_group.roi
    assert isinstance(surface, hd.sr.VolumeSurface)
    assert surface.frame_of_reference_uid == ct[0].FrameOfReferenceUID
    polygons = surface.graphic_data
    assert len(polygons) == 2
    for polygon, outline in zip(polygons, rt_lesion.outline_mm, strict=True):
        np.testing.assert_allclose(polygon[0], polygon[-1])  # closed
        np.testing.assert_allclose(polygon[:4], np.asarray(outline)[:4], atol=1e-4)

    planar = report.get_planar_roi_measurement_groups(tracking_uid=single.tracking_uid)
    assert len(planar) == 1
    region = planar[0].roi
    assert isinstance(region, hd.sr.ImageRegion3D)
    assert region.graphic_type == hd.sr.GraphicTypeValues3D.POLYGON
    assert len(report.get_volumetric_roi_measurement_groups()) == 2


def test_a_viewer_copy_precedes_each_outlined_lesion(ct: list[Dataset], seg: Dataset) -> None:
    """TID 1410 key-slice outline (SCOORD POLYLINE) before the lesion's record, same tracking UID."""
    result = make_result(ct, seg, "RESEARCH", single_slice_lesion=True)
    sr = build_measurement_report(result, [*ct, seg], segmentation_dataset=seg, finding_site=sr_codes.SCT.Liver)
    report = roundtrip(sr).content
    seg_lesion, rt_lesion, single = result.lesions
    groups = report[0].ContentSequence[-2].ContentSequence  # Imaging Measurements (before Qualitative Evaluations)
    uids = [hd.sr.utils.find_content_items(g, name=sr_codes.DCM.TrackingUniqueIdentifier)[0].UID for g in groups]
    kinds = ["SCOORD" if any(i.ValueType == "SCOORD" for i in g.ContentSequence) else "record" for g in groups]
    assert list(zip(uids, kinds, strict=True)) == [
        (seg_lesion.tracking_uid, "SCOORD"),
        (seg_lesion.tracking_uid, "record"),
        (rt_lesion.tracking_uid, "SCOORD"),
        (rt_lesion.tracking_uid, "record"),
        (single.tracking_uid, "record"),  # no key_outline_px: no viewer copy
    ]
    for lesion, outline, key_slice in (
        (seg_lesion, SEG_OUTLINE, ct[1]),
        (rt_lesion, (*RT_OUTLINE, RT_OUTLINE[0]), ct[0]),
    ):
        copies = [
            g
            for g in report.get_planar_roi_measurement_groups(tracking_uid=lesion.tracking_uid)
            if isinstance(g.roi, hd.sr.ImageRegion)
        ]
        assert len(copies) == 1
        copy = copies[0]
        assert copy.tracking_identifier == f"Cornerstone3DTools@^0.1.0:PlanarFreehandROI:{lesion.tracking_id}"
        assert copy.finding_type == sr_codes.SCT.Neoplasm
        assert [site.value for site in copy.finding_sites] == [sr_codes.SCT.Liver]
        assert copy.roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        np.testing.assert_array_equal(copy.roi.value, outline)
        assert copy.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == key_slice.SOPInstanceUID
        values = [(m.name.value, m.unit.value) for m in copy.get_measurements()]
        assert values == [("42798000", "mm2"), ("118565006", "ml"), ("103339001", "mm")]  # area first (OHIF)
        assert [m.value for m in copy.get_measurements()][1:] == [lesion.volume_ml, lesion.longest_axial_diameter_mm]
        comment = hd.sr.utils.find_content_items(copy[0], name=hd.sr.CodedConcept("121106", "DCM", "Comment"))
        assert [str(c.TextValue) for c in comment] == [
            f"{lesion.tracking_id}: {lesion.volume_ml:.1f} ml, long axis {lesion.longest_axial_diameter_mm:.1f} mm"
        ]
    # the RTSTRUCT lesion keeps its record with the SCOORD3D volume surface
    assert report.get_volumetric_roi_measurement_groups(tracking_uid=rt_lesion.tracking_uid)[0].roi is not None


def test_a_key_slice_outline_needs_its_key_slice_in_the_evidence(ct: list[Dataset], seg: Dataset) -> None:
    result = make_result(ct, seg)
    with pytest.raises(ValueError, match=r"key slice .* is not in the evidence"):
        build_measurement_report(result, [ct[0], seg])  # lesion 1's key slice is ct[1]
    beyond = dataclasses.replace(result.lesions[0], key_outline_px=((500.0, 10.0), (513.0, 10.0), (500.0, 20.0)))
    with pytest.raises(ValueError, match="leaves the key slice"):
        build_measurement_report(dataclasses.replace(result, lesions=(beyond,)), [*ct, seg])


def test_uids_are_deterministic_and_follow_the_model_version(ct: list[Dataset], seg: Dataset) -> None:
    result = make_result(ct, seg, "RESEARCH")
    first = build_measurement_report(result, [*ct, seg])
    again = build_measurement_report(result, [*reversed(ct), seg], segmentation_dataset=seg)
    assert first.SOPInstanceUID == again.SOPInstanceUID
    assert first.SeriesInstanceUID == again.SeriesInstanceUID
    assert pydicom.uid.UID(first.SOPInstanceUID).is_valid
    newer = dataclasses.replace(result, algorithm=dataclasses.replace(result.algorithm, version="1.3.0"))
    other = build_measurement_report(newer, [*ct, seg])
    assert other.SOPInstanceUID != first.SOPInstanceUID
    assert other.SeriesInstanceUID != first.SeriesInstanceUID
    fewer = build_measurement_report(result, [*ct[:2], seg])
    assert fewer.SOPInstanceUID != first.SOPInstanceUID


def test_demo_warning_in_content_and_series_description(ct: list[Dataset], seg: Dataset) -> None:
    sr = build(ct, seg, "DEMO")
    assert DEMO_WARNING in text_values(sr)
    assert sr.SeriesDescription == "AI Radiomics" + DEMO_SUFFIX  # what, then the notice
    assert DEMO_WARNING in render_sr_text(roundtrip(sr))


@pytest.mark.parametrize("status", ["RESEARCH", "VALIDATED"])
def test_no_demo_warning_for_other_algorithms(ct: list[Dataset], seg: Dataset, status: str) -> None:
    sr = build(ct, seg, status)
    assert all(DEMO_WARNING not in value for value in text_values(sr))
    assert sr.SeriesDescription == "AI Radiomics"
    assert sr.SeriesNumber == 900  # "M5" is no method of the node's table (dicom_sr.series): the default
    assert status in text_values(sr)  # the validation status is always stated


def test_report_metadata(ct: list[Dataset], seg: Dataset) -> None:
    sr = build(ct, seg, "RESEARCH", series_number=901, institution_name="Test Hospital", software_version="9.9")
    assert sr.SeriesNumber == 901
    assert sr.InstitutionName == "Test Hospital"
    assert sr.SoftwareVersions == "9.9"
    assert sr.CompletionFlag == "COMPLETE"
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99PACSAGENT"
    evidence = {
        str(ref.ReferencedSOPInstanceUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert evidence == {str(ds.SOPInstanceUID) for ds in [*ct, seg]}
    texts = text_values(sr)
    assert "pacs-agent 9.9" in texts  # device observer model name
    assert SHA in texts and "pyradiomics=3.0.1" in texts and "research only" in texts
    procedure = hd.sr.utils.find_content_items(sr, name=sr_codes.DCM.ProcedureReported)
    assert procedure[0].ConceptCodeSequence[0].CodeValue == "169070004"


def test_non_finite_feature_is_left_out(ct: list[Dataset], seg: Dataset) -> None:
    result = make_result(ct, seg, "RESEARCH")
    lesion = dataclasses.replace(
        result.lesions[0], features=(*FEATURES[:2], FeatureValue("original_glcm_JointEntropy", float("nan")))
    )
    sr = build_measurement_report(dataclasses.replace(result, lesions=(lesion,)), [*ct, seg])
    group = roundtrip(sr).content.get_volumetric_roi_measurement_groups()[0]
    names = {m.name.value for m in group.get_measurements()}
    assert "TU9B" not in names and "YEKZ" in names


def test_write_dataset_is_atomic_and_replaces(ct: list[Dataset], seg: Dataset, tmp_path: Path) -> None:
    sr = build(ct, seg, "RESEARCH")
    target = tmp_path / "a" / "b" / "sr.dcm"
    assert write_dataset(sr, target) == target
    assert write_dataset(sr, str(target)) == target  # replaces the existing file
    assert [p.name for p in target.parent.iterdir()] == ["sr.dcm"]  # no temp file left behind
    assert pydicom.dcmread(target).SOPInstanceUID == sr.SOPInstanceUID
    with pytest.raises(TypeError, match='"ds"'):
        write_dataset("not a dataset", target)  # type: ignore[arg-type]


# --- text rendering -----------------------------------------------------------------------------


def test_render_sr_text(ct: list[Dataset], seg: Dataset) -> None:
    text = render_sr_text(roundtrip(build(ct, seg, "DEMO", single_slice_lesion=True)))
    for tracking_id in ("Liver lesion 1", "GTV lesion 1", "GTV lesion 2"):
        assert f"Tracking Identifier: {tracking_id}" in text
    assert "Volume: 123.5 ml" in text
    assert "Long Axis: 61.25 mm" in text
    assert "Approximate volume: 12345.5 mm3" in text
    assert "Mean: 87.375 [hnsf'U]" in text
    assert "Surface area: 2750.5 mm2" in text
    assert "(NGTDM) Contrast: 0.03125\n" in text
    assert "Referenced Segment: Segmentation " in text and "segment 1" in text
    assert "Volume Surface: POLYGON (5 points)" in text
    assert f"Study Instance UID : {ct[0].StudyInstanceUID}" in text
    assert "Observer           : device pacs-agent" in text
    assert "Algorithm: pacs-agent radiomics 1.2.0" in text
    assert str(ct[0].PatientName) not in text
    assert not re.search(rf"(?<![\w.]){re.escape(str(ct[0].PatientID))}(?![\w.])", text)


def test_render_sr_text_rejects_non_sr(ct: list[Dataset]) -> None:
    with pytest.raises(TypeError, match='"ds"'):
        render_sr_text("sr.dcm")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not an SR"):
        render_sr_text(ct[0])


# --- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"segmentation_dataset": "liver.dcm"}, "segmentation_dataset"),
        ({"series_number": "900"}, "series_number"),
        ({"series_number": True}, "series_number"),
        ({"institution_name": 42}, "institution_name"),
        ({"manufacturer": None}, "manufacturer"),
        ({"finding_site": "liver"}, "finding_site"),
        ({"procedure_reported": "CT"}, "procedure_reported"),
    ],
)
def test_wrong_argument_types_name_the_argument(
    ct: list[Dataset], seg: Dataset, kwargs: dict[str, object], argument: str
) -> None:
    result = make_result(ct, seg)
    with pytest.raises(TypeError, match=f'Argument "{argument}" must have type'):
        build_measurement_report(result, [*ct, seg], **kwargs)  # type: ignore[arg-type]


def test_wrong_result_and_evidence_types(ct: list[Dataset], seg: Dataset) -> None:
    result = make_result(ct, seg)
    with pytest.raises(TypeError, match=r'Argument "result" must have type StudyResult\.'):
        build_measurement_report({"method": "M5"}, [*ct, seg])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match='"evidence"'):
        build_measurement_report(result, ct[0])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match='"evidence"'):
        build_measurement_report(result, [])
    with pytest.raises(TypeError, match='"evidence"'):
        build_measurement_report(result, [*ct, "seg.dcm"])  # type: ignore[list-item]


def test_unknown_feature_raises(ct: list[Dataset], seg: Dataset) -> None:
    result = make_result(ct, seg)
    lesion = dataclasses.replace(result.lesions[0], features=(FeatureValue("original_glcm_Autocorrelation", 1.0),))
    with pytest.raises(ValueError, match="original_glcm_Autocorrelation"):
        build_measurement_report(dataclasses.replace(result, lesions=(lesion,)), [*ct, seg])


def test_inconsistent_results_raise(ct: list[Dataset], seg: Dataset) -> None:
    result = make_result(ct, seg)
    with pytest.raises(ValueError, match="not in the evidence"):
        build_measurement_report(result, ct)
    no_outline = dataclasses.replace(result.lesions[1], outline_mm=())
    with pytest.raises(ValueError, match="outline_mm"):
        build_measurement_report(dataclasses.replace(result, lesions=(no_outline,)), [*ct, seg])
    bad_outline = dataclasses.replace(result.lesions[1], outline_mm=(((0.0, 0.0, 0.0), (1.0, 1.0, 0.0)),) * 2)
    with pytest.raises(ValueError, match="at least 3 distinct"):
        build_measurement_report(dataclasses.replace(result, lesions=(bad_outline,)), [*ct, seg])
    with pytest.raises(ValueError, match="at least one lesion"):
        build_measurement_report(dataclasses.replace(result, lesions=()), [*ct, seg])
    with pytest.raises(TypeError, match="LesionResult"):
        build_measurement_report(dataclasses.replace(result, lesions=("lesion",)), [*ct, seg])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Study Instance UID differs"):
        build_measurement_report(dataclasses.replace(result, study_instance_uid="1.2.3"), [*ct, seg])
    anonymous = pydicom.Dataset()
    anonymous.update(ct[0])
    del anonymous.PatientID
    with pytest.raises(ValueError, match="PatientID"):
        build_measurement_report(result, [anonymous, *ct[1:], seg])
    infinite = dataclasses.replace(result.lesions[0], volume_ml=float("inf"))
    with pytest.raises(ValueError, match="volume_ml"):
        build_measurement_report(dataclasses.replace(result, lesions=(infinite,)), [*ct, seg])


# --- codes (no test data needed) -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "code", "scheme"),
    [
        ("original_shape_MeshVolume", "RNU0", "IBSI"),
        ("original_shape_VoxelVolume", "YEKZ", "IBSI"),
        ("shape_Sphericity", "QCFX", "IBSI"),
        ("original_shape_SurfaceArea", "C0JK", "IBSI"),
        ("original_shape_Maximum3DDiameter", "L0JK", "IBSI"),
        ("original_firstorder_Mean", "Q4LE", "IBSI"),
        ("original_firstorder_Variance", "ECT3", "IBSI"),
        ("original_firstorder_RootMeanSquared", "5ZWQ", "IBSI"),
        ("log-sigma-1-0-mm-3D_firstorder_Entropy", "TLU2", "IBSI"),
        ("original_firstorder_Skewness", "KE2A", "IBSI"),
        ("original_glcm_Contrast", "ACUI", "IBSI"),
        ("original_glcm_JointEntropy", "TU9B", "IBSI"),
        ("original_ngtdm_Contrast", "65HE", "IBSI"),
        ("original_firstorder_Kurtosis", "KURTOSIS-PYRAD", "99PACSAGENT"),
        ("original_shape_Maximum2DDiameterSlice", "MAX2D-DIAM-SLICE", "99PACSAGENT"),
    ],
)
def test_feature_concepts(name: str, code: str, scheme: str) -> None:
    concept = codes.feature_concept(name)
    assert (concept.value, concept.scheme_designator) == (code, scheme)
    assert concept.meaning


def test_feature_concept_and_unit_errors() -> None:
    with pytest.raises(ValueError, match="No coded concept"):
        codes.feature_concept("original_glszm_ZoneEntropy")
    with pytest.raises(ValueError, match="not"):
        codes.feature_concept("VoxelVolume")
    with pytest.raises(TypeError, match='"name"'):
        codes.feature_concept(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Unknown unit"):
        codes.ucum("furlong")
    with pytest.raises(ValueError, match="not a UCUM code"):
        codes.ucum(sr_codes.SCT.Liver)
    assert codes.ucum("[hnsf'U]").meaning == "Hounsfield unit"
    assert codes.ucum(sr_codes.UCUM.Millimeter).value == "mm"
    assert codes.split_feature_name("shape_VoxelVolume") == ("original", "shape", "VoxelVolume")


def test_each_method_has_its_own_series_number_and_description() -> None:
    """A study browser tells the results apart: distinct numbers per method and kind, the method first."""
    from dicom_sr.series import SERIES_NUMBERS, series_description, series_number

    numbers = [series_number(method, kind) for method in SERIES_NUMBERS for kind in ("SR", "SC")]
    assert len(set(numbers)) == len(numbers)
    kinds = {"radiomics": "Radiomics", "m1": "KRAS", "m2": "EGFR/KRAS", "m3": "RAS", "m4": "Deep-RadScore",
             "comparator": "KRAS RF", "response": "Response 8w"}  # fmt: skip
    described = {method: series_description(method, kind, demo=True) for method, kind in kinds.items()}
    assert described["m1"] == "AI KRAS M1 - DEMO, not for clinical use"
    assert described["comparator"] == "AI KRAS RF - DEMO, not for clinical use"
    assert len(set(described.values())) == len(described)
    assert all(len(text) <= 64 for text in described.values())
    long = series_description("m3", "PIK3CA+BRAF and a very long label that does not fit " * 2, demo=True)
    assert len(long) == 64 and long.endswith("DEMO, not for clinical use")  # the notice is never cut
