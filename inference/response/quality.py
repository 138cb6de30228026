"""Acquisition quality tiers of a baseline / follow-up pair (M5, Dercle et al. 2020).

The paper classified every CT of its trial as **high quality (HQ)** or **standard quality (SD)**
("the only difference is the quality of the CT scan acquisition protocol and reconstruction
settings"), developed the signature on HQ patients and then *calibrated it per quality tier* because
the features differed between HQ and SD. Its exact quality criteria are in the paper's supplementary
methods, which the seed does not hold; what the main text names is the reconstruction settings and the
portal-venous contrast phase. pacs-agent therefore decides the tier by a documented, configurable rule
on the DICOM attributes of both CTs (:class:`TierRule`, recorded in the response package as
``[tiers.rule]``):

- **slice thickness** (``SliceThickness``; the slice spacing of the volume when absent) at most
  ``max_slice_thickness_mm`` (5 mm) at both time points, and the two within
  ``max_thickness_difference_mm`` (1 mm) of each other;
- **reconstruction kernel** (``ConvolutionKernel``) not a sharp / lung / bone kernel
  (``sharp_kernel_pattern``, a case-insensitive regular expression over common vendor names), and the
  same kernel at both time points (``require_same_kernel``);
- **contrast** recorded (``ContrastBolusAgent`` or ``ContrastBolusRoute``) at both time points
  (``require_contrast``): the pair is a contrast-enhanced (portal-venous) pair.

A pair meeting every criterion is ``high``; otherwise ``standard``, with the reasons. An attribute a
CT does not carry counts against ``high`` (``missing = "standard"``) or is not checked
(``missing = "ignore"``). Pure functions of small dataclasses: no pydicom reading here beyond the
headers the CT loader already kept.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from inference.errors import InputError

HIGH, STANDARD = "high", "standard"
TIERS: tuple[str, ...] = (HIGH, STANDARD)
"""The quality tiers, as the paper's HQ and SD."""
TIER_NAMES: dict[str, str] = {HIGH: "high-quality CT", STANDARD: "standard-quality CT"}
DEFAULT_SHARP_KERNELS = r"lung|bone|sharp|edge|detail|\b[BI]r?[5-9]\d|\bFC[3-9]\d|\bY[A-H]\b"
"""Sharp kernels of common vendors: GE LUNG / BONE / BONEPLUS / EDGE / DETAIL, Siemens B50f-B99f,
Br5x-Br9x, I50f-I99f, Canon / Toshiba FC30 and above, Philips YA-YH."""


class TierRuleError(InputError):
    """A quality-tier rule (``[tiers.rule]`` of a package or ``--tier-rule`` file) is not valid."""


@dataclass(frozen=True)
class Acquisition:
    """The acquisition attributes of one CT series that the tier rule reads."""

    slice_thickness_mm: float | None
    kernel: str
    contrast: bool | None
    """True when ContrastBolusAgent or ContrastBolusRoute is filled, None when neither is present."""

    @classmethod
    def from_headers(cls, headers: Sequence[Any], slice_spacing_mm: float | None = None) -> Acquisition:
        """Read the attributes from the first header of a CT series (pydicom datasets).

        ``slice_spacing_mm`` (the volume's spacing along the slice normal) stands in for a missing or
        invalid SliceThickness.
        """
        ds = headers[0] if headers else None
        thickness = _positive(getattr(ds, "SliceThickness", None)) if ds is not None else None
        if thickness is None:
            thickness = _positive(slice_spacing_mm)
        kernel = ""
        contrast: bool | None = None
        if ds is not None:
            raw = getattr(ds, "ConvolutionKernel", "") or ""
            kernel = str(raw) if isinstance(raw, str) else "\\".join(str(v) for v in raw)
            agent = "ContrastBolusAgent" in ds or "ContrastBolusRoute" in ds
            if agent:
                contrast = bool(str(ds.get("ContrastBolusAgent", "") or "").strip()) or bool(
                    str(ds.get("ContrastBolusRoute", "") or "").strip()
                )
        return cls(slice_thickness_mm=thickness, kernel=kernel.strip(), contrast=contrast)


@dataclass(frozen=True)
class TierRule:
    """When a pair of CTs is ``high`` quality (see the module docstring)."""

    max_slice_thickness_mm: float = 5.0
    max_thickness_difference_mm: float = 1.0
    sharp_kernel_pattern: str = DEFAULT_SHARP_KERNELS
    require_same_kernel: bool = True
    require_contrast: bool = True
    missing: str = STANDARD
    """What an attribute a CT does not carry means: ``"standard"`` (not high) or ``"ignore"``."""

    def __post_init__(self) -> None:
        for name in ("max_slice_thickness_mm", "max_thickness_difference_mm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise TierRuleError(f"tier rule: {name} must be a number >= 0, got {value!r}")
        for name in ("require_same_kernel", "require_contrast"):
            if not isinstance(getattr(self, name), bool):
                raise TierRuleError(f"tier rule: {name} must be true or false, got {getattr(self, name)!r}")
        if self.missing not in (STANDARD, "ignore"):
            raise TierRuleError(f'tier rule: missing must be "standard" or "ignore", got {self.missing!r}')
        try:
            re.compile(self.sharp_kernel_pattern, re.IGNORECASE)
        except (re.error, TypeError) as exc:
            raise TierRuleError(f"tier rule: sharp_kernel_pattern is not a valid regular expression: {exc}") from None

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> TierRule:
        """The rule from a TOML table; unknown keys are refused by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(table) - known)
        if unknown:
            raise TierRuleError(f"tier rule: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        values = dict(table)
        for name in ("max_slice_thickness_mm", "max_thickness_difference_mm"):
            if isinstance(values.get(name), int) and not isinstance(values.get(name), bool):
                values[name] = float(values[name])
        return cls(**values)

    def as_table(self) -> dict[str, Any]:
        """The rule as a TOML table (``[tiers.rule]``)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class QualityTier:
    """The tier of one pair and why."""

    tier: str
    reasons: tuple[str, ...] = ()
    """Why the pair is not ``high`` (empty for ``high``)."""

    def describe(self) -> str:
        """E.g. ``standard-quality CT: baseline slice thickness 7.5 mm > 5 mm``."""
        text = TIER_NAMES.get(self.tier, self.tier)
        if self.reasons:
            return f"{text}: {'; '.join(self.reasons)}"
        return f"{text}: every criterion of the tier rule met"


def decide_tier(baseline: Acquisition, follow_up: Acquisition, rule: TierRule | None = None) -> QualityTier:
    """The quality tier of a baseline / follow-up pair.

    Parameters
    ----------
    baseline, follow_up
        Acquisition attributes of the two CTs.
    rule
        The tier rule (default: :class:`TierRule` defaults).

    Returns
    -------
    QualityTier
        ``high`` when both CTs meet every criterion, else ``standard`` with one reason per failed one.
    """
    rule = rule or TierRule()
    strict = rule.missing == STANDARD
    sharp = re.compile(rule.sharp_kernel_pattern, re.IGNORECASE)
    reasons: list[str] = []
    for when, acq in (("baseline", baseline), ("follow-up", follow_up)):
        if acq.slice_thickness_mm is None:
            if strict:
                reasons.append(f"{when} slice thickness unknown")
        elif acq.slice_thickness_mm > rule.max_slice_thickness_mm + 1e-6:
            reasons.append(f"{when} slice thickness {acq.slice_thickness_mm:g} mm > {rule.max_slice_thickness_mm:g} mm")
        if not acq.kernel:
            if strict:
                reasons.append(f"{when} reconstruction kernel not recorded")
        elif sharp.search(acq.kernel):
            reasons.append(f"{when} reconstruction kernel {acq.kernel!r} is a sharp kernel")
        if rule.require_contrast:
            if acq.contrast is None:
                if strict:
                    reasons.append(f"{when} contrast not recorded")
            elif not acq.contrast:
                reasons.append(f"{when} without contrast")
    b, f = baseline.slice_thickness_mm, follow_up.slice_thickness_mm
    if b is not None and f is not None and abs(b - f) > rule.max_thickness_difference_mm + 1e-6:
        reasons.append(
            f"slice thickness differs by {abs(b - f):g} mm (> {rule.max_thickness_difference_mm:g} mm) between the CTs"
        )
    same = baseline.kernel.upper() == follow_up.kernel.upper()
    if rule.require_same_kernel and baseline.kernel and follow_up.kernel and not same:
        reasons.append(f"kernels differ ({baseline.kernel!r} vs {follow_up.kernel!r})")
    return QualityTier(HIGH if not reasons else STANDARD, tuple(reasons))


def _positive(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None
