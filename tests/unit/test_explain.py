"""Grad-CAM: the geometry round trip back onto the CT slice, and maps that find what a model learned."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inference.explain import AxisMap, box_maps, cube_view_maps, grad_cam, register, to_slice
from inference.imaging.roi import m1_input, m2_input, m3_input, m4_input, window
from inference.networks import EfficientNetAttention, MultiViewMultiTask, ResNetKRAS


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gaussian_slice(rows: int, cols: int, centre: tuple[float, float], sigma: float) -> np.ndarray:
    r, c = np.mgrid[0:rows, 0:cols]
    return np.exp(-((r - centre[0]) ** 2 + (c - centre[1]) ** 2) / (2 * sigma**2))


def volume_with(plane: np.ndarray, slices: int = 5) -> np.ndarray:
    """A (z, y, x) volume whose every slice is ``plane`` (the ROI functions take volumes)."""
    return np.repeat(plane[None].astype(np.float32), slices, axis=0)


def rect_mask(shape: tuple[int, int, int], z: int, rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[z, rows, cols] = True
    return mask


# --- geometry: a known-position map comes back to the right pixels ------------------------------


def test_box_maps_without_resize_is_the_exact_inverse_of_the_crop() -> None:
    plane = np.random.default_rng(0).random((50, 60))
    box = (-5, 25, 40, 70)  # reaches outside the slice at the top and on the right
    crop = np.zeros((30, 30))
    crop[5:, :20] = plane[0:25, 40:60]
    back = to_slice(crop, *box_maps(box, (30, 30)), plane.shape)
    assert np.array_equal(back[0:25, 40:60], plane[0:25, 40:60].astype(np.float32))
    outside = np.ones(plane.shape, dtype=bool)
    outside[0:25, 40:60] = False
    assert not back[outside].any()  # zero outside the crop


@pytest.mark.parametrize(("size", "order"), [((80, 80), 1), ((80, 80), 3), ((24, 24), 1), ((64, 40), 1)])
def test_m1_crop_and_resize_round_trip(size: tuple[int, int], order: int) -> None:
    """A smooth map planted on the slice, cut out and resized by roi.m1_input, comes back in place."""
    plane = gaussian_slice(128, 128, (50.0, 70.0), 6.0)
    mask = rect_mask((5, 128, 128), 2, slice(44, 58), slice(60, 81))
    x = m1_input(volume_with(plane), mask, None, margin_px=12, size=size, order=order)
    back = to_slice(x.image, *box_maps(x.box, size), (128, 128))
    r0, r1, c0, c1 = x.box
    inside = np.zeros((128, 128), dtype=bool)
    inside[max(r0, 0) : r1, max(c0, 0) : c1] = True
    assert np.unravel_index(np.argmax(back), back.shape) == (50, 70)
    assert np.abs(back[inside] - plane[inside]).max() < 0.03
    assert not back[~inside].any()


def test_m1_round_trip_when_the_crop_is_padded() -> None:
    plane = gaussian_slice(64, 64, (3.0, 60.0), 4.0)
    mask = rect_mask((3, 64, 64), 1, slice(0, 6), slice(56, 64))  # touches two edges: the crop is padded
    x = m1_input(volume_with(plane, 3), mask, None, margin_px=10, size=(40, 40), order=1)
    assert x.padded
    back = to_slice(x.image, *box_maps(x.box, (40, 40)), (64, 64))
    assert np.unravel_index(np.argmax(back), back.shape) == (3, 60)
    _, r1, c0, _ = x.box
    # away from the slice edge (where the resize blends in the -1024 HU padding) the map is back in place
    assert np.abs(back[2:r1, c0:62] - plane[2:r1, c0:62]).max() < 0.03
    assert not back[r1:].any() and not back[:, :c0].any()


def test_m3_crop_round_trip_with_anisotropic_pixels() -> None:
    plane = gaussian_slice(100, 120, (40.0, 55.0), 5.0)
    mask = np.zeros((6, 100, 120), dtype=bool)
    mask[1:5, 33:48, 45:66] = True
    slices = m3_input(volume_with(plane * 400.0 - 160.0, 6), mask, (2.5, 0.7, 0.9), size=(64, 64), order=1)
    for s in slices:
        # the window maps -160..240 HU linearly to 0..255, i.e. plane * 255
        back = to_slice(s.image / 255.0, *box_maps(s.box, (64, 64)), (100, 120))
        assert np.unravel_index(np.argmax(back), back.shape) == (40, 55)
        r0, r1, c0, c1 = s.box
        assert np.abs(back[r0:r1, c0:c1] - plane[r0:r1, c0:c1]).max() < 0.03
    assert np.allclose(window(np.array([-160.0, 240.0])), [0.0, 255.0])


def test_m4_patch_round_trip_is_exact() -> None:
    plane = np.random.default_rng(1).normal(0, 100, (90, 90))
    mask = rect_mask((4, 90, 90), 2, slice(70, 86), slice(5, 20))
    x = m4_input(volume_with(plane, 4), mask, (3.0, 0.8, 0.8), patch_size=(48, 48))
    assert x.padded  # the patch reaches below the slice and left of it
    back = to_slice(x.patch_hu, *box_maps(x.box, (48, 48)), (90, 90))
    r0, r1, c0, c1 = x.box
    region = (slice(max(r0, 0), min(r1, 90)), slice(max(c0, 0), min(c1, 90)))
    assert np.array_equal(back[region], plane[region].astype(np.float32))
    outside = np.ones((90, 90), dtype=bool)
    outside[region] = False
    assert not back[outside].any()


def test_m2_axial_view_round_trip() -> None:
    """The axial view of the 1 mm cube, resized to S, maps back onto the anisotropic CT grid."""
    spacing = (2.0, 0.75, 0.9)  # z, y, x mm
    rows, cols = 120, 110
    r, c = np.mgrid[0:rows, 0:cols]
    centre_mm = (47.0, 52.0)
    plane = np.exp(-(((r * spacing[1] - centre_mm[0]) ** 2 + (c * spacing[2] - centre_mm[1]) ** 2) / (2 * 6.0**2)))
    ct = volume_with(plane * 500.0, 20)
    mask = np.zeros(ct.shape, dtype=bool)
    mask[8:13, 55:70, 50:66] = True
    x = m2_input(ct, mask, spacing, None, cube_mm=32.0, spacing_mm=1.0, view_size=(75, 75), order=1)
    view = x.views["axial"] / 500.0
    maps = cube_view_maps(x.centroid_index, spacing, cube_voxels=32, spacing_mm=1.0, view_size=(75, 75))
    back = to_slice(view, *maps, (rows, cols))
    footprint = back > 0
    assert footprint.any()
    peak = np.unravel_index(np.argmax(back), back.shape)
    assert abs(peak[0] * spacing[1] - centre_mm[0]) <= 1.0 and abs(peak[1] * spacing[2] - centre_mm[1]) <= 1.0
    assert np.abs(back[footprint] - plane[footprint]).max() < 0.03
    # the footprint is the 32 mm cube around the centroid, nothing more
    extent_rows = np.flatnonzero(footprint.any(axis=1))
    assert (extent_rows[-1] - extent_rows[0] + 1) * spacing[1] == pytest.approx(32.0, abs=2 * spacing[1])


def test_to_slice_of_a_map_outside_the_slice_is_zero() -> None:
    out = to_slice(np.ones((10, 10)), AxisMap(1.0, -500.0), AxisMap(1.0, 0.0), (20, 20))
    assert out.shape == (20, 20) and not out.any()
    assert not register(np.ones((10, 10)), AxisMap(1.0, -500.0), AxisMap(1.0, 0.0), (20, 20)).any()
    with pytest.raises(ValueError, match="empty crop box"):
        box_maps((5, 5, 0, 3), (8, 8))
    with pytest.raises(ValueError, match="2D"):
        to_slice(np.ones(4), AxisMap(1.0, 0.0), AxisMap(1.0, 0.0), (4, 4))


def test_register_scales_the_slice_maximum_to_one() -> None:
    heat = np.zeros((20, 20))
    heat[5, 5] = 0.4
    out = register(heat, *box_maps((0, 20, 0, 20), (20, 20)), (30, 30))
    assert out.max() == pytest.approx(1.0) and out.min() == 0.0 and out.dtype == np.float32


# --- Grad-CAM finds what a model learned ----------------------------------------------------------


def planted_batch(rng: np.random.Generator, n: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Noise images; the positives carry a bright 5 x 5 square at a random place."""
    x = rng.normal(0, 1, (n, 1, size, size)).astype(np.float32)
    y = rng.integers(0, 2, n)
    corners = rng.integers(3, size - 8, (n, 2))
    for i in np.flatnonzero(y):
        r, c = corners[i]
        x[i, 0, r : r + 5, c : c + 5] += 3.0
    return torch.from_numpy(x), torch.from_numpy(y), corners


def test_grad_cam_peak_lies_on_the_planted_feature() -> None:
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    net = ResNetKRAS(width=0.25, blocks=2)
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(60):
        x, y, _ = planted_batch(rng, 32)
        loss = torch.nn.functional.cross_entropy(net(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    net.eval()
    x, y, corners = planted_batch(rng, 48)
    with torch.no_grad():
        assert (net(x).argmax(1) == y).float().mean() >= 0.95  # it learned the square
    net.train()  # grad_cam must leave the mode and the parameters as it found them
    cams = grad_cam(net, [x], net.blocks, lambda logits: logits[:, 1] - logits[:, 0], batch_size=20)
    assert net.training and all(p.requires_grad for p in net.parameters())
    assert cams.shape == (48, 32, 32) and cams.dtype == np.float32
    assert cams.min() >= 0.0 and cams.max() <= 1.0
    positives = np.flatnonzero(y.numpy())
    assert len(positives) >= 10
    for i in positives:
        r, c = np.unravel_index(np.argmax(cams[i]), cams[i].shape)
        top, left = corners[i]
        assert top - 1 <= r <= top + 5 and left - 1 <= c <= left + 5, (i, (r, c), (top, left))


def test_grad_cam_is_deterministic_and_batch_independent() -> None:
    torch.manual_seed(1)
    net = EfficientNetAttention(3, width=0.25, depth=0.25, heads=4).eval()
    x = torch.from_numpy(np.random.default_rng(2).normal(0, 1, (5, 1, 64, 64)).astype(np.float32))
    a = grad_cam(net, [x], net.backbone.head, lambda logits: logits[:, 0])
    b = grad_cam(net, [x], net.backbone.head, lambda logits: logits[:, 0], batch_size=2)
    assert a.shape == (5, 64, 64)
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_array_equal(a, grad_cam(net, [x], net.backbone.head, lambda logits: logits[:, 0]))


def test_grad_cam_selects_the_axial_view_of_a_shared_branch() -> None:
    torch.manual_seed(2)
    net = MultiViewMultiTask(
        0.0625, repeats=(1, 1, 1), mask_depths=(1, 1, 1), head_dims=(16, 8), shared_views=True
    ).eval()
    views = torch.from_numpy(np.random.default_rng(3).normal(0, 1, (2, 9, 75, 75)).astype(np.float32))
    covariates = torch.zeros((2, 8))
    cams = grad_cam(
        net,
        [views, covariates],
        net.branches[0].trunk.out_conv,
        lambda logits: logits[:, 0],
        select=lambda maps: maps[0::9],
    )
    assert cams.shape == (2, 75, 75)
    assert np.isfinite(cams).all() and cams.min() >= 0.0 and cams.max() <= 1.0
    with pytest.raises(ValueError, match="first dimension"):
        grad_cam(net, [views, covariates[:1]], net.branches[0].trunk.out_conv, lambda logits: logits[:, 0])
