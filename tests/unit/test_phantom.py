"""The synthetic phantom: DICOM validity, ground truth read back from the files, follow-up, transfer syntaxes."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from scipy import ndimage
from skimage.draw import polygon as fill_polygon

from inference.phantom import (
    SUPPORTED_TRANSFER_SYNTAXES,
    PhantomStudy,
    generate_follow_up,
    generate_study,
    label_volume,
    main,
)
from inference.phantom.anatomy import FAT_HU, LIVER, LIVER_HU, Anatomy

CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> PhantomStudy:
    return generate_study(tmp_path_factory.mktemp("baseline"), seed=5, lesion_texture=["coarse", "smooth", "coarse"])


@pytest.fixture(scope="module")
def follow_up(baseline: PhantomStudy, tmp_path_factory: pytest.TempPathFactory) -> PhantomStudy:
    return generate_follow_up(baseline, tmp_path_factory.mktemp("follow-up"), weeks=8, shrink=0.7)


def read_hu(study: PhantomStudy) -> tuple[np.ndarray, list[pydicom.Dataset]]:
    """The CT volume in HU, sorted inferior to superior by ImagePositionPatient (as a reader must)."""
    datasets = sorted((pydicom.dcmread(p) for p in study.ct_files), key=lambda d: float(d.ImagePositionPatient[2]))
    volume = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in datasets])
    return volume, datasets


def read_seg_labels(study: PhantomStudy) -> np.ndarray:
    """Segment numbers (0 = none) read from the SEG, indexed like the sorted CT volume."""
    assert study.seg_file is not None
    seg = hd.seg.segread(study.seg_file)
    headers = sorted(
        (pydicom.dcmread(p, stop_before_pixels=True) for p in study.ct_files),
        key=lambda d: float(d.ImagePositionPatient[2]),
    )
    return seg.get_pixels_by_source_instance([d.SOPInstanceUID for d in headers], combine_segments=True)


def dciodvfy_errors(path: Path) -> list[str]:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not on PATH")
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


# --- CT series --------------------------------------------------------------------------------------------


def test_layout_and_headers(baseline: PhantomStudy) -> None:
    assert len(baseline.ct_files) == 60
    assert all(p.parent == baseline.study_dir / "CT" for p in baseline.ct_files)
    assert baseline.seg_file == baseline.study_dir / "SEG" / "seg.dcm"
    assert baseline.rtstruct_file == baseline.study_dir / "RTSTRUCT" / "rtstruct.dcm"
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in baseline.ct_files]
    assert [int(d.InstanceNumber) for d in headers] == list(range(1, 61))
    first = headers[0]
    assert first.Modality == "CT"
    assert first.SOPClassUID == pydicom.uid.CTImageStorage
    assert first.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert first.SeriesDescription == "ABDOMEN PORTAL VENOUS 70s"
    assert first.ContrastBolusAgent
    assert str(first.PatientName) == "PHANTOM^SEED5"
    assert first.PatientID == baseline.patient_id
    assert first.PatientBirthDate and first.PatientSex in ("M", "F")
    assert first.StudyDate == baseline.study_date.strftime("%Y%m%d")
    assert first.AccessionNumber
    assert (first.RescaleSlope, first.RescaleIntercept) == (1, -1024)
    assert {d.FrameOfReferenceUID for d in headers} == {baseline.frame_of_reference_uid}
    assert {d.SeriesInstanceUID for d in headers} == {baseline.ct_series_instance_uid}
    assert {d.StudyInstanceUID for d in headers} == {baseline.study_instance_uid}
    assert len({d.SOPInstanceUID for d in headers}) == 60
    # Instance 1 is the most superior slice; positions are evenly spaced by SliceThickness.
    z = np.array([float(d.ImagePositionPatient[2]) for d in headers])
    assert np.allclose(np.diff(z), -float(first.SliceThickness))
    assert all(list(map(float, d.ImageOrientationPatient)) == [1, 0, 0, 0, 1, 0] for d in headers)
    assert float(first.PixelSpacing[0]) == pytest.approx(baseline.geometry.pixel_spacing_mm)


def test_same_seed_gives_identical_files(baseline: PhantomStudy, tmp_path: Path) -> None:
    again = generate_study(tmp_path / "again", seed=5, lesion_texture=["coarse", "smooth", "coarse"])
    assert again.lesions == baseline.lesions
    assert again.study_instance_uid == baseline.study_instance_uid
    for mine, theirs in zip(
        [*again.ct_files, again.seg_file, again.rtstruct_file],
        [*baseline.ct_files, baseline.seg_file, baseline.rtstruct_file],
        strict=True,
    ):
        assert mine is not None and theirs is not None
        assert mine.read_bytes() == theirs.read_bytes(), mine.name


def test_other_seed_gives_other_study(baseline: PhantomStudy, tmp_path: Path) -> None:
    other = generate_study(tmp_path, seed=6, slices=20, rows=64, columns=64, lesions=1, segmentation="none")
    assert other.study_instance_uid != baseline.study_instance_uid
    assert other.patient_id != baseline.patient_id
    assert (other.seg_file, other.rtstruct_file) == (None, None)


def test_hounsfield_units_read_back(baseline: PhantomStudy) -> None:
    hu, _ = read_hu(baseline)
    geometry = baseline.geometry
    anatomy = Anatomy(z_extent_mm=geometry.slices * geometry.slice_thickness_mm)
    lesions = label_volume(baseline)
    k = geometry.slices // 2
    clean, labels = anatomy.slice_hu(geometry, k)
    image = hu[k]
    assert np.median(image[labels == 0]) == pytest.approx(-1000, abs=5)
    assert np.median(image[clean == FAT_HU]) == pytest.approx(-100, abs=5)
    assert 40 <= np.median(image[clean == 45.0]) <= 60
    liver = (labels == LIVER) & (lesions[k] == 0)
    assert np.median(image[liver]) == pytest.approx(LIVER_HU, abs=5)
    assert 10 <= np.std(image[liver]) <= 15  # Gaussian noise
    assert image.max() >= 700  # cortical bone
    for index, lesion in enumerate(baseline.lesions, start=1):
        inside = hu[lesions == index]
        assert 40 <= lesion.mean_hu <= 60
        assert inside.mean() == pytest.approx(lesion.mean_hu, abs=3)
    coarse, smooth = (hu[lesions == i].std() for i in (1, 2))
    assert coarse > 2 * smooth


def test_lesions_are_separate_components_inside_the_liver(baseline: PhantomStudy) -> None:
    labels = label_volume(baseline)
    components, count = ndimage.label(labels > 0, structure=CONNECTIVITY_26)
    assert count == len(baseline.lesions) == 3
    geometry = baseline.geometry
    anatomy = Anatomy(z_extent_mm=geometry.slices * geometry.slice_thickness_mm)
    for index, lesion in enumerate(baseline.lesions, start=1):
        assert int((labels == index).sum()) == lesion.voxels
        assert lesion.volume_ml == pytest.approx(lesion.voxels * geometry.voxel_volume_ml)
        assert min(lesion.radii_mm) >= 3.5 and max(lesion.radii_mm) <= 24
        assert len(np.unique(components[labels == index])) == 1
        ks = np.nonzero((labels == index).any(axis=(1, 2)))[0]
        assert ks.min() > 0 and ks.max() < geometry.slices - 1
        for k in ks:
            _, anatomy_labels = anatomy.slice_hu(geometry, int(k))
            assert np.all(anatomy_labels[labels[k] == index] == LIVER)


# --- SEG ----------------------------------------------------------------------------------------------------


def test_seg_holds_the_ground_truth(baseline: PhantomStudy) -> None:
    seg = hd.seg.segread(baseline.seg_file)
    assert seg.SeriesInstanceUID not in (baseline.ct_series_instance_uid, None)
    assert seg.FrameOfReferenceUID == baseline.frame_of_reference_uid
    assert seg.segmentation_type == hd.seg.SegmentationTypeValues.BINARY
    assert seg.number_of_segments == 1
    assert seg.get_segment_description(1).SegmentLabel == "Liver lesions"
    assert seg.get_segment_description(1).SegmentAlgorithmType == "AUTOMATIC"
    mask = read_seg_labels(baseline)
    assert np.array_equal(mask > 0, label_volume(baseline) > 0)
    components, count = ndimage.label(mask, structure=CONNECTIVITY_26)
    assert count == len(baseline.lesions)
    found = sorted(int((components == c).sum()) for c in range(1, count + 1))
    assert found == sorted(lesion.voxels for lesion in baseline.lesions)


def test_seg_and_rtstruct_per_lesion(tmp_path: Path) -> None:
    study = generate_study(
        tmp_path, seed=2, slices=40, rows=128, columns=128, lesions=2, seg_per_lesion=True, rtstruct_per_lesion=True
    )
    seg = hd.seg.segread(study.seg_file)
    assert seg.number_of_segments == 2
    labels = read_seg_labels(study)
    for index, lesion in enumerate(study.lesions, start=1):
        assert int((labels == index).sum()) == lesion.voxels
    rtstruct = pydicom.dcmread(study.rtstruct_file)
    assert [r.ROIName for r in rtstruct.StructureSetROISequence] == ["GTV_Lesion_1", "GTV_Lesion_2"]
    assert dciodvfy_errors(study.seg_file) == []
    assert dciodvfy_errors(study.rtstruct_file) == []


# --- RTSTRUCT -----------------------------------------------------------------------------------------------


def test_rtstruct_contours_lie_on_slices_and_rasterise_to_the_ground_truth(baseline: PhantomStudy) -> None:
    rtstruct = pydicom.dcmread(baseline.rtstruct_file)
    assert rtstruct.Modality == "RTSTRUCT"
    assert [r.ROIName for r in rtstruct.StructureSetROISequence] == ["GTV_Liver_Lesions"]
    frame = rtstruct.ReferencedFrameOfReferenceSequence[0]
    assert frame.FrameOfReferenceUID == baseline.frame_of_reference_uid
    series = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == baseline.ct_series_instance_uid
    assert len(series.ContourImageSequence) == len(baseline.ct_files)
    _, datasets = read_hu(baseline)
    z_of_sop = {d.SOPInstanceUID: float(d.ImagePositionPatient[2]) for d in datasets}
    k_of_z = {z: k for k, z in enumerate(sorted(z_of_sop.values()))}
    geometry = baseline.geometry
    x0, y0, _ = geometry.origin_mm
    extent = (geometry.columns - 1) * geometry.pixel_spacing_mm
    raster = np.zeros(geometry.shape, dtype=np.int32)
    contours = rtstruct.ROIContourSequence[0].ContourSequence
    for contour in contours:
        assert contour.ContourGeometricType == "CLOSED_PLANAR"
        points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
        assert len(points) == contour.NumberOfContourPoints
        sop = contour.ContourImageSequence[0].ReferencedSOPInstanceUID
        assert np.allclose(points[:, 2], z_of_sop[sop])
        assert np.all((points[:, :2] > [x0, y0]) & (points[:, :2] < [x0 + extent, y0 + extent]))
        rows = (points[:, 1] - y0) / geometry.pixel_spacing_mm
        cols = (points[:, 0] - x0) / geometry.pixel_spacing_mm
        rr, cc = fill_polygon(rows, cols, shape=(geometry.rows, geometry.columns))
        raster[k_of_z[float(points[0, 2])], rr, cc] += 1  # even-odd: count the contours covering a pixel
    assert np.array_equal(raster % 2 == 1, label_volume(baseline) > 0)


def test_dicom_objects_pass_dciodvfy(baseline: PhantomStudy, follow_up: PhantomStudy) -> None:
    for path in (
        baseline.ct_files[30],
        baseline.seg_file,
        baseline.rtstruct_file,
        follow_up.ct_files[0],
        follow_up.seg_file,
        follow_up.rtstruct_file,
    ):
        assert path is not None
        assert dciodvfy_errors(path) == [], path


# --- follow-up ----------------------------------------------------------------------------------------------


def test_follow_up_is_the_same_patient_in_a_new_study(baseline: PhantomStudy, follow_up: PhantomStudy) -> None:
    before = pydicom.dcmread(baseline.ct_files[0], stop_before_pixels=True)
    after = pydicom.dcmread(follow_up.ct_files[0], stop_before_pixels=True)
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex"):
        assert after[keyword].value == before[keyword].value
    assert after.StudyInstanceUID == follow_up.study_instance_uid != baseline.study_instance_uid
    assert after.FrameOfReferenceUID == follow_up.frame_of_reference_uid != baseline.frame_of_reference_uid
    assert after.AccessionNumber != before.AccessionNumber
    assert (follow_up.study_date - baseline.study_date).days == 56
    assert after.StudyDate == follow_up.study_date.strftime("%Y%m%d")
    shift = np.asarray(follow_up.body_shift_mm)
    assert 0 < np.abs(shift).max() <= 5
    for old, new in zip(baseline.lesions, follow_up.lesions, strict=True):  # same order: lesion i is lesion i
        assert np.allclose(np.subtract(new.centre_mm, old.centre_mm), shift, atol=1e-5)


def test_follow_up_shrinks_and_homogenises(baseline: PhantomStudy, follow_up: PhantomStudy) -> None:
    labels = read_seg_labels(follow_up)
    truth = label_volume(follow_up)
    assert np.array_equal(labels > 0, truth > 0)
    for index, (old, new) in enumerate(zip(baseline.lesions, follow_up.lesions, strict=True), start=1):
        assert int((truth == index).sum()) == new.voxels
        assert new.volume_ml / old.volume_ml == pytest.approx(0.7, rel=0.15)
        assert new.texture == "smooth"
    hu, _ = read_hu(follow_up)
    baseline_hu, _ = read_hu(baseline)
    baseline_truth = label_volume(baseline)
    assert hu[truth == 1].std() < 0.5 * baseline_hu[baseline_truth == 1].std()  # lesion 1 was coarse


def test_follow_up_growth_and_kept_texture(baseline: PhantomStudy, tmp_path: Path) -> None:
    grown = generate_follow_up(baseline, tmp_path, shrink=1.2, texture_change=None, body_shift_mm=(0, 0, 0), weeks=12)
    assert [le.texture for le in grown.lesions] == ["coarse", "smooth", "coarse"]
    for old, new in zip(baseline.lesions, grown.lesions, strict=True):
        assert new.volume_ml / old.volume_ml == pytest.approx(1.2, rel=0.15)
        assert new.centre_mm == old.centre_mm
    assert (grown.study_date - baseline.study_date).days == 84


# --- transfer syntaxes and pixel representation -------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_pixels(tmp_path_factory: pytest.TempPathFactory) -> list[np.ndarray]:
    study = generate_study(
        tmp_path_factory.mktemp("reference"), seed=3, slices=16, rows=64, columns=64, lesions=1, segmentation="none"
    )
    return [pydicom.dcmread(p).pixel_array for p in study.ct_files]


@pytest.mark.parametrize("transfer_syntax", SUPPORTED_TRANSFER_SYNTAXES, ids=lambda uid: uid.name)
def test_transfer_syntax_round_trips(
    transfer_syntax: pydicom.uid.UID, reference_pixels: list[np.ndarray], tmp_path: Path
) -> None:
    study = generate_study(
        tmp_path,
        seed=3,
        slices=16,
        rows=64,
        columns=64,
        lesions=1,
        segmentation="none",
        transfer_syntax=transfer_syntax,
    )
    for path, expected in zip(study.ct_files, reference_pixels, strict=True):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == transfer_syntax
        assert np.array_equal(ds.pixel_array, expected)
    checked = study.ct_files[0]
    if transfer_syntax == pydicom.uid.DeflatedExplicitVRLittleEndian:
        # dciodvfy cannot inflate; let DCMTK read the deflated file and validate the re-encoded copy.
        if shutil.which("dcmconv") is None:
            pytest.skip("dcmconv (DCMTK) is not on PATH")
        checked = tmp_path / "inflated.dcm"
        subprocess.run(["dcmconv", "+te", str(study.ct_files[0]), str(checked)], check=True)
    assert dciodvfy_errors(checked) == []


def test_signed_pixels_store_the_same_hounsfield_units(baseline: PhantomStudy, tmp_path: Path) -> None:
    study = generate_study(
        tmp_path, seed=3, slices=16, rows=64, columns=64, lesions=1, segmentation="none", signed_pixels=True
    )
    unsigned = generate_study(tmp_path / "u", seed=3, slices=16, rows=64, columns=64, lesions=1, segmentation="none")
    signed_ds, unsigned_ds = pydicom.dcmread(study.ct_files[5]), pydicom.dcmread(unsigned.ct_files[5])
    assert signed_ds.PixelRepresentation == 1 and signed_ds.pixel_array.dtype == np.int16
    to_hu = lambda d: d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept)  # noqa: E731
    assert np.array_equal(to_hu(signed_ds), to_hu(unsigned_ds))
    assert dciodvfy_errors(study.ct_files[5]) == []


# --- argument validation and CLI ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lesion_texture": "grainy"}, "lesion_texture must be one of"),
        ({"lesion_texture": ["coarse"]}, "1 entries for 3 lesions"),
        ({"segmentation": "mesh"}, "segmentation must be"),
        ({"transfer_syntax": "1.2.840.10008.1.2.4.50"}, "not supported"),
        ({"slices": 2}, "at least 3 x 64 x 64"),
        ({"lesions": -1}, "must not be negative"),
        ({"lesion_scale": 0}, "lesion_scale must be positive"),
        ({"lesions": 40, "slices": 30}, "cannot place lesion"),
    ],
)
def test_invalid_arguments_are_refused(kwargs: dict[str, object], message: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message):
        generate_study(tmp_path, rows=64, columns=64, **kwargs)  # type: ignore[arg-type]


def test_invalid_follow_up_arguments_are_refused(baseline: PhantomStudy, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="shrink must be positive"):
        generate_follow_up(baseline, tmp_path, shrink=0)
    with pytest.raises(ValueError, match="texture_change must be"):
        generate_follow_up(baseline, tmp_path, texture_change="sharpen")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cannot be drawn"):
        generate_follow_up(baseline, tmp_path, shrink=30.0)


def test_cli_writes_baseline_and_follow_up_without_phi(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "--out",
            str(tmp_path),
            "--seed",
            "9",
            "--lesions",
            "2",
            "--slices",
            "40",
            "--size",
            "128",
            "--follow-up",
            "--segmentation",
            "seg",
        ]
    )
    assert code == 0
    assert len(list((tmp_path / "baseline" / "CT").glob("*.dcm"))) == 40
    assert (tmp_path / "follow-up" / "SEG" / "seg.dcm").is_file()
    assert not (tmp_path / "baseline" / "RTSTRUCT").exists()
    output = capsys.readouterr().out
    patient = pydicom.dcmread(next((tmp_path / "baseline" / "CT").glob("*.dcm")), stop_before_pixels=True)
    assert str(patient.PatientName) not in output and patient.PatientID not in output
    assert "follow-up" in output


def test_cli_reports_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path), "--slices", "1"])
    assert exit_info.value.code == 2
    assert "at least 3" in capsys.readouterr().err
