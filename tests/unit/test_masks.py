"""SEG / RTSTRUCT -> masks on the CT grid: real objects, synthetic ones, every error path."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from inference.imaging.masks import LabelMask, SegmentationError, load_segmentation, referenced_series_uids
from inference.imaging.volume import CTVolume, load_ct_series, volume_from_image
from pacs_agent.errors import InputError
from tests.dicom_factory import Series, make_seg, write_ct_series, write_rtstruct

DATA = Path(__file__).parents[2] / ".." / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared test data not found at {DATA}")
LIVER = DATA / "dicom_ct_seg" / "dcmqi_ct3slice_liver"
HD = DATA / "dicom_ct_seg" / "highdicom"
IBSI = DATA / "ibsi" / "ibsi_validation"


def _labelmap(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture(scope="module")
def liver_ct() -> CTVolume:
    if not DATA.is_dir():
        pytest.skip(f"shared test data not found at {DATA}")
    return load_ct_series(sorted(LIVER.glob("0?.dcm")))


@pytest.fixture(scope="module")
def ct2() -> CTVolume:
    """pydicom's CT2 series without its lone far-away slice (z=-99.5): 3 contiguous slices."""
    if not DATA.is_dir():
        pytest.skip(f"shared test data not found at {DATA}")
    return load_ct_series(sorted((DATA / "dicom_ct_seg" / "pydicom_CT2").glob("17*"))[1:])


@pytest.fixture
def series(tmp_path: Path) -> Series:
    return write_ct_series(tmp_path / "ct", n_slices=5)


# ---- real SEGs ----------------------------------------------------------------------------------


@needs_data
def test_dcmqi_liver_seg_matches_its_source_labelmap(liver_ct: CTVolume) -> None:
    masks = load_segmentation(LIVER / "liver.dcm", liver_ct)
    assert len(masks) == 1
    m = masks[0]
    assert m.ok and m.source.kind == "seg" and m.source.label == "Liver" and m.source.number == 1
    assert m.mask.shape == liver_ct.shape and m.mask.dtype == bool
    np.testing.assert_array_equal(m.mask, _labelmap(LIVER / "liver_seg.nrrd") == 1)
    assert m.mask.sum() == 36233 + 35645 + 35220


@needs_data
def test_dcmqi_overlapping_segments_match_source_labelmaps(liver_ct: CTVolume) -> None:
    masks = load_segmentation(LIVER / "partial_overlaps.dcm", liver_ct)
    assert [m.source.label for m in masks] == ["GREEN", "ORANGE", "PURPLE", "LIGHT_BLUE", "DARK_BLUE"]
    maps = {n: _labelmap(LIVER / f"partial_overlaps-{n}.nrrd") for n in (1, 2, 3)}
    expected = {1: maps[1] == 1, 2: maps[2] == 2, 3: maps[3] == 3, 4: maps[1] == 4, 5: maps[1] == 5}
    for m in masks:
        np.testing.assert_array_equal(m.mask, expected[m.source.number], err_msg=m.source.label)
    assert (masks[0].mask & masks[1].mask).any()  # the segments really overlap


@needs_data
@pytest.mark.parametrize(
    "name", ["seg_image_ct_binary.dcm", "seg_image_ct_binary_fractional.dcm", "seg_image_ct_true_fractional.dcm"]
)
def test_highdicom_segs_on_tiny_ct(ct2: CTVolume, name: str) -> None:
    (m,) = load_segmentation(HD / name, ct2)
    assert m.ok and m.source.label == "first segment"
    assert m.mask.sum(axis=(1, 2)).tolist() == [127, 256, 255]


@needs_data
def test_fractional_threshold_changes_the_mask(ct2: CTVolume) -> None:
    # stored values are 0, 64 and 128 of 255
    path = HD / "seg_image_ct_true_fractional.dcm"
    low = load_segmentation(path, ct2, fractional_threshold=0.2)[0].mask
    mid = load_segmentation(path, ct2, fractional_threshold=0.5)[0].mask
    assert (low.sum(), mid.sum()) == (661, 638)
    assert not (mid & ~low).any()
    with pytest.raises(SegmentationError, match="is empty on this CT"):
        load_segmentation(path, ct2, fractional_threshold=0.6)
    with pytest.raises(ValueError, match="fractional_threshold"):
        load_segmentation(path, ct2, fractional_threshold=0.0)


@needs_data
def test_segment_off_the_volume_is_a_problem(ct2: CTVolume) -> None:
    # both segments also cover the slice at z=-99.5 that is not part of the volume
    with pytest.raises(SegmentationError, match="has pixels outside the CT volume"):
        load_segmentation(HD / "seg_image_ct_binary_overlap.dcm", ct2)


@needs_data
def test_single_frame_seg_maps_by_plane_position() -> None:
    ct = pydicom.dcmread(HD / "ct_image.dcm")
    img = sitk.Image(int(ct.Columns), int(ct.Rows), 3, sitk.sitkFloat32)
    spacing = float(ct.PixelSpacing[0])
    img.SetSpacing((spacing, spacing, 5.0))
    x, y, z = (float(v) for v in ct.ImagePositionPatient)
    img.SetOrigin((x, y, z - 5.0))  # the CT slice is index 1 of this volume
    vol = volume_from_image(
        img, series_instance_uid=ct.SeriesInstanceUID, frame_of_reference_uid=ct.FrameOfReferenceUID
    )
    (m,) = load_segmentation(HD / "seg_image_ct_binary_single_frame.dcm", vol)
    counts = m.mask.sum(axis=(1, 2))
    assert counts[0] == 0 and counts[2] == 0 and counts[1] > 0


# ---- synthetic SEGs -----------------------------------------------------------------------------


def _blob(shape: tuple[int, ...]) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[1:4, 3:9, 2:7] = True
    m[2, 5, 9] = True
    return m


def test_synthetic_seg_round_trips_in_any_file_order(series: Series) -> None:
    blob = _blob(series.hu.shape)
    seg = make_seg(series, {"tumour": blob, "other": ~blob})
    vol = load_ct_series(series.paths[::-1])
    a, b = load_segmentation(seg, vol)
    np.testing.assert_array_equal(a.mask, blob)
    np.testing.assert_array_equal(b.mask, ~blob)
    assert (a.source.number, b.source.label) == (1, "other")
    assert a.source.sop_instance_uid == seg.SOPInstanceUID


def test_synthetic_seg_from_file(series: Series, tmp_path: Path) -> None:
    seg = make_seg(series, {"tumour": _blob(series.hu.shape)})
    seg.save_as(tmp_path / "seg.dcm")
    (m,) = load_segmentation(tmp_path / "seg.dcm", load_ct_series(series.paths))
    np.testing.assert_array_equal(m.mask, _blob(series.hu.shape))


def test_empty_segment_is_reported_and_others_returned(series: Series) -> None:
    blob = _blob(series.hu.shape)
    seg = make_seg(series, {"tumour": blob, "nothing": np.zeros_like(blob)})
    masks = load_segmentation(seg, load_ct_series(series.paths))
    assert masks[0].ok
    assert not masks[1].ok and "segment 2 (nothing) is empty" in str(masks[1].problem)
    assert not masks[1].mask.any()


def test_all_segments_empty_raises(series: Series) -> None:
    seg = make_seg(series, {"nothing": np.zeros(series.hu.shape, bool)})
    with pytest.raises(SegmentationError, match="no usable segment"):
        load_segmentation(seg, load_ct_series(series.paths))


@pytest.mark.parametrize("damage", ["frames missing", "no Segment Sequence", "no per-frame groups"])
def test_malformed_seg_is_a_segmentation_error(series: Series, tmp_path: Path, damage: str) -> None:
    """A broken SEG is bad input (the job fails at once with the reason), never an unexpected crash."""
    seg = make_seg(series, {"tumour": _blob(series.hu.shape)})
    seg.save_as(tmp_path / "seg.dcm")
    ds = pydicom.dcmread(tmp_path / "seg.dcm")
    if damage == "frames missing":
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
    elif damage == "no Segment Sequence":
        del ds.SegmentSequence
    else:
        del ds.PerFrameFunctionalGroupsSequence
    with pytest.raises(SegmentationError, match="is malformed and cannot be decoded"):
        load_segmentation(ds, load_ct_series(series.paths))


def test_seg_of_another_frame_of_reference_raises(series: Series) -> None:
    seg = make_seg(series, {"tumour": _blob(series.hu.shape)})
    seg.FrameOfReferenceUID = "1.2.3.4"
    with pytest.raises(SegmentationError, match=r"frame of reference 1\.2\.3\.4.*not drawn on this CT"):
        load_segmentation(seg, load_ct_series(series.paths))


def test_seg_naming_another_series_of_the_same_frame_of_reference_is_placed_by_geometry(series: Series) -> None:
    blob = _blob(series.hu.shape)
    seg = make_seg(series, {"tumour": blob})
    seg.ReferencedSeriesSequence[0].SeriesInstanceUID = "1.2.3.4"
    (mask,) = load_segmentation(seg, load_ct_series(series.paths))
    np.testing.assert_array_equal(mask.mask, blob)


def test_seg_of_another_series_without_frame_of_reference_raises(series: Series) -> None:
    seg = make_seg(series, {"tumour": _blob(series.hu.shape)})
    seg.ReferencedSeriesSequence[0].SeriesInstanceUID = "1.2.3.4"
    del seg.FrameOfReferenceUID
    with pytest.raises(SegmentationError, match=r"refers to series 1\.2\.3\.4"):
        load_segmentation(seg, load_ct_series(series.paths))


def test_only_the_requested_segments_are_rasterised(series: Series) -> None:
    blob = _blob(series.hu.shape)
    other = np.zeros_like(blob)
    other[4, 10:14, 1:3] = True
    seg = make_seg(series, {"organ": other, "tumour": blob})
    (tumour,) = load_segmentation(seg, load_ct_series(series.paths), numbers=[2])
    assert tumour.source.number == 2
    np.testing.assert_array_equal(tumour.mask, blob)


def test_seg_with_other_pixel_spacing_raises(series: Series) -> None:
    seg = make_seg(series, {"tumour": _blob(series.hu.shape)})
    seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing = [1.6, 1.4]
    with pytest.raises(SegmentationError, match="pixel spacing"):
        load_segmentation(seg, load_ct_series(series.paths))


def test_seg_frame_between_slices_raises(series: Series) -> None:
    seg = make_seg(series, {"tumour": _blob(series.hu.shape)})
    for frame in seg.PerFrameFunctionalGroupsSequence:
        pos = frame.PlanePositionSequence[0]
        pos.ImagePositionPatient = [*pos.ImagePositionPatient[:2], float(pos.ImagePositionPatient[2]) + 1.25]
    with pytest.raises(SegmentationError, match="lies between CT voxels"):
        load_segmentation(seg, load_ct_series(series.paths))


def test_not_a_segmentation_raises(series: Series, tmp_path: Path) -> None:
    vol = load_ct_series(series.paths)
    with pytest.raises(SegmentationError, match="not a DICOM SEG or RTSTRUCT"):
        load_segmentation(series.paths[0], vol)
    (tmp_path / "x.dcm").write_bytes(b"garbage")
    with pytest.raises(SegmentationError, match=r"cannot read x\.dcm"):
        load_segmentation(tmp_path / "x.dcm", vol)
    assert issubclass(SegmentationError, InputError)


def test_referenced_series_uids(series: Series, tmp_path: Path) -> None:
    seg = make_seg(series, {"tumour": _blob(series.hu.shape)})
    assert referenced_series_uids(seg) == {series.series_uid}
    rt = pydicom.dcmread(write_rtstruct(tmp_path / "rs.dcm", series, {"a": []}))
    assert referenced_series_uids(rt) == {series.series_uid}
    assert referenced_series_uids(pydicom.Dataset()) == set()


# ---- RTSTRUCT -----------------------------------------------------------------------------------


def _square(vol: CTVolume, x0: float, x1: float, y0: float, y1: float, k: float) -> np.ndarray:
    """Closed square given in continuous voxel indices, returned in patient mm."""
    idx = np.array([[x0, y0, k], [x1, y0, k], [x1, y1, k], [x0, y1, k]])
    return vol.index_to_mm(idx)


def test_rtstruct_hole_gives_a_ring(series: Series, tmp_path: Path) -> None:
    vol = load_ct_series(series.paths)
    outer = _square(vol, 0.5, 10.5, 0.5, 14.5, 2)
    inner = _square(vol, 3.5, 7.5, 4.5, 10.5, 2)
    path = write_rtstruct(tmp_path / "rs.dcm", series, {"ring": [outer, inner]})
    (m,) = load_segmentation(path, vol)
    expected = np.zeros(vol.shape, bool)
    expected[2, 1:15, 1:11] = True
    expected[2, 5:11, 4:8] = False
    np.testing.assert_array_equal(m.mask, expected)
    assert m.source.kind == "rtstruct" and m.source.label == "ring" and m.source.number == 1


def test_rtstruct_contour_between_slices_goes_to_nearest(series: Series, tmp_path: Path) -> None:
    vol = load_ct_series(series.paths)
    path = write_rtstruct(tmp_path / "rs.dcm", series, {"a": [_square(vol, 0.5, 3.5, 0.5, 3.5, 1.4)]})
    (m,) = load_segmentation(path, vol)
    assert m.mask.sum(axis=(1, 2)).tolist() == [0, 9, 0, 0, 0]


def test_rtstruct_problems_per_roi(series: Series, tmp_path: Path) -> None:
    vol = load_ct_series(series.paths)
    good = _square(vol, 0.5, 3.5, 0.5, 3.5, 1)
    tilted = good.copy()
    tilted[0] += vol.direction[:, 2] * 2.0  # one point off the slice plane
    rois = {
        "good": [good],
        "outside": [_square(vol, 0.5, 3.5, 0.5, 3.5, 7)],
        "beyond_fov": [_square(vol, 5, 30, 0.5, 3.5, 1)],
        "tilted": [tilted],
        "tiny": [_square(vol, 0.1, 0.4, 0.1, 0.4, 1)],
        "no_contours": [],
    }
    masks = load_segmentation(write_rtstruct(tmp_path / "rs.dcm", series, rois), vol)
    problems = {m.source.label: m.problem for m in masks}
    assert problems["good"] is None
    assert "outside the CT volume" in str(problems["outside"])
    assert "beyond the CT field of view" in str(problems["beyond_fov"])
    assert "not parallel to the CT slices" in str(problems["tilted"])
    assert "is empty on this CT" in str(problems["tiny"])
    assert "no closed planar contour" in str(problems["no_contours"])
    assert all(not m.mask.any() for m in masks if not m.ok)


def test_rtstruct_open_contour_is_a_problem(series: Series, tmp_path: Path) -> None:
    vol = load_ct_series(series.paths)
    path = write_rtstruct(
        tmp_path / "rs.dcm", series, {"line": [_square(vol, 0.5, 3.5, 0.5, 3.5, 1)]}, geometric_type="OPEN_PLANAR"
    )
    with pytest.raises(SegmentationError, match="type OPEN_PLANAR"):
        load_segmentation(path, vol)


def test_rtstruct_of_another_frame_of_reference_raises(series: Series, tmp_path: Path) -> None:
    vol = load_ct_series(series.paths)
    path = write_rtstruct(tmp_path / "rs.dcm", series, {"a": [_square(vol, 0, 3, 0, 3, 1)]}, for_uid="1.2.3")
    with pytest.raises(SegmentationError, match=r"frame of reference 1\.2\.3"):
        load_segmentation(path, vol)


def test_rtstruct_naming_another_series_of_the_same_frame_of_reference_is_placed_by_geometry(
    series: Series, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A re-exported or anonymised CT keeps its frame of reference but not its Series Instance UID."""
    vol = load_ct_series(series.paths)
    square = _square(vol, 0.5, 3.5, 0.5, 3.5, 1)
    path = write_rtstruct(tmp_path / "rs.dcm", series, {"a": [square]}, referenced_series_uid="1.2.3")
    (mask,) = load_segmentation(path, vol)
    assert mask.ok and mask.mask.sum() == 9
    assert "refers to series 1.2.3" in caplog.text and "placed by its frame of reference" in caplog.text


def test_rtstruct_roi_in_other_frame_of_reference_is_a_problem(series: Series, tmp_path: Path) -> None:
    vol = load_ct_series(series.paths)
    ds = pydicom.dcmread(
        write_rtstruct(tmp_path / "rs.dcm", series, {"a": [_square(vol, 0.5, 3.5, 0.5, 3.5, 1)]} | {"b": []})
    )
    ds = copy.deepcopy(ds)
    ds.StructureSetROISequence[1].ReferencedFrameOfReferenceUID = "1.2.3"
    a, b = load_segmentation(ds, vol)
    assert a.ok and "frame of reference 1.2.3" in str(b.problem)


@needs_data
def test_ibsi_rtstruct_matches_ibsi_mask() -> None:
    vol = load_ct_series(sorted((IBSI / "dicom" / "STS_001" / "CT" / "image").glob("*.dcm")))
    masks: list[LabelMask] = load_segmentation(IBSI / "dicom" / "STS_001" / "CT" / "mask" / "RS.dcm", vol)
    assert [m.source.label for m in masks] == ["GTV_Mass_CT"]
    ref_img = sitk.ReadImage(str(IBSI / "nifti" / "STS_001" / "CT_mask.nii.gz"))
    # same grid: compare geometry before comparing voxels
    assert ref_img.GetSize() == vol.image.GetSize()
    assert ref_img.GetOrigin() == pytest.approx(vol.image.GetOrigin(), abs=1e-3)
    assert ref_img.GetSpacing() == pytest.approx(vol.image.GetSpacing(), abs=1e-5)
    assert ref_img.GetDirection() == pytest.approx(vol.image.GetDirection(), abs=1e-6)
    ref = sitk.GetArrayFromImage(ref_img) > 0
    ours = masks[0].mask
    dice = 2 * (ref & ours).sum() / (ref.sum() + ours.sum())
    assert dice >= 0.98, f"Dice {dice:.4f}: ours {ours.sum()} voxels, IBSI {ref.sum()}"
    # the CT itself matches the IBSI NIfTI voxel for voxel (HU, ordering, geometry)
    ibsi_ct = sitk.ReadImage(str(IBSI / "nifti" / "STS_001" / "CT_image.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ibsi_ct), vol.array)


def test_rtstruct_malformed_contour_data_raises(series: Series, tmp_path: Path) -> None:
    vol = load_ct_series(series.paths)
    path = write_rtstruct(tmp_path / "rs.dcm", series, {"a": [_square(vol, 0.5, 3.5, 0.5, 3.5, 1)]})
    ds = pydicom.dcmread(path)
    ds.ROIContourSequence[0].ContourSequence[0].ContourData = ["1.0", "2.0", "3.0", "4.0"]
    with pytest.raises(SegmentationError, match=r"not a list of \(x, y, z\) points"):
        load_segmentation(ds, vol)
    ds.save_as(path)
    raw = path.read_bytes().replace(b"1.0\\2.0\\3.0\\4.0", b"1.0\\2.0\\3.0\\x.y")
    path.write_bytes(raw)
    with pytest.raises(SegmentationError, match="not numeric"):
        load_segmentation(path, vol)


def test_rtstruct_from_thinner_slices_unions_planes(series: Series, tmp_path: Path) -> None:
    # contours every 0.4 slice: two planes land on slice 1, each with its own square (no XOR between them)
    vol = load_ct_series(series.paths)
    a = _square(vol, 0.5, 3.5, 0.5, 3.5, 0.8)
    b = _square(vol, 2.5, 5.5, 0.5, 3.5, 1.2)  # overlaps a in columns 3
    hole_in_b = _square(vol, 3.5, 4.5, 1.5, 2.5, 1.2)
    (m,) = load_segmentation(write_rtstruct(tmp_path / "rs.dcm", series, {"a": [a, b, hole_in_b]}), vol)
    expected = np.zeros(vol.shape, bool)
    expected[1, 1:4, 1:4] = True
    expected[1, 1:4, 3:6] = True
    expected[1, 2, 4] = False  # hole of b, outside a
    np.testing.assert_array_equal(m.mask, expected)


def test_labelmap_seg(series: Series) -> None:
    blob = _blob(series.hu.shape)
    other = np.zeros_like(blob)
    other[4, 10:14, 1:3] = True
    seg = make_seg(series, {"tumour": blob, "other": other}, labelmap=True)
    assert seg.SegmentationType == "LABELMAP"
    a, b = load_segmentation(seg, load_ct_series(series.paths))
    np.testing.assert_array_equal(a.mask, blob)
    np.testing.assert_array_equal(b.mask, other)


def test_fractional_synthetic_seg(series: Series) -> None:
    soft = np.zeros(series.hu.shape, np.float32)
    soft[2, 2:6, 2:6] = 0.3
    soft[2, 3:5, 3:5] = 0.8
    seg = make_seg(series, {"soft": soft}, fractional=True)
    vol = load_ct_series(series.paths)
    assert load_segmentation(seg, vol)[0].mask.sum() == 4
    assert load_segmentation(seg, vol, fractional_threshold=0.25)[0].mask.sum() == 16
