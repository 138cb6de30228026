"""Lesion matching between a baseline and a follow-up CT: alignment, then overlap, then distance.

**Alignment.** When both CTs share the Frame of Reference UID their patient coordinates are the same
space and no registration is done. Otherwise the follow-up CT is registered rigidly onto the baseline
CT with SimpleITK:

- 6 degrees of freedom (``Euler3DTransform``: 3 rotations about the baseline region's centre, 3
  translations); Mattes mutual information (32 bins) on the CT clamped to [-300, 500] HU (air, fat,
  soft tissue and contrast-filled vessels keep their contrast, dense bone stops dominating);
- restricted to a region of the baseline CT: the liver mask when the segmentation has one, else the
  union of the baseline lesions, in both cases grown by ``REGION_MARGIN_MM`` (60 mm) and cropped to
  the CT; without any mask, the whole baseline CT;
- start: the better (by the metric) of "patient coordinates as they are" and "body centres of mass
  aligned" (body = voxels above -500 HU), so a changed table position or a re-centred frame of
  reference is caught before the optimiser starts;
- three resolution levels (shrink 4, 2, 1; smoothing 2, 1, 0 voxels), regular-step gradient descent,
  at most ``MAX_ITERATIONS`` (100) steps per level, a fixed number of random samples per level (at most
  ``MAX_SAMPLES``, seeded: the same pair always gives the same transform). The result is kept only if
  it scores better than the start; the time is bounded by the iteration and sample caps (a
  256 x 256 x 60 phantom pair registers in a few seconds on one core).

**Mapping.** Follow-up lesion masks are resampled onto the baseline grid (nearest neighbour) through the
transform; follow-up centroids are mapped into baseline patient coordinates by its inverse.

**Matching.** (1) Overlap: Dice between every baseline lesion and every mapped follow-up lesion; a
Hungarian assignment (``scipy.optimize.linear_sum_assignment``) maximises the total Dice; pairs with
Dice >= ``MIN_DICE`` (0.05) match. (2) Distance: the lesions left over are assigned by centroid
distance (Hungarian again); pairs closer than ``MAX_DISTANCE_MM`` (20 mm) match. Baseline lesions
left without a partner have *disappeared*; follow-up lesions left without one are *new*.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import SimpleITK as sitk
from scipy.optimize import linear_sum_assignment

from inference.imaging.lesions import Lesion
from inference.imaging.volume import CTVolume
from inference.response.results import Alignment, AlignmentMethod  # noqa: F401 - the types live there
from inference.vectors import vector3

logger = logging.getLogger(__name__)

REGION_MARGIN_MM = 60.0
"""Margin (mm) around the lesions / liver that the registration looks at."""
CLAMP_HU = (-300.0, 500.0)
"""CT values are clamped to this range before registration."""
BODY_THRESHOLD_HU = -500.0
SHRINK_FACTORS = (4, 2, 1)
SMOOTHING_SIGMAS = (2.0, 1.0, 0.0)
MAX_ITERATIONS = 100
MAX_SAMPLES = 20000
"""Random samples of the metric per resolution level (upper bound)."""
HISTOGRAM_BINS = 32
RANDOM_SEED = 20200204
MIN_DICE = 0.05
"""Smallest overlap (Dice) that makes two lesions a pair in the overlap step."""
MAX_DISTANCE_MM = 20.0
"""Largest centroid distance (mm, after alignment) that makes two lesions a pair in the distance step."""
_NO_PAIR = 1e6


@dataclass(frozen=True)
class LesionMatch:
    """A baseline lesion and the follow-up lesion it became (indices into the two lesion lists)."""

    baseline_index: int
    follow_up_index: int
    dice: float
    distance_mm: float
    rule: Literal["overlap", "distance"]


@dataclass(frozen=True)
class MatchResult:
    """Pairs, new lesions (follow-up indices) and disappeared lesions (baseline indices)."""

    alignment: Alignment
    matches: tuple[LesionMatch, ...]
    new: tuple[int, ...]
    disappeared: tuple[int, ...]
    follow_up_centroids_in_baseline_mm: tuple[tuple[float, float, float], ...]


def align(
    baseline: CTVolume,
    follow_up: CTVolume,
    *,
    region_mask: np.ndarray | None = None,
    region_label: str = "lesions",
    force_registration: bool = False,
) -> Alignment:
    """Bring follow-up patient coordinates into the baseline's: same frame of reference, or registration.

    Parameters
    ----------
    baseline, follow_up
        The two CT volumes.
    region_mask
        Bool (z, y, x) mask on the baseline grid (liver or lesions) that the registration looks at,
        grown by :data:`REGION_MARGIN_MM`; None for the whole CT.
    region_label
        What ``region_mask`` is (for the record).
    force_registration
        Register even when the frames of reference are the same.

    Returns
    -------
    Alignment
    """
    same_for = bool(baseline.frame_of_reference_uid) and (
        baseline.frame_of_reference_uid == follow_up.frame_of_reference_uid
    )
    if same_for and not force_registration:
        return Alignment(method="frame-of-reference", region="none", start="identity")
    return register_rigid(baseline, follow_up, region_mask=region_mask, region_label=region_label)


def register_rigid(
    baseline: CTVolume,
    follow_up: CTVolume,
    *,
    region_mask: np.ndarray | None = None,
    region_label: str = "lesions",
) -> Alignment:
    """Rigid registration of the follow-up CT onto the baseline CT (see the module docstring).

    Parameters
    ----------
    baseline, follow_up
        The two CT volumes (fixed and moving image).
    region_mask
        Bool (z, y, x) mask on the baseline grid to restrict the registration to (grown by
        :data:`REGION_MARGIN_MM`), or None for the whole baseline CT.
    region_label
        What ``region_mask`` is (for the record).

    Returns
    -------
    Alignment
        ``method="rigid-registration"``, the transform, metric values, iterations and time.
    """
    started = time.perf_counter()
    fixed_full = _prepare(baseline.image)
    moving = _prepare(follow_up.image)
    fixed, region = _crop_to_region(fixed_full, baseline, region_mask, region_label)
    centre = fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in fixed.GetSize()])

    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=HISTOGRAM_BINS)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    # The metric is sampled (MAX_SAMPLES points per level): image gradients are computed at those
    # points, not as whole gradient images of the CT at every level (seconds and GBs for nothing).
    reg.MetricUseFixedImageGradientFilterOff()
    reg.MetricUseMovingImageGradientFilterOff()
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=4.0,
        minStep=0.01,
        numberOfIterations=MAX_ITERATIONS,
        relaxationFactor=0.5,
        gradientMagnitudeTolerance=1e-6,
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(list(SHRINK_FACTORS))
    reg.SetSmoothingSigmasPerLevel(list(SMOOTHING_SIGMAS))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    voxels = int(np.prod(fixed.GetSize()))
    percentages = [min(1.0, MAX_SAMPLES * shrink**3 / max(voxels, 1)) for shrink in SHRINK_FACTORS]
    reg.SetMetricSamplingPercentagePerLevel(percentages, RANDOM_SEED)

    start_name, start_transform, metric_start = _best_start(reg, fixed, moving, fixed_full, centre)
    reg.SetInitialTransform(start_transform, inPlace=False)
    final = reg.Execute(fixed, moving)
    iterations = int(reg.GetOptimizerIteration())
    stop = reg.GetOptimizerStopConditionDescription()
    result = _as_euler(final)
    metric_final = _metric(fixed, moving, result)
    if metric_final > metric_start:  # the optimiser made it worse: keep the start
        logger.warning(
            "rigid registration ended worse than it started (%.4f > %.4f); kept the start", metric_final, metric_start
        )
        result, metric_final = start_transform, metric_start
    seconds = time.perf_counter() - started
    angle_x, angle_y, angle_z, shift_x, shift_y, shift_z = (float(v) for v in result.GetParameters())
    alignment = Alignment(
        method="rigid-registration",
        parameters=(angle_x, angle_y, angle_z, shift_x, shift_y, shift_z),
        centre_mm=vector3(result.GetCenter()),
        metric_start=float(metric_start),
        metric_final=float(metric_final),
        iterations=iterations,
        seconds=seconds,
        region=region,
        start=start_name,
        stop_condition=stop,
    )
    logger.info(
        "rigid registration: %.1f deg, translation %s mm, MI %.4f -> %.4f, %d iterations, %.1f s",
        alignment.rotation_degrees,
        tuple(round(v, 1) for v in alignment.translation_mm),
        metric_start,
        metric_final,
        iterations,
        seconds,
    )
    return alignment


def _prepare(image: sitk.Image) -> sitk.Image:
    return sitk.Clamp(sitk.Cast(image, sitk.sitkFloat32), sitk.sitkFloat32, CLAMP_HU[0], CLAMP_HU[1])


def _crop_to_region(
    image: sitk.Image, volume: CTVolume, region_mask: np.ndarray | None, label: str
) -> tuple[sitk.Image, str]:
    if region_mask is None or not np.asarray(region_mask).any():
        return image, "whole baseline CT"
    mask = np.asarray(region_mask, dtype=bool)
    if mask.shape != volume.shape:
        raise ValueError(f"region mask shape {mask.shape} is not the baseline volume shape {volume.shape}")
    lo, hi = [], []
    for axis_zyx, spacing, n in zip((2, 1, 0), volume.spacing_xyz, image.GetSize(), strict=True):
        other = tuple(a for a in range(3) if a != axis_zyx)
        idx = np.flatnonzero(mask.any(axis=other))
        margin = int(np.ceil(REGION_MARGIN_MM / spacing))
        lo.append(max(0, int(idx[0]) - margin))
        hi.append(min(int(n), int(idx[-1]) + margin + 1))
    # at least 8 voxels per axis after the coarsest shrink
    for i, n in enumerate(image.GetSize()):
        need = 8 * SHRINK_FACTORS[0]
        while hi[i] - lo[i] < min(need, n):
            lo[i], hi[i] = max(0, lo[i] - 1), min(int(n), hi[i] + 1)
    cropped = sitk.RegionOfInterest(image, [h - lo_ for h, lo_ in zip(hi, lo, strict=True)], lo)
    return cropped, f"{label} + {REGION_MARGIN_MM:g} mm"


def _best_start(
    reg: sitk.ImageRegistrationMethod,
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_full: sitk.Image,
    centre: tuple[float, ...],
) -> tuple[str, sitk.Euler3DTransform, float]:
    """The better of identity and body-centre alignment, by the metric at full resolution."""
    identity = sitk.Euler3DTransform()
    identity.SetCenter(centre)
    candidates = [("patient coordinates", identity)]
    shift = _body_centre(moving) - _body_centre(fixed_full)
    if np.all(np.isfinite(shift)):
        moments = sitk.Euler3DTransform()
        moments.SetCenter(centre)
        moments.SetTranslation(tuple(float(v) for v in shift))
        candidates.append(("body centres", moments))
    scored = [(_metric(fixed, moving, transform), name, transform) for name, transform in candidates]
    value, name, transform = min(scored, key=lambda item: item[0])
    return name, transform, value


def _metric(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform) -> float:
    """Mattes MI (negative: lower is better) at full resolution with the seeded random samples."""
    probe = sitk.ImageRegistrationMethod()
    probe.SetMetricAsMattesMutualInformation(numberOfHistogramBins=HISTOGRAM_BINS)
    probe.SetMetricSamplingStrategy(probe.RANDOM)
    probe.SetMetricSamplingPercentage(min(1.0, MAX_SAMPLES / max(int(np.prod(fixed.GetSize())), 1)), RANDOM_SEED)
    probe.MetricUseFixedImageGradientFilterOff()
    probe.MetricUseMovingImageGradientFilterOff()
    probe.SetInterpolator(sitk.sitkLinear)
    probe.SetInitialTransform(transform, inPlace=False)
    try:
        return float(probe.MetricEvaluate(fixed, moving))
    except RuntimeError:  # too few samples fall inside the moving image: a hopeless transform
        return 0.0


def _as_euler(transform: sitk.Transform) -> sitk.Euler3DTransform:
    """The Euler3DTransform inside what ImageRegistrationMethod.Execute returns."""
    while transform.GetName() == "CompositeTransform":
        transform = sitk.CompositeTransform(transform).GetNthTransform(0)
    return sitk.Euler3DTransform(transform)


def _body_centre(image: sitk.Image) -> np.ndarray:
    """Physical centre of mass of the voxels above BODY_THRESHOLD_HU (on a coarse copy)."""
    coarse = sitk.Shrink(image, [max(1, round(8.0 / s)) for s in image.GetSpacing()])
    body = sitk.GetArrayViewFromImage(coarse) > BODY_THRESHOLD_HU
    if not body.any():
        return np.full(3, np.nan)
    zyx = np.argwhere(body).mean(axis=0)
    return np.asarray(coarse.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in zyx[::-1])))


def map_lesion_masks(
    baseline: CTVolume, follow_up: CTVolume, lesions: Sequence[Lesion], alignment: Alignment
) -> np.ndarray:
    """Follow-up lesions as a label image on the baseline grid (0 background, ``i + 1`` = lesion ``i``).

    Parameters
    ----------
    baseline, follow_up
        The two CT volumes.
    lesions
        Follow-up lesions (masks on the follow-up grid).
    alignment
        From :func:`align`.

    Returns
    -------
    numpy.ndarray
        uint16 (z, y, x) labels on the baseline grid, nearest-neighbour resampled.
    """
    labels = np.zeros(follow_up.shape, dtype=np.uint16)
    for i, lesion in enumerate(lesions):
        labels[lesion.mask] = i + 1
    same_grid = (
        alignment.method == "frame-of-reference"
        and baseline.shape == follow_up.shape
        and np.allclose(baseline.origin, follow_up.origin, atol=1e-4)
        and np.allclose(baseline.spacing_xyz, follow_up.spacing_xyz, atol=1e-6)
        and np.allclose(baseline.direction, follow_up.direction, atol=1e-6)
    )
    if same_grid:
        return labels
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(follow_up.image)
    reference = sitk.Image(baseline.image.GetSize(), sitk.sitkUInt16)
    reference.CopyInformation(baseline.image)
    resampled = sitk.Resample(image, reference, alignment.transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16)
    return sitk.GetArrayFromImage(resampled)


def match_lesions(
    baseline: CTVolume,
    baseline_lesions: Sequence[Lesion],
    follow_up: CTVolume,
    follow_up_lesions: Sequence[Lesion],
    *,
    alignment: Alignment | None = None,
    region_mask: np.ndarray | None = None,
    region_label: str = "lesions",
    min_dice: float = MIN_DICE,
    max_distance_mm: float = MAX_DISTANCE_MM,
) -> MatchResult:
    """Match follow-up lesions to baseline lesions.

    Parameters
    ----------
    baseline, follow_up
        The two CT volumes.
    baseline_lesions, follow_up_lesions
        Lesions found on each (either list may be empty).
    alignment
        A precomputed alignment, or None to compute it with :func:`align` (``region_mask`` defaults to
        the union of the baseline lesions).
    region_mask, region_label
        Registration region on the baseline grid (see :func:`align`).
    min_dice
        Smallest Dice for a pair in the overlap step.
    max_distance_mm
        Largest centroid distance for a pair in the distance step.

    Returns
    -------
    MatchResult
    """
    if alignment is None:
        if region_mask is None and baseline_lesions:
            region_mask = np.zeros(baseline.shape, dtype=bool)
            for lesion in baseline_lesions:
                region_mask |= lesion.mask
        alignment = align(baseline, follow_up, region_mask=region_mask, region_label=region_label)
    centroids = (
        alignment.to_baseline(np.array([lesion.centroid_mm for lesion in follow_up_lesions]))
        if follow_up_lesions
        else np.zeros((0, 3))
    )
    nb, nf = len(baseline_lesions), len(follow_up_lesions)
    dice = np.zeros((nb, nf))
    if nb and nf:
        mapped = map_lesion_masks(baseline, follow_up, follow_up_lesions, alignment)
        mapped_sizes = np.bincount(mapped.ravel(), minlength=nf + 1)[1:]
        for i, lesion in enumerate(baseline_lesions):
            overlap = np.bincount(mapped[lesion.mask], minlength=nf + 1)[1:]
            dice[i] = 2.0 * overlap / np.maximum(lesion.mask.sum() + mapped_sizes, 1)
    distance = np.full((nb, nf), np.inf)
    for i, lesion in enumerate(baseline_lesions):
        if nf:
            distance[i] = np.linalg.norm(centroids - np.asarray(lesion.centroid_mm), axis=1)

    matches: list[LesionMatch] = []
    if nb and nf:
        cost = np.where(dice >= min_dice, -dice, _NO_PAIR)
        for row, col in zip(*linear_sum_assignment(cost), strict=True):
            if dice[row, col] >= min_dice:
                matches.append(
                    LesionMatch(int(row), int(col), float(dice[row, col]), float(distance[row, col]), "overlap")
                )
        left_b = [i for i in range(nb) if i not in {m.baseline_index for m in matches}]
        left_f = [j for j in range(nf) if j not in {m.follow_up_index for m in matches}]
        if left_b and left_f:
            sub = distance[np.ix_(left_b, left_f)]
            cost = np.where(sub <= max_distance_mm, sub, _NO_PAIR)
            for a, b in zip(*linear_sum_assignment(cost), strict=True):
                i, j = left_b[a], left_f[b]
                if distance[i, j] <= max_distance_mm:
                    matches.append(LesionMatch(i, j, float(dice[i, j]), float(distance[i, j]), "distance"))
    matches.sort(key=lambda m: m.baseline_index)
    matched_b = {m.baseline_index for m in matches}
    matched_f = {m.follow_up_index for m in matches}
    return MatchResult(
        alignment=alignment,
        matches=tuple(matches),
        new=tuple(j for j in range(nf) if j not in matched_f),
        disappeared=tuple(i for i in range(nb) if i not in matched_b),
        follow_up_centroids_in_baseline_mm=tuple(vector3(c) for c in centroids),
    )
