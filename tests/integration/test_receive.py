"""The receiving node against real senders: DCMTK echoscu / storescu and a pynetdicom SCU."""

from __future__ import annotations

import subprocess
import sys
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage, SecondaryCaptureImageStorage
from sqlalchemy import func, select

from inference.phantom import SUPPORTED_TRANSFER_SYNTAXES, PhantomStudy, generate_study
from pacs_agent.db.tables import Event, Instance, Study
from pacs_agent.receive.spool import Spool
from tests.integration.peers import Node, Nodes, storescu, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.phantom(seed=3, lesions=2, slices=20, rows=128, columns=128)]


@pytest.fixture
def node(nodes: Nodes) -> Node:
    """A fresh receiving node (``scp``) for each test."""
    return nodes.start("scp", extra_config='[security]\nallowed_calling_aets = ["STORESCU", "PYNETDICOM", "ECHOSCU"]\n')


def events(node: Node, kind: str) -> list[Event]:
    return node.scalars(select(Event).where(Event.kind == kind).order_by(Event.id))


def send_raw(port: int, file: Path) -> int:
    """Send a file's bytes as they are (pynetdicom chunked send) and return the C-STORE status."""
    meta = read_file_meta_info(file)
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(meta.MediaStorageSOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACS_AGENT")
    assert assoc.is_established
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        status = assoc.send_c_store(file)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
        assoc.release()
    return int(status.Status)


def file_with_body(path: Path, sop_class: str, body: bytes) -> Path:
    """A Part 10 file with a valid preamble and meta, followed by ``body`` as the dataset."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = BytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta)
    path.write_bytes(buffer.getvalue() + body)
    return path


def dataset_store(port: int, ds: Dataset) -> int:
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACS_AGENT")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def test_echo_and_store_with_dcmtk(node: Node, phantom: PhantomStudy) -> None:
    assert node.echo()
    files = [*phantom.ct_files, phantom.seg_file, phantom.rtstruct_file]
    result = storescu(node.port, files)
    assert result.returncode == 0, result.stderr
    assert node.scalar(select(func.count(Instance.id))) == len(files)
    stored = node.rows(select(Instance.path, Instance.size_bytes))
    [study] = node.scalars(select(Study))
    assert study.study_instance_uid == phantom.study_instance_uid
    for path, size in stored:
        on_disk = node.state_dir / "spool" / path
        assert on_disk.stat().st_size == size
    # byte-for-byte what was sent, apart from the meta header the receiver writes itself
    original = dcmread(phantom.ct_files[0])
    spooled = dcmread(node.state_dir / "spool" / stored[0][0])
    assert spooled.PixelData == original.PixelData
    assert not list((node.state_dir / "spool" / "tmp").iterdir())
    assert not list((node.state_dir / "spool" / "pending").iterdir())  # every row committed by the release
    assert f"{len(files)} stored" in events(node, "association")[-1].detail


def test_instances_acknowledged_before_their_rows_are_indexed_at_the_next_start(
    nodes: Nodes, phantom: PhantomStudy
) -> None:
    node = nodes.new()
    node.write_config()
    spool = Spool(node.state_dir / "spool", min_free_mb=0)
    journalled = []
    for path in phantom.ct_files[:3]:  # what a node killed between Success and the commit leaves behind
        ds = dcmread(path)
        ds.file_meta.SourceApplicationEntityTitle = "STORESCU"
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        relative = spool.relative_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        spool.write(relative, buffer.getvalue(), journal=True)
        journalled.append((str(ds.SOPInstanceUID), str(relative)))
    node.start("scp")
    rows = node.rows(select(Instance.sop_instance_uid, Instance.path, Instance.calling_ae_title))
    assert sorted(rows) == sorted((uid, path, "STORESCU") for uid, path in journalled)
    [study] = node.scalars(select(Study))
    assert study.study_instance_uid == phantom.study_instance_uid and study.state == "receiving"
    assert spool.pending() == []
    assert "indexed 3 instance(s) that were acknowledged but not yet indexed" in node.log.read_text()


def test_duplicate_is_stored_once(node: Node, phantom: PhantomStudy) -> None:
    assert storescu(node.port, phantom.ct_files[:2]).returncode == 0
    assert storescu(node.port, phantom.ct_files[:2]).returncode == 0
    assert node.scalar(select(func.count(Instance.id))) == 2
    assert node.scalar(select(func.sum(Instance.duplicates))) == 2


def test_disallowed_calling_ae_is_rejected(node: Node, phantom: PhantomStudy) -> None:
    result = storescu(node.port, phantom.ct_files[:1], aet="INTRUDER")
    assert result.returncode != 0
    assert "Rejected" in result.stderr or "rejected" in result.stderr.lower()
    rejected = events(node, "association_rejected")
    assert rejected and "INTRUDER" in rejected[-1].detail
    assert node.scalar(select(func.count(Instance.id))) == 0


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"this is not a DICOM dataset at all" * 10, 0xC210),  # non-DICOM byte stream
        (b"", 0xC210),  # nothing after the meta header
    ],
)
def test_garbage_gets_cannot_understand(node: Node, tmp_path: Path, body: bytes, status: int) -> None:
    path = file_with_body(tmp_path / "bad.dcm", CTImageStorage, body)
    assert send_raw(node.port, path) == status
    assert events(node, "store_refused")[-1].status == status
    assert node.echo()  # still serving


def test_truncated_file_is_refused(node: Node, phantom: PhantomStudy, tmp_path: Path) -> None:
    data = phantom.ct_files[0].read_bytes()
    meta_end = len(data) - len(dcmread(phantom.ct_files[0]).PixelData) - 12
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(data[: meta_end // 2 + 200])
    status = send_raw(node.port, truncated)
    assert status in (0xC210, 0xA900)
    assert events(node, "store_refused")
    assert storescu(node.port, phantom.ct_files[:1]).returncode == 0  # a good one right after


def test_ct_without_pixel_data(node: Node, phantom: PhantomStudy) -> None:
    ds = dcmread(phantom.ct_files[0])
    del ds.PixelData
    ds.SOPInstanceUID = generate_uid()
    assert dataset_store(node.port, ds) == 0xA900
    assert "without Pixel Data" in events(node, "store_refused")[-1].detail


def test_dataset_of_another_sop_class(node: Node, phantom: PhantomStudy, tmp_path: Path) -> None:
    ds = dcmread(phantom.ct_files[0])
    ds.SOPClassUID = SecondaryCaptureImageStorage
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    body = data[data.index(b"DICM") + 4 :]
    # keep the CT class in the file meta so the request says CT while the dataset says SC
    meta_len = int.from_bytes(body[8:12], "little") + 12
    path = file_with_body(tmp_path / "mismatch.dcm", CTImageStorage, body[meta_len:])
    assert send_raw(node.port, path) == 0xA900
    assert "differs from the requested" in events(node, "store_refused")[-1].detail


def test_low_disk_answers_out_of_resources(nodes: Nodes, phantom: PhantomStudy) -> None:
    node = nodes.start("scp", env={"PACS_AGENT__STORAGE__MIN_FREE_MB": str(10**12)})
    result = storescu(node.port, phantom.ct_files[:1])
    assert result.returncode != 0 or "0xa700" in result.stderr.lower() or "Out of Resources" in result.stderr
    refused = events(node, "store_refused")
    assert refused and refused[-1].status == 0xA700
    assert not list((node.state_dir / "spool").rglob("*.dcm"))
    assert node.stop() == 0


def test_scp_process_never_imports_torch(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from pacs_agent.config import load_settings\n"
        "from pacs_agent.service import ScpService\n"
        f"s = load_settings(None, {{'PACS_AGENT__STORAGE__STATE_DIR': r'{tmp_path}', 'PACS_AGENT__NODE__PORT': '1'}})\n"
        "svc = ScpService(s)\n"
        "heavy = [m for m in ('torch', 'radiomics', 'SimpleITK', 'inference.pipelines') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("syntax", SUPPORTED_TRANSFER_SYNTAXES)
def test_every_transfer_syntax_is_stored_as_sent(node: Node, tmp_path: Path, syntax: str) -> None:
    seed = 100 + SUPPORTED_TRANSFER_SYNTAXES.index(syntax)  # distinct UIDs per syntax
    study = generate_study(
        tmp_path / "p",
        seed=seed,
        lesions=1,
        slices=20,
        rows=64,
        columns=64,
        segmentation="none",
        transfer_syntax=syntax,
    )
    ds = dcmread(study.ct_files[0])
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(ds.SOPClassUID, syntax)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="PACS_AGENT")
    assert assoc.is_established
    try:
        assert int(assoc.send_c_store(ds).Status) == 0
    finally:
        assoc.release()
    [row] = node.scalars(select(Instance).where(Instance.sop_instance_uid == ds.SOPInstanceUID))
    assert row.transfer_syntax_uid == syntax
    stored = dcmread(node.state_dir / "spool" / row.path)
    assert np.array_equal(stored.pixel_array, ds.pixel_array)


def test_segmentation_of_an_unknown_series_is_explained(node: Node, phantom: PhantomStudy, tmp_path: Path) -> None:
    seg = dcmread(phantom.seg_file)
    seg.SOPInstanceUID = generate_uid()
    seg.file_meta.MediaStorageSOPInstanceUID = seg.SOPInstanceUID
    seg.ReferencedSeriesSequence[0].SeriesInstanceUID = "1.2.3.999"
    seg.FrameOfReferenceUID = "1.2.3.998"  # nor the CT's frame of reference: it was not drawn on this CT
    seg.save_as(tmp_path / "seg.dcm")
    assert storescu(node.port, [*phantom.ct_files, tmp_path / "seg.dcm"]).returncode == 0

    def status() -> str:
        out = subprocess.run(
            [sys.executable, "-m", "pacs_agent", "status", "--config", str(node.config)],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout if "incomplete" in out.stdout else ""

    text = wait_for(status, 30, "the study to be marked incomplete")
    assert "references 1.2.3.999, which is not a CT series of this study, and its frame of reference (1.2.3.998)" in (
        text
    )
    assert phantom.patient_id not in text
    assert node.echo()
