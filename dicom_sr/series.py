"""Series Number and Series Description of every result series: distinct per method and object kind.

A study browser lists series by number and description, so each method's SR and Secondary Capture
series must be told apart at a glance, and stay the same from one run to the next:

========== ====== ====== ===================================================
method     SR     SC     Series Description (DEMO packages add the suffix)
========== ====== ====== ===================================================
radiomics  901    911    AI Radiomics
m1         902    912    AI KRAS M1 - DEMO, not for clinical use
m2         903    913    AI EGFR/KRAS M2 - DEMO, not for clinical use
m3         904    914    AI RAS M3 - DEMO, not for clinical use
m4         905    915    AI Deep-RadScore M4 - DEMO, not for clinical use
comparator 906    916    AI KRAS RF - DEMO, not for clinical use
response   907    917    AI Response 8w M5 - DEMO, not for clinical use
========== ====== ====== ===================================================

The description starts with what the result is (the method's result kind, e.g. the package's
label) and the method, then the DEMO notice, so that a narrow study browser column still shows
the method. A method not in the table (a research extension) gets 900 / 910.
"""

from __future__ import annotations

from typing import Literal

from inference.methods import METHODS

__all__ = ["DEMO_SUFFIX", "SERIES_NUMBERS", "series_description", "series_number"]

SERIES_NUMBERS: dict[str, tuple[int, int]] = {spec.name: spec.series for spec in METHODS}
"""Method -> (SR series number, Secondary Capture series number): the registry's (:mod:`inference.methods`)."""
DEFAULT_SERIES_NUMBERS = (900, 910)
METHOD_TAGS = {spec.name: spec.tag for spec in METHODS if spec.tag}
"""The short name of a method in the description (radiomics has none: "AI Radiomics" says it)."""
DEMO_SUFFIX = " - DEMO, not for clinical use"
_LO = 64


def series_number(method: str, kind: Literal["SR", "SC"]) -> int:
    """The Series Number of ``method``'s SR or Secondary Capture series (:data:`SERIES_NUMBERS`)."""
    if kind not in ("SR", "SC"):
        raise ValueError('Argument "kind" must be "SR" or "SC".')
    sr, sc = SERIES_NUMBERS.get(method, DEFAULT_SERIES_NUMBERS)
    return sr if kind == "SR" else sc


def series_description(method: str, result_kind: str, *, demo: bool) -> str:
    """``AI <result kind> <method tag>``, plus :data:`DEMO_SUFFIX` for DEMO models; at most 64 characters (LO).

    Parameters
    ----------
    method: str
        The method (``radiomics``, ``m1`` ...).
    result_kind: str
        What the result is about: ``"Radiomics"``, the package's label (``"KRAS"``), ...
    demo: bool
        Whether the algorithm is a DEMO model; the suffix is never cut.
    """
    if not result_kind.strip():
        raise ValueError('Argument "result_kind" must not be empty.')
    tag = METHOD_TAGS.get(method)
    title = f"AI {result_kind.strip()}"
    if tag and not title.endswith(f" {tag}"):
        title += f" {tag}"
    suffix = DEMO_SUFFIX if demo else ""
    return title[: _LO - len(suffix)].rstrip() + suffix
