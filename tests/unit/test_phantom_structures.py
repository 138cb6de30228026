"""Phantom segmentations that look like clinical exports: organs, body outline and target volumes around the GTV."""

from __future__ import annotations

import hashlib
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from inference.imaging.masks import load_segmentation
from inference.imaging.volume import CTVolume, load_ct_series
from inference.phantom import PhantomStructure, PhantomStudy, generate_follow_up, generate_study, label_volume, main
from inference.phantom.anatomy import Anatomy, PhantomGeometry
from inference.phantom.segmentation import write_rtstruct_structures, write_seg_structures
from inference.phantom.structures import StructureMask, clinical_structures
from tests.unit.test_phantom import dciodvfy_errors

SMALL = {"seed": 0, "slices": 24, "rows": 64, "columns": 64}
ANATOMICAL_STRUCTURE = ("123037004", "SCT")
MORPHOLOGICALLY_ABNORMAL = ("49755003", "SCT")
NEOPLASM = ("108369006", "SCT")
LIVER = ("10200004", "SCT")
SPLEEN = ("78961009", "SCT")

# Digests of the SEG / RTSTRUCT content (UIDs, segment codes, frames and pixel data; ROIs, observations and
# contour points) of generate_study(**SMALL) and of its per-lesion variant, recorded before the option existed.
DEFAULT_DIGESTS = {
    False: (
        "7f4a8f0e4885c37a7abdc3b596234f905a703aa21f2b49c34909c060b4e79197",
        "d4dc23c5e9ee81aa0afc000edfa6f1c476a4f6ab1170079731e4c073e4553ead",
    ),
    True: (
        "360c08dbc575604005c96b065d60a73b003cd7afaeac1624a408bb4054603881",
        "52fdfc15a974f398a8d4724b9d85dcc5867e5b08a1ff8859b2b38018bdaa1cc0",
    ),
}


@pytest.fixture(scope="module")
def default(tmp_path_factory: pytest.TempPathFactory) -> PhantomStudy:
    return generate_study(tmp_path_factory.mktemp("default"), **SMALL)


@pytest.fixture(scope="module")
def clinical(tmp_path_factory: pytest.TempPathFactory) -> PhantomStudy:
    return generate_study(tmp_path_factory.mktemp("clinical"), clinical_structures=True, **SMALL)


@pytest.fixture(scope="module")
def volume(clinical: PhantomStudy) -> CTVolume:
    return load_ct_series(list(clinical.ct_files))


def content_digest(path: Path) -> str:
    """sha256 of what a SEG / RTSTRUCT says, independent of the library versions written into its header."""
    ds = pydicom.dcmread(path)
    digest = hashlib.sha256()

    def put(*values: object) -> None:
        digest.update("|".join(str(v) for v in values).encode() + b"\n")

    put(ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID)
    if ds.Modality == "SEG":
        for s in ds.SegmentSequence:
            category, kind = s.SegmentedPropertyCategoryCodeSequence[0], s.SegmentedPropertyTypeCodeSequence[0]
            put(*(s.SegmentNumber, s.SegmentLabel), *code(category), *code(kind))
        shared = ds.SharedFunctionalGroupsSequence[0]
        for frame in ds.PerFrameFunctionalGroupsSequence:
            ident = frame.get("SegmentIdentificationSequence") or shared.SegmentIdentificationSequence
            source = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            put(ident[0].ReferencedSegmentNumber, *frame.PlanePositionSequence[0].ImagePositionPatient, source)
        digest.update(ds.PixelData)
    else:
        for roi in ds.StructureSetROISequence:
            put(roi.ROINumber, roi.ROIName)
        for observation in ds.RTROIObservationsSequence:
            put(observation.ReferencedROINumber, observation.RTROIInterpretedType)
        for roi_contour in ds.ROIContourSequence:
            put(roi_contour.ReferencedROINumber, *roi_contour.ROIDisplayColor)
            for contour in roi_contour.ContourSequence:
                put(contour.ContourImageSequence[0].ReferencedSOPInstanceUID, *contour.ContourData)
    return digest.hexdigest()


def masks_by_name(path: Path | None, volume: CTVolume) -> dict[str, np.ndarray]:
    assert path is not None
    masks = load_segmentation(path, volume)
    assert all(m.ok for m in masks), [m.problem for m in masks]
    return {m.source.label: m.mask for m in masks}


def code(item: pydicom.Dataset) -> tuple[str, str]:
    return (str(item.CodeValue), str(item.CodingSchemeDesignator))


# --- the default output ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_lesion", [False, True], ids=["one-structure", "per-lesion"])
def test_default_segmentations_are_what_they_were_before_the_option(per_lesion: bool, tmp_path: Path) -> None:
    study = generate_study(tmp_path, seg_per_lesion=per_lesion, rtstruct_per_lesion=per_lesion, **SMALL)
    assert study.options.clinical_structures is False
    assert study.seg_file is not None and study.rtstruct_file is not None
    assert (content_digest(study.seg_file), content_digest(study.rtstruct_file)) == DEFAULT_DIGESTS[per_lesion]


def test_default_structures_describe_the_lesion_files(default: PhantomStudy, tmp_path: Path) -> None:
    assert default.structures == (
        PhantomStructure("seg", 1, "Liver lesions", "tumour", (1, 2, 3)),
        PhantomStructure("rtstruct", 1, "GTV_Liver_Lesions", "tumour", (1, 2, 3)),
    )
    assert default.structure_numbers("seg") == default.structure_numbers("rtstruct") == (1,)
    assert default.structure_numbers("seg", "organ") == ()
    only_seg = generate_study(tmp_path / "seg", seg_per_lesion=True, segmentation="seg", **SMALL)
    assert [(s.kind, s.name, s.lesions) for s in only_seg.structures] == [
        ("seg", f"Liver lesion {i}", (i,)) for i in (1, 2, 3)
    ]
    assert generate_study(tmp_path / "none", segmentation="none", **SMALL).structures == ()


# --- the clinical option --------------------------------------------------------------------------------------


def test_rtstruct_holds_body_organs_gtv_and_margins_in_order(clinical: PhantomStudy) -> None:
    rtstruct = pydicom.dcmread(clinical.rtstruct_file)
    names = ["BODY", "Liver", "Spleen", "GTV_Liver_Lesions", "CTV_Liver", "PTV_Liver"]
    assert [r.ROIName for r in rtstruct.StructureSetROISequence] == names
    assert [int(r.ROINumber) for r in rtstruct.StructureSetROISequence] == [1, 2, 3, 4, 5, 6]
    assert [int(c.ReferencedROINumber) for c in rtstruct.ROIContourSequence] == [1, 2, 3, 4, 5, 6]
    types = {int(o.ReferencedROINumber): o.RTROIInterpretedType for o in rtstruct.RTROIObservationsSequence}
    assert types == {1: "EXTERNAL", 2: "ORGAN", 3: "ORGAN", 4: "GTV", 5: "CTV", 6: "PTV"}
    described = [s for s in clinical.structures if s.kind == "rtstruct"]
    assert [(s.number, s.name) for s in described] == list(enumerate(names, start=1))
    assert [s.role for s in described] == ["other", "organ", "organ", "tumour", "other", "other"]
    assert clinical.structure_numbers("rtstruct") == (4,)
    assert clinical.structure_numbers("rtstruct", "organ") == (2, 3)


def test_seg_holds_the_organs_then_the_lesions(clinical: PhantomStudy) -> None:
    seg = hd.seg.segread(clinical.seg_file)
    assert seg.segmentation_type == hd.seg.SegmentationTypeValues.BINARY
    assert seg.number_of_segments == 3
    expected = {
        1: ("Liver", ANATOMICAL_STRUCTURE, LIVER),
        2: ("Spleen", ANATOMICAL_STRUCTURE, SPLEEN),
        3: ("Liver lesions", MORPHOLOGICALLY_ABNORMAL, NEOPLASM),
    }
    for number, (label, category, kind) in expected.items():
        description = seg.get_segment_description(number)
        assert description.SegmentLabel == label
        assert code(description.SegmentedPropertyCategoryCodeSequence[0]) == category
        assert code(description.SegmentedPropertyTypeCodeSequence[0]) == kind
    assert [(s.number, s.name, s.role) for s in clinical.structures if s.kind == "seg"] == [
        (1, "Liver", "organ"),
        (2, "Spleen", "organ"),
        (3, "Liver lesions", "tumour"),
    ]
    assert clinical.structure_numbers("seg") == (3,)


def test_lesions_and_ct_are_those_of_the_default_study(
    clinical: PhantomStudy, default: PhantomStudy, volume: CTVolume
) -> None:
    default_volume = load_ct_series(list(default.ct_files))
    assert np.array_equal(volume.array, default_volume.array)
    assert clinical.lesions == default.lesions
    assert clinical.study_instance_uid != default.study_instance_uid  # other content, other UIDs
    truth = label_volume(clinical) > 0
    for path, default_path, name in (
        (clinical.seg_file, default.seg_file, "Liver lesions"),
        (clinical.rtstruct_file, default.rtstruct_file, "GTV_Liver_Lesions"),
    ):
        lesions = masks_by_name(path, volume)[name]
        assert np.array_equal(lesions, masks_by_name(default_path, default_volume)[name])
        assert np.array_equal(lesions, truth)


def test_structures_nest_like_organs_and_target_volumes(clinical: PhantomStudy, volume: CTVolume) -> None:
    seg = masks_by_name(clinical.seg_file, volume)
    rt = masks_by_name(clinical.rtstruct_file, volume)
    body, liver, spleen, gtv, ctv, ptv = (
        rt[n] for n in ("BODY", "Liver", "Spleen", "GTV_Liver_Lesions", "CTV_Liver", "PTV_Liver")
    )
    assert np.array_equal(seg["Liver"], liver) and np.array_equal(seg["Spleen"], spleen)
    assert np.all(seg["Liver"][seg["Liver lesions"]])  # the organ contains every lesion voxel
    assert body.any(axis=(1, 2)).all()  # the body outline is on every slice
    assert np.all(body[liver]) and np.all(body[spleen]) and not np.any(liver & spleen)
    assert np.all(ctv[gtv]) and ctv.sum() > gtv.sum()
    assert np.all(ptv[ctv]) and ptv.sum() > ctv.sum()
    assert np.all(body[ptv])
    on_gtv_slices = gtv.any(axis=(1, 2))
    assert np.array_equal(ctv.any(axis=(1, 2)), on_gtv_slices)  # margins in plane only
    assert np.array_equal(ptv.any(axis=(1, 2)), on_gtv_slices)


def test_margins_are_5_and_10_mm_in_plane() -> None:
    geometry = PhantomGeometry.centred(rows=65, columns=65, slices=3, pixel_spacing_mm=1.0, slice_thickness_mm=2.5)
    labels = np.zeros(geometry.shape, dtype=np.uint8)
    labels[1, 32, 32] = 1
    anatomy = Anatomy(z_extent_mm=7.5)
    structures = clinical_structures(
        labels, "rtstruct", per_lesion=False, geometry=geometry, anatomy=anatomy, slice_index=[0, 1, 2]
    )
    by_name = {s.name: s.mask for s in structures}
    rows, cols = np.mgrid[-32:33, -32:33]
    for name, radius in (("CTV_Liver", 5.0), ("PTV_Liver", 10.0)):
        assert by_name[name][1].sum() == np.count_nonzero(np.hypot(rows, cols) <= radius)
        assert not by_name[name][[0, 2]].any()
    assert not by_name["BODY"][:, 0, :].any()  # one pixel clear of the image edge: contours stay in the field


def test_per_lesion_clinical_structures_are_numbered_after_the_organs(tmp_path: Path) -> None:
    study = generate_study(tmp_path, clinical_structures=True, seg_per_lesion=True, rtstruct_per_lesion=True, **SMALL)
    assert [(s.kind, s.number, s.name) for s in study.structures] == [
        ("seg", 1, "Liver"),
        ("seg", 2, "Spleen"),
        *(("seg", 2 + i, f"Liver lesion {i}") for i in (1, 2, 3)),
        ("rtstruct", 1, "BODY"),
        ("rtstruct", 2, "Liver"),
        ("rtstruct", 3, "Spleen"),
        *(("rtstruct", 3 + i, f"GTV_Lesion_{i}") for i in (1, 2, 3)),
        ("rtstruct", 7, "CTV_Liver"),
        ("rtstruct", 8, "PTV_Liver"),
    ]
    assert study.structure_numbers("seg") == (3, 4, 5) and study.structure_numbers("rtstruct") == (4, 5, 6)
    volume = load_ct_series(list(study.ct_files))
    truth = label_volume(study)
    for path in (study.seg_file, study.rtstruct_file):
        masks = {m.source.number: m.mask for m in load_segmentation(path, volume)}
        kind = "seg" if path == study.seg_file else "rtstruct"
        for structure in study.structures:
            if structure.kind == kind and structure.role == "tumour":
                (lesion,) = structure.lesions
                assert np.array_equal(masks[structure.number], truth == lesion)
    types = [o.RTROIInterpretedType for o in pydicom.dcmread(study.rtstruct_file).RTROIObservationsSequence]
    assert types == ["EXTERNAL", "ORGAN", "ORGAN", "GTV", "GTV", "GTV", "CTV", "PTV"]
    assert dciodvfy_errors(study.seg_file) == []
    assert dciodvfy_errors(study.rtstruct_file) == []


def test_clinical_study_is_deterministic(clinical: PhantomStudy, tmp_path: Path) -> None:
    again = generate_study(tmp_path, clinical_structures=True, **SMALL)
    assert again.structures == clinical.structures
    for mine, theirs in ((again.seg_file, clinical.seg_file), (again.rtstruct_file, clinical.rtstruct_file)):
        assert mine is not None and theirs is not None
        assert mine.read_bytes() == theirs.read_bytes(), mine.name
    assert again.ct_files[5].read_bytes() == clinical.ct_files[5].read_bytes()


def test_follow_up_is_written_with_the_same_structures(clinical: PhantomStudy, tmp_path: Path) -> None:
    follow_up = generate_follow_up(clinical, tmp_path, shrink=0.7)
    assert follow_up.options.clinical_structures is True
    assert follow_up.structures == clinical.structures
    volume = load_ct_series(list(follow_up.ct_files))
    seg = masks_by_name(follow_up.seg_file, volume)
    rt = masks_by_name(follow_up.rtstruct_file, volume)
    assert np.array_equal(seg["Liver lesions"], label_volume(follow_up) > 0)
    assert np.all(seg["Liver"][seg["Liver lesions"]])
    assert np.all(rt["CTV_Liver"][rt["GTV_Liver_Lesions"]]) and np.all(rt["PTV_Liver"][rt["CTV_Liver"]])


# --- writer validation and CLI --------------------------------------------------------------------------------


def test_writers_refuse_what_they_cannot_write(tmp_path: Path) -> None:
    outline = StructureMask("BODY", "other", (np.ones((1, 4, 4), dtype=bool),), "EXTERNAL", "Body", (0, 255, 0))
    with pytest.raises(ValueError, match="at least one structure"):
        write_seg_structures(tmp_path / "seg.dcm", [], [], series_instance_uid="1.2", sop_instance_uid="1.3")
    with pytest.raises(ValueError, match='"BODY" has no segmented property category'):
        write_seg_structures(tmp_path / "seg.dcm", [], [outline], series_instance_uid="1.2", sop_instance_uid="1.3")
    with pytest.raises(ValueError, match="at least one structure"):
        write_rtstruct_structures(
            tmp_path / "rt.dcm",
            None,  # type: ignore[arg-type]
            None,  # type: ignore[arg-type]
            [],
            [],
            [],
            series_instance_uid="1.2",
            sop_instance_uid="1.3",
        )


def test_cli_writes_clinical_structures_and_lists_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--out", str(tmp_path), "--lesions", "2", "--slices", "24", "--size", "64", "--clinical-structures"]
    assert main(argv) == 0
    output = capsys.readouterr().out
    assert 'segment 1 "Liver": organ' in output
    assert 'segment 3 "Liver lesions": tumour (lesions 1, 2)' in output
    assert 'ROI 1 "BODY": other' in output
    assert 'ROI 4 "GTV_Liver_Lesions": tumour (lesions 1, 2)' in output
    assert 'ROI 6 "PTV_Liver": other' in output
    rtstruct = pydicom.dcmread(tmp_path / "RTSTRUCT" / "rtstruct.dcm")
    assert len(rtstruct.StructureSetROISequence) == 6
