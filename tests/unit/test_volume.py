"""CT series -> HU volume: geometry, ordering, decoding and every rejection path."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import JPEGLSLossless, RLELossless, generate_uid

from inference.imaging.volume import CTVolume, VolumeError, load_ct_series, volume_from_image
from pacs_agent.errors import InputError
from tests.dicom_factory import write_ct_series

DATA = Path(__file__).parents[2] / ".." / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared test data not found at {DATA}")


def _assert_geometry(vol: CTVolume, series) -> None:
    assert vol.image.GetOrigin() == pytest.approx(series.origin, abs=1e-6)
    assert vol.image.GetSpacing() == pytest.approx(series.spacing_xyz, abs=1e-6)
    assert np.asarray(vol.image.GetDirection()).reshape(3, 3) == pytest.approx(series.direction, abs=1e-6)
    np.testing.assert_array_equal(vol.array, series.hu)
    assert vol.array.dtype == np.float32
    assert vol.series_instance_uid == series.series_uid
    assert vol.study_instance_uid == series.study_uid
    assert vol.frame_of_reference_uid == series.for_uid


def test_axial_series_loads_with_exact_geometry(tmp_path: Path) -> None:
    series = write_ct_series(tmp_path, slope=2.0, intercept=-1000.0)
    vol = load_ct_series(series.paths)
    _assert_geometry(vol, series)
    assert vol.sop_instance_uids == tuple(ds.SOPInstanceUID for ds in series.datasets)
    assert vol.positions_mm[2] == pytest.approx((-10.0, -20.0, 35.0))
    # array and image are the same data
    np.testing.assert_array_equal(sitk.GetArrayFromImage(vol.image), vol.array)
    # index <-> mm round trip, and index (1, 2, 3) in patient space
    pt = vol.index_to_mm(np.array([1.0, 2.0, 3.0]))
    assert pt[0] == pytest.approx(vol.image.TransformContinuousIndexToPhysicalPoint((1.0, 2.0, 3.0)))
    assert vol.mm_to_index(pt)[0] == pytest.approx([1.0, 2.0, 3.0])


def test_file_order_and_instance_numbers_do_not_matter(tmp_path: Path) -> None:
    series = write_ct_series(tmp_path, n_slices=7, instance_numbers=[7, 6, 5, 4, 3, 2, 1])
    shuffled = list(series.paths)
    random.Random(3).shuffle(shuffled)
    a = load_ct_series(series.paths)
    b = load_ct_series(shuffled)
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_array_equal(a.array, series.hu)
    assert a.sop_instance_uids == b.sop_instance_uids


def test_feet_first_order_sorts_along_normal(tmp_path: Path) -> None:
    # slices written from top to bottom: the volume still runs along +normal
    positions = [(0.0, 0.0, 50.0 - 2.0 * k) for k in range(4)]
    series = write_ct_series(tmp_path, positions=positions)
    vol = load_ct_series(series.paths)
    assert vol.image.GetOrigin() == pytest.approx((0.0, 0.0, 44.0))
    np.testing.assert_array_equal(vol.array, series.hu[::-1])


def test_tilted_orientation_gives_its_direction(tmp_path: Path) -> None:
    # rows along x rotated 20 deg about z; columns tilted 0.3 rad out of the axial plane
    angle = np.deg2rad(20)
    row = np.array([np.cos(angle), np.sin(angle), 0.0])
    col = np.array([0.0, np.cos(0.3), np.sin(0.3)])
    col = col - (col @ row) * row
    col = col / np.linalg.norm(col)
    series = write_ct_series(tmp_path, orientation=(*row, *col), slice_spacing=1.5)
    vol = load_ct_series(series.paths)
    _assert_geometry(vol, series)
    # slice 3 centre pixel lands where DICOM says it is
    ds = series.datasets[3]
    ipp = np.asarray([float(v) for v in ds.ImagePositionPatient])
    expected = ipp + 5 * 0.7 * row + 4 * 0.8 * col
    assert vol.image.TransformIndexToPhysicalPoint((5, 4, 3)) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless])
def test_compressed_transfer_syntaxes_decode(tmp_path: Path, syntax: str) -> None:
    series = write_ct_series(tmp_path, transfer_syntax=syntax)
    assert pydicom.dcmread(series.paths[0]).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(load_ct_series(series.paths).array, series.hu)


def test_volume_from_image_keeps_geometry() -> None:
    img = sitk.Image(4, 5, 6, sitk.sitkInt32)
    img.SetSpacing((0.5, 0.6, 2.0))
    img.SetOrigin((1.0, 2.0, 3.0))
    vol = volume_from_image(img, series_instance_uid="1.2.3")
    assert vol.array.shape == (6, 5, 4)
    assert vol.array.dtype == np.float32
    assert vol.positions_mm[1] == pytest.approx((1.0, 2.0, 5.0))
    assert vol.voxel_volume_mm3 == pytest.approx(0.6)
    with pytest.raises(ValueError, match="UIDs"):
        volume_from_image(img, sop_instance_uids=["1"])
    with pytest.raises(ValueError, match="3D"):
        volume_from_image(sitk.Image(4, 5, sitk.sitkFloat32))


# ---- rejection paths -----------------------------------------------------------------------------


def test_errors_are_input_errors() -> None:
    assert issubclass(VolumeError, InputError)


def test_rejects_empty_list() -> None:
    with pytest.raises(VolumeError, match="no files"):
        load_ct_series([])


def test_rejects_non_dicom(tmp_path: Path) -> None:
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    with pytest.raises(VolumeError, match=r"cannot read notes\.txt"):
        load_ct_series([bad])


def test_rejects_mixed_orientation(tmp_path: Path) -> None:
    oris = [(1, 0, 0, 0, 1, 0)] * 4 + [(1, 0, 0, 0, 0, -1)]
    series = write_ct_series(tmp_path, orientations=oris)
    with pytest.raises(VolumeError, match="2 different orientations"):
        load_ct_series(series.paths)


def test_rejects_duplicate_positions(tmp_path: Path) -> None:
    positions = [(0, 0, 0), (0, 0, 2), (0, 0, 2), (0, 0, 4)]
    series = write_ct_series(tmp_path, positions=positions)
    with pytest.raises(VolumeError, match=r"share the position 2\.000 mm"):
        load_ct_series(series.paths)


def test_rejects_gap(tmp_path: Path) -> None:
    positions = [(0, 0, 0), (0, 0, 2), (0, 0, 4), (0, 0, 8), (0, 0, 10)]
    series = write_ct_series(tmp_path, positions=positions)
    with pytest.raises(VolumeError, match=r"missing slices: a gap of 4\.000 mm between 4\.000 and 8\.000"):
        load_ct_series(series.paths)


def test_accepts_gap_just_below_limit_but_rejects_non_uniform(tmp_path: Path) -> None:
    positions = [(0, 0, 0), (0, 0, 2), (0, 0, 4), (0, 0, 6.9), (0, 0, 8.9)]
    series = write_ct_series(tmp_path, positions=positions)
    with pytest.raises(VolumeError, match="not uniform"):
        load_ct_series(series.paths)


def test_tolerates_rounding_jitter_in_positions(tmp_path: Path) -> None:
    positions = [(0, 0, 0), (0, 0, 1.2501), (0, 0, 2.4999), (0, 0, 3.75)]
    vol = load_ct_series(write_ct_series(tmp_path, positions=positions).paths)
    assert vol.image.GetSpacing()[2] == pytest.approx(1.25)


def test_rejects_sheared_stack(tmp_path: Path) -> None:
    positions = [(0, 0.5 * k, 2.0 * k) for k in range(4)]  # gantry tilt: y drifts with z
    series = write_ct_series(tmp_path, positions=positions)
    with pytest.raises(VolumeError, match="gantry tilt"):
        load_ct_series(series.paths)


def test_rejects_too_few_slices(tmp_path: Path) -> None:
    series = write_ct_series(tmp_path, n_slices=2)
    with pytest.raises(VolumeError, match="only 2 slice"):
        load_ct_series(series.paths)


def test_rejects_missing_pixel_data(tmp_path: Path) -> None:
    series = write_ct_series(tmp_path, drop=["PixelData"])
    with pytest.raises(VolumeError, match="has no pixel data"):
        load_ct_series(series.paths)


def test_rejects_missing_geometry(tmp_path: Path) -> None:
    series = write_ct_series(tmp_path, drop=["ImagePositionPatient"])
    with pytest.raises(VolumeError, match="lacks Image"):
        load_ct_series(series.paths)


def test_rejects_non_ct(tmp_path: Path) -> None:
    series = write_ct_series(tmp_path, modality="MR")
    with pytest.raises(VolumeError, match="modality is MR, not CT"):
        load_ct_series(series.paths)


def test_rejects_mixed_series(tmp_path: Path) -> None:
    uids = [generate_uid(), generate_uid()]
    series = write_ct_series(tmp_path, n_slices=4, series_uids=[uids[0], uids[0], uids[1], uids[1]])
    with pytest.raises(VolumeError, match="2 different Series Instance UIDs"):
        load_ct_series(series.paths)


def test_rejects_mixed_matrix_size(tmp_path: Path) -> None:
    a = write_ct_series(tmp_path / "a", n_slices=3)
    b = write_ct_series(tmp_path / "b", rows=8, positions=[(-10, -20, 37.5)], study_uid=a.study_uid, for_uid=a.for_uid)
    ds = pydicom.dcmread(b.paths[0])
    ds.SeriesInstanceUID = a.series_uid
    ds.save_as(b.paths[0])
    with pytest.raises(VolumeError, match="different matrix sizes"):
        load_ct_series([*a.paths, b.paths[0]])


def test_rejects_undecodable_pixel_data(tmp_path: Path) -> None:
    series = write_ct_series(tmp_path, n_slices=3)
    ds = pydicom.dcmread(series.paths[1])
    ds.PixelData = ds.PixelData[:10]  # truncated
    ds.save_as(series.paths[1])
    with pytest.raises(VolumeError, match="cannot decode the pixel data"):
        load_ct_series(series.paths)


# ---- real data ----------------------------------------------------------------------------------


@needs_data
def test_real_three_slice_ct_loads() -> None:
    folder = DATA / "dicom_ct_seg" / "dcmqi_ct3slice_liver"
    vol = load_ct_series(sorted(folder.glob("0?.dcm")))
    assert vol.shape == (3, 512, 512)
    assert vol.image.GetSpacing() == pytest.approx((0.810547, 0.810547, 1.0))
    assert vol.image.GetOrigin() == pytest.approx((-235.199997, -226.800003, -128.690002))
    assert vol.sop_instance_uids[0].endswith(".23433.1")  # lowest z first, despite InstanceNumber 3
    assert -1100 < float(np.median(vol.array)) < 200  # HU, not stored values


@needs_data
def test_real_series_with_a_gap_is_rejected() -> None:
    # pydicom's CT2 series: one slice at z=-99.5 and three at z=103..105.5
    with pytest.raises(VolumeError, match="missing slices"):
        load_ct_series(sorted((DATA / "dicom_ct_seg" / "pydicom_CT2").glob("17*")))


def test_array_outlives_a_temporary_volume(tmp_path: Path) -> None:
    import gc

    series = write_ct_series(tmp_path, n_slices=3)
    array = load_ct_series(series.paths).array  # the CTVolume is gone after this line
    gc.collect()
    _ = [np.ones((64, 64), np.float32) for _ in range(50)]  # reuse freed memory if any
    np.testing.assert_array_equal(array, series.hu)
    assert not array.flags.writeable


def test_enhanced_multiframe_ct_loads(tmp_path: Path) -> None:
    import highdicom as hd

    series = write_ct_series(tmp_path / "ct", slope=2.0, intercept=-1000.0, orientation=(0.6, 0.8, 0, 0, 0, -1))
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy_datasets=series.datasets[::-1],
        series_instance_uid=generate_uid(),
        series_number=9,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    enhanced.save_as(tmp_path / "enhanced.dcm")
    vol = load_ct_series([tmp_path / "enhanced.dcm"])
    np.testing.assert_array_equal(vol.array, series.hu)
    assert vol.image.GetOrigin() == pytest.approx(series.origin)
    assert vol.image.GetSpacing() == pytest.approx(series.spacing_xyz)
    assert np.asarray(vol.image.GetDirection()).reshape(3, 3) == pytest.approx(series.direction)
    assert vol.sop_instance_uids == (enhanced.SOPInstanceUID,) * 5


def test_tiny_in_plane_drift_from_rounding_is_tolerated(tmp_path: Path) -> None:
    drift = [(0.002 * k, 0.0, 2.0 * k) for k in range(6)]  # 0.01 mm over 10 mm: rounded cosines
    assert load_ct_series(write_ct_series(tmp_path, positions=drift).paths).shape[0] == 6
