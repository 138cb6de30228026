"""Which CT series is the portal-venous phase? Rules are data (``[routing]`` in the config).

A series is portal-venous when none of its text fields (SeriesDescription, ProtocolName,
ImageComments) matches an exclusion pattern, the contrast agent is present if required, the
acquisition delay after contrast start is inside the window when one is set and both times are
known, and a portal-venous pattern matches (or, failing a pattern, the delay is inside the
window). Every verdict comes with the reason, shown by ``pacs-agent status``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

DEFAULT_PORTAL_VENOUS_PATTERNS = ("portal", "venous", r"\bPV\b", r"\b70 ?s(ec)?\b")
DEFAULT_EXCLUDE_PATTERNS = ("arterial", r"non[- ]?contrast", r"\bnative\b", r"\bdelayed\b", r"\bplain\b")


@dataclass(frozen=True)
class SeriesPhaseInfo:
    """The header fields of one CT series that phase selection looks at."""

    series_description: str | None = None
    protocol_name: str | None = None
    image_comments: str | None = None
    contrast_bolus_agent: str | None = None
    contrast_start_time: str | None = None
    """ContrastBolusStartTime (DICOM TM)."""
    acquisition_time: str | None = None
    """AcquisitionTime, else SeriesTime (DICOM TM)."""


@dataclass(frozen=True)
class PhaseRules:
    """The ``[routing]`` rules, compiled."""

    portal_venous_patterns: tuple[str, ...] = DEFAULT_PORTAL_VENOUS_PATTERNS
    exclude_patterns: tuple[str, ...] = DEFAULT_EXCLUDE_PATTERNS
    require_contrast_agent: bool = True
    delay_window_seconds: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        for pattern in (*self.portal_venous_patterns, *self.exclude_patterns):
            re.compile(pattern)  # fail early on a bad pattern
        if self.delay_window_seconds is not None:
            low, high = self.delay_window_seconds
            if not 0 <= low <= high:
                raise ValueError("delay window must be [min, max] seconds with 0 <= min <= max")


@dataclass(frozen=True)
class PhaseVerdict:
    """Portal-venous or not, and why."""

    portal_venous: bool
    reason: str


def _seconds(tm: str | None) -> float | None:
    if not tm:
        return None
    text = tm.strip()
    for fmt in ("%H%M%S.%f", "%H%M%S", "%H%M", "%H:%M:%S.%f", "%H:%M:%S"):
        try:
            t = datetime.strptime(text, fmt)
        except ValueError:
            continue
        return t.hour * 3600 + t.minute * 60 + t.second + t.microsecond / 1e6
    return None


def acquisition_delay_seconds(info: SeriesPhaseInfo) -> float | None:
    """Seconds from contrast start to acquisition, when both times are known (same day assumed)."""
    start, acquired = _seconds(info.contrast_start_time), _seconds(info.acquisition_time)
    if start is None or acquired is None:
        return None
    delay = acquired - start
    return delay + 86400 if delay < 0 else delay


def classify(info: SeriesPhaseInfo, rules: PhaseRules) -> PhaseVerdict:
    """Decide whether a CT series is the portal-venous phase under ``rules``."""
    fields = {
        "SeriesDescription": info.series_description,
        "ProtocolName": info.protocol_name,
        "ImageComments": info.image_comments,
    }
    for name, value in fields.items():
        for pattern in rules.exclude_patterns:
            if value and re.search(pattern, value, re.IGNORECASE):
                return PhaseVerdict(False, f"{name} {value!r} matches exclusion pattern {pattern!r}")
    if rules.require_contrast_agent and not (info.contrast_bolus_agent or "").strip():
        return PhaseVerdict(False, "no ContrastBolusAgent: not a contrast-enhanced series")
    delay = acquisition_delay_seconds(info)
    in_window = None
    if rules.delay_window_seconds is not None and delay is not None:
        low, high = rules.delay_window_seconds
        in_window = low <= delay <= high
        if not in_window:
            return PhaseVerdict(False, f"acquired {delay:.0f} s after contrast start, outside {low:g}-{high:g} s")
    for name, value in fields.items():
        for pattern in rules.portal_venous_patterns:
            if value and re.search(pattern, value, re.IGNORECASE):
                return PhaseVerdict(True, f"{name} {value!r} matches {pattern!r}")
    if in_window:
        return PhaseVerdict(True, f"acquired {delay:.0f} s after contrast start (portal-venous window)")
    return PhaseVerdict(False, "no portal-venous pattern in SeriesDescription, ProtocolName or ImageComments")
