"""The four M5 features per lesion, patient-level averaging and deltas."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from inference.imaging import LabelMask, find_lesions, load_ct_series, load_segmentation, volume_from_image
from inference.phantom import PhantomStudy, generate_follow_up, generate_study
from inference.radiomics.delta import (
    FEATURE_NAMES,
    RESPONSE_PARAMS,
    RESPONSE_SETTINGS,
    FeatureDeltas,
    LesionFeatures,
    feature_delta,
    feature_deltas,
    histogram_entropy,
    lesion_features,
    log_axis_values,
    log_settings,
    patient_features,
)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> PhantomStudy:
    return generate_study(
        tmp_path_factory.mktemp("b"), seed=5, lesions=3, slices=40, rows=160, columns=160, lesion_scale=1.5
    )


def _features(study: PhantomStudy) -> list[LesionFeatures]:
    volume = load_ct_series(study.ct_files)
    mask = load_segmentation(study.seg_file, volume)[0]
    return [lesion_features(volume, lesion.mask)[0] for lesion in find_lesions(mask, volume)]


def test_parameter_file_matches_the_embedded_settings() -> None:
    from ruamel.yaml import YAML

    assert YAML(typ="safe", pure=True).load(RESPONSE_PARAMS.read_text()) == RESPONSE_SETTINGS
    settings = log_settings()
    assert (settings.sigma_mm, settings.bin_width) == (3.0, 5.0)


def test_histogram_entropy() -> None:
    assert histogram_entropy(np.array([1.0, 6.0, 11.0, 16.0]), 5.0) == pytest.approx(2.0)
    assert histogram_entropy(np.array([0.1, 0.2, 4.9]), 5.0) == 0.0
    # bin edges at multiples of the width, like pyradiomics: -0.1 and 0.1 fall in different bins
    assert histogram_entropy(np.array([-0.1, 0.1]), 5.0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="positive"):
        histogram_entropy(np.array([1.0]), 0.0)


def _wave_volume(axis: int, wavelength_mm: float = 20.0, amplitude: float = 100.0) -> tuple:
    """A CT whose values vary as a cosine along one image axis (0 = x, 2 = z) only."""
    shape_zyx = (40, 48, 56)
    spacing = (1.0, 1.25, 2.0)  # x, y, z
    coords = np.indices(shape_zyx, dtype=float)
    position = coords[2 - axis] * spacing[axis]
    array = (amplitude * np.cos(2 * np.pi * position / wavelength_mm)).astype(np.float32)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    volume = volume_from_image(image)
    mask = np.zeros(shape_zyx, dtype=bool)
    mask[12:28, 14:34, 16:40] = True
    return volume, mask


@pytest.mark.parametrize("axis", [0, 2])
def test_log_filters_along_one_axis_only(axis: int) -> None:
    volume, mask = _wave_volume(axis)
    along = log_axis_values(volume, mask, "x" if axis == 0 else "z", sigma_mm=3.0)
    across = log_axis_values(volume, mask, "z" if axis == 0 else "x", sigma_mm=3.0)
    # scale-normalised: sigma^2 d2/dx2 of A cos(kx) smoothed = -A (k sigma)^2 exp(-(k sigma)^2 / 2) cos(kx)
    k = 2 * np.pi / 20.0
    expected = 100.0 * (k * 3.0) ** 2 * math.exp(-((k * 3.0) ** 2) / 2)
    assert np.abs(along).max() == pytest.approx(expected, rel=0.05)
    assert np.abs(across).max() < 1e-3 * expected


def test_log_axis_rejects_bad_input() -> None:
    volume, mask = _wave_volume(0)
    with pytest.raises(ValueError, match="axis"):
        log_axis_values(volume, mask, "w", sigma_mm=3.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        log_axis_values(volume, np.zeros_like(mask), "x", sigma_mm=3.0)
    with pytest.raises(ValueError, match="shape"):
        log_axis_values(volume, mask[:-1], "x", sigma_mm=3.0)
    with pytest.raises(ValueError, match="sigma"):
        log_axis_values(volume, mask, "x", sigma_mm=0.0)


def test_lesion_features_and_their_provenance(baseline: PhantomStudy) -> None:
    volume = load_ct_series(baseline.ct_files)
    lesion = find_lesions(load_segmentation(baseline.seg_file, volume)[0], volume)[0]
    features, provenance = lesion_features(volume, lesion.mask)
    assert features.si4 == 0.0  # an ellipsoid is convex
    assert 2.0 < features.log_z_entropy < 6.0
    assert 2.0 < features.log_x_entropy < 6.0
    assert features.ngtdm_contrast > 0
    assert features.volume_ml == pytest.approx(lesion.volume_ml)
    reference = {f.name: f.value for f in features.reference}
    assert "log-sigma-3-0-mm-3D_firstorder_Entropy" in reference
    assert reference["original_shape_VoxelVolume"] == pytest.approx(lesion.volume_ml * 1000)
    assert provenance["equivalent_log_z_entropy"].startswith("log-sigma-3-0-mm-3D_firstorder_Entropy")
    assert provenance["log_sigma_mm"] == "3.0"
    assert provenance["pyradiomics_version"]
    assert list(features.values()) == list(FEATURE_NAMES)


def test_same_image_gives_exactly_zero_deltas(baseline: PhantomStudy) -> None:
    first, second = _features(baseline), _features(baseline)
    deltas = feature_deltas(patient_features(first), patient_features(second))
    assert deltas.vector() == (0.0, 0.0, 0.0, 0.0)


@pytest.mark.parametrize(
    ("rotation_deg", "translation_mm"),
    [((0.0, 0.0, 0.0), (5.0, -2.5, 5.0)), ((0.0, 0.0, 3.0), (1.3, -0.7, 0.9)), ((2.0, -1.0, 4.0), (4.1, 2.2, -1.6))],
)
def test_rigidly_resampled_copy_changes_every_feature_by_less_than_5_percent(
    baseline: PhantomStudy, rotation_deg: tuple[float, float, float], translation_mm: tuple[float, float, float]
) -> None:
    """A copy of the CT moved by a known rigid transform (B-spline for the CT, nearest for the mask).

    Whole-voxel shifts reproduce the features exactly. (With *linear* interpolation the copy's noise
    is smoothed and NGTDM contrast drops by ~30 %, LoG entropies by ~7 %: compare native grids.)
    """
    volume = load_ct_series(baseline.ct_files)
    label_mask = load_segmentation(baseline.seg_file, volume)[0]
    lesions = find_lesions(label_mask, volume)
    transform = sitk.Euler3DTransform()
    transform.SetCenter(lesions[0].centroid_mm)
    transform.SetRotation(*np.radians(rotation_deg))
    transform.SetTranslation(translation_mm)
    moved = sitk.Resample(volume.image, volume.image, transform, sitk.sitkBSpline, -1000.0, sitk.sitkFloat32)
    mask_image = sitk.GetImageFromArray(label_mask.mask.astype(np.uint8))
    mask_image.CopyInformation(volume.image)
    moved_mask = sitk.GetArrayFromImage(sitk.Resample(mask_image, volume.image, transform, sitk.sitkNearestNeighbor))
    copy = volume_from_image(moved)
    copy_lesions = find_lesions(LabelMask(label_mask.source, moved_mask.astype(bool)), copy)
    assert len(copy_lesions) == len(lesions)
    before = patient_features([lesion_features(volume, lesion.mask)[0] for lesion in lesions])
    after = patient_features([lesion_features(copy, lesion.mask)[0] for lesion in copy_lesions])
    deltas = feature_deltas(before, after)
    for delta in deltas.deltas:
        assert abs(delta.value) < 0.05, (delta.name, delta.value)


def test_homogenised_lesions_lose_entropy_and_contrast(baseline: PhantomStudy, tmp_path: Path) -> None:
    follow = generate_follow_up(baseline, tmp_path / "f", shrink=0.5, texture_change="homogenise")
    before, after = _features(baseline), _features(follow)
    for b, f in zip(before, after, strict=True):
        deltas = feature_deltas(b, f)
        assert f.volume_ml < b.volume_ml
        assert deltas["log_z_entropy"].value < -0.05
        assert deltas["log_x_entropy"].value < -0.05
        assert deltas["ngtdm_contrast"].value < -0.1


def _lobulated(with_lobes: bool) -> tuple:
    """A synthetic CT with one lesion: a ball, with or without six smaller balls on its surface."""
    shape = (48, 64, 64)
    z, y, x = np.indices(shape, dtype=float)
    centre = np.array([24.0, 32.0, 32.0])
    mask = (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= 11.0**2
    if with_lobes:
        rng = np.random.default_rng(0)
        for _ in range(6):
            v = rng.standard_normal(3)
            c = centre + 12.0 * v / np.linalg.norm(v)
            mask |= (z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= 5.5**2
    array = np.where(mask, 50.0, 100.0) + np.random.default_rng(1).normal(0, 10, shape)
    return volume_from_image(sitk.GetImageFromArray(array.astype(np.float32))), mask


def test_si4_falls_when_a_lobulated_border_becomes_smooth() -> None:
    lobed, smooth = lesion_features(*_lobulated(True))[0], lesion_features(*_lobulated(False))[0]
    assert lobed.si4 > 0.01
    assert smooth.si4 == 0.0
    delta = feature_deltas(lobed, smooth)["si4"]
    assert delta.relative == pytest.approx(-1.0)
    legacy = feature_deltas(smooth, lobed, definition="relative")["si4"]  # baseline 0: absolute change
    assert legacy.relative is None
    assert legacy.value == pytest.approx(lobed.si4)
    back = feature_deltas(smooth, lobed)["si4"]  # symmetric (default): continuous, the same sign
    assert back.value == pytest.approx(lobed.si4 / (lobed.si4 / 2 + 0.2))


def test_patient_features_are_volume_weighted() -> None:
    small = LesionFeatures(si4=0.0, log_z_entropy=4.0, log_x_entropy=6.0, ngtdm_contrast=0.1, volume_ml=1.0)
    large = LesionFeatures(si4=0.2, log_z_entropy=8.0, log_x_entropy=6.0, ngtdm_contrast=0.5, volume_ml=3.0)
    patient = patient_features([small, large])
    assert patient.values() == pytest.approx(
        {"si4": 0.15, "log_z_entropy": 7.0, "log_x_entropy": 6.0, "ngtdm_contrast": 0.4}
    )
    assert (patient.total_volume_ml, patient.lesion_count) == (4.0, 2)
    with pytest.raises(ValueError, match="no lesion"):
        patient_features([])


def test_legacy_delta_is_relative_unless_the_baseline_is_zero() -> None:
    def rel(name: str, b: float, f: float):
        return feature_delta(name, b, f, definition="relative")

    assert rel("log_z_entropy", 5.0, 4.0).value == pytest.approx(-0.2)
    assert rel("ngtdm_contrast", -0.5, -0.25).value == pytest.approx(0.5)  # divided by |baseline|
    zero = rel("si4", 0.0, 0.03)
    assert (zero.relative, zero.value, zero.is_relative) == (None, pytest.approx(0.03), False)
    tiny = rel("si4", 5e-7, 0.01)
    assert tiny.relative is None
    assert rel("si4", 2e-6, 4e-6).relative == pytest.approx(1.0)
    deltas = FeatureDeltas(tuple(rel(n, 1.0, 1.0 + i) for i, n in enumerate(FEATURE_NAMES)))
    assert deltas.vector() == (0.0, 1.0, 2.0, 3.0)
    assert deltas.as_dict()["ngtdm_contrast"] == 3.0


def test_symmetric_delta_by_default() -> None:
    d = feature_delta("log_z_entropy", 5.0, 4.0)
    assert d.value == pytest.approx(-1.0 / (4.5 + 0.01)) and d.is_relative
    assert d.relative == pytest.approx(-0.2)  # the relative change is kept beside it
    deltas = FeatureDeltas(tuple(feature_delta(n, 1.0, 1.0 + i) for i, n in enumerate(FEATURE_NAMES)))
    with pytest.raises(KeyError):
        deltas["volume"]
