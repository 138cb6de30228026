"""Alignment of two CTs and lesion matching: frame of reference, rigid registration, overlap, distance."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from inference.imaging import CTVolume, Lesion, find_lesions, load_ct_series, load_segmentation, volume_from_image
from inference.imaging.masks import LabelMask
from inference.phantom import PhantomStudy, generate_follow_up, generate_study
from inference.response.matching import Alignment, align, match_lesions, register_rigid
from inference.results import SegmentationSource

SOURCE = SegmentationSource("seg", "1.2.3", "1.2.840.10008.5.1.4.1.1.66.4", "1.2.4", 1, "Liver lesions")


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> PhantomStudy:
    return generate_study(
        tmp_path_factory.mktemp("b"), seed=5, lesions=3, slices=40, rows=160, columns=160, lesion_scale=1.5
    )


@pytest.fixture
def one_thread() -> Iterator[None]:
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    yield
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


def load(study: PhantomStudy) -> tuple[CTVolume, list[Lesion]]:
    volume = load_ct_series(study.ct_files)
    return volume, find_lesions(load_segmentation(study.seg_file, volume)[0], volume)


def test_same_frame_of_reference_needs_no_registration(baseline: PhantomStudy) -> None:
    volume, lesions = load(baseline)
    result = match_lesions(volume, lesions, volume, lesions)
    assert result.alignment.method == "frame-of-reference"
    assert [(m.baseline_index, m.follow_up_index, m.rule) for m in result.matches] == [
        (0, 0, "overlap"),
        (1, 1, "overlap"),
        (2, 2, "overlap"),
    ]
    assert all(m.dice == 1.0 and m.distance_mm == pytest.approx(0.0, abs=1e-9) for m in result.matches)
    assert result.new == result.disappeared == ()


@pytest.mark.parametrize("shift", [(7.3, -4.1, 3.2), (-12.0, 9.0, -6.0)])
def test_registration_recovers_a_known_body_shift(
    baseline: PhantomStudy, tmp_path: Path, shift: tuple[float, float, float], one_thread: None
) -> None:
    follow = generate_follow_up(baseline, tmp_path / "f", shrink=1.0, texture_change=None, body_shift_mm=shift)
    b_volume, b_lesions = load(baseline)
    f_volume, f_lesions = load(follow)
    assert b_volume.frame_of_reference_uid != f_volume.frame_of_reference_uid
    result = match_lesions(b_volume, b_lesions, f_volume, f_lesions)
    alignment = result.alignment
    assert alignment.method == "rigid-registration"
    # the transform maps a baseline point to the follow-up point: the body moved by ``shift``
    assert np.subtract(alignment.translation_mm, shift) == pytest.approx([0, 0, 0], abs=1.0)
    assert alignment.rotation_degrees < 1.0
    assert alignment.metric_final < alignment.metric_start
    assert alignment.seconds > 0  # recorded for the report; how fast is a benchmark's business
    assert len(result.matches) == 3 and result.new == result.disappeared == ()
    for match in result.matches:
        assert match.rule == "overlap" and match.dice > 0.8 and match.distance_mm < 1.5


def test_registration_recovers_a_rotated_and_recentred_copy(baseline: PhantomStudy, one_thread: None) -> None:
    """A copy resampled through a known rotation + translation, in a frame whose origin moved 150 mm."""
    volume, lesions = load(baseline)
    truth = sitk.Euler3DTransform()
    truth.SetCenter(lesions[0].centroid_mm)
    truth.SetRotation(*np.radians([1.5, -1.0, 4.0]))
    truth.SetTranslation((6.0, -3.0, 4.0))
    moved = sitk.Resample(volume.image, volume.image, truth.GetInverse(), sitk.sitkBSpline, -1000.0, sitk.sitkFloat32)
    moved.SetOrigin(tuple(np.add(moved.GetOrigin(), (0.0, 0.0, 150.0))))  # another table / frame origin
    copy = volume_from_image(moved, frame_of_reference_uid="2.25.1")
    alignment = register_rigid(volume, copy)
    recentre = sitk.TranslationTransform(3, (0.0, 0.0, 150.0))
    for lesion in lesions:
        expected = recentre.TransformPoint(truth.TransformPoint(lesion.centroid_mm))
        found = alignment.transform().TransformPoint(lesion.centroid_mm)
        assert np.linalg.norm(np.subtract(found, expected)) < 1.5
    assert alignment.start == "body centres"


@pytest.mark.slow
def test_full_size_pair_registers_and_matches(tmp_path: Path, one_thread: None) -> None:
    """A 256 x 256 x 60 pair with a body shift: the rigid alignment finds the shift, every lesion is matched.

    Its time is a benchmark's business, not a test's (no timed assertion here).
    """
    base = generate_study(tmp_path / "b", seed=3, lesions=3, slices=60, rows=256, columns=256)
    follow = generate_follow_up(base, tmp_path / "f", shrink=0.7, body_shift_mm=(5.0, -6.0, 2.5))
    b_volume, b_lesions = load(base)
    f_volume, f_lesions = load(follow)
    result = match_lesions(b_volume, b_lesions, f_volume, f_lesions)
    assert np.subtract(result.alignment.translation_mm, (5.0, -6.0, 2.5)) == pytest.approx([0, 0, 0], abs=1.0)
    assert len(result.matches) == 3


def _synthetic(centres_mm: list[tuple[float, float, float]], radii_mm: list[float]) -> tuple[CTVolume, list[Lesion]]:
    """A 1 mm grid with one ball per centre, as lesions (same frame of reference for all calls)."""
    shape = (60, 80, 80)
    image = sitk.GetImageFromArray(np.zeros(shape, dtype=np.float32))
    volume = volume_from_image(image, frame_of_reference_uid="2.25.7")
    z, y, x = np.indices(shape, dtype=float)
    lesions = []
    for centre, radius in zip(centres_mm, radii_mm, strict=True):
        mask = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2 <= radius**2
        lesions += find_lesions(LabelMask(SOURCE, mask), volume)
    return volume, lesions


def test_new_disappeared_overlap_and_distance() -> None:
    b_volume, b_lesions = _synthetic([(20, 20, 20), (60, 60, 40), (60, 20, 30)], [8, 6, 3])
    # lesion 0 shrank in place; lesion 1 is gone; lesion 2 (small) moved 12 mm: no overlap, within 20 mm;
    # a new lesion appeared far from everything. Listed in another order than the baseline.
    f_volume, f_lesions = _synthetic([(20, 60, 40), (60, 32, 30), (21, 20, 20)], [5, 3, 5])
    result = match_lesions(b_volume, b_lesions, f_volume, f_lesions)
    pairs = {(m.baseline_index, m.follow_up_index): m for m in result.matches}
    assert set(pairs) == {(0, 2), (2, 1)}
    assert pairs[(0, 2)].rule == "overlap" and pairs[(0, 2)].dice == pytest.approx(2 * 5**3 / (8**3 + 5**3), rel=0.1)
    assert pairs[(2, 1)].rule == "distance" and pairs[(2, 1)].distance_mm == pytest.approx(12.0, abs=0.1)
    assert result.new == (0,)
    assert result.disappeared == (1,)


def test_too_far_is_not_a_pair() -> None:
    b_volume, b_lesions = _synthetic([(20, 20, 20)], [3])
    f_volume, f_lesions = _synthetic([(20, 45, 20)], [3])
    result = match_lesions(b_volume, b_lesions, f_volume, f_lesions)
    assert result.matches == ()
    assert (result.new, result.disappeared) == ((0,), (0,))
    closer = match_lesions(b_volume, b_lesions, f_volume, f_lesions, max_distance_mm=30.0)
    assert len(closer.matches) == 1


def test_hungarian_assignment_maximises_total_overlap() -> None:
    # follow-up lesion 0 overlaps both baseline lesions; greedy pairing would steal baseline 1's partner
    b_volume, b_lesions = _synthetic([(20, 40, 30), (34, 40, 30)], [7, 7])
    f_volume, f_lesions = _synthetic([(29, 40, 30), (16, 40, 30)], [7, 5])
    result = match_lesions(b_volume, b_lesions, f_volume, f_lesions)
    assert {(m.baseline_index, m.follow_up_index) for m in result.matches} == {(0, 1), (1, 0)}


def test_either_side_may_be_empty() -> None:
    volume, lesions = _synthetic([(20, 20, 20), (50, 50, 30)], [5, 5])
    assert match_lesions(volume, lesions, volume, []).disappeared == (0, 1)
    assert match_lesions(volume, [], volume, lesions).new == (0, 1)


def test_alignment_maps_points_back_to_the_baseline() -> None:
    alignment = Alignment(method="rigid-registration", parameters=(0.0, 0.0, np.pi / 2, 10.0, 0.0, 0.0))
    follow_point = alignment.transform().TransformPoint((1.0, 0.0, 0.0))
    assert alignment.to_baseline(np.array([follow_point]))[0] == pytest.approx([1.0, 0.0, 0.0])
    assert alignment.rotation_degrees == pytest.approx(90.0)
    same = align(*(_synthetic([(20, 20, 20)], [3])[0],) * 2)
    assert same.method == "frame-of-reference"
