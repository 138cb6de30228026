"""Malformed objects over the network: each gets a failure status or a job error, the node stays up."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import select

from inference.phantom import PhantomStudy, generate_study
from pacs_agent.db.tables import Event, Instance, Job, Study
from tests.integration.peers import Node, Nodes, Receiver, storescu, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def receiver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Receiver]:
    receiver = Receiver(tmp_path_factory.mktemp("received"))
    receiver.start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="module")
def node(receiver: Receiver, module_nodes: Nodes) -> Node:
    """One node (``serve``) that every malformed object of the module is thrown at; it must stay up."""
    return module_nodes.start("serve", extra_config=receiver.destination_toml())


def part10(body: bytes, sop_class: str = CTImageStorage, syntax: str = ExplicitVRLittleEndian) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    buffer = BytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta)
    return buffer.getvalue() + body


def send_bytes(node: Node, data: bytes, tmp_path: Path) -> int | None:
    """Send a file's dataset bytes unchanged; None when the association fails (also a refusal)."""
    path = tmp_path / f"{generate_uid()}.dcm"
    path.write_bytes(data)
    ae = AE(ae_title="FUZZER")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="PACS_AGENT")
    if not assoc.is_established:
        return None
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        status = assoc.send_c_store(path)
    except Exception:  # the SCU library itself may refuse to send garbage: also fine for the node
        return None
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
        if assoc.is_established:
            assoc.release()
    return int(status.Status) if status and "Status" in status else None


def element(tag: tuple[int, int], vr: bytes, value: bytes, length: int | None = None) -> bytes:
    size = len(value) if length is None else length
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"OF"):
        return struct.pack("<HH", *tag) + vr + b"\x00\x00" + struct.pack("<I", size) + value
    return struct.pack("<HH", *tag) + vr + struct.pack("<H", size) + value


UIDS = element((0x0008, 0x0016), b"UI", b"1.2.840.10008.5.1.4.1.1.2\x00") + element(
    (0x0008, 0x0018), b"UI", b"1.2.3.4.5\x00"
)

MALFORMED = {
    "huge length": UIDS + element((0x0010, 0x0010), b"UN", b"x" * 8, length=0xFFFFFFF0),
    "wrong VR length": UIDS + element((0x0028, 0x0010), b"US", b"\x01\x02\x03"),
    "truncated element": UIDS + element((0x0020, 0x000D), b"UI", b"1.2.3")[:-2],
    "deep sequences": UIDS
    + b"".join(
        struct.pack("<HH", 0x0040, 0xA730) + b"SQ\x00\x00\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
        for _ in range(400)
    ),
    "odd tag order": element((0x0020, 0x000D), b"UI", b"1.2\x00") + UIDS,
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_dataset_is_refused_and_node_stays_up(node: Node, tmp_path: Path, name: str) -> None:
    status = send_bytes(node, part10(MALFORMED[name]), tmp_path)
    assert status is None or status != 0x0000, f"{name}: accepted"
    assert node.echo()


def test_bogus_transfer_syntax_is_refused_at_negotiation(node: Node) -> None:
    ae = AE(ae_title="FUZZER")
    ae.add_requested_context(CTImageStorage, "1.2.3.4.5.6.7")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="PACS_AGENT")
    try:
        assert not assoc.accepted_contexts
    finally:
        if assoc.is_established:
            assoc.release()
    assert node.echo()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(min_size=1, max_size=3000))
def test_random_bodies(node: Node, tmp_path: Path, body: bytes) -> None:
    status = send_bytes(node, part10(body), tmp_path)
    assert status != 0x0000  # random bytes can never carry the SOP Instance UID of the request
    assert node.echo()


def test_wrong_pixel_size_is_refused_at_receive_and_a_good_study_still_gets_results(
    node: Node, phantom: PhantomStudy, tmp_path: Path
) -> None:
    """Native Pixel Data shorter than Rows x Columns x Bits Allocated: refused at receive, not stored."""
    bad = generate_study(tmp_path / "bad", seed=62, lesions=1, slices=24, rows=64, columns=64)
    broken = dcmread(bad.ct_files[5])
    broken.PixelData = broken.PixelData[: len(broken.PixelData) // 2]  # half the pixels missing
    broken.save_as(bad.ct_files[5])
    assert storescu(node.port, [*bad.ct_files, bad.seg_file]).returncode != 0  # one instance refused
    refused = store_refusals(node, str(broken.SOPInstanceUID))
    assert refused and "pixel" in refused[0].lower(), refused
    assert not node.rows(select(Instance.id).where(Instance.sop_instance_uid == str(broken.SOPInstanceUID)))
    assert storescu(node.port, [*phantom.ct_files, phantom.seg_file]).returncode == 0
    assert wait_for(lambda: ended_job(node, phantom.study_instance_uid), 120, "the good study's job")[0] == "done"


def store_refusals(node: Node, sop_instance_uid: str) -> list[str]:
    """Details of the node's ``store_refused`` events for one SOP Instance UID."""
    return [
        str(detail)
        for (detail,) in node.rows(
            select(Event.detail).where(Event.kind == "store_refused", Event.sop_instance_uid == sop_instance_uid)
        )
    ]


def break_seg_pixels(ds: Dataset) -> None:
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]  # frames missing


def break_rtstruct_contour(ds: Dataset) -> None:
    contour = ds.ROIContourSequence[0].ContourSequence[0]
    contour.ContourData = list(contour.ContourData)[:-1]  # not (x, y, z) triplets any more
    contour.NumberOfContourPoints = len(contour.ContourData)


def drop_segment_sequence(ds: Dataset) -> None:
    del ds.SegmentSequence


MALFORMED_SEGMENTATIONS = {
    # Pixel Data shorter than its frames: refused at receive (PS3.4 B.2.3 0xA900), never stored
    "SEG with missing frames": ("seg", break_seg_pixels, "refused at receive"),
    # no segment described: readiness finds no tumour structure, so no job is started
    "SEG without Segment Sequence": ("seg", drop_segment_sequence, "study incomplete"),
    "RTSTRUCT contour not in triplets": ("rtstruct", break_rtstruct_contour, "job failed"),
}


def test_malformed_segmentations_fail_with_a_reason_and_the_worker_goes_on(node: Node, tmp_path: Path) -> None:
    """Each broken SEG / RTSTRUCT is refused at receive when its bytes are incomplete, fails its own job at once
    (no retries), or leaves its study incomplete when readiness already sees it cannot be used; each with a
    reason, and a good study sent next is processed.
    """
    bad: dict[str, tuple[PhantomStudy, str]] = {}
    for n, (case, (kind, breaker, expected)) in enumerate(MALFORMED_SEGMENTATIONS.items()):
        study = generate_study(
            tmp_path / f"bad{n}", seed=70 + n, lesions=1, slices=24, rows=64, columns=64, segmentation=kind
        )
        path = study.seg_file if kind == "seg" else study.rtstruct_file
        assert path is not None
        ds = dcmread(path)
        breaker(ds)
        ds.save_as(path, enforce_file_format=True)
        if expected == "refused at receive":
            assert storescu(node.port, [*study.ct_files, path]).returncode != 0, case
            assert store_refusals(node, str(ds.SOPInstanceUID)), f"{case}: no store_refused event"
            continue
        assert storescu(node.port, [*study.ct_files, path]).returncode == 0
        bad[case] = (study, expected)
    after = generate_study(tmp_path / "after", seed=80, lesions=1, slices=24, rows=64, columns=64)
    assert storescu(node.port, [*after.ct_files, after.seg_file]).returncode == 0
    for case, (study, expected) in bad.items():
        what, error = wait_for(lambda s=study: ended(node, s.study_instance_uid), 120, f"the outcome of {case}")
        assert what == expected, f"{case}: {what}: {error}"  # input errors fail at once, they are not retried
        assert error and "Traceback" not in error and len(error) < 1000, error
    # the worker survived them all: the next study is processed
    assert wait_for(lambda: ended_job(node, after.study_instance_uid), 120, "the next study's job")[0] == "done"


def ended(node: Node, study_uid: str) -> tuple[str, str | None] | None:
    """("job <state>", last error) once the study's job ended, ("study incomplete", reason), else None."""
    job = ended_job(node, study_uid)
    if job is not None:
        return f"job {job[0]}", job[1]
    rows = node.rows(select(Study.state, Study.state_reason).where(Study.study_instance_uid == study_uid))
    return ("study incomplete", rows[0][1]) if rows and rows[0][0] == "incomplete" else None


def ended_job(node: Node, study_uid: str) -> tuple[str, str | None] | None:
    """(state, last error) of the study's job once it ended, else None."""
    rows = node.rows(
        select(Job.state, Job.last_error)
        .join(Study, Study.id == Job.study_id)
        .where(Study.study_instance_uid == study_uid)
    )
    return (rows[0][0], rows[0][1]) if rows and rows[0][0] in ("done", "failed", "dead") else None
