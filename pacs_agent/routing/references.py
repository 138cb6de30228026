"""Pair a segmentation with its CT by series, frame of reference and slice geometry.

Real archives re-export, anonymise, crop and re-send series, so the per-image references inside a
SEG or RTSTRUCT (SOP Instance UIDs of the images it was drawn on) are often stale although the CT
it was drawn on is right there. What decides is geometry, as the IBSI did: a segmentation is usable
with a CT series when the series is the one it references (by Series Instance UID, or failing that
a series of the same Frame of Reference) and the series has a slice within half a slice spacing of
every plane its tumour contours / frames lie on.

Pure functions of recorded positions: no files, no network.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, overload

Point = tuple[float, float, float]
Orientation = tuple[float, float, float, float, float, float]

__all__ = ["CTGeometry", "Coverage", "coverage", "parse_vector"]


@overload
def parse_vector(text: str | None, size: Literal[3]) -> Point | None: ...
@overload
def parse_vector(text: str | None, size: Literal[6]) -> Orientation | None: ...
@overload
def parse_vector(text: str | None, size: int) -> tuple[float, ...] | None: ...
def parse_vector(text: str | None, size: int) -> tuple[float, ...] | None:
    """``size`` numbers from a backslash-separated DICOM DS value, or None when absent or malformed."""
    if not text:
        return None
    try:
        values = tuple(float(v) for v in text.split("\\"))
    except ValueError:
        return None
    if len(values) != size or not all(math.isfinite(v) for v in values):
        return None
    return values


@dataclass(frozen=True)
class CTGeometry:
    """Slice geometry of a received CT series: one orientation, one position per slice."""

    orientation: Orientation
    """Image Orientation (Patient): row then column direction cosines."""
    positions: tuple[Point, ...]
    """Image Position (Patient) of each received slice."""

    @property
    def normal(self) -> Point:
        """Unit slice normal (row x column)."""
        r, c = self.orientation[:3], self.orientation[3:]
        n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
        length = math.sqrt(sum(v * v for v in n)) or 1.0
        return (n[0] / length, n[1] / length, n[2] / length)

    def along_normal(self, point: Sequence[float]) -> float:
        """Distance (mm) of ``point`` along the slice normal."""
        n = self.normal
        return point[0] * n[0] + point[1] * n[1] + point[2] * n[2]

    def slice_positions(self) -> tuple[float, ...]:
        """Sorted slice positions along the normal (mm), duplicates merged."""
        return tuple(sorted({round(self.along_normal(p), 3) for p in self.positions}))

    def spacing(self) -> float | None:
        """Median distance between neighbouring slices (mm), or None with fewer than two slices."""
        positions = self.slice_positions()
        gaps = sorted(b - a for a, b in itertools.pairwise(positions) if b - a > 1e-3)
        return gaps[len(gaps) // 2] if gaps else None


@dataclass(frozen=True)
class Coverage:
    """How the planes of a segmentation meet the slices of a CT series."""

    planes: int
    """Distinct planes looked at."""
    uncovered: tuple[float, ...]
    """Plane positions (mm along the slice normal) with no slice within half a slice spacing."""
    first_slice: float
    last_slice: float
    spacing: float

    @property
    def complete(self) -> bool:
        """True when every plane has a slice."""
        return not self.uncovered

    def describe(self) -> str:
        """Where the uncovered planes are, for a reason an imaging IT person can act on."""
        if not self.uncovered:
            return f"all {self.planes} plane(s) lie on received slices"
        low, high = self.first_slice - self.spacing / 2, self.last_slice + self.spacing / 2
        outside = [p for p in self.uncovered if p < low or p > high]
        inside = len(self.uncovered) - len(outside)
        span = f"{min(self.uncovered):.1f} to {max(self.uncovered):.1f} mm"
        parts = []
        if outside:
            parts.append(f"{len(outside)} outside the received volume")
        if inside:
            parts.append(f"{inside} in gaps between received slices")
        return (
            f"{len(self.uncovered)} of {self.planes} plane(s) have no CT slice ({', '.join(parts)}; planes at "
            f"{span} along the slice normal, received slices from {self.first_slice:.1f} to "
            f"{self.last_slice:.1f} mm every {self.spacing:.2f} mm)"
        )


def coverage(geometry: CTGeometry, points: Sequence[Sequence[float]], default_spacing: float = 1.0) -> Coverage:
    """Which of the planes through ``points`` have a slice of ``geometry`` within half a slice spacing.

    Parameters
    ----------
    geometry
        The CT series.
    points
        One point per plane (patient coordinates, mm).
    default_spacing
        Spacing (mm) assumed for a single-slice series.
    """
    slices = geometry.slice_positions()
    spacing = geometry.spacing() or default_spacing
    tolerance = spacing / 2 + 1e-3
    planes = sorted({round(geometry.along_normal(p), 3) for p in points})
    uncovered = []
    for plane in planes:
        nearest = min((abs(plane - s) for s in slices), default=math.inf)
        if nearest > tolerance:
            uncovered.append(plane)
    return Coverage(
        planes=len(planes),
        uncovered=tuple(uncovered),
        first_slice=slices[0] if slices else math.nan,
        last_slice=slices[-1] if slices else math.nan,
        spacing=spacing,
    )
