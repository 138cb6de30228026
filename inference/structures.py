"""Which structures of a segmentation are tumours, and the planes each one lies on.

Real exports are not one clean tumour label: a radiotherapy RTSTRUCT carries BODY, organs at risk,
GTV, CTV and PTV; a SEG from a segmentation tool carries the liver, the spleen and the lesions.
This module reads what a SEG or RTSTRUCT holds from its header (no pixel data, no rasterising) and
decides, per segment / ROI and with a reason, whether it is a *tumour* (each of its connected
components becomes a lesion), an *organ* (anatomical context such as the liver that holds the
lesions: never a lesion itself) or *other* (body outline, planning volumes, oedema, ...: ignored).

Rules, in this order (the first that applies decides; :class:`StructureRules` holds the knobs):

SEG segment (Segmented Property Category / Type, Segment Label)
    1. label matches an ``exclude_labels`` pattern -> other
    2. type code listed in ``tumour_codes`` -> tumour; listed in ``not_tumour_codes`` -> other
    3. type meaning matches an ``exclude_labels`` pattern (e.g. "Edema") -> other;
       matches an ``include_labels`` pattern (e.g. "Neoplasm", "Mass", "Metastasis") -> tumour
    4. generic or absent codes (Tissue, Anatomical Structure, Morphologically Abnormal Structure):
       label matches ``include_labels`` -> tumour, ``organ_labels`` -> organ, else other
    5. a specific anatomical type (category Anatomical Structure / Tissue, e.g. Liver) -> organ;
       anything else -> other
RTSTRUCT ROI (RT ROI Interpreted Type, ROI Name)
    1. interpreted type in ``tumour_interpreted_types`` (GTV) -> tumour, unless the name matches
       ``exclude_labels`` (e.g. "GTV+5mm"); in ``organ_interpreted_types`` (ORGAN) -> organ; any
       other type (EXTERNAL, PTV, CTV, AVOIDANCE, ...) -> other
    2. no interpreted type: name matches ``exclude_labels`` -> other, ``include_labels`` -> tumour,
       ``organ_labels`` -> organ, else other

Light by design: pydicom and the standard library only, so the receiving process (readiness,
routing) can import it without loading the imaging stack.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import pydicom
from pydicom.dataset import Dataset

from inference.vectors import vector3

__all__ = [
    "DEFAULT_EXCLUDE_LABELS",
    "DEFAULT_INCLUDE_LABELS",
    "DEFAULT_NOT_TUMOUR_CODES",
    "DEFAULT_ORGAN_LABELS",
    "DEFAULT_TUMOUR_CODES",
    "CodedTerm",
    "SegmentationSummary",
    "StructureInfo",
    "StructureRules",
    "StructureSelection",
    "StructureVerdict",
    "classify_structure",
    "classify_structures",
    "no_tumour_message",
    "read_summary",
    "referenced_instance_uids",
    "referenced_series_uids",
    "select_structures",
    "summarise",
]

Role = Literal["tumour", "organ", "other"]
_CODE = re.compile(r"^[^:\s]+:[^:\s]+$")
Kind = Literal["seg", "rtstruct"]

SEG_SOP_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7"})
RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"

_WORD_START = r"(?<![a-z])"
_WORD_END = r"(?![a-z])"
DEFAULT_INCLUDE_LABELS: tuple[str, ...] = (
    _WORD_START + r"gtv",  # GTV, GTVp, GTV_1, GTV_Mass_CT
    _WORD_START + r"(tumou?rs?|lesions?|mass(es)?|nodules?|neoplasms?|carcinomas?|cancers?)" + _WORD_END,
    _WORD_START + r"(mets?|metastas[ie]s|metastatic)" + _WORD_END,
)
"""Labels (and coded meanings) that name a tumour; searched case-insensitively."""
DEFAULT_EXCLUDE_LABELS: tuple[str, ...] = (
    _WORD_START + r"(body|external|skin|outline|patient)" + _WORD_END,
    _WORD_START + r"[cpi]tv",  # CTV, PTV, ITV: planning volumes around the tumour
    _WORD_START + r"(couch|table|support|ring|bolus|markers?|dummy|artefacts?|artifacts?|isocent(er|re))" + _WORD_END,
    _WORD_START + r"(avoid\w*|opt\w*|expansion|margin|bed)" + _WORD_END,
    r"^z[_ ]",  # helper structures of planning systems
    r"\+\s*\d",  # expansions such as "GTV+5mm"
    _WORD_START
    + r"(o?edema|necros[ie]s|necrotic|cysts?|cystic|ha?emorrhag\w*|calcif\w*|fluid|effusion|abscess)"
    + _WORD_END,
)
"""Labels (and coded meanings) that are never a tumour; they win over every other rule."""
DEFAULT_ORGAN_LABELS: tuple[str, ...] = (
    _WORD_START + r"(liver|hepar|spleen|kidneys?|lungs?|pancreas|stomach|bowel|colon|duodenum|rectum|bladder|"
    r"gall ?bladder|heart|aorta|vena ?cava|ivc|o?esophagus|trachea|bronch\w*|spinal ?cord|cord|brain ?stem|brain|"
    r"prostate|femur|femoral\w*|bones?|spine|vertebra[el]?|ribs?|pelvis|muscles?|parotids?|mandible|eyes?|lens|"
    r"optic\w*|chiasm|cochlea|breasts?|thyroid|adrenals?|uterus|ovar\w*)" + _WORD_END,
)
"""Labels that name an organ (anatomical context, never a lesion)."""
DEFAULT_TUMOUR_CODES: tuple[str, ...] = (
    "SCT:108369006",  # Neoplasm / Tumor
    "SCT:4147007",  # Mass
    "SCT:52988006",  # Lesion
    "SCT:128462008",  # Metastasis (Metastatic neoplasm)
    "SCT:14799000",  # Neoplasm, metastatic
    "SCT:86049000",  # Malignant neoplasm, primary
    "SCT:363346000",  # Malignant neoplastic disease
    "SCT:27925004",  # Nodule
    "SRT:M-80003",  # Neoplasm (SNOMED RT, legacy exports)
    "SRT:M-03000",  # Mass
    "SRT:M-01100",  # Lesion
    "SRT:M-80006",  # Neoplasm, metastatic
    "SRT:M-03010",  # Nodule
)
"""Segmented Property Type codes (``SCHEME:VALUE``) that are tumours whatever the label says."""
DEFAULT_NOT_TUMOUR_CODES: tuple[str, ...] = (
    "SCT:79654002",  # Edema
    "SCT:6574001",  # Necrosis
    "SCT:367643001",  # Cyst
    "SCT:50960005",  # Hemorrhage
)
"""Segmented Property Type codes that are never tumours."""
GENERIC_CODES = frozenset(
    {
        "SCT:85756007",  # Tissue
        "SCT:91723000",  # Anatomical Structure
        "SCT:123037004",  # Body structure / Anatomical Structure
        "SCT:49755003",  # Morphologically Abnormal Structure
        "SCT:260787004",  # Physical object
        "SRT:T-D0050",  # Tissue
        "SRT:T-D000A",  # Anatomical Structure
        "SRT:M-01000",  # Morphologically Altered Structure
        "SRT:A-00004",  # Physical object
    }
)
"""Property types that say nothing about what the structure is: the label decides."""
ANATOMICAL_CATEGORIES = frozenset(
    {"SCT:85756007", "SCT:91723000", "SCT:123037004", "SRT:T-D0050", "SRT:T-D000A", "SCT:280115004"}
)
"""Categories whose specific types are organs (Tissue, Anatomical Structure, Body substance)."""
RT_INTERPRETED_TYPES = frozenset(
    {
        "EXTERNAL", "PTV", "CTV", "GTV", "TREATED_VOLUME", "IRRAD_VOLUME", "BOLUS", "AVOIDANCE", "ORGAN",
        "MARKER", "REGISTRATION", "ISOCENTER", "CONTRAST_AGENT", "CAVITY", "BRACHY_CHANNEL", "BRACHY_ACCESSORY",
        "BRACHY_SRC_APP", "BRACHY_CHNL_SHLD", "SUPPORT", "FIXATION", "DOSE_REGION", "CONTROL", "DOSE_MEASUREMENT",
    }
)  # fmt: skip
"""RT ROI Interpreted Type defined terms (PS3.3 C.8.8.8.1)."""


@dataclass(frozen=True)
class CodedTerm:
    """A coded concept as it appears in a SEG segment description."""

    scheme: str
    value: str
    meaning: str

    @property
    def key(self) -> str:
        """``SCHEME:VALUE``, the form used in the configuration."""
        return f"{self.scheme}:{self.value}"

    def __str__(self) -> str:
        return self.meaning or self.key


@dataclass(frozen=True)
class StructureInfo:
    """One segment (SEG) or ROI (RTSTRUCT) as described by the object's header."""

    number: int
    """Segment Number or ROI Number."""
    label: str
    """Segment Label or ROI Name."""
    kind: Kind
    category: CodedTerm | None = None
    """SEG: Segmented Property Category."""
    property_type: CodedTerm | None = None
    """SEG: Segmented Property Type."""
    interpreted_type: str | None = None
    """RTSTRUCT: RT ROI Interpreted Type (empty or absent: None)."""
    plane_points: tuple[tuple[float, float, float], ...] = ()
    """One point (patient coordinates, mm) on each distinct plane a contour / frame of it lies in."""


@dataclass(frozen=True)
class SegmentationSummary:
    """What a SEG or RTSTRUCT holds and what it refers to, read from its header."""

    sop_instance_uid: str
    sop_class_uid: str
    kind: Kind
    frame_of_reference_uids: tuple[str, ...]
    referenced_series_uids: tuple[str, ...]
    referenced_instance_uids: tuple[str, ...]
    structures: tuple[StructureInfo, ...]

    def to_json(self) -> str:
        """A JSON text that :meth:`from_json` reads back (stored with the instance)."""
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> SegmentationSummary:
        """The summary stored by :meth:`to_json`."""
        data = json.loads(text)
        structures = []
        for item in data["structures"]:
            structures.append(
                StructureInfo(
                    number=int(item["number"]),
                    label=str(item["label"]),
                    kind=item["kind"],
                    category=CodedTerm(**item["category"]) if item.get("category") else None,
                    property_type=CodedTerm(**item["property_type"]) if item.get("property_type") else None,
                    interpreted_type=item.get("interpreted_type"),
                    plane_points=tuple(vector3(p) for p in item.get("plane_points", ())),
                )
            )
        return cls(
            sop_instance_uid=data["sop_instance_uid"],
            sop_class_uid=data["sop_class_uid"],
            kind=data["kind"],
            frame_of_reference_uids=tuple(data["frame_of_reference_uids"]),
            referenced_series_uids=tuple(data["referenced_series_uids"]),
            referenced_instance_uids=tuple(data["referenced_instance_uids"]),
            structures=tuple(structures),
        )


@dataclass(frozen=True)
class StructureRules:
    """The knobs of :func:`classify_structure` (``[routing.tumour]`` in the configuration).

    Patterns are regular expressions searched case-insensitively in the label (and, for SEG, in the
    meaning of the Segmented Property Type). Codes are ``SCHEME:VALUE`` (e.g. ``SCT:108369006``).
    """

    include_labels: tuple[str, ...] = DEFAULT_INCLUDE_LABELS
    exclude_labels: tuple[str, ...] = DEFAULT_EXCLUDE_LABELS
    organ_labels: tuple[str, ...] = DEFAULT_ORGAN_LABELS
    tumour_codes: tuple[str, ...] = DEFAULT_TUMOUR_CODES
    not_tumour_codes: tuple[str, ...] = DEFAULT_NOT_TUMOUR_CODES
    tumour_interpreted_types: tuple[str, ...] = ("GTV",)
    organ_interpreted_types: tuple[str, ...] = ("ORGAN",)

    def __post_init__(self) -> None:
        for name in ("include_labels", "exclude_labels", "organ_labels"):
            bad = [pattern for pattern in getattr(self, name) if not _is_regex(pattern)]
            if bad:
                raise ValueError(f"{name}: {bad[0]!r} is not a valid regular expression")
        for name in ("tumour_codes", "not_tumour_codes"):
            bad = [code for code in getattr(self, name) if not _CODE.match(code)]
            if bad:
                raise ValueError(f"{name}: {bad[0]!r} is not a code: write SCHEME:VALUE, e.g. SCT:108369006")
        for name in ("tumour_interpreted_types", "organ_interpreted_types"):
            object.__setattr__(self, name, tuple(t.strip().upper() for t in getattr(self, name)))


@dataclass(frozen=True)
class StructureVerdict:
    """The role of one structure and why."""

    number: int
    label: str
    role: Role
    reason: str
    organ: str | None = None
    """For ``organ``: what it is, lower case (e.g. ``liver``)."""

    def describe(self) -> str:
        """``label (role, reason)``, for messages, e.g. ``Liver (organ, coded Tissue / Liver)``."""
        role = {"tumour": "tumour", "organ": "organ", "other": "not a tumour"}[self.role]
        return f"{self.label} ({role}, {self.reason})"


@dataclass(frozen=True)
class StructureSelection:
    """Which structures a method analyses: tumour numbers, and organ numbers with the organ's name.

    This is what routing hands to a job; pipelines turn only the tumours into lesions.
    """

    tumours: tuple[int, ...]
    organs: tuple[tuple[int, str], ...] = ()

    @classmethod
    def from_verdicts(cls, verdicts: Iterable[StructureVerdict]) -> StructureSelection:
        """The selection made by :func:`classify_structures`."""
        verdicts = list(verdicts)
        return cls(
            tumours=tuple(v.number for v in verdicts if v.role == "tumour"),
            organs=tuple((v.number, v.organ or v.label.lower()) for v in verdicts if v.role == "organ"),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (job inputs)."""
        return {"tumours": list(self.tumours), "organs": [[n, name] for n, name in self.organs]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StructureSelection:
        """The selection of :meth:`to_dict`."""
        return cls(
            tumours=tuple(int(n) for n in data.get("tumours", ())),
            organs=tuple((int(n), str(name)) for n, name in data.get("organs", ())),
        )

    def organ_of(self, number: int) -> str | None:
        """The organ name of structure ``number``, or None when it is not an organ."""
        return dict(self.organs).get(number)


@functools.lru_cache(maxsize=256)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE)


def _is_regex(pattern: str) -> bool:
    try:
        _compiled(pattern)
    except re.error:
        return False
    return True


def _matches(patterns: Sequence[str], text: str) -> str | None:
    """The first pattern found in ``text``, or None."""
    for pattern in patterns:
        if text and _compiled(pattern).search(text):
            return pattern
    return None


def classify_structure(structure: StructureInfo, rules: StructureRules) -> StructureVerdict:
    """Decide whether one segment / ROI is a tumour, an organ or other (rules in the module docstring)."""
    label = structure.label.strip()

    def verdict(role: Role, reason: str, organ: str | None = None) -> StructureVerdict:
        return StructureVerdict(structure.number, label or f"#{structure.number}", role, reason, organ)

    if structure.kind == "rtstruct":
        return _classify_roi(structure, label, rules, verdict)
    if _matches(rules.exclude_labels, label):
        return verdict("other", "its label marks it as no tumour (exclude_labels)")
    return _classify_segment(structure, label, rules, verdict)


def _classify_roi(structure: StructureInfo, label: str, rules: StructureRules, verdict: Any) -> StructureVerdict:
    kind = (structure.interpreted_type or "").strip().upper()
    excluded = _matches(rules.exclude_labels, label)
    if kind in rules.tumour_interpreted_types:
        if excluded:
            return verdict(
                "other", f"RT ROI Interpreted Type {kind}, but its name marks it as no tumour (exclude_labels)"
            )
        return verdict("tumour", f"RT ROI Interpreted Type {kind}")
    if kind in rules.organ_interpreted_types:
        return verdict("organ", f"RT ROI Interpreted Type {kind}", organ=label.lower())
    if kind:
        what = {"EXTERNAL": "body outline", "PTV": "planning volume", "CTV": "clinical target volume"}.get(kind)
        return verdict("other", f"RT ROI Interpreted Type {kind}" + (f": {what}" if what else ""))
    if excluded:
        return verdict("other", "its name marks it as no tumour (exclude_labels)")
    if _matches(rules.include_labels, label):
        return verdict("tumour", "no interpreted type; its name names a tumour")
    if _matches(rules.organ_labels, label):
        return verdict("organ", "no interpreted type; its name names an organ", organ=label.lower())
    return verdict("other", "no interpreted type and its name names no tumour (see [routing.tumour])")


def _classify_segment(structure: StructureInfo, label: str, rules: StructureRules, verdict: Any) -> StructureVerdict:
    category, ptype = structure.category, structure.property_type
    coded = f"{category or '-'} / {ptype or '-'}"
    if ptype is not None:
        if ptype.key in rules.tumour_codes:
            return verdict("tumour", f"coded {coded}")
        if ptype.key in rules.not_tumour_codes:
            return verdict("other", f"coded {coded}: no tumour")
        if ptype.key not in GENERIC_CODES:
            if _matches(rules.exclude_labels, ptype.meaning):
                return verdict("other", f"coded {coded}: no tumour")
            if _matches(rules.include_labels, ptype.meaning):
                return verdict("tumour", f"coded {coded}")
    if ptype is None or ptype.key in GENERIC_CODES:
        if _matches(rules.include_labels, label):
            return verdict("tumour", f"generic code ({coded}); its label names a tumour")
        if _matches(rules.organ_labels, label):
            return verdict("organ", f"generic code ({coded}); its label names an organ", organ=label.lower())
        return verdict("other", f"generic code ({coded}) and a label that names no tumour (see [routing.tumour])")
    anatomical = category is not None and (
        category.key in ANATOMICAL_CATEGORIES or re.search(r"anatom|tissue|organ|body", category.meaning, re.I)
    )
    if anatomical or _matches(rules.organ_labels, ptype.meaning):
        return verdict("organ", f"coded {coded}", organ=ptype.meaning.lower())
    return verdict("other", f"coded {coded}: not a tumour code (see [routing.tumour] tumour_codes)")


def classify_structures(summary: SegmentationSummary, rules: StructureRules) -> tuple[StructureVerdict, ...]:
    """:func:`classify_structure` for every structure of ``summary``, in structure-number order."""
    return tuple(classify_structure(s, rules) for s in sorted(summary.structures, key=lambda s: s.number))


def select_structures(
    ds: Dataset, rules: StructureRules | None = None
) -> tuple[StructureSelection, tuple[StructureVerdict, ...]]:
    """Which structures of a SEG / RTSTRUCT dataset are tumours and organs, under ``rules`` (default rules).

    For callers without routing (the command-line tools, tests); the node decides in its readiness
    check and hands the selection to each job.

    Raises
    ------
    ValueError
        Not a SEG or RTSTRUCT, or its structures cannot be decoded.
    """
    verdicts = classify_structures(summarise(ds), rules or StructureRules())
    return StructureSelection.from_verdicts(verdicts), verdicts


def no_tumour_message(verdicts: Sequence[StructureVerdict]) -> str:
    """The sentence for a segmentation without any tumour structure, listing what it holds and why."""
    listed = "; ".join(v.describe() for v in verdicts) or "it holds no structure"
    return f"no tumour structure: {listed}. If one of them is the tumour, add a rule in [routing.tumour]"


# --- reading the header ---------------------------------------------------------------------------------------


def read_summary(path: str | Path) -> SegmentationSummary:
    """:func:`summarise` of the SEG / RTSTRUCT file at ``path`` (pixel data not read).

    Raises
    ------
    ValueError
        The file is not a readable SEG or RTSTRUCT (the message says why).
    """
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # pydicom raises many kinds on malformed input
        raise ValueError(f"cannot read the segmentation file: {type(exc).__name__}: {exc}") from None
    return summarise(ds)


def summarise(ds: Dataset) -> SegmentationSummary:
    """What a SEG or RTSTRUCT dataset holds: its structures, their planes and its references.

    Raises
    ------
    ValueError
        Not a SEG or RTSTRUCT, or its structure description cannot be decoded.
    """
    sop_class = str(ds.get("SOPClassUID", ""))
    try:
        if sop_class in SEG_SOP_CLASSES:
            kind: Kind = "seg"
            structures = _seg_structures(ds)
            frames: tuple[str, ...] = (str(ds.get("FrameOfReferenceUID", "")),)
        elif sop_class == RTSTRUCT_SOP_CLASS:
            kind = "rtstruct"
            structures = _roi_structures(ds)
            references = ds.get("ReferencedFrameOfReferenceSequence", [])
            frames = tuple(str(f.get("FrameOfReferenceUID", "")) for f in references)
        else:
            raise ValueError(f"SOP Class {sop_class or 'unknown'} is not a DICOM SEG or RTSTRUCT")
        series, instances = referenced_series_uids(ds), referenced_instance_uids(ds)
    except ValueError:
        raise
    except Exception as exc:  # malformed sequences, values that break their VR
        raise ValueError(f"its structure description cannot be decoded ({type(exc).__name__}: {exc})") from None
    return SegmentationSummary(
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        sop_class_uid=sop_class,
        kind=kind,
        frame_of_reference_uids=tuple(dict.fromkeys(f for f in frames if f)),
        referenced_series_uids=series,
        referenced_instance_uids=instances,
        structures=structures,
    )


def _code(sequence: Any) -> CodedTerm | None:
    if not sequence:
        return None
    item = sequence[0]
    return CodedTerm(
        scheme=str(item.get("CodingSchemeDesignator", "")).strip(),
        value=str(item.get("CodeValue", item.get("LongCodeValue", item.get("URNCodeValue", "")))).strip(),
        meaning=str(item.get("CodeMeaning", "")).strip(),
    )


def _point(values: Sequence[Any]) -> tuple[float, float, float]:
    x, y, z = (round(float(v), 3) for v in list(values)[:3])
    return (x, y, z)


def _seg_structures(ds: Dataset) -> tuple[StructureInfo, ...]:
    shared = (ds.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
    labelmap = str(ds.get("SegmentationType", "")) == "LABELMAP"
    numbers = [int(s.SegmentNumber) for s in ds.get("SegmentSequence", []) if int(s.SegmentNumber) > 0]
    planes: dict[int, dict[tuple[float, float, float], None]] = {n: {} for n in numbers}
    for frame in ds.get("PerFrameFunctionalGroupsSequence", []):
        position = frame.get("PlanePositionSequence") or shared.get("PlanePositionSequence")
        if not position or "ImagePositionPatient" not in position[0]:
            continue
        point = _point(position[0].ImagePositionPatient)
        ident = frame.get("SegmentIdentificationSequence") or shared.get("SegmentIdentificationSequence")
        owners = numbers if labelmap or not ident else [int(ident[0].ReferencedSegmentNumber)]
        for n in owners:
            planes.setdefault(n, {})[point] = None
    out = []
    for segment in ds.get("SegmentSequence", []):
        number = int(segment.SegmentNumber)
        if number <= 0:  # LABELMAP SEGs describe the background as segment 0
            continue
        out.append(
            StructureInfo(
                number=number,
                label=str(segment.get("SegmentLabel", "") or f"segment {number}"),
                kind="seg",
                category=_code(segment.get("SegmentedPropertyCategoryCodeSequence")),
                property_type=_code(segment.get("SegmentedPropertyTypeCodeSequence")),
                plane_points=tuple(planes.get(number, {})),
            )
        )
    return tuple(out)


def _first_point(contour: Dataset) -> tuple[float, float, float] | None:
    """The first (x, y, z) of a contour, parsing the raw DS bytes when pydicom has not decoded them."""
    raw = contour.get_item("ContourData")
    if raw is None:
        return None
    value = raw.value
    if isinstance(value, bytes):
        parts = value.replace(b"\x00", b"").split(b"\\", 3)[:3]
        return _point([p.decode("ascii", "replace") for p in parts]) if len(parts) == 3 else None
    values = list(contour.ContourData)
    return _point(values) if len(values) >= 3 else None


def _roi_structures(ds: Dataset) -> tuple[StructureInfo, ...]:
    interpreted = {
        int(o.ReferencedROINumber): str(o.get("RTROIInterpretedType", "") or "").strip() or None
        for o in ds.get("RTROIObservationsSequence", [])
        if "ReferencedROINumber" in o
    }
    planes: dict[int, dict[tuple[float, float, float], None]] = {}
    for item in ds.get("ROIContourSequence", []):
        points = planes.setdefault(int(item.ReferencedROINumber), {})
        for contour in item.get("ContourSequence", []):
            if str(contour.get("ContourGeometricType", "CLOSED_PLANAR")) == "POINT":
                continue
            point = _first_point(contour)
            if point is not None:
                points[point] = None
    out = []
    for roi in ds.get("StructureSetROISequence", []):
        number = int(roi.ROINumber)
        out.append(
            StructureInfo(
                number=number,
                label=str(roi.get("ROIName", "") or f"ROI {number}"),
                kind="rtstruct",
                interpreted_type=interpreted.get(number),
                plane_points=_distinct_planes(planes.get(number, {})),
            )
        )
    return tuple(sorted(out, key=lambda s: s.number))


def _distinct_planes(points: Iterable[tuple[float, float, float]]) -> tuple[tuple[float, float, float], ...]:
    """One point per plane: contours of one slice (islands, holes) share a plane; keep the first."""
    seen: dict[float, tuple[float, float, float]] = {}
    for point in points:
        seen.setdefault(round(point[2], 2), point)
    return tuple(seen.values())


def referenced_series_uids(ds: Dataset) -> tuple[str, ...]:
    """Series a SEG or RTSTRUCT refers to, from its header (in order of appearance, no repeats).

    SEG: Referenced Series Sequence (also inside Studies Containing Other Referenced Instances).
    RTSTRUCT: RT Referenced Series of every referenced frame of reference.
    """
    found: list[str] = []
    for item in ds.get("ReferencedSeriesSequence", []):
        found.append(str(item.get("SeriesInstanceUID", "")))
    for study in ds.get("StudiesContainingOtherReferencedInstancesSequence", []):
        for item in study.get("ReferencedSeriesSequence", []):
            found.append(str(item.get("SeriesInstanceUID", "")))
    for frame in ds.get("ReferencedFrameOfReferenceSequence", []):
        for study in frame.get("RTReferencedStudySequence", []):
            for series in study.get("RTReferencedSeriesSequence", []):
                found.append(str(series.get("SeriesInstanceUID", "")))
    return tuple(uid for uid in dict.fromkeys(found) if uid)


def referenced_instance_uids(ds: Dataset) -> tuple[str, ...]:
    """SOP Instance UIDs of the images a SEG or RTSTRUCT was drawn on, from its header.

    SEG: Referenced Instance Sequence of each Referenced Series, and the Source Image Sequence
    of each frame's Derivation Image Sequence. RTSTRUCT: the Contour Image Sequences.
    """
    found: list[str] = []
    for series in ds.get("ReferencedSeriesSequence", []):
        for item in series.get("ReferencedInstanceSequence", []):
            found.append(str(item.get("ReferencedSOPInstanceUID", "")))
    for frame in ds.get("PerFrameFunctionalGroupsSequence", []):
        for derivation in frame.get("DerivationImageSequence", []):
            for item in derivation.get("SourceImageSequence", []):
                found.append(str(item.get("ReferencedSOPInstanceUID", "")))
    for ref_for in ds.get("ReferencedFrameOfReferenceSequence", []):
        for study in ref_for.get("RTReferencedStudySequence", []):
            for series in study.get("RTReferencedSeriesSequence", []):
                for item in series.get("ContourImageSequence", []):
                    found.append(str(item.get("ReferencedSOPInstanceUID", "")))
    for roi in ds.get("ROIContourSequence", []):
        for contour in roi.get("ContourSequence", []):
            for item in contour.get("ContourImageSequence", []):
                found.append(str(item.get("ReferencedSOPInstanceUID", "")))
    return tuple(uid for uid in dict.fromkeys(found) if uid)
