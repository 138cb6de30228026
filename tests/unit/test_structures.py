"""Which structures are tumours: rules on SEG codes, RT ROI types and names; real exports and phantoms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from inference.phantom import PhantomStudy, generate_study
from inference.pipelines.radiomics import run_radiomics
from inference.pipelines.study import load_study
from inference.structures import (
    CodedTerm,
    SegmentationSummary,
    StructureInfo,
    StructureRules,
    StructureSelection,
    classify_structure,
    classify_structures,
    read_summary,
    select_structures,
)
from pacs_agent.config import settings_from_mapping
from pacs_agent.errors import ConfigError, InputError
from tests.conftest import shared_data

RULES = StructureRules()
TISSUE = CodedTerm("SCT", "85756007", "Tissue")
ANATOMY = CodedTerm("SCT", "123037004", "Anatomical Structure")
MORPH = CodedTerm("SCT", "49755003", "Morphologically Abnormal Structure")


def roi(name: str, kind: str | None = None) -> StructureInfo:
    return StructureInfo(1, name, "rtstruct", interpreted_type=kind)


def segment(label: str, category: CodedTerm | None, ptype: CodedTerm | None) -> StructureInfo:
    return StructureInfo(1, label, "seg", category, ptype)


@pytest.mark.parametrize(
    ("name", "kind", "role"),
    [
        ("GTV_Mass_CT", "GTV", "tumour"),
        ("BODY", "EXTERNAL", "other"),
        ("External", None, "other"),
        ("Liver", "ORGAN", "organ"),
        ("Spinal_Cord", None, "organ"),
        ("CTV_60", "CTV", "other"),
        ("PTV_High", "PTV", "other"),
        ("PTV", None, "other"),
        ("GTV+5mm", "GTV", "other"),  # an expansion typed as GTV is not the tumour
        ("GTVp", None, "tumour"),
        ("gtv_n1", None, "tumour"),
        ("Liver_mets", None, "tumour"),
        ("Tumour bed", None, "other"),
        ("Lesion 2", "", "tumour"),
        ("z_ring_opt", None, "other"),
        ("Couch Surface", "SUPPORT", "other"),
        ("Oedema", None, "other"),
        ("ROI-1", None, "other"),
    ],
)
def test_rt_rois_by_interpreted_type_then_name(name: str, kind: str | None, role: str) -> None:
    assert classify_structure(roi(name, kind), RULES).role == role


@pytest.mark.parametrize(
    ("label", "category", "ptype", "role"),
    [
        ("first segment", MORPH, CodedTerm("SCT", "108369006", "Neoplasm"), "tumour"),
        ("anything", MORPH, CodedTerm("SRT", "M-80003", "Neoplasm"), "tumour"),
        ("seg 1", MORPH, CodedTerm("99LOCAL", "x1", "Metastatic mass"), "tumour"),  # unknown scheme, telling meaning
        (
            "LIGHT_BLUE",
            CodedTerm("SCT", "49755003", "Morphologically Altered Structure"),
            CodedTerm("SCT", "79654002", "Edema"),
            "other",
        ),
        ("tumor", TISSUE, TISSUE, "tumour"),  # generic codes: the label decides
        ("GREEN", TISSUE, TISSUE, "other"),
        ("Liver", TISSUE, TISSUE, "organ"),
        ("lesion", None, None, "tumour"),
        ("Liver", CodedTerm("SRT", "T-D0050", "Tissue"), CodedTerm("SRT", "T-62000", "Liver"), "organ"),
        ("Spleen", ANATOMY, CodedTerm("SCT", "78961009", "Spleen"), "organ"),
        ("Body", ANATOMY, CodedTerm("SCT", "38266002", "Entire body"), "other"),  # the label is excluded first
        ("Stent", CodedTerm("SCT", "260787004", "Physical object"), CodedTerm("SCT", "65818007", "Stent"), "other"),
    ],
)
def test_seg_segments_by_codes_then_label(
    label: str, category: CodedTerm | None, ptype: CodedTerm | None, role: str
) -> None:
    verdict = classify_structure(segment(label, category, ptype), RULES)
    assert verdict.role == role, verdict.reason


def test_an_organ_verdict_names_the_organ_and_describes_itself() -> None:
    verdict = classify_structure(
        segment("Liver", CodedTerm("SRT", "T-D0050", "Tissue"), CodedTerm("SRT", "T-62000", "Liver")), RULES
    )
    assert verdict.organ == "liver"
    assert verdict.describe() == "Liver (organ, coded Tissue / Liver)"


def test_site_rules_add_tumour_names_codes_and_types() -> None:
    site = StructureRules(
        include_labels=(r"^T\d+$",), tumour_codes=("99LOCAL:T1",), tumour_interpreted_types=("GTV", "CAVITY")
    )
    assert classify_structure(roi("T2"), site).role == "tumour"
    assert classify_structure(roi("T2"), RULES).role == "other"
    assert classify_structure(segment("x", TISSUE, CodedTerm("99LOCAL", "T1", "local tumour")), site).role == "tumour"
    assert classify_structure(roi("resection", "CAVITY"), site).role == "tumour"


def test_bad_patterns_and_codes_are_refused_with_the_key() -> None:
    with pytest.raises(ValueError, match="include_labels: '\\(' is not a valid regular expression"):
        StructureRules(include_labels=("(",))
    with pytest.raises(ConfigError, match="not a code: write SCHEME:VALUE"):
        settings_from_mapping({"routing": {"tumour": {"tumour_codes": ["108369006"]}}})
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        settings_from_mapping({"routing": {"tumour": {"exclude_labels": ["[body"]}}})


def test_configured_rules_reach_the_classifier() -> None:
    settings = settings_from_mapping({"routing": {"tumour": {"organ_interpreted_types": ["organ", "avoidance"]}}})
    rules = settings.routing.tumour
    assert classify_structure(roi("Bowel_PRV", "AVOIDANCE"), rules).role == "organ"


# --- real exports ----------------------------------------------------------------------------------------------


def test_ibsi_rtstruct_gtv_is_the_tumour_with_its_contour_planes() -> None:
    summary = read_summary(shared_data("ibsi", "ibsi_validation", "dicom", "STS_001", "CT", "mask", "RS.dcm"))
    assert summary.kind == "rtstruct"
    ((gtv, verdict),) = zip(summary.structures, classify_structures(summary, RULES), strict=True)
    assert (verdict.label, verdict.role, verdict.reason) == ("GTV_Mass_CT", "tumour", "RT ROI Interpreted Type GTV")
    assert len(gtv.plane_points) == 31  # one point on each contoured slice
    assert len(summary.referenced_instance_uids) == 267


def test_dcmqi_liver_seg_is_an_organ_not_a_tumour() -> None:
    summary = read_summary(shared_data("dicom_ct_seg", "dcmqi_ct3slice_liver", "liver.dcm"))
    (verdict,) = classify_structures(summary, RULES)
    assert (verdict.label, verdict.role, verdict.organ) == ("Liver", "organ", "liver")


def test_dcmqi_overlapping_segments_hold_no_tumour_and_edema_is_not_one() -> None:
    summary = read_summary(shared_data("dicom_ct_seg", "dcmqi_ct3slice_liver", "partial_overlaps.dcm"))
    roles = {v.label: v.role for v in classify_structures(summary, RULES)}
    assert roles == {
        "GREEN": "other",
        "ORANGE": "organ",
        "PURPLE": "organ",
        "LIGHT_BLUE": "other",
        "DARK_BLUE": "organ",
    }


def test_highdicom_segments_are_anatomy() -> None:
    summary = read_summary(shared_data("dicom_ct_seg", "highdicom", "seg_image_ct_binary_overlap.dcm"))
    assert {v.role for v in classify_structures(summary, RULES)} == {"organ"}


def test_summary_round_trips_through_json() -> None:
    summary = read_summary(shared_data("dicom_ct_seg", "dcmqi_ct3slice_liver", "partial_overlaps.dcm"))
    assert SegmentationSummary.from_json(summary.to_json()) == summary


def test_a_file_that_is_no_segmentation_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.dcm"
    path.write_bytes(b"not dicom")
    with pytest.raises(ValueError, match="cannot read the segmentation file"):
        read_summary(path)
    with pytest.raises(ValueError, match="is not a DICOM SEG or RTSTRUCT"):
        read_summary(shared_data("dicom_ct_seg", "dcmqi_ct3slice_liver", "01.dcm"))


# --- phantoms with organs, body and planning volumes -----------------------------------------------------------


@pytest.fixture(scope="module")
def clinical(tmp_path_factory: pytest.TempPathFactory) -> PhantomStudy:
    return generate_study(
        tmp_path_factory.mktemp("clinical"),
        seed=21,
        lesions=2,
        slices=24,
        rows=64,
        columns=64,
        clinical_structures=True,
    )


@pytest.mark.parametrize("kind", ["seg", "rtstruct"])
def test_default_rules_find_the_phantom_tumours_organs_and_the_rest(clinical: PhantomStudy, kind: str) -> None:
    path = clinical.seg_file if kind == "seg" else clinical.rtstruct_file
    assert path is not None
    selection, verdicts = select_structures(pydicom.dcmread(path))
    assert selection.tumours == clinical.structure_numbers(kind)  # type: ignore[arg-type]
    assert tuple(n for n, _ in selection.organs) == clinical.structure_numbers(kind, "organ")  # type: ignore[arg-type]
    assert {name for _, name in selection.organs} == {"liver", "spleen"}
    others = {v.number for v in verdicts if v.role == "other"}
    assert others == set(clinical.structure_numbers(kind, "other"))  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["seg", "rtstruct"])
def test_only_tumours_become_lesions_and_the_liver_is_kept_as_context(clinical: PhantomStudy, kind: str) -> None:
    path = clinical.seg_file if kind == "seg" else clinical.rtstruct_file
    assert path is not None
    study = load_study(clinical.ct_files, path)
    assert len(study.lesions) == len(clinical.lesions)
    assert {item.source.number for item in study.lesions} <= set(clinical.structure_numbers(kind))  # type: ignore[arg-type]
    assert sorted(round(item.lesion.volume_ml, 3) for item in study.lesions) == sorted(
        round(lesion.volume_ml, 3) for lesion in clinical.lesions
    )
    organs = dict(study.organs)
    assert set(organs) == {"liver", "spleen"}
    lesions = np.zeros_like(organs["liver"].mask)
    for item in study.lesions:
        lesions |= item.lesion.mask
    assert (organs["liver"].mask | ~lesions).all()  # the liver holds the lesions
    result = run_radiomics(clinical.ct_files, path).result
    assert {lesion.source.label for lesion in result.lesions}.isdisjoint({"BODY", "Liver", "Spleen", "CTV_Liver"})


def test_a_selection_from_routing_is_obeyed_and_no_tumour_is_refused(clinical: PhantomStudy) -> None:
    assert clinical.rtstruct_file is not None
    liver_only = StructureSelection(tumours=clinical.structure_numbers("rtstruct", "organ")[:1])
    study = load_study(clinical.ct_files, clinical.rtstruct_file, liver_only)  # a site that wants the liver
    assert [item.source.label for item in study.lesions] == ["Liver"]
    with pytest.raises(InputError, match="no tumour structure was chosen"):
        load_study(clinical.ct_files, clinical.rtstruct_file, StructureSelection(tumours=()))


def test_the_liver_seg_alone_is_refused_with_the_reason(tmp_path: Path) -> None:
    folder = shared_data("dicom_ct_seg", "dcmqi_ct3slice_liver")
    with pytest.raises(InputError, match=r"no tumour structure: Liver \(organ, coded Tissue / Liver\)"):
        load_study(sorted(folder.glob("0*.dcm")), folder / "liver.dcm")
