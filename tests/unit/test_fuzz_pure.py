"""Property-based tests of the pure parts that see untrusted input: header reading, readiness, names."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta
from io import BytesIO

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from pacs_agent.receive.header import CT_IMAGE, RT_STRUCTURE_SET, SEGMENTATION, HeaderError, read_header
from pacs_agent.receive.spool import safe_name
from pacs_agent.routing.phase import PhaseRules, SeriesPhaseInfo, classify
from pacs_agent.studies.readiness import (
    ReadinessRules,
    SegmentationSnapshot,
    SeriesSnapshot,
    StudySnapshot,
    decide,
)


def _valid_file() -> bytes:
    ds = Dataset()
    ds.SOPClassUID = CT_IMAGE
    ds.SOPInstanceUID = "1.2.3.4"
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.5"
    ds.Modality = "CT"
    ds.PatientName = "Doe^Jane"
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated = 16
    ds.PixelData = b"\x00" * 32
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE
    meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


VALID = _valid_file()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_never_escape_as_anything_but_header_error(data: bytes) -> None:
    with contextlib.suppress(HeaderError):
        read_header(data)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=len(VALID)), st.binary(min_size=1, max_size=64))
def test_corrupted_valid_file(position: int, garbage: bytes) -> None:
    corrupted = VALID[:position] + garbage + VALID[position + len(garbage) :]
    try:
        header = read_header(corrupted)
    except HeaderError:
        return
    assert header.sop_instance_uid  # whatever parses still carries the UIDs the node needs


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=len(VALID) - 1))
def test_truncated_valid_file(length: int) -> None:
    with contextlib.suppress(HeaderError):
        read_header(VALID[:length])


@given(st.text(max_size=200))
def test_safe_name_never_traverses(uid: str) -> None:
    name = safe_name(uid)
    assert "/" not in name and "\x00" not in name and name not in ("", ".", "..")
    assert len(name) <= 64


T0 = datetime(2026, 1, 1, tzinfo=UTC)
uids = st.sampled_from(["1.1", "1.2", "1.3", "9.9"])


@st.composite
def snapshots(draw: st.DrawFn) -> StudySnapshot:
    series = tuple(
        SeriesSnapshot(
            uid,
            "CT",
            frozenset({draw(st.sampled_from([CT_IMAGE, "1.2.840.10008.5.1.4.1.1.7"]))}),
            draw(st.integers(0, 500)),
            phase=SeriesPhaseInfo(
                draw(st.sampled_from([None, "PORTAL", "ARTERIAL", "x"])),
                contrast_bolus_agent=draw(st.sampled_from([None, "C"])),
            ),
        )
        for uid in draw(st.sets(uids, max_size=3))
    )
    segs = tuple(
        SegmentationSnapshot(
            f"7.{n}",
            draw(st.sampled_from([SEGMENTATION, RT_STRUCTURE_SET])),
            f"8.{n}",
            frozenset(draw(st.sets(uids, max_size=3))),
            T0 + timedelta(seconds=draw(st.integers(0, 100))),
        )
        for n in range(draw(st.integers(0, 3)))
    )
    return StudySnapshot("1.9", T0 + timedelta(seconds=100), series, segs)


@settings(max_examples=300, deadline=None)
@given(snapshots(), st.integers(0, 400), st.booleans())
def test_decide_is_total_and_consistent(snapshot: StudySnapshot, seconds: int, phase_rules: bool) -> None:
    rules = ReadinessRules(quiet_seconds=30, phase=PhaseRules() if phase_rules else None)
    decision = decide(snapshot, T0 + timedelta(seconds=seconds), rules)
    assert decision.reason
    if decision.state == "ready":
        chosen = next(s for s in snapshot.series if s.series_instance_uid == decision.ct_series_instance_uid)
        seg = next(s for s in snapshot.segmentations if s.sop_instance_uid == decision.segmentation_sop_instance_uid)
        assert chosen.series_instance_uid in seg.referenced_series_uids
        assert CT_IMAGE in chosen.sop_class_uids and chosen.instance_count >= rules.min_ct_instances
    if seconds < 130:
        assert decision.state == "waiting"
    # the same snapshot always gives the same decision
    assert decide(snapshot, T0 + timedelta(seconds=seconds), rules) == decision


@given(st.text(max_size=80), st.text(max_size=80), st.text(max_size=20))
def test_phase_classification_is_total(description: str, protocol: str, agent: str) -> None:
    verdict = classify(SeriesPhaseInfo(description, protocol, contrast_bolus_agent=agent), PhaseRules())
    assert verdict.reason
