"""Header reading on the hot path and the durable spool."""

from __future__ import annotations

import os
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pacs_agent.receive.header import CT_IMAGE, RT_STRUCTURE_SET, SEGMENTATION, HeaderError, read_header
from pacs_agent.receive.spool import Spool, durable_write, safe_name


def encode(ds: Dataset) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def ct_dataset(with_pixels: bool = True) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CT_IMAGE
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.4"
    ds.Modality = "CT"
    ds.PatientID = "SECRET-ID"
    ds.PatientName = "Doe^Jane"
    ds.FrameOfReferenceUID = "1.2.3.9"
    if with_pixels:
        ds.Rows = ds.Columns = 64
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = np.zeros((64, 64), np.int16).tobytes()
    return ds


def test_reads_the_fields_the_node_needs() -> None:
    header = read_header(encode(ct_dataset()))
    assert header.sop_class_uid == CT_IMAGE
    assert header.study_instance_uid == "1.2.3"
    assert header.frame_of_reference_uid == "1.2.3.9"
    assert header.has_pixel_data
    assert header.transfer_syntax_uid == ExplicitVRLittleEndian
    assert not read_header(encode(ct_dataset(with_pixels=False))).has_pixel_data


def test_segmentation_references() -> None:
    seg = ct_dataset(with_pixels=True)
    seg.SOPClassUID = SEGMENTATION
    ref = Dataset()
    ref.SeriesInstanceUID = "5.6.7"
    seg.ReferencedSeriesSequence = Sequence([ref])
    assert read_header(encode(seg)).referenced_series_uids == ("5.6.7",)

    rt = ct_dataset(with_pixels=False)
    rt.SOPClassUID = RT_STRUCTURE_SET
    series = Dataset()
    series.SeriesInstanceUID = "8.9"
    study = Dataset()
    study.RTReferencedSeriesSequence = Sequence([series])
    frame = Dataset()
    frame.RTReferencedStudySequence = Sequence([study])
    rt.ReferencedFrameOfReferenceSequence = Sequence([frame])
    assert read_header(encode(rt)).referenced_series_uids == ("8.9",)


def with_meta(body: bytes) -> bytes:
    """What pynetdicom hands over: its own preamble + file meta, then the peer's bytes."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE
    meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = BytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta)
    return buffer.getvalue() + body


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00" * 10, b"this is not dicom at all" * 20, with_meta(b""), with_meta(b"\xff" * 300)],
)
def test_garbage_is_refused(data: bytes) -> None:
    with pytest.raises(HeaderError, match=r"not a DICOM file|cannot decode|missing or empty"):
        read_header(data)


def test_truncated_file_is_refused() -> None:
    data = encode(ct_dataset())
    with pytest.raises(HeaderError):
        read_header(data[:200])


def test_missing_uid_is_named() -> None:
    ds = ct_dataset()
    del ds.SeriesInstanceUID
    with pytest.raises(HeaderError, match="SeriesInstanceUID"):
        read_header(encode(ds))


def test_safe_name_blocks_traversal() -> None:
    assert safe_name("1.2.840.113619.2") == "1.2.840.113619.2"
    for crafted in ("../../etc/passwd", "1.2/../../x", "", "1." * 40, "1.2\x00"):
        name = safe_name(crafted)
        assert "/" not in name and ".." not in name and name.startswith("x")


def test_durable_write_is_atomic(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", min_free_mb=0)
    relative = spool.relative_path("1.2", "1.2.3", "../../evil")
    target = spool.write(relative, b"DICM" * 10)
    assert target.read_bytes() == b"DICM" * 10
    assert target.resolve().is_relative_to((tmp_path / "spool").resolve())
    assert list(spool.tmp_dir.iterdir()) == []
    assert oct(os.stat(target).st_mode & 0o777) == "0o600"
    assert oct(os.stat(tmp_path / "spool").st_mode & 0o777) == "0o700"


def test_failed_write_leaves_no_part_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", min_free_mb=0)
    blocker = tmp_path / "spool" / "1.2"
    blocker.write_text("a file where a directory must go")
    with pytest.raises(OSError):
        spool.write(spool.relative_path("1.2", "1.2.3", "1.2.3.4"), b"x")
    assert list(spool.tmp_dir.iterdir()) == []


def test_orphan_parts_are_removed_at_start(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", min_free_mb=0)
    (spool.tmp_dir / "abc.part").write_bytes(b"half")
    assert spool.remove_orphan_parts() == 1
    assert list(spool.tmp_dir.iterdir()) == []


def test_watermark(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", min_free_mb=10)
    spool.free_bytes = lambda: 11 * 1024 * 1024
    assert spool.has_room(0)
    assert not spool.has_room(2 * 1024 * 1024)
    spool.free_bytes = lambda: 5 * 1024 * 1024
    assert not spool.has_room()


def test_durable_write_replaces_existing(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b.dcm"
    (tmp_path / "tmp").mkdir()
    durable_write(b"one", target, tmp_path / "tmp")
    durable_write(b"two", target, tmp_path / "tmp")
    assert target.read_bytes() == b"two"


@pytest.mark.parametrize(
    ("charset", "patient_id", "description"),
    [
        (None, "PLAIN-1", "Thorax  "),
        ("ISO_IR 100", "MÜLLER-7", "Thorax nativ"),
        ("ISO_IR 192", "ID-ünï", "胸部 CT"),
        ("\\ISO 2022 IR 87", "ID-9", "\x1b$B;3ED\x1b(B"),
        (None, "A\\B", "multi\\valued"),
    ],
)
@pytest.mark.parametrize("implicit", [False, True])
def test_one_pass_header_reads_what_a_full_parse_reads(
    charset: str | None, patient_id: str, description: str, implicit: bool
) -> None:
    """The values decoded from the walk's raw bytes equal pydicom's full parse, in every character set."""
    from pacs_agent.receive import header as module

    ds = ct_dataset()
    if charset is not None:
        ds.SpecificCharacterSet = charset
    ds.PatientID = patient_id
    ds.SeriesDescription = description
    ds.BodyPartExamined = " CHEST "
    ds.ImagePositionPatient = ["-1.5", "2", "1e2"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    if implicit:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = "1.2.840.10008.1.2"
        ds.file_meta = meta
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        data = buffer.getvalue()
    else:
        data = encode(ds)
    complete = module.check_complete(data)
    assert not module._needs_full_parse(complete)
    full = module._parse(BytesIO(data), complete, stop_before_pixels=False)
    assert read_header(data) == full
    assert full.image_position == "-1.5\\2.0\\100.0"
