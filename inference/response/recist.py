"""RECIST 1.1-like response category and volumetric change: the comparators reported beside the score.

What is computed (pure functions, no images):

- **Target lesions**: among the lesions measured at baseline, those with a longest axial diameter of
  at least ``MIN_TARGET_DIAMETER_MM`` (10 mm); the largest first, at most ``MAX_TARGETS_PER_ORGAN``
  (2) per organ and ``MAX_TARGETS`` (5) in total. RECIST also asks for lesions that can be measured
  reproducibly; here size is the only criterion.
- **Sum of diameters** of the target lesions at baseline and at follow-up. At follow-up a target
  lesion is measured on its matched follow-up lesion; a target that disappeared counts 0 mm.
- **Percent change** = (follow-up sum - baseline sum) / baseline sum x 100. RECIST measures
  progression against the smallest sum on study (nadir); with two time points the nadir is the
  baseline.
- **Category**, checked in this order:
  PD (progressive disease) when any new lesion appeared, or the sum grew by >= 20 % *and* by >= 5 mm;
  CR (complete response) when every target lesion disappeared;
  PR (partial response) when the sum shrank by >= 30 %;
  SD (stable disease) otherwise;
  NE (not evaluable) when there is no target lesion and no new lesion.
  Non-target lesions are not assessed (RECIST would also call PD on their unequivocal progression, and
  CR needs them gone too).
- **Volumetric change** = (total follow-up volume - total baseline volume) / total baseline volume x 100
  over *all* segmented lesions (new lesions included, disappeared ones count 0).
"""

from __future__ import annotations

from collections.abc import Sequence

from inference.response.results import CATEGORY_NAMES, Category, MeasuredLesion, RecistResult  # noqa: F401

MIN_TARGET_DIAMETER_MM = 10.0
MAX_TARGETS_PER_ORGAN = 2
MAX_TARGETS = 5
PR_THRESHOLD_PERCENT = -30.0
PD_THRESHOLD_PERCENT = 20.0
PD_MIN_ABSOLUTE_MM = 5.0
_TOLERANCE = 1e-9
"""Percentages within this of a threshold count as reaching it (floating-point rounding)."""


def select_targets(lesions: Sequence[MeasuredLesion]) -> list[MeasuredLesion]:
    """Target lesions: >= 10 mm at baseline, largest first, at most 2 per organ and 5 in total.

    Parameters
    ----------
    lesions
        Every lesion measured at baseline.

    Returns
    -------
    list of MeasuredLesion
        In selection order (largest baseline diameter first; ties by ``lesion_id``).
    """
    ranked = sorted(
        (lesion for lesion in lesions if lesion.baseline_diameter_mm >= MIN_TARGET_DIAMETER_MM - _TOLERANCE),
        key=lambda lesion: (-lesion.baseline_diameter_mm, lesion.lesion_id),
    )
    targets: list[MeasuredLesion] = []
    per_organ: dict[str, int] = {}
    for lesion in ranked:
        if len(targets) == MAX_TARGETS:
            break
        if per_organ.get(lesion.organ, 0) == MAX_TARGETS_PER_ORGAN:
            continue
        per_organ[lesion.organ] = per_organ.get(lesion.organ, 0) + 1
        targets.append(lesion)
    return targets


def assess_response(
    lesions: Sequence[MeasuredLesion], *, new_lesions: int = 0, new_lesion_volume_ml: float = 0.0
) -> RecistResult:
    """RECIST 1.1-like category, sums of diameters and volumetric change.

    Parameters
    ----------
    lesions
        Every baseline lesion, with its matched follow-up measurement or None when it disappeared.
    new_lesions
        Number of lesions seen only at follow-up.
    new_lesion_volume_ml
        Their total volume (enters the volumetric change).

    Returns
    -------
    RecistResult

    Raises
    ------
    ValueError
        A negative count, diameter or volume.
    """
    if new_lesions < 0 or new_lesion_volume_ml < 0:
        raise ValueError("new_lesions and new_lesion_volume_ml must not be negative")
    for lesion in lesions:
        values = (
            lesion.baseline_diameter_mm,
            lesion.baseline_volume_ml,
            lesion.follow_up_diameter_mm or 0.0,
            lesion.follow_up_volume_ml or 0.0,
        )
        if min(values) < 0:
            raise ValueError(f"lesion {lesion.lesion_id!r} has a negative diameter or volume")
    targets = select_targets(lesions)
    baseline_sum = sum(t.baseline_diameter_mm for t in targets)
    follow_up_sum = sum(t.follow_up_diameter_mm or 0.0 for t in targets)
    absolute = follow_up_sum - baseline_sum
    percent = 100.0 * absolute / baseline_sum if baseline_sum > 0 else None
    category, reason = _category(targets, percent, absolute, new_lesions)
    baseline_volume = sum(lesion.baseline_volume_ml for lesion in lesions)
    follow_up_volume = sum(lesion.follow_up_volume_ml or 0.0 for lesion in lesions) + new_lesion_volume_ml
    volumetric = 100.0 * (follow_up_volume - baseline_volume) / baseline_volume if baseline_volume > 0 else None
    return RecistResult(
        category=category,
        reason=reason,
        target_ids=tuple(t.lesion_id for t in targets),
        baseline_sum_mm=baseline_sum,
        follow_up_sum_mm=follow_up_sum,
        percent_change=percent,
        absolute_change_mm=absolute,
        new_lesions=new_lesions,
        baseline_volume_ml=baseline_volume,
        follow_up_volume_ml=follow_up_volume,
        volumetric_change_percent=volumetric,
    )


def _category(
    targets: Sequence[MeasuredLesion], percent: float | None, absolute: float, new_lesions: int
) -> tuple[Category, str]:
    if new_lesions:
        return "PD", f"{new_lesions} new lesion(s) at follow-up"
    if not targets or percent is None:
        return (
            "NE",
            f"no target lesion (no baseline lesion with a longest axial diameter >= {MIN_TARGET_DIAMETER_MM:g} mm)",
        )
    if all(t.follow_up_diameter_mm is None or t.follow_up_diameter_mm == 0 for t in targets):
        return "CR", "every target lesion disappeared"
    if percent >= PD_THRESHOLD_PERCENT - _TOLERANCE and absolute >= PD_MIN_ABSOLUTE_MM - _TOLERANCE:
        return "PD", f"sum of diameters +{percent:.1f} % (+{absolute:.1f} mm): >= +20 % and >= 5 mm"
    if percent <= PR_THRESHOLD_PERCENT + _TOLERANCE:
        return "PR", f"sum of diameters {percent:.1f} %: <= -30 %"
    return "SD", f"sum of diameters {percent:+.1f} % ({absolute:+.1f} mm): neither <= -30 % nor >= +20 % and +5 mm"
