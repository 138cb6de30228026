r"""Source attributes made valid before a result copies them (PS3.5 6.2 value representations).

A result joins the study of its source CT. highdicom copies the Patient, Clinical Trial Subject,
General Study, Patient Study and Clinical Trial Study modules from ``evidence[0]`` of an SR
(``SOPClass.copy_patient_and_study_information``) and the patient / study attributes of the
``ref_dataset`` of a Secondary Capture (``SCImage.from_ref_dataset``), and turns the source's
acquisition equipment into a Contributing Equipment item (``ContributingEquipment.
for_image_acquisition``: Manufacturer, model, software versions, serial number, institution,
department, address, station, acquisition date / time); :func:`dicom_sr.sc.sc_image` copies Body
Part Examined and Laterality; every result references the source's UIDs. Real sources break their
VRs (a 17-character Study ID in an SH, "2023-01-01" in a DA, "male" in Patient's Sex) and, copied
verbatim, make the result fail ``dciodvfy``. :func:`valid_source` returns a copy in which each of
those attributes is valid, fixed as follows (``SourceFix.action`` in quotes):

- more values than the VM allows: the first values are kept, the extra ones dropped ("dropped
  values"). A backslash in a VM 1 string is a value delimiter for DICOM and pydicom, so "A\B" in a
  Study ID keeps "A": joining the parts would invent an identifier that never existed;
- control characters: removed ("removed characters"); TAB, LF, FF and CR stay in ST / LT / UT
  text (PS3.5 6.1.3), as does the backslash (these VRs have one value); a backslash left inside
  a single value of another VR (possible only when set by hand) is removed too;
- a string longer than its VR allows (LO 64, SH 16, ST 1024, LT 10240, AE 16): cut ("cut");
  PN: component groups beyond 3 and components beyond 5 dropped ("dropped groups",
  "dropped components"), each group cut to 64 characters ("cut");
- CS in lower case or padded: upper-cased and trimmed ("uppercased"); a DS that is a number in the
  wrong form (e.g. 20 digits): rewritten ("reformatted");
- any value still invalid (CS, DA, TM, DT, AS, IS, DS, a value outside the enumerated values):
  the attribute is emptied when it is Type 1 or 2 in the result, e.g. Study Date, Study Time,
  Patient's Birth Date, Patient's Sex ("emptied"), else removed ("removed");
- an invalid UID is kept unchanged ("kept invalid UID"): the result must file into the source's
  study; it is reported, never repaired.

Validity is pydicom's (:func:`pydicom.valuerep.validate_value`) plus what pydicom leaves out: a
DA / TM / DT is one value, not a range, on a real calendar date; a PN group has at most five
components; the CS attributes with enumerated values (PS3.3 C.7.1.1, C.7.2.2, C.7.2.3, C.7.3.1)
hold one of them. A :class:`SourceFix` names the attribute and what was done, never the value:
values may be patient data and fixes are logged.

The builders clean before highdicom copies: :func:`dicom_sr.sr.comprehensive_3d_sr` (every SR) and
:func:`dicom_sr.sc.sc_image` (every Secondary Capture) call :func:`cleaned_sources`, which logs one
warning per fix; :func:`source_fixes` lists the fixes of a set of sources for the worker to record.
"""

from __future__ import annotations

import copy
import datetime
import functools
import logging
import math
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from highdicom._standard_utils import get_iod_module_map, get_module_attribute_map, get_sop_class_iod_map
from pydicom import Dataset, config
from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import dictionary_VM, dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import FileDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.valuerep import MAX_VALUE_LEN, format_number_as_ds, validate_value

__all__ = ["SourceFix", "cleaned_sources", "source_fixes", "valid_source"]

logger = logging.getLogger(__name__)

_RESULT_IODS = ("comprehensive-3d-sr", "secondary-capture-image")
"""highdicom's keys of the result IODs; their Type 1 / 2 attributes are emptied, never removed."""
_EQUIPMENT = (
    "Manufacturer",
    "ManufacturerModelName",
    "SoftwareVersions",
    "DeviceSerialNumber",
    "InstitutionName",
    "InstitutionalDepartmentName",
    "InstitutionAddress",
    "StationName",
    "AcquisitionDateTime",
    "AcquisitionDate",
    "AcquisitionTime",
)
"""What ``highdicom.ContributingEquipment.for_image_acquisition`` copies from the source."""
_SERIES = ("BodyPartExamined", "Laterality")
"""What :func:`dicom_sr.sc.sc_image` copies into the General Series of a Secondary Capture."""
_REFERENCES = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID")
_ENUMERATED: dict[str, tuple[str, ...]] = {
    "PatientSex": ("M", "F", "O"),
    "PatientIdentityRemoved": ("YES", "NO"),
    "QualityControlSubject": ("YES", "NO"),
    "TypeOfPatientID": ("TEXT", "RFID", "BARCODE"),
    "PatientSexNeutered": ("ALTERED", "UNALTERED"),
    "SmokingStatus": ("YES", "NO", "UNKNOWN"),
    "LongitudinalTemporalEventType": ("ENROLLMENT", "BASELINE"),
    "Laterality": ("R", "L"),
}
"""Enumerated values (PS3.3) of the copied CS attributes that have them."""
_STRING_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UR", "UT"}
)
_TEXT_VRS = frozenset({"ST", "LT", "UT"})
"""Always single-valued: a backslash is text, TAB / LF / FF / CR are allowed (PS3.5 6.2)."""
_CUT_VRS = frozenset({"AE", "LO", "SH", "ST", "LT"})
"""VRs whose over-long values are cut; cutting a code, number, date or UID would change its meaning."""
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_TEXT_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f]")
_UTC_OFFSET = re.compile(r"[+-]\d{4}$")
_PN_GROUPS, _PN_COMPONENTS, _PN_GROUP_LENGTH = 3, 5, 64
_VALIDATION_LOCK = threading.Lock()
"""pydicom's validation switch is global: one cleaning at a time turns it off."""


@dataclass(frozen=True)
class SourceFix:
    """One change made to a source attribute before a result copies it.

    Attributes
    ----------
    keyword: str
        DICOM keyword, ``"Sequence > Keyword"`` inside a sequence item.
    action: str
        "cut", "removed characters", "dropped values", "dropped groups", "dropped components",
        "uppercased", "reformatted", "emptied", "removed" or "kept invalid UID".
    reason: str
        What was done and the rule (VR, VM, Type); never the value.
    """

    keyword: str
    action: str
    reason: str

    @property
    def message(self) -> str:
        """``"<keyword>: <reason>"``, e.g. "StudyID: cut from 17 to 16 characters (SH allows at most 16)"."""
        return f"{self.keyword}: {self.reason}"

    def __str__(self) -> str:
        return self.message


def _module_attributes(iod: str) -> list[tuple[str, str]]:
    """(keyword, Type) of the top-level attributes of the Patient and Study modules of ``iod``."""
    modules, attributes = get_iod_module_map()[iod], get_module_attribute_map()
    return [
        (str(item["keyword"]), str(item["type"]))
        for module in modules
        if module["ie"] in ("Patient", "Study")
        for item in attributes[module["key"]]
        if not item["path"]
    ]


@functools.cache
def _required() -> frozenset[str]:
    return frozenset(
        kw for iod in _RESULT_IODS for kw, kind in _module_attributes(iod) if kind in ("1", "1C", "2", "2C")
    )


@functools.cache
def _checked(sop_class_uid: str) -> tuple[str, ...]:
    """Keywords copied from a source of ``sop_class_uid`` (highdicom copies its IOD's modules)."""
    source_iod = get_sop_class_iod_map().get(sop_class_uid)
    iods = [*_RESULT_IODS, *([source_iod] if source_iod else [])]
    keywords = [kw for iod in iods for kw, _ in _module_attributes(iod)]
    return tuple(dict.fromkeys([*keywords, *_EQUIPMENT, *_SERIES, *_REFERENCES]))


def _max_vm(tag: int) -> int | None:
    """Largest VM of ``tag`` (PS3.6), None when unbounded ("1-n", "2-2n")."""
    high = dictionary_VM(tag).split("-")[-1]
    return None if "n" in high else int(high)


def _valid(vr: str, value: str, enumerated: tuple[str, ...] | None) -> bool:
    """Whether ``value`` passes pydicom's VR check, is one date / time on a real date, is enumerated."""
    try:
        validate_value(vr, value, config.RAISE)
    except ValueError:
        return False
    if enumerated is not None and value and value not in enumerated:
        return False
    if vr in ("DA", "TM", "DT") and value:
        text = _UTC_OFFSET.sub("", value.strip()) if vr == "DT" else value.strip()
        if "-" in text:
            return False
        day = text if vr == "DA" else text[:8] if vr == "DT" else ""
        if len(day) == 8:
            try:
                datetime.date(int(day[:4]), int(day[4:6]), int(day[6:8]))
            except ValueError:
                return False
    return True


def _repair_pn(keyword: str, value: str, fixes: list[SourceFix]) -> str:
    groups = value.split("=")
    if len(groups) > _PN_GROUPS:
        extra = len(groups) - _PN_GROUPS
        fixes.append(SourceFix(keyword, "dropped groups", f"dropped {extra} component group(s) beyond the 3 of PN"))
        groups = groups[:_PN_GROUPS]
    repaired = []
    for group in groups:
        components = group.split("^")
        if len(components) > _PN_COMPONENTS:
            extra = len(components) - _PN_COMPONENTS
            reason = f"dropped {extra} name component(s) beyond the 5 of a PN component group"
            fixes.append(SourceFix(keyword, "dropped components", reason))
            group = "^".join(components[:_PN_COMPONENTS])
        if len(group) > _PN_GROUP_LENGTH:
            reason = f"cut a component group from {len(group)} to 64 characters (PN allows at most 64 per group)"
            fixes.append(SourceFix(keyword, "cut", reason))
            group = group[:_PN_GROUP_LENGTH]
        repaired.append(group)
    return "=".join(repaired)


def _repair_value(
    keyword: str, vr: str, value: str, single: bool, enumerated: tuple[str, ...] | None, fixes: list[SourceFix]
) -> str | None:
    """The valid form of one value, None when it cannot be made valid."""
    cleaned = (_TEXT_CONTROL if vr in _TEXT_VRS else _CONTROL).sub("", value)
    kinds = "control"
    if single and vr not in _TEXT_VRS and "\\" in cleaned:  # pydicom splits at it: only set by hand
        cleaned, kinds = cleaned.replace("\\", ""), "control or backslash"
    if cleaned != value:
        reason = f"removed {len(value) - len(cleaned)} {kinds} character(s) ({vr} forbids them, PS3.5 6.1, 6.2)"
        fixes.append(SourceFix(keyword, "removed characters", reason))
    value = cleaned
    if vr == "PN":
        value = _repair_pn(keyword, value, fixes)
    elif vr in _CUT_VRS and len(value) > MAX_VALUE_LEN[vr]:
        limit = MAX_VALUE_LEN[vr]
        reason = f"cut from {len(value)} to {limit} characters ({vr} allows at most {limit})"
        fixes.append(SourceFix(keyword, "cut", reason))
        value = value[:limit]
    if vr == "CS" and not _valid(vr, value, enumerated) and _valid(vr, value.strip().upper(), enumerated):
        fixes.append(SourceFix(keyword, "uppercased", "upper-cased and trimmed to a valid CS value"))
        value = value.strip().upper()
    elif vr == "DS" and not _valid(vr, value, None):
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if math.isfinite(number):
            fixes.append(SourceFix(keyword, "reformatted", "rewritten as a valid DS (at most 16 characters)"))
            value = format_number_as_ds(number)
    return value if _valid(vr, value, enumerated) else None


def _strings(value: object, single: bool) -> list[str] | None:
    """The values of an element as strings (a multi-valued string split at backslashes)."""
    items = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    if any(isinstance(item, (bytes, bytearray)) for item in items):
        return None  # undecoded: not copied as text
    strings = [str(item) for item in items]
    return strings if single else [part for text in strings for part in text.split("\\")]


def _fix_attribute(
    ds: Dataset,
    keyword: str,
    label: str,
    required: bool,
    fixes: list[SourceFix],
    parent_encoding: str | list[str] = default_encoding,
) -> None:
    """Make ``ds.<keyword>`` valid in place; ``ds`` is the copy, its elements are replaced, never changed."""
    tag = tag_for_keyword(keyword)
    if tag is None or tag not in ds:
        return
    try:
        elem = ds[tag]
    except (ValueError, TypeError, OverflowError):  # not even decodable, e.g. "1,80" in a DS
        _drop(ds, tag, dictionary_VR(tag), label, f"not a valid {dictionary_VR(tag)} value", required, fixes)
        return
    if elem.VR == "SQ":
        charset = ds.get("SpecificCharacterSet")
        encoding = convert_encodings(charset) if charset else parent_encoding
        items = [_copy(item, encoding) for item in elem.value]
        for item in items:
            _fix_item(item, label, encoding, fixes)
        ds[tag] = DataElement(tag, "SQ", DicomSequence(items))
        return
    if elem.is_empty:
        return
    if elem.VR == "UI":
        if any(not _valid("UI", str(uid), None) for uid in (elem.value if elem.VM > 1 else [elem.value])):
            reason = "not a valid UID (PS3.5 9.1); left unchanged, UIDs are never changed"
            fixes.append(SourceFix(label, "kept invalid UID", reason))
        return
    max_vm, enumerated = _max_vm(tag), _ENUMERATED.get(keyword)
    values = _strings(elem.value, max_vm == 1) if elem.VR in _STRING_VRS else None
    if values is None:
        return
    kept = values
    if max_vm is not None and len(values) > max_vm:
        reason = f"dropped {len(values) - max_vm} value(s) beyond the VM of {max_vm}"
        fixes.append(SourceFix(label, "dropped values", reason))
        kept = values[:max_vm]
    repaired = [_repair_value(label, elem.VR, value, max_vm == 1, enumerated, fixes) for value in kept]
    valid = [value for value in repaired if value is not None]
    if not valid:
        why = f"not one of {', '.join(enumerated)}" if enumerated else f"not a valid {elem.VR} value"
        _drop(ds, tag, elem.VR, label, why, required, fixes)
        return
    if len(valid) < len(kept):
        reason = f"dropped {len(kept) - len(valid)} invalid {elem.VR} value(s)"
        fixes.append(SourceFix(label, "dropped values", reason))
    if valid != values:
        ds[tag] = DataElement(tag, elem.VR, valid[0] if len(valid) == 1 else valid)


def _drop(ds: Dataset, tag: int, vr: str, label: str, why: str, required: bool, fixes: list[SourceFix]) -> None:
    """Empty a Type 1 / 2 attribute of the result, remove an optional one."""
    if required:
        fixes.append(SourceFix(label, "emptied", f"emptied: {why} (Type 1 or 2 in the result)"))
        ds[tag] = DataElement(tag, vr, "")
    else:
        fixes.append(SourceFix(label, "removed", f"removed: {why} (optional in the result)"))
        del ds[tag]


def _fix_item(item: Dataset, label: str, encoding: str | list[str], fixes: list[SourceFix]) -> None:
    """Make every attribute of a (copied) sequence item valid; all count as optional."""
    for tag in list(item.keys()):
        keyword = keyword_for_tag(tag)
        if keyword and not tag.is_private:
            _fix_attribute(item, keyword, f"{label} > {keyword}", False, fixes, encoding)


def _copy(ds: Dataset, parent_encoding: str | list[str] = default_encoding) -> Dataset:
    """A new dataset holding the same element objects; the cleaning replaces elements, never changes one.

    Not a deep copy: that of an RTSTRUCT whose contours were read takes a third of a second.
    ``parent_encoding`` decodes the text of a sequence item (as pydicom's reader does); a
    FileDataset stays one, with its file meta and its file, from which deferred values are read.
    """
    elements = dict(ds.items())
    implicit, little = ds.original_encoding
    if isinstance(ds, FileDataset):
        source = ds.filename or ds.buffer or ""
        meta = copy.deepcopy(ds.file_meta)
        copied: Dataset = FileDataset(source, elements, ds.preamble, meta, implicit is not False, little is not False)
    else:
        copied = Dataset(elements, parent_encoding=parent_encoding)
        if getattr(ds, "file_meta", None) is not None:
            copied.file_meta = copy.deepcopy(ds.file_meta)
    copied.set_original_encoding(implicit, little, ds.original_character_set)
    return copied


def valid_source(ds: Dataset) -> tuple[Dataset, tuple[SourceFix, ...]]:
    """A copy of a source dataset in which every attribute a result copies is valid (PS3.5 6.2).

    The attributes checked are the Patient and Study modules highdicom copies, the source's
    acquisition equipment, Body Part Examined, Laterality and the referenced UIDs; each invalid
    value is fixed as described in the module docstring. UIDs are never changed.

    Parameters
    ----------
    ds: pydicom.Dataset
        A source instance (CT, SEG, RTSTRUCT; headers suffice). It is not modified, not even
        decoded: the copy shares its unchanged elements and holds new ones where a value was
        fixed.

    Returns
    -------
    tuple[pydicom.Dataset, tuple[SourceFix, ...]]
        The valid copy (a ``pydicom.Dataset`` with the source's file meta information) and the
        fixes made, in attribute order (none for a valid source).

    Raises
    ------
    TypeError
        When ``ds`` is not a pydicom Dataset.
    """
    if not isinstance(ds, Dataset):
        raise TypeError('Argument "ds" must have type pydicom.Dataset.')
    fixes: list[SourceFix] = []
    required = _required()
    # pydicom validates (and logs, value included) when it decodes a value: off while cleaning
    with _VALIDATION_LOCK, config.disable_value_validation():
        copied = _copy(ds)
        for keyword in _checked(str(copied.get("SOPClassUID", ""))):
            _fix_attribute(copied, keyword, keyword, keyword in required, fixes)
    return copied, tuple(fixes)


def _unique(fixes: Iterable[SourceFix]) -> tuple[SourceFix, ...]:
    first: dict[tuple[str, str], SourceFix] = {}
    for fix in fixes:
        first.setdefault((fix.keyword, fix.action), fix)
    return tuple(first.values())


def source_fixes(datasets: Sequence[Dataset]) -> tuple[SourceFix, ...]:
    """The fixes :func:`valid_source` would make to a set of source headers, one per (keyword, action).

    Parameters
    ----------
    datasets: Sequence[pydicom.Dataset]
        The source instances (e.g. the CT headers and the segmentation); none is modified.

    Returns
    -------
    tuple[SourceFix, ...]
        The first fix of each (keyword, action), in order; for the worker's warnings.

    Raises
    ------
    TypeError
        When ``datasets`` is not a sequence of pydicom Datasets.
    """
    if (
        isinstance(datasets, Dataset)
        or not isinstance(datasets, Sequence)
        or any(not isinstance(ds, Dataset) for ds in datasets)
    ):
        raise TypeError('Argument "datasets" must be a sequence of pydicom.Dataset.')
    return _unique(fix for ds in datasets for fix in valid_source(ds)[1])


def cleaned_sources(datasets: Sequence[Dataset]) -> list[Dataset]:
    """:func:`valid_source` of each dataset for a builder, logging one warning per (keyword, action).

    Parameters
    ----------
    datasets: Sequence[pydicom.Dataset]
        The sources a result copies attributes and references from.

    Returns
    -------
    list[pydicom.Dataset]
        The valid copies, in order. The log names the attribute and the fix, never the value.
    """
    cleaned: list[Dataset] = []
    fixes: list[SourceFix] = []
    for ds in datasets:
        valid, made = valid_source(ds)
        cleaned.append(valid)
        fixes.extend(made)
    for fix in _unique(fixes):
        logger.warning("source attribute made valid before copying it into a result: %s", fix.message)
    return cleaned
