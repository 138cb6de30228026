"""Lesions: connected components, ordering, volume, diameter, centroid, outlines."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from inference.imaging.lesions import find_lesions, outline_mm
from inference.imaging.masks import LabelMask, SegmentationError
from inference.imaging.volume import CTVolume, volume_from_image
from inference.results import SegmentationSource

SOURCE = SegmentationSource("seg", "1.2.3", "1.2.840.10008.5.1.4.1.1.66.4", "1.2.4", 1, "Tumour")


def _volume(shape_zyx: tuple[int, int, int], spacing_xyz=(0.7, 0.8, 2.0), origin=(-50.0, 20.0, 100.0)) -> CTVolume:
    img = sitk.Image(shape_zyx[2], shape_zyx[1], shape_zyx[0], sitk.sitkFloat32)
    img.SetSpacing(spacing_xyz)
    img.SetOrigin(origin)
    return volume_from_image(img)


def _mask(mask: np.ndarray) -> LabelMask:
    return LabelMask(SOURCE, mask)


def test_two_blobs_ordered_by_volume() -> None:
    vol = _volume((10, 30, 30))
    m = np.zeros(vol.shape, bool)
    m[2:4, 2:6, 2:6] = True  # 32 voxels
    m[5:9, 15:25, 15:25] = True  # 400 voxels
    lesions = find_lesions(_mask(m), vol, min_volume_ml=0.0)
    assert [les.voxel_count for les in lesions] == [400, 32]
    assert [les.tracking_id for les in lesions] == ["Tumour lesion 1", "Tumour lesion 2"]
    assert [les.index for les in lesions] == [1, 2]
    big = lesions[0]
    assert big.volume_ml == pytest.approx(400 * 0.7 * 0.8 * 2.0 / 1000)
    assert big.bbox == (slice(5, 9), slice(15, 25), slice(15, 25))
    assert big.mask.sum() == 400 and not (big.mask & lesions[1].mask).any()
    # centroid at index (x, y, z) = (19.5, 19.5, 6.5)
    assert big.centroid_mm == pytest.approx((-50 + 19.5 * 0.7, 20 + 19.5 * 0.8, 100 + 6.5 * 2.0))


def test_ties_are_ordered_by_position() -> None:
    vol = _volume((4, 20, 20))
    m = np.zeros(vol.shape, bool)
    m[1, 12:14, 12:14] = True
    m[1, 2:4, 2:4] = True
    a = find_lesions(_mask(m), vol, min_volume_ml=0.0)
    b = find_lesions(_mask(m[:, ::-1, ::-1].copy()), vol, min_volume_ml=0.0)
    # equal volumes: the lesion nearer the origin (lower centroid index) comes first
    assert a[0].bbox[1].start == 2 and b[0].bbox[1].start == 6
    assert [les.tracking_id for les in a] == ["Tumour lesion 1", "Tumour lesion 2"]


def test_diagonal_neighbours_join_under_26_connectivity() -> None:
    vol = _volume((5, 5, 5), spacing_xyz=(1.0, 1.0, 1.0))
    m = np.zeros(vol.shape, bool)
    m[1, 1, 1] = m[2, 2, 2] = m[3, 3, 3] = True  # corner-touching only
    lesions = find_lesions(_mask(m), vol, min_volume_ml=0.0)
    assert len(lesions) == 1 and lesions[0].voxel_count == 3


def test_min_volume_filter() -> None:
    vol = _volume((5, 20, 20), spacing_xyz=(1.0, 1.0, 1.0))
    m = np.zeros(vol.shape, bool)
    m[1:3, 1:6, 1:6] = True  # 50 mm3
    m[2, 10:18, 10:18] = True  # 64 mm3
    assert [les.voxel_count for les in find_lesions(_mask(m), vol, min_volume_ml=0.06)] == [64]
    assert len(find_lesions(_mask(m), vol, min_volume_ml=0.05)) == 2
    assert find_lesions(_mask(m), vol, min_volume_ml=1.0) == []
    assert find_lesions(_mask(np.zeros(vol.shape, bool)), vol) == []


def test_sphere_volume_diameter_and_centroid() -> None:
    vol = _volume((40, 40, 40), spacing_xyz=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0))
    z, y, x = np.mgrid[0:40, 0:40, 0:40]
    r = 10.0
    m = (x - 20) ** 2 + (y - 19) ** 2 + (z - 18) ** 2 <= r**2
    (lesion,) = find_lesions(_mask(m), vol)
    assert lesion.volume_ml == pytest.approx(4 / 3 * np.pi * r**3 / 1000, rel=0.02)
    assert abs(lesion.longest_axial_diameter_mm - 2 * r) <= 1.0  # within a voxel
    assert lesion.centroid_mm == pytest.approx((20.0, 19.0, 18.0), abs=1e-6)
    assert lesion.key_slice_index == 18


def test_ellipse_diameter_with_anisotropic_pixels() -> None:
    sx, sy = 0.7, 0.8
    vol = _volume((5, 60, 60), spacing_xyz=(sx, sy, 3.0), origin=(0.0, 0.0, 0.0))
    _, y, x = np.mgrid[0:5, 0:60, 0:60]
    # semi-axes 15 mm along x and 8 mm along y, centred at (21 mm, 24 mm); largest on slice 2
    m = ((x * sx - 21) / 15) ** 2 + ((y * sy - 24) / 8) ** 2 <= 1
    m[[0, 4]] = False
    small = ((x[0] * sx - 21) / 10) ** 2 + ((y[0] * sy - 24) / 5) ** 2 <= 1
    m[1] &= small
    m[3] &= small
    (lesion,) = find_lesions(_mask(m), vol, min_volume_ml=0.0)
    assert abs(lesion.longest_axial_diameter_mm - 30.0) <= sx
    assert lesion.key_slice_index == 2


def test_one_pixel_wide_line_has_its_length() -> None:
    vol = _volume((3, 10, 20), spacing_xyz=(0.5, 0.8, 1.0))
    m = np.zeros(vol.shape, bool)
    m[1, 4, 2:12] = True  # 10 pixels along x: 5 mm edge to edge
    (lesion,) = find_lesions(_mask(m), vol, min_volume_ml=0.0)
    assert lesion.longest_axial_diameter_mm == pytest.approx(5.0, abs=0.5)


def test_problem_mask_and_wrong_shape_raise() -> None:
    vol = _volume((3, 10, 10))
    bad = LabelMask(SOURCE, np.zeros(vol.shape, bool), problem="segment 1 (Tumour) is empty on this CT")
    with pytest.raises(SegmentationError, match="is empty"):
        find_lesions(bad, vol)
    with pytest.raises(ValueError, match="not the volume shape"):
        find_lesions(_mask(np.zeros((2, 10, 10), bool)), vol)


def test_outline_is_closed_on_the_pixel_edges_in_mm() -> None:
    vol = _volume((4, 12, 12), spacing_xyz=(0.5, 0.5, 2.0), origin=(10.0, 20.0, 30.0))
    m = np.zeros(vol.shape, bool)
    m[1:3, 2:6, 3:9] = True  # 4 rows x 6 columns on slices 1 and 2
    m[2, 3:5, 5:7] = False  # a hole on slice 2
    (lesion,) = find_lesions(_mask(m), vol, min_volume_ml=0.0)
    polys = outline_mm(lesion, vol)
    assert len(polys) == 3  # slice 1 outer, slice 2 outer + hole
    first = np.asarray(polys[0])
    assert np.array_equal(first[0], first[-1])
    assert set(np.round(first[:, 2], 6)) == {32.0}
    # the boundary runs half a pixel outside the outer voxel centres
    assert first[:, 0].min() == pytest.approx(10 + 2.5 * 0.5)
    assert first[:, 0].max() == pytest.approx(10 + 8.5 * 0.5)
    assert first[:, 1].min() == pytest.approx(20 + 1.5 * 0.5)
    assert first[:, 1].max() == pytest.approx(20 + 5.5 * 0.5)
    # area of the outer polygon (shoelace) = 4 x 6 pixels
    xy = first[:, :2]
    area = 0.5 * abs(np.dot(xy[:-1, 0], xy[1:, 1]) - np.dot(xy[1:, 0], xy[:-1, 1]))
    assert area == pytest.approx(24 * 0.25, rel=0.1)


def test_outline_round_trips_through_an_rtstruct(tmp_path) -> None:
    from inference.imaging.masks import load_segmentation
    from inference.imaging.volume import load_ct_series
    from tests.dicom_factory import write_ct_series, write_rtstruct

    series = write_ct_series(tmp_path / "ct", n_slices=6, rows=24, cols=20, orientation=(0.6, 0.8, 0, -0.8, 0.6, 0))
    vol = load_ct_series(series.paths)
    z, y, x = np.mgrid[0:6, 0:24, 0:20]
    m = ((x - 9) / 6.0) ** 2 + ((y - 11) / 8.0) ** 2 + ((z - 2.5) / 2.2) ** 2 <= 1
    m[2, 10:13, 8:11] = False  # a hole
    assert m[4, 6, 7] and not m[4, 6, 6] and not m[4, 5, 7]
    m[4, 4:6, 5:7] = True  # touches the ellipse at one corner only (saddle case of marching squares)
    (lesion,) = find_lesions(_mask(m), vol, min_volume_ml=0.0)
    path = write_rtstruct(tmp_path / "rs.dcm", series, {"Tumour": [np.asarray(p) for p in outline_mm(lesion, vol)]})
    (back,) = load_segmentation(path, vol)
    np.testing.assert_array_equal(back.mask, lesion.mask)
