"""Which enabled methods apply to a study: rules as data (``[routing] method_regions``).

The mutation models were trained on one body region each: M1 (KRAS, colorectal cancer) and M3
(RAS family, colorectal liver metastases) on abdominal CT, M2 and M4 (NSCLC) on chest CT; the
radiomics comparator follows the population of its package (the demo one: KRAS in CRC). A
method mapped to a region runs only on studies whose Body Part Examined, Study Description,
Series Description or Protocol Name matches one of that region's patterns; methods not mapped
(radiomics, the response score) run on every study. Every skip is recorded with the reason.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from inference.methods import METHODS

DEFAULT_METHOD_REGIONS: dict[str, str] = {spec.name: spec.region for spec in METHODS if spec.region}
"""Method -> the body region it was trained on, from the registry (:mod:`inference.methods`)."""
DEFAULT_REGION_PATTERNS: dict[str, tuple[str, ...]] = {
    "abdomen": ("abdom", "liver", "hepat", "colo", "rect", "pelvi", r"\bABD\b"),
    "chest": ("chest", "thora", "lung", "pulmo", r"\bTHX\b"),
}


@dataclass(frozen=True)
class StudyText:
    """The header text that tells which body region a study shows."""

    body_part_examined: str | None = None
    study_description: str | None = None
    series_description: str | None = None
    protocol_name: str | None = None

    def fields(self) -> dict[str, str | None]:
        """Field name -> value, in the order they are checked."""
        return {
            "BodyPartExamined": self.body_part_examined,
            "StudyDescription": self.study_description,
            "SeriesDescription": self.series_description,
            "ProtocolName": self.protocol_name,
        }


@dataclass(frozen=True)
class MethodChoice:
    """The methods to run on a study and the ones skipped, each with its reason."""

    selected: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]


def region_evidence(text: StudyText, patterns: Sequence[str]) -> str | None:
    """The first ``field 'value'`` matching one of ``patterns`` (case-insensitive), or None."""
    for name, value in text.fields().items():
        for pattern in patterns:
            if value and re.search(pattern, value, re.IGNORECASE):
                return f"{name} {value!r} matches {pattern!r}"
    return None


def select_methods(
    methods: Sequence[str],
    text: StudyText,
    method_regions: Mapping[str, str],
    region_patterns: Mapping[str, Sequence[str]],
) -> MethodChoice:
    """Split the enabled ``methods`` into those that apply to the study and those that do not."""
    selected: list[str] = []
    skipped: list[tuple[str, str]] = []
    for method in methods:
        region = method_regions.get(method)
        if region is None:
            selected.append(method)
            continue
        if region_evidence(text, region_patterns.get(region, ())) is not None:
            selected.append(method)
            continue
        shown = ", ".join(f"{k} {v!r}" for k, v in text.fields().items() if v) or "no descriptive header text"
        skipped.append((method, f"{method} is for {region} CT; this study is not recognised as {region} ({shown})"))
    return MethodChoice(tuple(selected), tuple(skipped))
