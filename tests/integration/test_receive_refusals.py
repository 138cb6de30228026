"""Incomplete data and malformed UIDs sent over the network to a running node: refused, recorded, never stored.

Each case goes from a pynetdicom SCU to ``pacs-agent scp`` as raw bytes (the dataset exactly as made
here, streamed from a Part 10 file) and must come back with its failure status and Error Comment,
leave the spool and the instances table as they were, and leave a ``store_refused`` event with the
reason; the node then still stores a good phantom study.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import Dataset, config, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, RLELossless
from pynetdicom import AE, _config
from sqlalchemy import func, select

from inference.phantom import PhantomStudy
from pacs_agent.db.tables import Event, Instance
from tests.integration.peers import Node, Nodes, storescu

pytestmark = [pytest.mark.integration, pytest.mark.phantom(seed=3, lesions=2, slices=20, rows=128, columns=128)]

CT = "1.2.840.10008.5.1.4.1.1.2"
PIXEL_DATA = 0x7FE00010
LONG_UID = "1." * 500 + "1"  # 1,001 characters


@pytest.fixture(scope="module")
def node(module_nodes: Nodes) -> Node:
    """One receiving node for every case of the module (each case checks what it changed)."""
    return module_nodes.start(
        "scp", extra_config='[security]\nallowed_calling_aets = ["PYNETDICOM", "STORESCU", "ECHOSCU"]\n'
    )


@pytest.fixture
def lenient_sender(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Let this test process write and send UIDs that pydicom and pynetdicom would refuse to encode."""
    monkeypatch.setitem(_config.VALIDATORS, "UI", lambda value: (True, ""))
    writing, reading = config.settings.writing_validation_mode, config.settings.reading_validation_mode
    config.settings.writing_validation_mode = config.settings.reading_validation_mode = config.IGNORE
    try:
        yield
    finally:
        config.settings.writing_validation_mode, config.settings.reading_validation_mode = writing, reading


def body_of(ds: Dataset) -> bytes:
    """The dataset as the peer sends it: Explicit VR Little Endian (or its own syntax), no file meta."""
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    meta_length = int.from_bytes(data[140:144], "little")
    return data[144 + meta_length :]


def send(port: int, folder: Path, body: bytes, sop_instance_uid: str, syntax: str = ExplicitVRLittleEndian) -> Dataset:
    """Stream ``body`` as the dataset of a C-STORE for ``sop_instance_uid``; the response status."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(CT)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = UID(syntax)
    buffer = BytesIO()
    buffer.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buffer, meta)  # type: ignore[arg-type]
    path = folder / "case.dcm"
    path.write_bytes(buffer.getvalue() + body)
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(CT, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACS_AGENT")
    assert assoc.is_established
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        status = assoc.send_c_store(path)
        assert not assoc.is_aborted, "the node aborted the association instead of answering"
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        assoc.release()
    assert "Status" in status, "no C-STORE response"
    return status


def spooled(node: Node) -> list[Path]:
    return sorted(p for p in (node.state_dir / "spool").rglob("*") if p.is_file())


def with_uid(keyword: str, value: str) -> Callable[[Dataset], str]:
    def change(ds: Dataset) -> str:
        setattr(ds, keyword, value)
        return value if keyword == "SOPInstanceUID" else str(ds.SOPInstanceUID)

    return change


def cut_pixel_data(ds: Dataset) -> bytes:
    return body_of(ds)[:-10_000]  # the stream ends 10,000 bytes into the 32,768 of Pixel Data


def halve_pixel_data(ds: Dataset) -> bytes:
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]  # well-formed, but half the image
    return body_of(ds)


def unterminate_encapsulated(ds: Dataset) -> bytes:
    ds.compress(RLELossless, encoding_plugin="pydicom")
    body = body_of(ds)
    assert body.endswith(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")  # the sequence delimiter
    return body[:-8]


STREAM_CASES = {
    "pixel data cut short": (cut_pixel_data, ExplicitVRLittleEndian, 0xC210, "declares 32768 bytes but only 22768"),
    "native pixel data too short": (halve_pixel_data, ExplicitVRLittleEndian, 0xA900, "holds 16384 bytes"),
    "encapsulated pixel data unterminated": (
        unterminate_encapsulated,
        RLELossless,
        0xC210,
        "has no sequence delimiter",
    ),
}

UID_CASES = {
    "traversal in the Study Instance UID": (with_uid("StudyInstanceUID", "../../x"), 0xA900, "Study Instance UID"),
    "slash in the Series Instance UID": (with_uid("SeriesInstanceUID", "1.2.3/4.5"), 0xA900, "Series Instance UID"),
    "NUL in the Frame of Reference UID": (
        with_uid("FrameOfReferenceUID", "1.2.3\x004.5"),
        0xA900,
        "Frame of Reference UID",
    ),
    "1,001-character Study Instance UID": (with_uid("StudyInstanceUID", LONG_UID), 0xA900, "has 1001 characters"),
    "slash in the SOP Instance UID": (with_uid("SOPInstanceUID", "1.2.3/4.5"), 0x0117, "SOP Instance UID"),
    "65-character Affected SOP Instance UID": (
        with_uid("SOPInstanceUID", "1." * 32 + "1"),
        0x0117,
        "Affected SOP Instance UID",
    ),
    "1,001-character Affected SOP Instance UID": (with_uid("SOPInstanceUID", LONG_UID), 0x0117, "has 1001 characters"),
}


def assert_refused(node: Node, status: Dataset, code: int, reason: str, before: list[Path], count: int) -> Event:
    """The status and its comment, nothing stored, and the ``store_refused`` event with the reason."""
    assert int(status.Status) == code, f"0x{int(status.Status):04X}: {status.get('ErrorComment')}"
    assert status.get("ErrorComment")
    assert spooled(node) == before
    assert node.scalar(select(func.count(Instance.id))) == count
    [event] = node.scalars(select(Event).where(Event.kind == "store_refused").order_by(Event.id.desc()).limit(1))
    assert event.status == code
    assert reason in event.detail
    assert node.echo()  # still serving
    return event


@pytest.mark.parametrize(("make", "syntax", "code", "reason"), STREAM_CASES.values(), ids=STREAM_CASES.keys())
def test_incomplete_data_are_refused_and_not_stored(
    node: Node,
    phantom: PhantomStudy,
    tmp_path: Path,
    make: Callable[[Dataset], bytes],
    syntax: str,
    code: int,
    reason: str,
) -> None:
    before, count = spooled(node), node.scalar(select(func.count(Instance.id)))
    ds = dcmread(phantom.ct_files[0])
    body = make(ds)
    status = send(node.port, tmp_path, body, str(ds.SOPInstanceUID), syntax)
    event = assert_refused(node, status, code, reason, before, count)
    assert event.sop_instance_uid == ds.SOPInstanceUID
    assert status.get("OffendingElement") == PIXEL_DATA


@pytest.mark.usefixtures("lenient_sender")
@pytest.mark.parametrize(("change", "code", "reason"), UID_CASES.values(), ids=UID_CASES.keys())
def test_malformed_uids_are_refused_and_not_stored(
    node: Node, phantom: PhantomStudy, tmp_path: Path, change: Callable[[Dataset], str], code: int, reason: str
) -> None:
    before, count = spooled(node), node.scalar(select(func.count(Instance.id)))
    ds = dcmread(phantom.ct_files[0])
    affected = change(ds)
    status = send(node.port, tmp_path, body_of(ds), affected)
    event = assert_refused(node, status, code, reason, before, count)
    assert "\x00" not in event.detail


def test_a_good_study_is_still_stored_after_the_refusals(node: Node, phantom: PhantomStudy) -> None:
    before = node.scalar(select(func.count(Instance.id)))
    files = [*phantom.ct_files, phantom.seg_file, phantom.rtstruct_file]
    result = storescu(node.port, files)
    assert result.returncode == 0, result.stderr
    assert node.scalar(select(func.count(Instance.id))) == before + len(files)
    sop_uids = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    stored = set(node.scalars(select(Instance.sop_instance_uid)))
    assert sop_uids <= stored
