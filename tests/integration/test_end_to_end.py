"""The whole path with Orthanc as the PACS: Orthanc sends a study, the SR comes back into Orthanc."""

from __future__ import annotations

import os
import signal
import subprocess
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from inference.phantom import PhantomStudy, generate_study
from pacs_agent.db.tables import Delivery, Job, Study
from tests.integration.peers import Node, Orthanc, require_tool, storescu, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.phantom(seed=11, lesions=3, slices=40, rows=128, columns=128)]


def job_states(node: Node) -> list[tuple[str, int, str | None]]:
    return [tuple(r) for r in node.rows(select(Job.state, Job.attempts, Job.last_error).order_by(Job.id))]


def srs_in(orthanc: Orthanc) -> list[dict]:
    return orthanc.instances_with_modality("SR")


def check_dciodvfy(data: bytes, tmp_path: Path) -> None:
    tool = require_tool("dciodvfy")
    path = tmp_path / "sr.dcm"
    path.write_bytes(data)
    out = subprocess.run([tool, "-new", str(path)], capture_output=True, text=True, check=False)
    errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
    assert errors == [], "\n".join(errors)


def test_orthanc_sends_study_and_gets_sr_back(
    pacs_and_node: tuple[Orthanc, Node], phantom: PhantomStudy, tmp_path: Path
) -> None:
    orthanc, node = pacs_and_node
    node.start("serve")
    ids = orthanc.upload([*phantom.ct_files, phantom.seg_file])
    study_id = orthanc.get(f"/instances/{ids[0]}/study")["ID"]
    orthanc.post("/modalities/pacsagent/store", {"Resources": [study_id], "Synchronous": True})
    srs = wait_for(lambda: srs_in(orthanc), 180, "the SR to arrive in Orthanc")
    assert len(srs) == 1
    sr = srs[0]
    assert sr["StudyInstanceUID"] == phantom.study_instance_uid
    data = orthanc.file(sr["ID"])
    ds = dcmread(BytesIO(data))
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    check_dciodvfy(data, tmp_path)
    # one measurement group per planted lesion, and a volume close to the planted one
    from dicom_sr.sr.text import render_sr_text

    text = render_sr_text(ds)
    assert text.count("lesion") >= len(phantom.lesions)
    # the Secondary Captures (summary + one per lesion) arrive too, and pass dciodvfy
    scs = wait_for(
        lambda: (found := orthanc.instances_with_modality("OT")) and len(found) == len(phantom.lesions) + 1 and found,
        60,
        "the Secondary Captures",
    )
    for sc in scs:
        sc_data = orthanc.file(sc["ID"])
        assert dcmread(BytesIO(sc_data)).BurnedInAnnotation == "YES"
        check_dciodvfy(sc_data, tmp_path)
    assert node.scalars(select(Delivery.state)) == ["done"] * (len(phantom.lesions) + 2)
    assert node.scalars(select(Study.state)) == ["done"]


def test_restart_between_receive_and_processing(pacs_and_node: tuple[Orthanc, Node], phantom: PhantomStudy) -> None:
    orthanc, node = pacs_and_node
    node.start("scp")  # receives and schedules, but no worker runs the job
    assert storescu(node.port, [*phantom.ct_files, phantom.seg_file]).returncode == 0
    wait_for(lambda: job_states(node), 30, "the job to be scheduled")
    assert job_states(node)[0][0] == "pending"
    assert node.stop() == 0
    node.start("serve")
    wait_for(lambda: srs_in(orthanc), 180, "the SR after the restart")
    assert job_states(node) == [("done", 1, None)]


def test_worker_crash_is_retried(pacs_and_node: tuple[Orthanc, Node], phantom: PhantomStudy) -> None:
    orthanc, node = pacs_and_node
    node.start("serve")
    assert storescu(node.port, [*phantom.ct_files, phantom.seg_file]).returncode == 0

    def running_worker_pid() -> int | None:
        workers = node.scalars(select(Job.worker_id).where(Job.state == "running"))
        assert len(workers) <= 1, workers
        return int(workers[0].rpartition(":")[2]) if workers else None

    pid = wait_for(running_worker_pid, 60, "the job to start", interval=0.02)
    os.kill(pid, signal.SIGKILL)  # the worker dies mid-job, as on a segfault or OOM kill
    wait_for(lambda: srs_in(orthanc), 180, "the SR after the worker was restarted")
    state, attempts, error = job_states(node)[0]
    assert state == "done"
    assert attempts == 2
    assert "bad input" not in (error or "")
    assert len(srs_in(orthanc)) == 1


def test_bad_segmentation_fails_the_job_with_a_reason(pacs_and_node: tuple[Orthanc, Node], tmp_path: Path) -> None:
    _, node = pacs_and_node
    study = generate_study(tmp_path / "p", seed=4, lesions=1, slices=24, rows=64, columns=64)
    seg = dcmread(study.seg_file)
    seg.PixelData = b"\x00" * len(seg.PixelData)  # every segment empty
    seg.save_as(study.seg_file)
    node.start("serve")
    assert storescu(node.port, [*study.ct_files, study.seg_file]).returncode == 0
    wait_for(lambda: job_states(node) and job_states(node)[0][0] in ("failed", "dead"), 120, "the job to fail")
    state, attempts, error = job_states(node)[0]
    assert state == "failed"
    assert attempts == 1
    assert error and "empty" in error.lower()
    assert node.echo()  # the node is still up
