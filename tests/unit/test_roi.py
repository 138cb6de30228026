"""Method inputs M1-M4 (inference.imaging.roi): geometry, interpolation, padding, normalisation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from inference.imaging import roi
from inference.imaging.lesions import find_lesions
from inference.imaging.masks import LabelMask
from inference.imaging.volume import volume_from_image
from inference.results import SegmentationSource


def _ct(shape: tuple[int, int, int] = (20, 120, 110), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(40, 30, shape).astype(np.float32)


def _box_mask(shape: tuple[int, int, int], z: slice, y: slice, x: slice) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[z, y, x] = True
    return mask


def _ellipsoid(shape: tuple[int, int, int], centre: tuple[float, ...], radii: tuple[float, ...]) -> np.ndarray:
    z, y, x = np.indices(shape, dtype=float)
    return ((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + (
        (x - centre[2]) / radii[2]
    ) ** 2 <= 1


# ------------------------------------------------------------------------------------------- shared


def test_zscore_validates_and_applies() -> None:
    z = roi.ZScore(mean=10.0, std=4.0)
    np.testing.assert_allclose(z.apply(np.array([10.0, 14.0, 2.0])), [0.0, 1.0, -2.0])
    assert z.apply(np.zeros(2)).dtype == np.float32
    with pytest.raises(ValueError, match='"std"'):
        roi.ZScore(mean=0.0, std=0.0)
    with pytest.raises(ValueError, match="finite"):
        roi.ZScore(mean=math.nan, std=1.0)


def test_largest_slice_is_the_lesion_key_slice() -> None:
    shape = (12, 40, 40)
    mask = _ellipsoid(shape, (6.3, 20, 20), (4.5, 9, 7)) | _box_mask(shape, slice(2, 3), slice(0, 3), slice(0, 3))
    image = sitk.GetImageFromArray(np.zeros(shape, np.float32))
    image.SetSpacing((0.8, 0.8, 2.5))
    volume = volume_from_image(image)
    source = SegmentationSource(
        kind="seg", sop_instance_uid="1.2", sop_class_uid="1.2.3", series_instance_uid="1.3", number=1, label="t"
    )
    lesion = find_lesions(LabelMask(source, mask), volume, min_volume_ml=0.0)[0]
    assert roi.largest_slice(lesion.mask) == lesion.key_slice_index
    assert roi.largest_slice(mask) == int(np.argmax(mask.sum(axis=(1, 2))))
    with pytest.raises(ValueError, match="non-empty"):
        roi.largest_slice(np.zeros(shape, bool))


def test_crop2d_pads_explicitly_and_never_shifts() -> None:
    image = np.arange(20, dtype=np.float32).reshape(4, 5)
    inside, padded = roi.crop2d(image, (1, 3, 1, 4))
    np.testing.assert_array_equal(inside, image[1:3, 1:4])
    assert not padded
    crop, padded = roi.crop2d(image, (-2, 2, 3, 7))
    assert padded and crop.shape == (4, 4)
    np.testing.assert_array_equal(crop[:2], roi.PAD_HU)  # rows -2, -1
    np.testing.assert_array_equal(crop[2:, 2:], roi.PAD_HU)  # columns 5, 6
    np.testing.assert_array_equal(crop[2:, :2], image[0:2, 3:5])
    far, padded = roi.crop2d(image, (10, 12, 10, 12))
    assert padded and np.all(far == roi.PAD_HU)
    with pytest.raises(ValueError, match="empty crop box"):
        roi.crop2d(image, (2, 2, 0, 1))


@pytest.mark.parametrize(
    "call",
    [
        lambda ct, m: roi.m1_input(ct, m, None),
        lambda ct, m: roi.m2_input(ct, m, (1, 1, 1), None),
        lambda ct, m: roi.m3_input(ct, m, (1, 1, 1)),
        lambda ct, m: roi.m4_input(ct, m, (1, 1, 1)),
    ],
    ids=["m1", "m2", "m3", "m4"],
)
def test_every_method_rejects_bad_masks(call) -> None:
    ct = _ct((5, 30, 30))
    with pytest.raises(ValueError, match="empty"):
        call(ct, np.zeros(ct.shape, bool))
    with pytest.raises(ValueError, match="not the CT shape"):
        call(ct, np.ones((5, 30, 29), bool))


def test_bad_spacing_and_sizes_are_refused() -> None:
    ct = _ct((5, 30, 30))
    mask = _box_mask(ct.shape, slice(2, 3), slice(10, 14), slice(10, 14))
    with pytest.raises(ValueError, match="spacing_zyx"):
        roi.m3_input(ct, mask, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="size"):
        roi.m1_input(ct, mask, None, size=(80,))
    with pytest.raises(ValueError, match="margin_px"):
        roi.m1_input(ct, mask, None, margin_px=-1)


# ----------------------------------------------------------------------------------------------- M1


def test_m1_crops_the_bounding_rectangle_plus_margin_on_the_largest_slice() -> None:
    ct = _ct()
    mask = _box_mask(ct.shape, slice(5, 9), slice(40, 60), slice(30, 45))
    mask[7, 35:65, 28:47] = True  # slice 7 is the largest: rows 35..64, columns 28..46
    out = roi.m1_input(ct, mask, None)
    assert out.slice_index == 7
    # the paper's A2 set by default: 20 pixels more in height and width, 10 on each side
    assert out.box == (25, 75, 18, 57)
    assert not out.padded
    np.testing.assert_array_equal(out.crop_hu, ct[7, 25:75, 18:57])
    assert out.image.shape == (80, 80) and out.image.dtype == np.float32
    # cubic resize without blur: a constant crop stays constant, values stay in the crop's range
    flat = roi.m1_input(np.full(ct.shape, 55.0, np.float32), mask, None)
    np.testing.assert_allclose(flat.image, 55.0, atol=1e-4)
    assert out.image.min() >= out.crop_hu.min() - 1e-3 and out.image.max() <= out.crop_hu.max() + 1e-3


def test_m1_zscore_comes_from_the_model_package_not_the_study() -> None:
    ct = _ct()
    mask = _box_mask(ct.shape, slice(5, 9), slice(40, 60), slice(30, 45))
    z = roi.ZScore(mean=40.0, std=30.0)
    raw = roi.m1_input(ct, mask, None)
    normalised = roi.m1_input(ct, mask, z)
    np.testing.assert_allclose(normalised.image, (raw.image - 40.0) / 30.0, rtol=1e-5, atol=1e-5)
    # changing the study outside the crop (e.g. other organs) changes nothing
    other = ct.copy()
    other[:, :5, :] = 3000.0
    np.testing.assert_array_equal(roi.m1_input(other, mask, z).image, normalised.image)


def test_m1_margin_size_and_square_options() -> None:
    ct = _ct()
    mask = _box_mask(ct.shape, slice(5, 6), slice(40, 50), slice(30, 70))  # 10 x 40
    assert roi.m1_input(ct, mask, None, margin_px=0).box == (40, 50, 30, 70)
    square = roi.m1_input(ct, mask, None, margin_px=0, square=True, size=(60, 60))
    assert square.box == (25, 65, 30, 70) and square.image.shape == (60, 60)
    tall = _box_mask(ct.shape, slice(5, 6), slice(30, 71), slice(40, 50))  # 41 x 10: odd difference
    r0, r1, c0, c1 = roi.m1_input(ct, tall, None, margin_px=0, square=True).box
    assert (r1 - r0, c1 - c0) == (41, 41) and (c0, c1) == (25, 66)


def test_m1_roi_sets_are_the_papers_a1_a2_a3() -> None:
    ct = _ct()
    mask = _box_mask(ct.shape, slice(5, 6), slice(40, 60), slice(30, 50))  # a 20 x 20 ROI
    heights = {}
    for name in ("ROI", "A1", "A2", "A3"):
        margin, shape = roi.m1_roi_set(name)
        out = roi.m1_input(ct, mask, None, margin_px=margin, size=shape)
        r0, r1, c0, c1 = out.box
        heights[name] = (r1 - r0, c1 - c0, out.image.shape)
    assert heights == {
        "ROI": (20, 20, (60, 60)),
        "A1": (30, 30, (70, 70)),
        "A2": (40, 40, (80, 80)),
        "A3": (50, 50, (90, 90)),
    }
    with pytest.raises(ValueError, match="roi_set"):
        roi.m1_roi_set("A4")


def test_m1_lesion_at_the_volume_edge_is_padded_not_shifted() -> None:
    ct = _ct()
    mask = _box_mask(ct.shape, slice(3, 5), slice(0, 6), slice(100, 110))  # touches top and right edges
    out = roi.m1_input(ct, mask, None, margin_px=20)
    assert out.padded
    assert out.box == (-20, 26, 80, 130)
    assert out.crop_hu.shape == (46, 50)
    np.testing.assert_array_equal(out.crop_hu[:20], roi.PAD_HU)
    np.testing.assert_array_equal(out.crop_hu[:, 30:], roi.PAD_HU)
    np.testing.assert_array_equal(out.crop_hu[20:, :30], ct[out.slice_index, 0:26, 80:110])


# ----------------------------------------------------------------------------------------------- M2


def test_m2_cube_is_a_1mm_bspline_resampling_centred_on_the_centroid() -> None:
    spacing = (2.5, 0.8, 0.7)
    z, y, x = np.indices((40, 100, 120), dtype=float)
    ct = (3 * z * spacing[0] + 2 * y * spacing[1] - x * spacing[2]).astype(np.float32)  # linear in mm
    mask = _ellipsoid(ct.shape, (20, 50, 60), (6, 20, 17))
    out = roi.m2_input(ct, mask, spacing, None)
    assert out.centroid_index == pytest.approx((20.0, 50.0, 60.0))
    assert out.cube.shape == (64, 64, 64) and not out.padded
    offsets = np.arange(64) - 31.5  # voxel centres around the centroid, 1 mm apart
    cz, cy, cx = (c * s + offsets for c, s in zip(out.centroid_index, spacing, strict=True))
    expected = 3 * cz[:, None, None] + 2 * cy[None, :, None] - cx[None, None, :]
    np.testing.assert_allclose(out.cube, expected, atol=1e-2)  # a cubic B-spline reproduces linear data
    # nearest-neighbour mask: same volume (mm3) within the partial-voxel error
    assert out.cube_mask.dtype == bool
    assert out.cube_mask.sum() == pytest.approx(mask.sum() * np.prod(spacing), rel=0.03)
    assert set(out.views) == set(roi.VIEW_NAMES) and len(out.views) == 9
    assert all(v.shape == (299, 299) for v in out.views.values())


def test_m2_bspline_is_not_linear_interpolation() -> None:
    ct = np.zeros((9, 9, 9), np.float32)
    ct[4, 4, 4] = 1000.0
    mask = np.zeros(ct.shape, bool)
    mask[4, 4, 4] = True
    cube, cube_mask, _, _ = roi.m2_cube(ct, mask, (2.0, 2.0, 2.0), cube_mm=8.0, spacing_mm=1.0)
    assert cube.min() < -1.0  # the B-spline rings (undershoots) next to a spike; linear never would
    assert cube_mask.sum() == 8  # nearest neighbour: the 2 mm voxel becomes 2 x 2 x 2 voxels of 1 mm


def test_cube_views_follow_the_documented_planes() -> None:
    n = 6
    z, y, x = np.indices((n, n, n))
    cube = (10000 * z + 100 * y + x).astype(np.float32)
    views = roi.cube_views(cube)
    assert list(views) == list(roi.VIEW_NAMES)
    np.testing.assert_array_equal(views["axial"], (cube[2] + cube[3]) / 2)
    np.testing.assert_array_equal(views["coronal"], (cube[:, 2] + cube[:, 3]) / 2)
    np.testing.assert_array_equal(views["sagittal"], (cube[:, :, 2] + cube[:, :, 3]) / 2)
    for zz in range(n):
        for k in range(n):
            assert views["diagonal_z_main"][zz, k] == 10000 * zz + 101 * k
            assert views["diagonal_z_anti"][zz, k] == 10000 * zz + 100 * k + (n - 1 - k)
            assert views["diagonal_y_main"][zz, k] == 10000 * k + 100 * zz + k  # rows run along y
            assert views["diagonal_y_anti"][zz, k] == 10000 * k + 100 * zz + (n - 1 - k)
            assert views["diagonal_x_main"][k, zz] == 10000 * k + 100 * k + zz
            assert views["diagonal_x_anti"][k, zz] == 10000 * (n - 1 - k) + 100 * k + zz
    # every diagonal plane holds two opposite cube edges
    d = views["diagonal_z_anti"]
    np.testing.assert_array_equal(d[:, 0], cube[:, 0, n - 1])
    np.testing.assert_array_equal(d[:, -1], cube[:, n - 1, 0])
    d = views["diagonal_x_anti"]
    np.testing.assert_array_equal(d[0], cube[n - 1, 0, :])
    np.testing.assert_array_equal(d[-1], cube[0, n - 1, :])
    with pytest.raises(ValueError, match="n even"):
        roi.cube_views(np.zeros((5, 5, 5)))


def test_m2_views_are_resized_and_normalised() -> None:
    spacing = (1.0, 1.0, 1.0)
    ct = _ct((80, 80, 80))
    mask = _ellipsoid(ct.shape, (40, 40, 40), (5, 5, 5))
    raw = roi.m2_input(ct, mask, spacing, None, view_size=(64, 64))
    views = roi.cube_views(raw.cube)
    for name in roi.VIEW_NAMES:  # view_size equal to the cube: no resizing
        np.testing.assert_array_equal(raw.views[name], views[name])
    z = roi.ZScore(mean=40.0, std=30.0)
    small = roi.m2_input(ct, mask, spacing, z, view_size=(32, 48))
    assert all(v.shape == (32, 48) for v in small.views.values())
    assert abs(float(np.mean([v.mean() for v in small.views.values()]))) < 0.2


def test_m2_nodule_at_the_volume_edge_is_padded_with_air() -> None:
    spacing = (1.0, 1.0, 1.0)
    ct = _ct((80, 80, 80))
    mask = _ellipsoid(ct.shape, (40, 40, 5), (4, 4, 4))  # 5 mm from the x = 0 side, inside along z and y
    out = roi.m2_input(ct, mask, spacing, None)
    assert out.padded
    # cube x centres run from 5 - 31.5 = -26.5 mm: x < -0.5 (outside the volume) is air
    outside = (np.arange(64) - 31.5 + out.centroid_index[2]) < -0.5
    assert outside.sum() == 26
    np.testing.assert_array_equal(out.cube[:, :, outside], roi.PAD_HU)
    assert not np.any(out.cube[:, :, ~outside] == roi.PAD_HU)


# ----------------------------------------------------------------------------------------------- M3


def test_window_maps_40_400_to_0_255() -> None:
    np.testing.assert_allclose(roi.window(np.array([-1024.0, -160.0, 40.0, 240.0, 3000.0])), [0, 0, 127.5, 255, 255])
    with pytest.raises(ValueError, match="width"):
        roi.window(np.zeros(1), width=0)


def test_m3_selects_slices_above_40_percent_of_the_mean_area() -> None:
    ct = _ct((12, 100, 100))
    mask = np.zeros(ct.shape, bool)
    areas = {2: 4, 3: 36, 4: 100, 5: 144, 6: 100, 7: 16}  # squares 2x2 .. 12x12; mean 400/6 = 66.7
    for k, area in areas.items():
        side = math.isqrt(area)
        mask[k, 40 : 40 + side, 40 : 40 + side] = True
    out = roi.m3_input(ct, mask, (2.5, 0.8, 0.8))
    assert [s.slice_index for s in out] == [3, 4, 5, 6]  # area > 0.4 x 66.7 = 26.7 px
    assert [s.area_px for s in out] == [36, 100, 144, 100]
    assert all(s.image.shape == (128, 128) and s.mask.shape == (128, 128) for s in out)
    assert all(s.image.min() >= 0.0 and s.image.max() <= 255.0 for s in out)
    # 1 cm border: ceil(10 / 0.8) = 13 px on every side of the 10 x 10 square at (40, 40)
    assert out[1].box == (27, 63, 27, 63)
    assert not out[1].padded and out[1].opened


def test_m3_border_is_in_mm_from_the_pixel_spacing() -> None:
    ct = _ct((3, 100, 100))
    mask = _box_mask(ct.shape, slice(1, 2), slice(40, 50), slice(40, 50))
    (only,) = roi.m3_input(ct, mask, (3.0, 0.5, 0.8))
    assert only.box == (40 - 20, 50 + 20, 40 - 13, 50 + 13)
    (wide,) = roi.m3_input(ct, mask, (3.0, 0.5, 0.8), border_mm=0.0)
    assert wide.box == (40, 50, 40, 50)
    # window before resize: the crop's pixels map to [0, 255] exactly like roi.window
    (same,) = roi.m3_input(ct, mask, (3.0, 1.0, 1.0), border_mm=0.0, size=(10, 10))
    np.testing.assert_allclose(same.image, roi.window(ct[1, 40:50, 40:50]), rtol=1e-6)


def test_m3_opening_removes_spurs_but_never_the_whole_slice() -> None:
    ct = _ct((3, 100, 100))
    mask = _box_mask(ct.shape, slice(1, 2), slice(40, 50), slice(40, 50))
    mask[1, 45, 50:70] = True  # a one-pixel-wide spur to the right
    (out,) = roi.m3_input(ct, mask, (1.0, 1.0, 1.0), border_mm=0.0)
    # the spur goes; (45, 50) comes back because (45, 49) survives the erosion by the 3 x 3 cross
    assert out.box == (40, 50, 40, 51) and out.opened
    (kept,) = roi.m3_input(ct, mask, (1.0, 1.0, 1.0), border_mm=0.0, opening_radius_px=0)
    assert kept.box == (40, 50, 40, 70)
    line = _box_mask(ct.shape, slice(1, 2), slice(45, 46), slice(40, 60))  # opening would erase it
    (thin,) = roi.m3_input(ct, line, (1.0, 1.0, 1.0), border_mm=0.0)
    assert not thin.opened and thin.box == (45, 46, 40, 60)


def test_m3_lesion_at_the_volume_edge_is_padded_with_air() -> None:
    ct = np.full((3, 60, 60), 40.0, np.float32)
    mask = _box_mask(ct.shape, slice(1, 2), slice(55, 60), slice(0, 6))
    (out,) = roi.m3_input(ct, mask, (1.0, 1.0, 1.0), size=(5 + 20, 6 + 20), order=0)
    assert out.padded and out.box == (45, 70, -10, 16)
    image = out.image
    np.testing.assert_array_equal(image[15:, :], 0.0)  # rows 60..69: -1024 HU -> 0
    np.testing.assert_array_equal(image[:, :10], 0.0)  # columns -10..-1
    np.testing.assert_allclose(image[:15, 10:], 127.5)  # 40 HU inside


# ----------------------------------------------------------------------------------------------- M4


def test_m4_patch_is_centred_on_the_largest_slice_centroid() -> None:
    ct = _ct((10, 300, 300))
    mask = _ellipsoid(ct.shape, (5, 120.2, 150.7), (3, 20, 30))
    out = roi.m4_input(ct, mask, (2.0, 0.7, 0.7))
    assert out.slice_index == 5 and out.centre == (120, 151)
    assert out.box == (40, 200, 71, 231) and not out.padded
    assert out.patch_hu.shape == (160, 160)
    np.testing.assert_array_equal(out.patch_hu, ct[5, 40:200, 71:231])
    assert out.patch_mask.sum() == mask[5].sum()


def test_peritumoral_ring_is_3mm_in_physical_units() -> None:
    point = np.zeros((15, 15, 15), bool)
    point[7, 7, 7] = True
    ring = roi.peritumoral_ring(point, (1.0, 1.0, 1.0))
    assert ring.sum() == 122  # lattice points with 0 < distance <= 3: 123 in the ball, minus the centre
    assert not (ring & point).any()
    thick = roi.peritumoral_ring(point, (5.0, 1.0, 1.0))
    assert thick.sum() == 28 and thick[7].sum() == 28  # 5 mm slices: the ring stays in the slice
    fine = roi.peritumoral_ring(point, (0.5, 0.5, 0.5))  # 3 mm = 6 voxels of 0.5 mm
    z, y, x = np.nonzero(fine)
    assert np.sqrt((z - 7) ** 2 + (y - 7) ** 2 + (x - 7) ** 2).max() == pytest.approx(6.0)
    with pytest.raises(ValueError, match="ring_mm"):
        roi.peritumoral_ring(point, (1.0, 1.0, 1.0), ring_mm=0)


def test_peritumoral_ring_matches_a_full_volume_distance_transform() -> None:
    from scipy import ndimage

    ct = _ct((30, 80, 80))
    mask = _ellipsoid(ct.shape, (15, 40, 40), (5, 12, 9))
    spacing = (2.0, 0.75, 0.75)
    full = (ndimage.distance_transform_edt(~mask, sampling=spacing) <= 3.0) & ~mask
    np.testing.assert_array_equal(roi.m4_input(ct, mask, spacing).ring_mask, full)


def test_m4_tumour_at_the_volume_edge() -> None:
    ct = _ct((6, 100, 100))
    mask = _box_mask(ct.shape, slice(0, 2), slice(90, 100), slice(0, 10))
    out = roi.m4_input(ct, mask, (1.0, 1.0, 1.0))
    assert out.padded and out.centre == (94, 4) and out.box == (14, 174, -76, 84)
    np.testing.assert_array_equal(out.patch_hu[86:, :], roi.PAD_HU)
    np.testing.assert_array_equal(out.patch_hu[:, :76], roi.PAD_HU)
    np.testing.assert_array_equal(out.patch_hu[:86, 76:], ct[out.slice_index, 14:100, 0:84])
    assert out.ring_mask.shape == ct.shape and out.ring_mask.any()
    assert not out.ring_mask[:, :, 14:].any() and not (out.ring_mask & mask).any()


def test_m1_input_spec_records_the_roi_set_margin_for_inference() -> None:
    from inference.training.datasets import resolve_input_spec

    assert resolve_input_spec("m1") == {
        "roi_set": "A2",
        "shape": [80, 80],
        "margin_px": 10,
        "order": 3,
        "square": False,
    }
    a3 = resolve_input_spec("m1", {"roi_set": "A3"})
    assert (a3["margin_px"], a3["shape"], a3["roi_set"]) == (15, [90, 90], "A3")
    custom = resolve_input_spec("m1", {"margin_px": 20})
    assert (custom["margin_px"], custom["shape"], custom["roi_set"]) == (20, [80, 80], "custom")
    with pytest.raises(ValueError, match="roi_set"):
        resolve_input_spec("m1", {"roi_set": "B2"})
