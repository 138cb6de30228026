"""Received datasets streamed into the spool as they arrive: memory for small ones, a file for large ones, limits.

Each test writes the pieces the way pynetdicom does (``write`` per P-DATA fragment, then
``file.flush()``) and checks what is in memory, on disk and what the handler will be told.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from pacs_agent.receive.header import HeaderError, read_header
from pacs_agent.receive.spool import IncomingFile, IncomingFiles, Spool

KB = 1024
MB = 1024 * 1024


def receive(incoming: IncomingFile, data: bytes, piece: int = 16 * KB) -> None:
    """Hand ``data`` over in P-DATA-sized pieces, as pynetdicom's ``decode_msg`` does."""
    for start in range(0, len(data), piece):
        incoming.write(data[start : start + piece])
        incoming.file.flush()


def files(spool: Spool, memory_bytes: int = 64 * KB, limit_bytes: int = 0) -> IncomingFiles:
    return IncomingFiles(spool, limit_bytes=limit_bytes, memory_bytes=memory_bytes)


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool", min_free_mb=0)


def test_a_small_instance_stays_in_memory_and_touches_no_file(spool: Spool) -> None:
    incoming = files(spool).open(delete=False, mode="wb", suffix=".dcm")
    receive(incoming, b"x" * 50 * KB)
    assert incoming.in_memory and incoming.getvalue() == b"x" * 50 * KB
    assert not list(spool.tmp_dir.iterdir())


def test_a_large_instance_goes_to_a_private_file_in_the_spool_and_is_renamed_into_place(spool: Spool) -> None:
    data = os.urandom(300 * KB)
    incoming = files(spool).open()
    receive(incoming, data)
    assert not incoming.in_memory and incoming.size == len(data)
    assert incoming.path.parent == spool.tmp_dir and incoming.path.read_bytes() == data
    assert oct(incoming.path.stat().st_mode & 0o777) == "0o600"
    inode = incoming.path.stat().st_ino
    final = spool.commit(incoming, Path("1.2") / "1.2.3" / "1.2.3.4.dcm")
    incoming.discard()  # what the handler does afterwards: a committed file stays
    assert final.read_bytes() == data and final.stat().st_ino == inode  # renamed, not copied
    assert not list(spool.tmp_dir.iterdir())


def test_past_max_instance_mb_nothing_more_is_kept_but_the_size_is_counted(spool: Spool) -> None:
    incoming = files(spool, limit_bytes=1 * MB).open()
    receive(incoming, b"y" * (3 * MB))
    assert incoming.over_limit and incoming.refused and incoming.size == 3 * MB
    assert not incoming.in_memory and not incoming.path.exists()
    assert not list(spool.tmp_dir.iterdir())


def test_under_the_watermark_the_file_is_dropped_while_the_instance_arrives(spool: Spool) -> None:
    free = [100 * MB]
    spool.min_free_bytes = 10 * MB
    spool.free_bytes = lambda: free[0]
    incoming = files(spool).open()
    receive(incoming, b"z" * MB)
    assert incoming.path.exists() and not incoming.refused
    free[0] = 5 * MB  # the disk fills while the instance arrives
    receive(incoming, b"z" * (20 * MB))
    assert incoming.no_room and not incoming.path.exists() and incoming.size == 21 * MB


def test_a_write_error_is_kept_for_the_handler_and_never_raised(spool: Spool) -> None:
    incoming = files(spool).open()
    os.rmdir(spool.tmp_dir)  # the file cannot be created
    receive(incoming, b"w" * 200 * KB)
    assert isinstance(incoming.write_error, FileNotFoundError) and incoming.refused


def test_files_of_an_ended_association_that_no_handler_took_are_removed(spool: Spool) -> None:
    incoming = files(spool)
    taken: list[IncomingFile] = []
    left: list[IncomingFile] = []

    def association() -> None:  # one DUL reader thread: two instances, the handler takes the first
        for target in (taken, left):
            part = incoming.open()
            receive(part, b"v" * 100 * KB)
            target.append(part)

    reader = threading.Thread(target=association)
    reader.start()
    reader.join()
    other = incoming.open()  # another association (this thread) is left alone
    receive(other, b"u" * 100 * KB)
    assert incoming.take(taken[0].path) is taken[0]
    assert incoming.discard_of(reader) == 1
    assert not left[0].path.exists() and taken[0].path.exists() and other.path.exists()
    assert incoming.take(left[0].path) is None


def test_a_file_too_short_or_gone_is_not_dicom(tmp_path: Path) -> None:
    short = tmp_path / "short.part"
    short.write_bytes(b"\0" * 100)
    for path in (short, tmp_path / "gone.part"):
        with pytest.raises(HeaderError, match=r"not a DICOM file|cannot read the received file"):
            read_header(path)


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "syntax"),
    [
        ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5", "1.2.840.10008.1.2.1"),  # odd and even lengths
        ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.3.44", "1.2.840.10008.1.2"),
        ("1.2.840.10008.5.1.4.1.1.2", "1." + "2" * 80, "1.2.840.10008.1.2.4.90"),  # over-long: refused later
    ],
)
def test_the_encoded_file_meta_is_what_pydicom_writes(sop_class: str, sop_instance: str, syntax: str) -> None:
    """The streamed file starts with the same file meta bytes as pynetdicom's create_file_meta would write."""
    from io import BytesIO

    from pydicom import config as pydicom_config
    from pydicom.dataelem import DataElement
    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info
    from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

    from pacs_agent.receive.server import _file_meta, _write_file_meta_info

    meta = FileMetaDataset()
    meta.FileMetaInformationGroupLength = 0
    meta.FileMetaInformationVersion = b"\x00\x01"
    for tag, value in ((0x00020002, sop_class), (0x00020003, sop_instance), (0x00020010, syntax)):
        meta[tag] = DataElement(tag, "UI", value, validation_mode=pydicom_config.IGNORE)
    meta.ImplementationClassUID = PYNETDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = PYNETDICOM_IMPLEMENTATION_VERSION
    expected, ours = BytesIO(), BytesIO()
    with pydicom_config.disable_value_validation():
        write_file_meta_info(expected, meta)
    _write_file_meta_info(
        ours, _file_meta(sop_class_uid=sop_class, sop_instance_uid=sop_instance, transfer_syntax=syntax)
    )
    assert ours.getvalue() == expected.getvalue()
