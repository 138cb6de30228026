"""Read the few header elements the node needs from an encoded DICOM object, without pixel data.

This runs on the C-STORE hot path: large values (pixel data, contour data) are deferred, never
decoded. Before anything is parsed, one pass over the element headers checks that the bytes are a
complete dataset (:func:`check_complete`): every element's declared length is present, every
undefined-length sequence and encapsulated Pixel Data ends with its delimiter. After parsing,
native Pixel Data must have exactly the length its image attributes describe, and every UID the
node records or uses for a path or key must be a well-formed UID (PS3.5 9.1).

The object is either bytes in memory or a file (a large instance streamed to the spool): a file is
memory-mapped for the walk, which touches only the element headers, and pydicom reads its header
elements up to the pixel data; the pixel data themselves are never read into memory.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import struct
import zlib
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

from inference.structures import referenced_instance_uids, referenced_series_uids
from pacs_agent.errors import InputError

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2.1"
RT_STRUCTURE_SET = "1.2.840.10008.5.1.4.1.1.481.3"
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
MULTIFRAME_TRUE_COLOR_SC = "1.2.840.10008.5.1.4.1.1.7.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"

STORAGE_SOP_CLASSES: dict[str, str] = {
    CT_IMAGE: "CT Image Storage",
    ENHANCED_CT_IMAGE: "Enhanced CT Image Storage",
    RT_STRUCTURE_SET: "RT Structure Set Storage",
    SEGMENTATION: "Segmentation Storage",
    SECONDARY_CAPTURE: "Secondary Capture Image Storage",
    MULTIFRAME_TRUE_COLOR_SC: "Multi-frame True Color Secondary Capture Image Storage",
    COMPREHENSIVE_3D_SR: "Comprehensive 3D SR Storage",
}
IMAGE_SOP_CLASSES = frozenset({CT_IMAGE, ENHANCED_CT_IMAGE, SEGMENTATION, SECONDARY_CAPTURE, MULTIFRAME_TRUE_COLOR_SC})
SEGMENTATION_SOP_CLASSES = frozenset({SEGMENTATION, RT_STRUCTURE_SET})

_DEFER = 2048  # bytes: values larger than this are not read
Buffer = bytes | mmap.mmap
"""An encoded object in memory, or a memory-mapped file (slices of both are bytes)."""


class HeaderError(InputError):
    """The received bytes are not a DICOM object the node can index."""


class IncompleteDatasetError(HeaderError):
    """The bytes end before the dataset does: an element, a sequence or encapsulated Pixel Data is cut short.

    ``tag`` is the element that is incomplete (as ``0xGGGGEEEE``), None when the stream ends inside
    an element header.
    """

    def __init__(self, message: str, tag: int | None = None) -> None:
        super().__init__(message)
        self.tag = tag


class PixelDataMismatchError(HeaderError):
    """The dataset is complete, but its Pixel Data does not have the length its image attributes describe."""

    def __init__(self, message: str, tag: int) -> None:
        super().__init__(message)
        self.tag = tag


class InvalidUIDError(HeaderError):
    """A UID the node records or uses for a path or key is not a well-formed UID (PS3.5 9.1).

    ``keyword`` names the attribute, e.g. ``StudyInstanceUID`` or ``ReferencedSOPInstanceUID``.
    """

    def __init__(self, message: str, keyword: str) -> None:
        super().__init__(message)
        self.keyword = keyword


@dataclass(frozen=True)
class InstanceHeader:
    """What the node records about a received instance."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    modality: str | None
    series_description: str | None
    frame_of_reference_uid: str | None
    patient_id: str | None
    issuer_of_patient_id: str | None
    patient_birth_date: str | None
    patient_sex: str | None
    study_date: str | None
    accession_number: str | None
    referenced_series_uids: tuple[str, ...]
    has_pixel_data: bool
    referenced_instance_uids: tuple[str, ...] = ()
    """Images a SEG / RTSTRUCT was drawn on (empty for images)."""
    protocol_name: str | None = None
    image_comments: str | None = None
    contrast_bolus_agent: str | None = None
    contrast_start_time: str | None = None
    acquisition_time: str | None = None
    body_part_examined: str | None = None
    study_description: str | None = None
    image_position: str | None = None
    """Image Position (Patient), three backslash-separated numbers (None when absent or malformed)."""
    image_orientation: str | None = None
    """Image Orientation (Patient) as six backslash-separated numbers (None when absent or malformed)."""


# -- UIDs (PS3.5 9.1) ----------------------------------------------------------------------

UID_MAX_LENGTH = 64
_UID_SYNTAX = re.compile(r"[0-9]+(\.[0-9]+)*")
"""Digits separated by dots. A leading zero in a component (not allowed by PS3.5 9.1) is tolerated:
older modalities still write such UIDs, every PACS keeps them, and they are harmless as keys and names."""


def shown(value: str, limit: int = 72) -> str:
    """``value`` as a message may show it: control and non-ASCII characters escaped, a long value cut."""
    if len(value) <= limit:
        return ascii(value)[1:-1]
    return f"{ascii(value[:limit])[1:-1]}... ({len(value)} characters)"


def uid_problem(value: str) -> str | None:
    """Why ``value`` is not a well-formed UID, or None when it is one.

    PS3.5 9.1: at most 64 characters; components of digits separated by dots, none empty. A leading
    zero in a component is tolerated (legacy modalities write them; see :data:`_UID_SYNTAX`). The UI
    padding (one trailing NUL) is removed by pydicom before this is asked.
    """
    if len(value) <= UID_MAX_LENGTH and _UID_SYNTAX.fullmatch(value):
        return None
    if not value:
        return "is empty"
    if len(value) > UID_MAX_LENGTH:
        return f"has {len(value)} characters (at most {UID_MAX_LENGTH})"
    if any(not component.isascii() or not component.isdigit() for component in value.split(".") if component):
        return "contains characters other than digits and dots"
    return "has an empty component (a leading, trailing or double dot)"


def _check_uid(value: str, keyword: str, what: str) -> None:
    problem = uid_problem(value)
    if problem is not None:
        raise InvalidUIDError(f"{what} '{shown(value)}' is not a valid UID: it {problem} (PS3.5 9.1)", keyword)


_INSTANCE_UIDS = {
    "SOPInstanceUID": (0x00080018, "SOP Instance UID"),
    "SOPClassUID": (0x00080016, "SOP Class UID"),
    "StudyInstanceUID": (0x0020000D, "Study Instance UID"),
    "SeriesInstanceUID": (0x0020000E, "Series Instance UID"),
    "FrameOfReferenceUID": (0x00200052, "Frame of Reference UID"),
}
"""Top-level UIDs the node records (keyword: tag, name), in the order they are checked."""
_REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


def _instance_uids(values: dict[int, bytes]) -> dict[str, str | None]:
    """The instance's own UIDs (:data:`_INSTANCE_UIDS`), required ones present and every one well-formed.

    Decoded from the raw values the walk kept (padding removed), not through pydicom, whose value
    conversion would warn with the raw value (control characters included) and costs more.
    """
    uids: dict[str, str | None] = {}
    for keyword, (tag, _) in _INSTANCE_UIDS.items():
        raw = values.get(tag)
        uids[keyword] = raw.decode("latin-1").rstrip("\0 ") or None if raw is not None else None
    missing = [keyword for keyword in _REQUIRED_UIDS if not uids[keyword]]
    if missing:
        raise HeaderError(f"required attribute(s) missing or empty: {', '.join(missing)}")
    for keyword, (_, what) in _INSTANCE_UIDS.items():
        value = uids[keyword]
        if value is not None:
            _check_uid(value, keyword, what)
    return uids


def _check_referenced_uids(header: InstanceHeader) -> None:
    """The referenced UIDs the node records (series and images a segmentation was drawn on) must be well-formed."""
    for uid in header.referenced_series_uids:
        _check_uid(uid, "SeriesInstanceUID", "a referenced Series Instance UID")
    for uid in header.referenced_instance_uids:
        _check_uid(uid, "ReferencedSOPInstanceUID", "a Referenced SOP Instance UID")


# -- completeness of the byte stream -----------------------------------------------------

_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
PIXEL_DATA_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
"""Pixel Data, Float Pixel Data, Double Float Pixel Data."""
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_SHORT_VRS = frozenset(
    {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"PN", b"SH", b"SL", b"SS"}
    | {b"ST", b"TM", b"UI", b"UL", b"US"}
)
_NATIVE_SYNTAXES = frozenset(
    {ImplicitVRLittleEndian, "1.2.840.10008.1.2.1", ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian}
)
_META_TAG = struct.Struct("<HH")
_META_U16 = struct.Struct("<H")
_META_U32 = struct.Struct("<I")


def tag_text(tag: int) -> str:
    """``(GGGG,EEEE) Keyword`` of a tag given as ``0xGGGGEEEE``."""
    keyword = keyword_for_tag(tag)
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X}){' ' + keyword if keyword else ''}"


_ROWS, _COLUMNS, _SAMPLES, _BITS = 0x00280010, 0x00280011, 0x00280002, 0x00280100
_PHOTOMETRIC, _FRAMES = 0x00280004, 0x00280008
_KEPT_TAGS = frozenset(
    {tag for tag, _ in _INSTANCE_UIDS.values()} | {_ROWS, _COLUMNS, _SAMPLES, _BITS, _PHOTOMETRIC, _FRAMES}
)
"""Top-level elements whose raw values the walk keeps: the instance's UIDs and the image pixel description."""
_HEADER_KEYWORDS = (
    "SpecificCharacterSet",
    "Modality",
    "SeriesDescription",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "AccessionNumber",
    "ProtocolName",
    "ImageComments",
    "ContrastBolusAgent",
    "ContrastBolusStartTime",
    "AcquisitionTime",
    "SeriesTime",
    "BodyPartExamined",
    "StudyDescription",
    "ImagePositionPatient",
    "ImageOrientationPatient",
)
_HEADER_TAGS = frozenset(int(tag_for_keyword(k) or 0) for k in _HEADER_KEYWORDS)
"""Top-level elements :func:`read_header` records besides the UIDs: kept raw by the walk, decoded by pydicom."""
_REFERENCE_SEQUENCES = frozenset({0x00081115, 0x00081200, 0x30060010})
"""Referenced Series, Studies Containing Other Referenced Instances, Referenced Frame of Reference
Sequence: nested references that only a full parse reads (see :func:`read_header`)."""


@dataclass(frozen=True)
class PixelDataExtent:
    """The top-level pixel data element: its tag and value length (None when encapsulated)."""

    tag: int
    length: int | None


class _Walker:
    """One pass over the element headers of a dataset, skipping every value (nothing is decoded)."""

    def __init__(self, buf: Buffer, *, implicit: bool, little: bool) -> None:
        order = "<" if little else ">"
        self.buf = buf
        self.implicit = implicit
        self._tag = struct.Struct(order + "HH").unpack_from
        self._u16 = struct.Struct(order + "H").unpack_from
        self._u32 = struct.Struct(order + "I").unpack_from
        self.pixel: PixelDataExtent | None = None
        self.values: dict[int, bytes] = {}
        """Raw values of the :data:`_KEPT_TAGS` found at the top level."""
        self.elements_kept: dict[int, tuple[bytes, int, bytes]] = {}
        """VR (empty when implicit), value offset and raw value of the top-level :data:`_HEADER_TAGS` and UIDs."""
        self.references = False
        """True when a top-level reference sequence (:data:`_REFERENCE_SEQUENCES`) is present."""

    def elements(self, pos: int, end: int, *, in_item: bool = False, top: bool = False) -> int:
        """Walk the elements from ``pos`` to ``end`` (or to the item delimiter, ``in_item``); the position after."""
        buf, implicit = self.buf, self.implicit
        while pos < end:
            if pos + 8 > end:
                raise IncompleteDatasetError(f"the data end inside an element header ({end - pos} of 8 bytes)")
            group, element = self._tag(buf, pos)
            tag = group << 16 | element
            if group == 0xFFFE:
                if tag == _ITEM_END and in_item:
                    return pos + 8
                raise HeaderError(f"cannot decode the dataset: unexpected delimiter {tag_text(tag)}")
            if implicit:
                vr = b""
                length = self._u32(buf, pos + 4)[0]
                pos += 8
            else:
                vr = buf[pos + 4 : pos + 6]
                if vr in _LONG_VRS:
                    if pos + 12 > end:
                        raise IncompleteDatasetError(f"the data end inside the header of {tag_text(tag)}", tag)
                    length = self._u32(buf, pos + 8)[0]
                    pos += 12
                elif vr in _SHORT_VRS:
                    length = self._u16(buf, pos + 6)[0]
                    pos += 8
                else:
                    raise HeaderError(f"cannot decode the dataset: element {tag_text(tag)} has no valid VR ({vr!r})")
            if top and tag in _REFERENCE_SEQUENCES:
                self.references = True
            if length == _UNDEFINED:
                if top and tag in PIXEL_DATA_TAGS:
                    pos = self.encapsulated(pos, end, tag)
                    self.pixel = PixelDataExtent(tag, None)
                elif implicit or vr == b"SQ":
                    pos = self.sequence(pos, end, tag)
                elif vr == b"UN":  # PS3.5 6.2.2: its content is Implicit VR Little Endian
                    inner = _Walker(buf, implicit=True, little=True)
                    pos = inner.sequence(pos, end, tag)
                else:
                    raise HeaderError(f"cannot decode the dataset: {tag_text(tag)} ({vr!r}) has an undefined length")
            else:
                if pos + length > end:
                    raise IncompleteDatasetError(
                        f"element {tag_text(tag)} declares {length} bytes but only {end - pos} arrived", tag
                    )
                if top:
                    if tag in _KEPT_TAGS:
                        self.values[tag] = buf[pos : pos + length]
                        self.elements_kept[tag] = (vr, pos, self.values[tag])
                    elif tag in _HEADER_TAGS:
                        self.elements_kept[tag] = (vr, pos, buf[pos : pos + length])
                    elif tag in PIXEL_DATA_TAGS:
                        self.pixel = PixelDataExtent(tag, length)
                pos += length
        if in_item:
            raise IncompleteDatasetError("the data end inside a sequence item (no item delimiter)")
        return pos

    def _item_header(self, pos: int) -> tuple[int, int]:
        """The tag (item or sequence delimiter) and the declared length of the item header at ``pos``."""
        group, element = self._tag(self.buf, pos)
        return group << 16 | element, self._u32(self.buf, pos + 4)[0]

    def sequence(self, pos: int, end: int, tag: int) -> int:
        """Walk the items of an undefined-length sequence up to its delimiter; the position after it."""
        while True:
            if pos + 8 > end:
                raise IncompleteDatasetError(
                    f"sequence {tag_text(tag)} has no sequence delimiter: the data end inside it", tag
                )
            item, length = self._item_header(pos)
            pos += 8
            if item == _SEQUENCE_END:
                return pos
            if item != _ITEM:
                raise HeaderError(
                    f"cannot decode the dataset: sequence {tag_text(tag)} holds {tag_text(item)}, not an item"
                )
            if length == _UNDEFINED:
                try:
                    pos = self.elements(pos, end, in_item=True)
                except IncompleteDatasetError as exc:
                    raise IncompleteDatasetError(f"in sequence {tag_text(tag)}: {exc}", exc.tag or tag) from None
            elif pos + length > end:
                raise IncompleteDatasetError(
                    f"an item of sequence {tag_text(tag)} declares {length} bytes but only {end - pos} arrived", tag
                )
            else:
                pos += length

    def encapsulated(self, pos: int, end: int, tag: int) -> int:
        """Walk the fragments of encapsulated Pixel Data up to its sequence delimiter; the position after it."""
        items = 0
        while True:
            if pos + 8 > end:
                raise IncompleteDatasetError(
                    f"encapsulated {tag_text(tag)} has no sequence delimiter: the data end after {items} item(s)", tag
                )
            item, length = self._item_header(pos)
            pos += 8
            if item == _SEQUENCE_END:
                if items < 2:
                    raise PixelDataMismatchError(
                        f"encapsulated {tag_text(tag)} holds no fragment after its Basic Offset Table", tag
                    )
                return pos
            if item != _ITEM or length == _UNDEFINED:
                raise HeaderError(f"cannot decode the dataset: encapsulated {tag_text(tag)} holds {tag_text(item)}")
            if pos + length > end:
                raise IncompleteDatasetError(
                    f"a fragment of encapsulated {tag_text(tag)} declares {length} bytes but only {end - pos} arrived",
                    tag,
                )
            pos += length
            items += 1


def _file_meta_end(data: Buffer) -> tuple[int, str]:
    """Where the dataset starts after the preamble and file meta (group 0002), and the Transfer Syntax UID."""
    if len(data) < 132 or data[128:132] != b"DICM":
        raise HeaderError("not a DICOM file: no preamble and DICM prefix")
    pos, end, syntax = 132, len(data), ""
    while pos + 8 <= end:
        group, element = _META_TAG.unpack_from(data, pos)
        if group != 0x0002:
            break
        vr = data[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            length, pos = (_META_U32.unpack_from(data, pos + 8)[0], pos + 12) if pos + 12 <= end else (0, end + 1)
        else:
            length, pos = _META_U16.unpack_from(data, pos + 6)[0], pos + 8
        if pos + length > end:
            raise IncompleteDatasetError("the file meta information is cut short")
        if element == 0x0010:
            syntax = data[pos : pos + length].decode("ascii", "replace").rstrip("\0 ")
        pos += length
    if not syntax:
        raise HeaderError("not a DICOM file: the file meta information has no Transfer Syntax UID")
    return pos, syntax


@dataclass(frozen=True)
class CompleteDataset:
    """What the walk of a complete dataset found."""

    transfer_syntax_uid: str
    pixel: PixelDataExtent | None
    """The top-level pixel data element, if any."""
    values: dict[int, bytes]
    """Raw values of the instance's UIDs and of the image pixel description (tag -> bytes)."""
    little_endian: bool
    implicit: bool = False
    kept: dict[int, tuple[bytes, int, bytes]] = field(default_factory=dict)
    """Top-level elements :func:`read_header` records: tag -> (VR, value offset, raw value)."""
    references: bool = False
    """A top-level sequence of references to other series is present (a full parse reads it)."""


def check_complete(data: Buffer) -> CompleteDataset:
    """Check that an encoded file (preamble + file meta + dataset) holds a complete dataset.

    Every element's declared length must be present, every undefined-length sequence and item
    must end with its delimiter, encapsulated Pixel Data with its sequence delimiter (after at least
    one fragment), and the data must end exactly after the last element. Values are skipped, never
    decoded (a deflated dataset is inflated first). Returns the transfer syntax, where the
    top-level pixel data element is and the raw values :func:`read_header` checks.

    Raises
    ------
    IncompleteDatasetError
        The bytes end before the dataset does (the element that is cut short is named).
    HeaderError
        The bytes are not a DICOM dataset (no DICM prefix, an invalid VR, a stray delimiter).
    """
    start, syntax = _file_meta_end(data)
    body: Buffer = data
    if syntax == DeflatedExplicitVRLittleEndian:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            body = inflater.decompress(data[start:])
        except zlib.error as exc:
            raise HeaderError(f"cannot decode the dataset: the deflated data are corrupt ({exc})") from None
        if not inflater.eof:
            raise IncompleteDatasetError("the deflated dataset ends before its deflate stream does")
        start = 0
    implicit = syntax == ImplicitVRLittleEndian
    if not implicit and len(body) >= start + 6 and body[start + 4 : start + 6] not in _LONG_VRS | _SHORT_VRS:
        implicit = True  # an implicit VR dataset in an explicit context, which pydicom reads too
    little = syntax != ExplicitVRBigEndian
    walker = _Walker(body, implicit=implicit, little=little)
    walker.elements(start, len(body), top=True)
    return CompleteDataset(
        syntax, walker.pixel, walker.values, little, implicit, walker.elements_kept, walker.references
    )


def _number(complete: CompleteDataset, tag: int) -> int | None:
    """A US or IS value of the image pixel description from its raw bytes; None when absent or empty."""
    raw = complete.values.get(tag)
    if not raw:
        return None
    if tag == _FRAMES:  # IS
        return int(raw.decode("latin-1").strip("\0 "))
    if len(raw) != 2:
        raise ValueError(f"{tag_text(tag)} is not one US value")
    return int.from_bytes(raw, "little" if complete.little_endian else "big")


def _check_pixel_data(complete: CompleteDataset) -> None:
    """Native pixel data must have exactly the length its image attributes describe, padded to even."""
    pixel, syntax = complete.pixel, complete.transfer_syntax_uid
    if pixel is None:
        return
    name = tag_text(pixel.tag)
    if pixel.length is None:
        if syntax in _NATIVE_SYNTAXES:
            raise HeaderError(
                f"cannot decode the dataset: {name} is encapsulated in the native transfer syntax {syntax}"
            )
        return
    if syntax not in _NATIVE_SYNTAXES and pixel.tag == 0x7FE00010:
        raise HeaderError(
            f"cannot decode the dataset: {name} is not encapsulated in the compressed transfer syntax {syntax}"
        )
    described = {"Rows": _ROWS, "Columns": _COLUMNS, "SamplesPerPixel": _SAMPLES, "BitsAllocated": _BITS}
    try:
        numbers = {keyword: _number(complete, tag) for keyword, tag in described.items()}
        frames = _number(complete, _FRAMES) or 1
    except ValueError:
        raise PixelDataMismatchError(
            f"{name}: Rows, Columns, Samples per Pixel, Bits Allocated or Number of Frames is not a number", pixel.tag
        ) from None
    missing = [keyword for keyword, number in numbers.items() if number is None]
    if missing:
        raise PixelDataMismatchError(f"{name} without {', '.join(missing)}: its length cannot be checked", pixel.tag)
    rows, columns, samples, bits = (int(number or 0) for number in numbers.values())
    total_bits = rows * columns * frames * samples * bits
    photometric = complete.values.get(_PHOTOMETRIC, b"").strip(b"\0 ")
    if photometric == b"YBR_FULL_422":
        total_bits = total_bits // 3 * 2  # PS3.3 C.7.6.3.1.2: two of three chroma samples shared
    expected = (total_bits + 7) // 8
    padded = expected + expected % 2
    if pixel.length != padded:
        padding = f", padded to {padded}" if padded != expected else ""
        raise PixelDataMismatchError(
            f"{name} holds {pixel.length} bytes, but Rows x Columns x Number of Frames x Samples per Pixel x "
            f"Bits Allocated = {rows} x {columns} x {frames} x {samples} x {bits} bits need {expected} bytes{padding}",
            pixel.tag,
        )


def _ds_text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value).strip() or None


def _ds_vector(ds: Dataset, keyword: str, size: int) -> str | None:
    """A numeric multi-valued attribute as backslash-separated text; None when absent or not ``size`` finite numbers."""
    try:
        value = ds.get(keyword)
        if value is None:
            return None
        numbers = [float(v) for v in (value if isinstance(value, MultiValue | list | tuple) else [value])]
    except Exception:  # a value that breaks its VR: no geometry, not a refusal
        return None
    if len(numbers) != size or not all(math.isfinite(v) for v in numbers):
        return None
    return "\\".join(repr(v) for v in numbers)


def _numbers_text(numbers: list[float], size: int) -> str | None:
    if len(numbers) != size or not all(math.isfinite(v) for v in numbers):
        return None
    return "\\".join(repr(v) for v in numbers)


_TEXT_VRS_SINGLE = frozenset({b"LT", b"ST", b"UT"})
"""Text VRs whose value is one string even with a backslash in it."""
_KEYWORD_TAGS = {keyword: int(tag_for_keyword(keyword) or 0) for keyword in _HEADER_KEYWORDS}


class _Fields:
    """The recorded header values of a dataset: read through pydicom, or straight from the walk's raw values.

    ``complete`` given: a value that is plain ASCII without an ISO 2022 escape (ESC) reads the same in
    every character set and is decoded here; any other value (and a multi-valued one) goes through
    pydicom with the dataset's Specific Character Set, as a full parse would. ``nested`` tells
    whether the dataset holds the nested references (a full parse).
    """

    def __init__(self, ds: Dataset | None, complete: CompleteDataset | None = None) -> None:
        self._ds = ds
        self.complete = complete
        self.nested = complete is None

    @property
    def ds(self) -> Dataset:
        """The parsed dataset, or one of the kept elements (built when first needed)."""
        if self._ds is None:
            assert self.complete is not None
            self._ds = _kept_dataset(self.complete)
        return self._ds

    def _raw(self, keyword: str) -> tuple[bytes, bytes] | None:
        """(VR, raw value) when the value can be decoded here; None when pydicom must decode it."""
        assert self.complete is not None
        kept = self.complete.kept.get(_KEYWORD_TAGS[keyword])
        if kept is None:
            return b"", b""
        vr, _, value = kept
        if not value.isascii() or b"\x1b" in value:
            return None
        return vr, value

    def text(self, keyword: str) -> str | None:
        """The value as text, stripped; None when absent or empty."""
        if self.complete is None:
            return _ds_text(self.ds, keyword)
        raw = self._raw(keyword)
        if raw is None or (b"\\" in raw[1] and raw[0] not in _TEXT_VRS_SINGLE):
            return _ds_text(self.ds, keyword)
        return raw[1].decode("ascii").strip("\0").strip() or None

    def vector(self, keyword: str, size: int) -> str | None:
        """A numeric multi-valued value as backslash-separated text (see :func:`_ds_vector`)."""
        if self.complete is None or self.complete.little_endian is False:
            return _ds_vector(self.ds, keyword, size)
        raw = self._raw(keyword)
        if raw is None or raw[0] not in (b"DS", b""):
            return _ds_vector(self.ds, keyword, size)
        if not raw[1]:
            return None
        try:
            numbers = [float(v) for v in raw[1].decode("ascii").strip("\0 ").split("\\")]
        except ValueError:
            return None
        return _numbers_text(numbers, size)


def read_header(source: bytes | Path) -> InstanceHeader:
    """Parse the header of an encoded DICOM file (preamble + file meta + dataset), in memory or on disk.

    The bytes must be a complete dataset (:func:`check_complete`), every UID the node records
    must be well-formed and native pixel data must have the length its image attributes describe.
    A file is checked through a memory map: its size does not matter for the memory this takes.

    One pass: the completeness walk keeps the raw values of the top-level elements the node
    records, and they are decoded from there (pydicom's value conversion, with the dataset's
    Specific Character Set). Only a SEG, an RTSTRUCT or an object with top-level reference
    sequences (whose nested items the node records) is parsed again by pydicom, up to its pixel data.

    Raises
    ------
    IncompleteDatasetError
        The bytes end before the dataset does.
    InvalidUIDError
        A UID the node records or uses for a path or key is malformed.
    PixelDataMismatchError
        The Pixel Data do not have the length that Rows, Columns, ... describe.
    HeaderError
        The bytes are not DICOM or lack a UID the node needs.
    """
    if isinstance(source, Path):
        return _read_header_file(source)
    complete = check_complete(source)
    if _needs_full_parse(complete):
        return _parse(BytesIO(source), complete, stop_before_pixels=False)
    return _header(complete, _Fields(None, complete))


def _needs_full_parse(complete: CompleteDataset) -> bool:
    """True when the header holds nested references the node records (a SEG, an RTSTRUCT, a reference sequence)."""
    raw = complete.values.get(0x00080016, b"")
    sop_class = raw.decode("latin-1").rstrip("\0 ")
    return complete.references or sop_class in SEGMENTATION_SOP_CLASSES


def _kept_dataset(complete: CompleteDataset) -> Dataset:
    """A dataset of the elements the walk kept, decoded by pydicom only when a value is read."""
    ds = Dataset()
    implicit, little = complete.implicit, complete.little_endian
    for tag, (vr, offset, value) in sorted(complete.kept.items()):
        raw = RawDataElement(
            Tag(tag), None if implicit else vr.decode("ascii"), len(value), value, offset, implicit, little
        )
        ds[tag] = raw  # pydicom converts a RawDataElement on access
    ds.set_original_encoding(implicit, little)
    return ds


def _read_header_file(path: Path) -> InstanceHeader:
    """:func:`read_header` of a file: the walk over a memory map, pydicom up to the pixel data if needed."""
    try:
        with path.open("rb") as fp:
            if os.fstat(fp.fileno()).st_size < 132:
                raise HeaderError("not a DICOM file: no preamble and DICM prefix")
            with mmap.mmap(fp.fileno(), 0, access=mmap.ACCESS_READ) as view:
                complete = check_complete(view)
            if not _needs_full_parse(complete):
                return _header(complete, _Fields(None, complete))
            fp.seek(0)
            return _parse(fp, complete, stop_before_pixels=True)
    except OSError as exc:
        raise HeaderError(f"cannot read the received file: {exc.strerror}") from None


def _parse(fp: BinaryIO, complete: CompleteDataset, *, stop_before_pixels: bool) -> InstanceHeader:
    """The header of a complete dataset, values over 2 KB deferred.

    ``stop_before_pixels`` for a file: pydicom would otherwise read encapsulated Pixel Data through
    to find its end. Bytes in memory are read whole, which is faster for objects without pixel
    data (no check per element).
    """
    try:
        ds = dcmread(fp, defer_size=_DEFER, force=False, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError as exc:
        raise HeaderError(f"not a DICOM file: {exc}") from None
    except Exception as exc:  # pydicom raises many kinds on malformed input
        raise HeaderError(f"cannot decode the dataset: {type(exc).__name__}: {exc}") from None
    return _header(complete, _Fields(ds))


def _header(complete: CompleteDataset, fields: _Fields) -> InstanceHeader:
    """The :class:`InstanceHeader` from what the walk found and the recorded values (``fields``)."""
    _text, _vector = fields.text, fields.vector
    try:
        uids = _instance_uids(complete.values)
        sop_class_uid = str(uids["SOPClassUID"])
        has_pixels = complete.pixel is not None
        if fields.nested:
            references = referenced_series_uids(fields.ds)
            images = referenced_instance_uids(fields.ds) if sop_class_uid in SEGMENTATION_SOP_CLASSES else ()
        else:
            references, images = (), ()
        header = InstanceHeader(
            sop_class_uid=sop_class_uid,
            sop_instance_uid=str(uids["SOPInstanceUID"]),
            study_instance_uid=str(uids["StudyInstanceUID"]),
            series_instance_uid=str(uids["SeriesInstanceUID"]),
            transfer_syntax_uid=complete.transfer_syntax_uid,
            modality=_text("Modality"),
            series_description=(_text("SeriesDescription") or "")[:64] or None,
            frame_of_reference_uid=uids["FrameOfReferenceUID"],
            patient_id=_text("PatientID"),
            issuer_of_patient_id=_text("IssuerOfPatientID"),
            patient_birth_date=_text("PatientBirthDate"),
            patient_sex=_text("PatientSex"),
            study_date=_text("StudyDate"),
            accession_number=_text("AccessionNumber"),
            referenced_series_uids=references,
            has_pixel_data=has_pixels,
            referenced_instance_uids=images,
            protocol_name=(_text("ProtocolName") or "")[:64] or None,
            image_comments=(_text("ImageComments") or "")[:256] or None,
            contrast_bolus_agent=(_text("ContrastBolusAgent") or "")[:64] or None,
            contrast_start_time=_text("ContrastBolusStartTime"),
            acquisition_time=_text("AcquisitionTime") or _text("SeriesTime"),
            body_part_examined=(_text("BodyPartExamined") or "")[:16] or None,
            study_description=(_text("StudyDescription") or "")[:64] or None,
            image_position=_vector("ImagePositionPatient", 3),
            image_orientation=_vector("ImageOrientationPatient", 6),
        )
        _check_referenced_uids(header)
        _check_pixel_data(complete)
        return header
    except HeaderError:
        raise
    except InvalidDicomError as exc:
        raise HeaderError(f"not a DICOM file: {exc}") from None
    except Exception as exc:  # pydicom raises many kinds on malformed input
        raise HeaderError(f"cannot decode the dataset: {type(exc).__name__}: {exc}") from None
