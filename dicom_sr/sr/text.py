"""Plain-text rendering of an SR document's content tree (``make demo``, ``pacs-agent show``).

Any SR IOD is rendered by walking the Content Sequence (PS3.3 C.17.3): one line per content item,
indented by depth, ``<concept name>: <value>``. The header names the study, series, content date
and observer, never the patient: no Patient's Name, Patient ID or birth date is printed, and PNAME
content items are withheld.
"""

from __future__ import annotations

from collections.abc import Iterable

from pydicom import Dataset
from pydicom.uid import UID

__all__ = ["render_sr_text"]

_INDENT = "  "
_DEVICE_OBSERVER_NAME = "121013"
_DEVICE_OBSERVER_UID = "121012"
_DEVICE_OBSERVER_MODEL = "121015"
_PERSON_OBSERVER_NAME = "121008"
_ALGORITHM_NAME, _ALGORITHM_PARAMETERS, _ALGORITHM_VERSION = "111001", "111002", "111003"
_ALGORITHM_PARTS = (_ALGORITHM_NAME, _ALGORITHM_VERSION, _ALGORITHM_PARAMETERS)


def _meaning(seq_holder: Dataset, keyword: str, default: str = "?") -> str:
    seq = seq_holder.get(keyword)
    if not seq:
        return default
    code = seq[0]
    return str(code.get("CodeMeaning") or code.get("CodeValue") or default)


def _number(value: object) -> str:
    try:
        return f"{float(str(value)):.6g}"
    except ValueError:
        return str(value)


def _date(value: str | None) -> str:
    text = str(value or "")
    return f"{text[:4]}-{text[4:6]}-{text[6:8]}" if len(text) >= 8 else text


def _time(value: str | None) -> str:
    text = str(value or "")
    return f"{text[:2]}:{text[2:4]}:{text[4:6]}" if len(text) >= 6 else text


def _sop_class(uid: str) -> str:
    name = UID(uid).name
    return name.removesuffix(" Storage") if name != uid else uid


def _num(item: Dataset) -> str:
    measured = item.get("MeasuredValueSequence")
    if not measured:
        return f"(no value: {_meaning(item, 'NumericValueQualifierCodeSequence')})"
    value = measured[0]
    unit = value.get("MeasurementUnitsCodeSequence")
    unit_text = str(unit[0].CodeValue) if unit else ""
    if unit_text == "1":  # UCUM unity: show the meaning only when it says more ("px")
        meaning = str(unit[0].get("CodeMeaning", ""))
        unit_text = "" if meaning.lower() in ("", "no units", "unity") else meaning
    return _number(value.NumericValue) + (f" {unit_text}" if unit_text else "")


def _image(item: Dataset) -> str:
    refs = item.get("ReferencedSOPSequence")
    if not refs:
        return "IMAGE (no reference)"
    ref = refs[0]
    text = f"{_sop_class(str(ref.ReferencedSOPClassUID))} {ref.ReferencedSOPInstanceUID}"
    if "ReferencedFrameNumber" in ref:
        text += f" frame(s) {ref.ReferencedFrameNumber}"
    if "ReferencedSegmentNumber" in ref:
        text += f" segment {ref.ReferencedSegmentNumber}"
    return text


def _scoord3d(item: Dataset) -> str:
    data = [float(v) for v in item.get("GraphicData", [])]
    points = len(data) // 3
    text = f"{item.get('GraphicType', '?')} ({points} point{'s' if points != 1 else ''})"
    z_values = {round(z, 3) for z in data[2::3]}
    if len(z_values) == 1:
        text += f" at z = {_number(z_values.pop())} mm"
    return text


def _scoord(item: Dataset) -> str:
    points = len(item.get("GraphicData", [])) // 2
    return f"{item.get('GraphicType', '?')} ({points} point{'s' if points != 1 else ''}, image coordinates)"


def _value(item: Dataset) -> str:
    value_type = str(item.get("ValueType", ""))
    if value_type == "CONTAINER":
        return ""
    if value_type == "TEXT":
        return str(item.get("TextValue", ""))
    if value_type == "CODE":
        return _meaning(item, "ConceptCodeSequence")
    if value_type == "NUM":
        return _num(item)
    if value_type == "UIDREF":
        return str(item.get("UID", ""))
    if value_type in ("IMAGE", "COMPOSITE", "WAVEFORM"):
        return _image(item)
    if value_type == "SCOORD3D":
        return _scoord3d(item)
    if value_type == "SCOORD":
        return _scoord(item)
    if value_type == "DATE":
        return _date(item.get("Date"))
    if value_type == "TIME":
        return _time(item.get("Time"))
    if value_type == "DATETIME":
        text = str(item.get("DateTime", ""))
        return f"{_date(text[:8])} {_time(text[8:])}".strip()
    if value_type == "PNAME":
        return "(name withheld)"
    return f"({value_type or 'unknown value type'})"


def _algorithm_part(item: Dataset) -> str | None:
    """Code value of a TID 4019 Algorithm Name / Version / Parameters TEXT item, else None."""
    code = item.get("ConceptNameCodeSequence")
    if item.get("ValueType") != "TEXT" or not code or code[0].get("CodingSchemeDesignator") != "DCM":
        return None
    value = str(code[0].CodeValue)
    return value if value in _ALGORITHM_PARTS else None


def _algorithm_line(items: list[Dataset]) -> str:
    """One line for a TID 4019 Algorithm Identification: name version (parameters)."""
    parts: dict[str, list[str]] = {key: [] for key in _ALGORITHM_PARTS}
    for item in items:
        text = str(item.get("TextValue", ""))
        key, sep, value = text.partition("=")
        if sep and len(value) > 16 and all(c in "0123456789abcdef" for c in value.lower()):
            text = f"{key}={value[:12]}..."  # checksums in full are in the report-level items
        parts[str(item.ConceptNameCodeSequence[0].CodeValue)].append(text)
    line = " ".join(parts[_ALGORITHM_NAME] + parts[_ALGORITHM_VERSION])
    if parts[_ALGORITHM_PARAMETERS]:
        line += f" ({', '.join(parts[_ALGORITHM_PARAMETERS])})"
    return f"Algorithm: {line}"


def _walk(items: Iterable[Dataset], depth: int, lines: list[str]) -> None:
    algorithm: list[Dataset] = []
    for item in items:
        if _algorithm_part(item) is not None:
            algorithm.append(item)
            continue
        if algorithm:
            lines.append(_INDENT * depth + _algorithm_line(algorithm))
            algorithm = []
        if "ReferencedContentItemIdentifier" in item:
            ids = ".".join(str(i) for i in item.ReferencedContentItemIdentifier)
            lines.append(f"{_INDENT * depth}(see content item {ids})")
            continue
        name = _meaning(item, "ConceptNameCodeSequence", default=str(item.get("ValueType", "?")))
        value = _value(item)
        lines.append(f"{_INDENT * depth}{name}: {value}" if value else f"{_INDENT * depth}{name}")
        _walk(item.get("ContentSequence", []), depth + 1, lines)
    if algorithm:
        lines.append(_INDENT * depth + _algorithm_line(algorithm))


def _observer(ds: Dataset) -> str:
    found: dict[str, str] = {}
    for item in ds.get("ContentSequence", []):
        code = item.get("ConceptNameCodeSequence")
        if not code or item.get("RelationshipType") != "HAS OBS CONTEXT":
            continue
        key = str(code[0].CodeValue)
        if key in (_DEVICE_OBSERVER_NAME, _DEVICE_OBSERVER_MODEL):
            found.setdefault(key, str(item.get("TextValue", "")))
        elif key == _DEVICE_OBSERVER_UID:
            found.setdefault(key, str(item.get("UID", "")))
        elif key == _PERSON_OBSERVER_NAME:
            found.setdefault(key, "person (name withheld)")
    if _DEVICE_OBSERVER_NAME in found or _DEVICE_OBSERVER_UID in found:
        text = f"device {found.get(_DEVICE_OBSERVER_NAME, '?')}"
        if _DEVICE_OBSERVER_MODEL in found:
            text += f" ({found[_DEVICE_OBSERVER_MODEL]})"
        if _DEVICE_OBSERVER_UID in found:
            text += f", UID {found[_DEVICE_OBSERVER_UID]}"
        return text
    return found.get(_PERSON_OBSERVER_NAME, "not recorded")


def render_sr_text(ds: Dataset) -> str:
    """Render an SR document as indented, human-readable text without patient identity.

    Parameters
    ----------
    ds: pydicom.Dataset
        Any SR document (e.g. a TID 1500 Measurement Report in a Comprehensive 3D SR); the root
        content item is the dataset itself (PS3.3 C.17.3 SR Document Content Module).

    Returns
    -------
    str
        A header (document type, Study Instance UID, series description and number, SOP
        Instance UID, content date/time, completion / verification flags, observer) followed by
        the content tree, one item per line: concept name, then the value (NUM with its UCUM
        unit, CODE meaning, TEXT, UIDREF, IMAGE / SCOORD3D references in brief).

    Raises
    ------
    TypeError
        When ``ds`` is not a pydicom Dataset.
    ValueError
        When ``ds`` has no SR content (no Value Type / Content Sequence at its root).
    """
    if not isinstance(ds, Dataset):
        raise TypeError('Argument "ds" must have type pydicom.Dataset.')
    if ds.get("ValueType") != "CONTAINER" or "ContentSequence" not in ds:
        raise ValueError("Dataset is not an SR document (no root CONTAINER with a Content Sequence).")
    sop_class = _sop_class(str(ds.get("SOPClassUID", "")))
    lines = [
        f"{sop_class}: {_meaning(ds, 'ConceptNameCodeSequence')}",
        f"Study Instance UID : {ds.get('StudyInstanceUID', '?')}",
        f"Series             : {ds.get('SeriesDescription', '')} (#{ds.get('SeriesNumber', '?')})",
        f"SOP Instance UID   : {ds.get('SOPInstanceUID', '?')}",
        f"Content date/time  : {_date(ds.get('ContentDate'))} {_time(ds.get('ContentTime'))}".rstrip(),
        "Status             : "
        + ", ".join(str(ds[k].value) for k in ("CompletionFlag", "VerificationFlag", "PreliminaryFlag") if k in ds),
        f"Observer           : {_observer(ds)}",
        "",
    ]
    root_name = _meaning(ds, "ConceptNameCodeSequence")
    lines.append(root_name)
    _walk(ds.ContentSequence, 1, lines)
    return "\n".join(lines) + "\n"
