"""Complete data and well-formed UIDs, checked on hand-made byte streams before anything is stored.

Each stream is built element by element here (no pydicom writer), so a test can cut, shorten or
unterminate exactly the part it is about. Every test runs twice: on the bytes in memory (a small
instance) and on the same bytes in a file (a large instance streamed to the spool).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from pacs_agent.receive.header import (
    CT_IMAGE,
    SEGMENTATION,
    HeaderError,
    IncompleteDatasetError,
    InstanceHeader,
    InvalidUIDError,
    PixelDataMismatchError,
    check_complete,
    shown,
    uid_problem,
)
from pacs_agent.receive.header import read_header as read_header_of

read_header: Callable[[bytes], InstanceHeader] = read_header_of
"""What the tests call: :func:`read_header` of the bytes, or of a file holding them (see ``source``)."""


@pytest.fixture(autouse=True, params=["in memory", "from a file"])
def source(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test on bytes in memory, then again with every stream written to a file and read from there."""
    if request.param == "from a file":
        counter = iter(range(1_000_000))

        def from_file(data: bytes) -> InstanceHeader:
            path = tmp_path / f"{next(counter)}.part"
            path.write_bytes(data)
            return read_header_of(path)

        monkeypatch.setitem(globals(), "read_header", from_file)
    return str(request.param)


PIXEL_DATA = 0x7FE00010
LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
UNDEFINED = 0xFFFFFFFF


def element(tag: int, vr: str, value: bytes, *, big: bool = False, implicit: bool = False) -> bytes:
    """One encoded element; ``value`` as given (no padding), so a test can make it odd or short."""
    order = ">" if big else "<"
    head = struct.pack(order + "HH", tag >> 16, tag & 0xFFFF)
    if implicit:
        return head + struct.pack(order + "I", len(value)) + value
    if vr in LONG_VRS:
        return head + vr.encode() + b"\0\0" + struct.pack(order + "I", len(value)) + value
    return head + vr.encode() + struct.pack(order + "H", len(value)) + value


def header_only(tag: int, vr: str, length: int) -> bytes:
    """An explicit VR little endian element header that declares ``length`` (the value follows separately)."""
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode()
    return head + (b"\0\0" + struct.pack("<I", length) if vr in LONG_VRS else struct.pack("<H", length))


def delimiter(tag: int, length: int = 0) -> bytes:
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, length)


ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


def text(value: str, pad: bytes = b" ") -> bytes:
    raw = value.encode("utf-8")
    return raw + pad if len(raw) % 2 else raw


def us(value: int, big: bool = False) -> bytes:
    return struct.pack(">H" if big else "<H", value)


def ct_body(
    *,
    rows: int = 4,
    columns: int = 4,
    bits: int = 16,
    samples: int = 1,
    frames: int | None = None,
    photometric: str = "MONOCHROME2",
    pixels: bytes | None = None,
    pixel_element: bytes | None = None,
    sop_class: str = CT_IMAGE,
    sop_instance: str = "1.2.3.4",
    study: str = "1.2.3",
    series: str = "1.2.3.5",
    frame_of_reference: str | None = "1.2.3.9",
    between: bytes = b"",
    big: bool = False,
    implicit: bool = False,
) -> bytes:
    """A CT (or any image) dataset, elements in tag order; Pixel Data last unless ``pixel_element`` replaces it."""

    def el(tag: int, vr: str, value: bytes) -> bytes:
        return element(tag, vr, value, big=big, implicit=implicit)

    parts = [
        el(0x00080016, "UI", text(sop_class, b"\0")),
        el(0x00080018, "UI", text(sop_instance, b"\0")),
        el(0x00080060, "CS", text("CT")),
        el(0x00100020, "LO", text("SECRET-ID")),
        el(0x0020000D, "UI", text(study, b"\0")),
        el(0x0020000E, "UI", text(series, b"\0")),
    ]
    if frame_of_reference is not None:
        parts.append(el(0x00200052, "UI", text(frame_of_reference, b"\0")))
    parts.append(between)
    parts += [el(0x00280002, "US", us(samples, big)), el(0x00280004, "CS", text(photometric))]
    if frames is not None:
        parts.append(el(0x00280008, "IS", text(str(frames))))
    parts += [el(0x00280010, "US", us(rows, big)), el(0x00280011, "US", us(columns, big))]
    parts.append(el(0x00280100, "US", us(bits, big)))
    if pixel_element is None:
        size = rows * columns * samples * (frames or 1) * bits // 8
        pixel_element = el(PIXEL_DATA, "OW", pixels if pixels is not None else bytes(size + size % 2))
    parts.append(pixel_element)
    return b"".join(parts)


def part10(body: bytes, syntax: str = ExplicitVRLittleEndian, sop_class: str = CT_IMAGE) -> bytes:
    """What the C-STORE handler reads: preamble, DICM, a file meta as pynetdicom writes it, then the peer's bytes."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    meta.TransferSyntaxUID = syntax
    buffer = BytesIO()
    buffer.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buffer, meta)
    return buffer.getvalue() + body


def encapsulated(*fragments: bytes, terminated: bool = True) -> bytes:
    """Encapsulated Pixel Data: an empty Basic Offset Table, the fragments, the sequence delimiter."""
    items = delimiter(ITEM) + b"".join(delimiter(ITEM, len(f)) + f for f in fragments)
    return header_only(PIXEL_DATA, "OB", UNDEFINED) + items + (delimiter(SEQUENCE_END) if terminated else b"")


# -- complete datasets are read ---------------------------------------------------------------------


def test_a_complete_ct_is_read() -> None:
    header = read_header(part10(ct_body()))
    assert header.sop_instance_uid == "1.2.3.4"
    assert header.has_pixel_data


@pytest.mark.parametrize(
    ("options", "size"),
    [
        ({"rows": 3, "columns": 3, "bits": 8}, 10),  # 9 bytes, padded to an even 10
        ({"rows": 5, "columns": 5, "bits": 1, "frames": 3}, 10),  # 75 bits packed into 10 bytes (SEG)
        ({"rows": 5, "columns": 5, "bits": 1, "frames": 2}, 8),  # 50 bits -> 7 bytes, padded to 8
        ({"rows": 4, "columns": 4, "bits": 8, "samples": 3, "photometric": "RGB"}, 48),
        ({"rows": 4, "columns": 4, "bits": 8, "samples": 3, "photometric": "YBR_FULL_422"}, 32),
        ({"rows": 2, "columns": 2, "bits": 16, "frames": 5}, 40),
    ],
)
def test_native_pixel_data_of_the_described_length_is_accepted(options: dict[str, int | str], size: int) -> None:
    body = ct_body(pixels=bytes(size), **options)  # type: ignore[arg-type]
    assert read_header(part10(body)).has_pixel_data


def test_encapsulated_pixel_data_ending_with_its_delimiter_is_accepted() -> None:
    body = ct_body(pixel_element=encapsulated(b"\x01\x02" * 8, b"\x03\x04"))
    complete = check_complete(part10(body, RLELossless))
    assert complete.transfer_syntax_uid == RLELossless
    assert complete.pixel is not None and complete.pixel.length is None
    assert read_header(part10(body, RLELossless)).has_pixel_data


def test_implicit_and_big_endian_datasets_are_walked_in_their_encoding() -> None:
    implicit = ct_body(implicit=True)
    assert read_header(part10(implicit, ImplicitVRLittleEndian)).has_pixel_data
    big = ct_body(big=True)
    assert read_header(part10(big, ExplicitVRBigEndian)).has_pixel_data
    with pytest.raises(IncompleteDatasetError):
        read_header(part10(implicit[:-2], ImplicitVRLittleEndian))
    with pytest.raises(IncompleteDatasetError):
        read_header(part10(big[:-2], ExplicitVRBigEndian))


def test_a_deflated_dataset_is_inflated_and_checked() -> None:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = compressor.compress(ct_body()) + compressor.flush()
    assert read_header(part10(deflated, DeflatedExplicitVRLittleEndian)).has_pixel_data
    with pytest.raises(IncompleteDatasetError, match="deflate stream"):
        read_header(part10(deflated[: len(deflated) // 2], DeflatedExplicitVRLittleEndian))


def test_an_odd_length_outside_the_pixel_data_is_tolerated() -> None:
    # PS3.5 7.1.1 wants even lengths; pydicom reads odd ones, and refusing them would refuse sloppy modalities.
    odd = element(0x00081030, "LO", b"abc")
    assert read_header(part10(ct_body(between=odd))).has_pixel_data


def test_nested_undefined_length_sequences_are_walked_to_their_delimiters() -> None:
    inner = header_only(0x00081115, "SQ", UNDEFINED) + delimiter(ITEM, UNDEFINED)
    inner += element(0x0020000E, "UI", text("1.2.3.7", b"\0")) + delimiter(ITEM_END) + delimiter(SEQUENCE_END)
    outer = header_only(0x00081111, "SQ", UNDEFINED) + delimiter(ITEM, UNDEFINED) + inner
    outer += delimiter(ITEM_END) + delimiter(ITEM, 0) + delimiter(SEQUENCE_END)
    assert read_header(part10(ct_body(between=outer))).has_pixel_data


# -- incomplete streams: cannot understand ----------------------------------------------------------


def test_pixel_data_cut_short_names_the_element_and_both_lengths() -> None:
    data = part10(ct_body(rows=16, columns=16))  # 512 bytes of Pixel Data
    with pytest.raises(
        IncompleteDatasetError, match=r"\(7FE0,0010\) PixelData declares 512 bytes but only 312"
    ) as info:
        read_header(data[:-200])
    assert info.value.tag == PIXEL_DATA


def test_a_stream_ending_inside_an_element_header_is_incomplete() -> None:
    data = part10(ct_body() + b"\x08\x00\x30\x10")  # 4 of the 8 bytes of a next element header
    with pytest.raises(IncompleteDatasetError, match="inside an element header") as info:
        read_header(data)
    assert info.value.tag is None


def test_every_cut_of_a_ct_is_refused_or_has_no_pixel_data() -> None:
    data = part10(ct_body())
    start = len(part10(b""))
    for end in range(start + 1, len(data)):
        try:
            header = read_header(data[:end])
        except HeaderError:
            continue
        assert not header.has_pixel_data, f"a stream cut at byte {end} was read as complete"


def test_unterminated_encapsulated_pixel_data_is_incomplete() -> None:
    body = ct_body(pixel_element=encapsulated(b"\x01\x02" * 8, terminated=False))
    with pytest.raises(IncompleteDatasetError, match="no sequence delimiter") as info:
        read_header(part10(body, RLELossless))
    assert info.value.tag == PIXEL_DATA


def test_a_fragment_cut_short_is_incomplete() -> None:
    body = ct_body(pixel_element=encapsulated(b"\x01\x02" * 8))
    with pytest.raises(IncompleteDatasetError, match="a fragment of encapsulated"):
        read_header(part10(body[:-20], RLELossless))


def test_encapsulated_pixel_data_without_a_fragment_is_refused() -> None:
    body = ct_body(pixel_element=encapsulated())
    with pytest.raises(PixelDataMismatchError, match="no fragment"):
        read_header(part10(body, RLELossless))


def test_an_unterminated_sequence_is_incomplete() -> None:
    sequence = header_only(0x00081115, "SQ", UNDEFINED) + delimiter(ITEM, 0)
    with pytest.raises(IncompleteDatasetError, match=r"sequence \(0008,1115\).*no sequence delimiter"):
        read_header(part10(ct_body(pixel_element=sequence)))


def test_an_item_without_its_delimiter_is_incomplete() -> None:
    sequence = header_only(0x00081115, "SQ", UNDEFINED) + delimiter(ITEM, UNDEFINED)
    sequence += element(0x0020000E, "UI", text("1.2.3.7", b"\0"))
    with pytest.raises(IncompleteDatasetError, match="no item delimiter"):
        read_header(part10(ct_body(pixel_element=sequence)))


def test_pixel_data_encoded_against_its_transfer_syntax_cannot_be_understood() -> None:
    with pytest.raises(HeaderError, match="is encapsulated in the native transfer syntax"):
        read_header(part10(ct_body(pixel_element=encapsulated(b"\x01\x02"))))
    with pytest.raises(HeaderError, match="is not encapsulated in the compressed transfer syntax"):
        read_header(part10(ct_body(), RLELossless))


def test_a_stray_delimiter_or_an_invalid_vr_cannot_be_understood() -> None:
    with pytest.raises(HeaderError, match="unexpected delimiter"):
        read_header(part10(ct_body() + delimiter(SEQUENCE_END)))
    with pytest.raises(HeaderError, match="no valid VR"):
        read_header(part10(ct_body() + b"\x09\x00\x10\x00zz\x02\x00ab"))


# -- complete, but the Pixel Data do not match the image: does not match SOP class -------------------


@pytest.mark.parametrize(
    ("options", "size", "message"),
    [
        ({}, 30, "holds 30 bytes, but .* 4 x 4 x 1 x 1 x 16 bits need 32 bytes"),  # well-formed but short
        ({}, 34, "holds 34 bytes"),  # too long
        ({"rows": 3, "columns": 3, "bits": 8}, 9, "holds 9 bytes, .* need 9 bytes, padded to 10"),  # odd, unpadded
        ({"rows": 5, "columns": 5, "bits": 1, "frames": 3}, 8, "need 10 bytes"),
        ({"rows": 2, "columns": 2, "frames": 5}, 8, "2 x 2 x 5 x 1 x 16 bits need 40 bytes"),  # one frame only
    ],
)
def test_native_pixel_data_of_another_length_is_refused(options: dict[str, int], size: int, message: str) -> None:
    with pytest.raises(PixelDataMismatchError, match=message) as info:
        read_header(part10(ct_body(pixels=bytes(size), **options)))  # type: ignore[arg-type]
    assert info.value.tag == PIXEL_DATA


def test_pixel_data_without_its_image_attributes_is_refused() -> None:
    body = ct_body()
    rows = element(0x00280010, "US", us(4))
    with pytest.raises(PixelDataMismatchError, match="without Rows"):
        read_header(part10(body.replace(rows, b"")))


# -- UIDs -------------------------------------------------------------------------------------------

MALFORMED = {
    "traversal": ("../../x", "contains characters other than digits and dots"),
    "slash": ("1.2.3/4.5", "contains characters other than digits and dots"),
    "nul inside": ("1.2\x003.4", "contains characters other than digits and dots"),
    "1,001 characters": ("1." * 500 + "1", "has 1001 characters"),
    "65 characters": ("1." * 32 + "1", "has 65 characters"),
    "double dot": ("1.2..4", "empty component"),
    "trailing dot": ("1.2.", "empty component"),
    "letters": ("1.2.abc", "characters other than digits"),
    "non-ASCII digit": ("1.2.\u0663", "characters other than digits"),
}


@pytest.mark.parametrize(("value", "reason"), MALFORMED.values(), ids=MALFORMED.keys())
def test_uid_problem_says_what_is_wrong(value: str, reason: str) -> None:
    problem = uid_problem(value)
    assert problem is not None and reason in problem


@pytest.mark.parametrize(
    "value",
    ["0", "1.2.840.10008.5.1.4.1.1.2", "2.25." + "9" * 59, "1.0.2", "1.2.03.4"],  # legacy leading zero: kept
)
def test_well_formed_uids_pass(value: str) -> None:
    assert uid_problem(value) is None


@pytest.mark.parametrize("keyword", ["sop_instance", "study", "series", "frame_of_reference"])
@pytest.mark.parametrize(("value", "reason"), MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_uid_in_the_dataset_is_refused_with_its_attribute(keyword: str, value: str, reason: str) -> None:
    with pytest.raises(InvalidUIDError, match=reason) as info:
        read_header(part10(ct_body(**{keyword: value})))  # type: ignore[arg-type]
    expected = {
        "sop_instance": "SOPInstanceUID",
        "study": "StudyInstanceUID",
        "series": "SeriesInstanceUID",
        "frame_of_reference": "FrameOfReferenceUID",
    }
    assert info.value.keyword == expected[keyword]
    assert "\x00" not in str(info.value) and len(str(info.value)) < 300


def test_the_trailing_nul_of_a_uid_is_padding_not_a_fault() -> None:
    assert read_header(part10(ct_body(study="1.2.34", frame_of_reference="1.2.3"))).study_instance_uid == "1.2.34"


# The references are read through pydicom's value conversion, which warns about the value first.
@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_a_malformed_referenced_uid_is_refused() -> None:
    def referenced_series(uid: str) -> bytes:
        item = element(0x0020000E, "UI", text(uid, b"\0"))
        return header_only(0x00081115, "SQ", len(item) + 8) + delimiter(ITEM, len(item)) + item

    good = ct_body(sop_class=SEGMENTATION, between=referenced_series("1.2.3.7"))
    assert read_header(part10(good, sop_class=SEGMENTATION)).referenced_series_uids == ("1.2.3.7",)
    bad = ct_body(sop_class=SEGMENTATION, between=referenced_series("1.2.3/7"))
    with pytest.raises(InvalidUIDError, match=r"referenced Series Instance UID '1\.2\.3/7'"):
        read_header(part10(bad, sop_class=SEGMENTATION))


def test_shown_escapes_control_characters_and_cuts_long_values() -> None:
    assert shown("1.2\x00\x1b[31m\n") == "1.2\\x00\\x1b[31m\\n"
    assert shown("1" * 1001).endswith("... (1001 characters)")
