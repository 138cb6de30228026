"""A large multi-frame Enhanced CT written frame by frame (never whole in memory), and how to send it.

Used by tests/integration/test_receive_large.py and benchmarks/memory_receive.py.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config

ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
SIDE = 512
FRAME_BYTES = SIDE * SIDE * 2
"""One 512 x 512 frame of 16-bit pixels: 0.5 MB."""
CHUNK = 1024 * 1024


@dataclass(frozen=True)
class LargeInstance:
    """A Part 10 file on disk and what a receiver must end up with."""

    path: Path
    sop_instance_uid: str
    study_instance_uid: str
    frames: int
    dataset_sha256: str
    """SHA-256 of the dataset as sent (the bytes after the file meta)."""
    size: int
    """Size of the file, bytes."""


def dataset_offset(path: Path) -> int:
    """Where the dataset starts in a Part 10 file: after preamble, ``DICM`` and the file meta group."""
    with path.open("rb") as fp:
        head = fp.read(144)
    if head[128:132] != b"DICM" or head[132:136] != b"\x02\x00\x00\x00":
        raise ValueError(f"{path} does not start with a preamble and File Meta Information Group Length")
    return 144 + int.from_bytes(head[140:144], "little")


def dataset_sha256(path: Path) -> str:
    """SHA-256 of the dataset part of a Part 10 file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fp:
        fp.seek(dataset_offset(path))
        while chunk := fp.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_large_ct(path: Path, megabytes: int) -> LargeInstance:
    """An Enhanced CT of about ``megabytes`` MB of native Pixel Data (0.5 MB per frame), written in chunks."""
    frames = max(1, megabytes * 1024 * 1024 // FRAME_BYTES)
    ds = Dataset()
    ds.SOPClassUID = ENHANCED_CT
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.Modality = "CT"
    ds.PatientID = "LARGE-1"
    ds.PatientName = "Large^Instance"
    ds.StudyDate = "20260101"
    ds.SeriesDescription = "large multi-frame"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = frames
    ds.Rows = ds.Columns = SIDE
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    head = buffer.getvalue()
    offset = 144 + int.from_bytes(head[140:144], "little")
    digest = hashlib.sha256(head[offset:])
    pixel_header = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, frames * FRAME_BYTES)
    digest.update(pixel_header)
    with path.open("wb") as out:
        out.write(head + pixel_header)
        for frame in range(frames):
            seed = hashlib.sha256(frame.to_bytes(4, "little")).digest()
            data = seed * (FRAME_BYTES // len(seed))  # differs per frame, cheap to make
            digest.update(data)
            out.write(data)
    return LargeInstance(path, ds.SOPInstanceUID, ds.StudyInstanceUID, frames, digest.hexdigest(), path.stat().st_size)


def send_large(port: int, instance: LargeInstance, *, ae_title: str = "PACS_AGENT", timeout: float = 600) -> int | None:
    """C-STORE ``instance`` streamed from its file (pynetdicom's chunked send); the status, None without answer."""
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(ENHANCED_CT, ExplicitVRLittleEndian)
    ae.dimse_timeout = ae.network_timeout = timeout
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    if not assoc.is_established:
        raise AssertionError("the node did not accept the association")
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        status = assoc.send_c_store(instance.path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        if assoc.is_established:
            assoc.release()
    return int(status.Status) if "Status" in status else None


def peak_rss_bytes(pid: int) -> int:
    """The kernel's peak resident set size of a process (``VmHWM`` in ``/proc/<pid>/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"no VmHWM for process {pid}")
