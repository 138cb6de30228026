"""The whole path with Orthanc as the PACS: Orthanc sends a study, the SR comes back into Orthanc."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from inference.phantom import PhantomStudy, generate_study
from pacs_agent.db import Database
from pacs_agent.db.tables import Delivery, Job, Study
from tests.integration.peers import Node, Orthanc, require_tool, storescu, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> PhantomStudy:
    return generate_study(tmp_path_factory.mktemp("phantom"), seed=11, lesions=3, slices=40, rows=128, columns=128)


@pytest.fixture
def orthanc_and_node(tmp_path: Path) -> Iterator[tuple[Orthanc, Node]]:
    orthanc = Orthanc(tmp_path / "orthanc")
    node = Node(tmp_path / "node")
    node.extra_config = (
        f'[[destinations]]\nname = "pacs"\nae_title = "{orthanc.ae_title}"\n'
        f'host = "127.0.0.1"\nport = {orthanc.dicom_port}\n'
    )
    orthanc.add_modality("pacsagent", node.ae_title, node.port)
    orthanc.start()
    try:
        yield orthanc, node
    finally:
        if node.process is not None:
            node.stop()
        orthanc.stop()


def node_db(node: Node) -> Database:
    return Database(node.database_url(), run_migrations=False)


def job_states(node: Node) -> list[tuple[str, int, str | None]]:
    db = node_db(node)
    with db.session() as session:
        rows = session.execute(select(Job.state, Job.attempts, Job.last_error).order_by(Job.id)).all()
    db.dispose()
    return [tuple(r) for r in rows]


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
    orthanc_and_node: tuple[Orthanc, Node], phantom: PhantomStudy, tmp_path: Path
) -> None:
    orthanc, node = orthanc_and_node
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
    db = node_db(node)
    with db.session() as session:
        states = session.execute(select(Delivery.state)).scalars().all()
        assert states == ["done"] * (len(phantom.lesions) + 2)
        assert session.execute(select(Study.state)).scalar_one() == "done"
    db.dispose()


def test_restart_between_receive_and_processing(orthanc_and_node: tuple[Orthanc, Node], phantom: PhantomStudy) -> None:
    orthanc, node = orthanc_and_node
    node.start("scp")  # receives and schedules, but no worker runs the job
    assert storescu(node.port, [*phantom.ct_files, phantom.seg_file]).returncode == 0
    wait_for(lambda: job_states(node), 30, "the job to be scheduled")
    assert job_states(node)[0][0] == "pending"
    assert node.stop() == 0
    node.start("serve")
    wait_for(lambda: srs_in(orthanc), 180, "the SR after the restart")
    assert job_states(node) == [("done", 1, None)]


def test_worker_crash_is_retried(orthanc_and_node: tuple[Orthanc, Node], phantom: PhantomStudy) -> None:
    orthanc, node = orthanc_and_node
    node.start("serve")
    assert storescu(node.port, [*phantom.ct_files, phantom.seg_file]).returncode == 0

    def running_worker_pid() -> int | None:
        db = node_db(node)
        with db.session() as session:
            worker = session.execute(select(Job.worker_id).where(Job.state == "running")).scalar_one_or_none()
        db.dispose()
        return int(worker.rpartition(":")[2]) if worker else None

    pid = wait_for(running_worker_pid, 60, "the job to start", interval=0.02)
    os.kill(pid, signal.SIGKILL)  # the worker dies mid-job, as on a segfault or OOM kill
    wait_for(lambda: srs_in(orthanc), 180, "the SR after the worker was restarted")
    state, attempts, error = job_states(node)[0]
    assert state == "done"
    assert attempts == 2
    assert "bad input" not in (error or "")
    assert len(srs_in(orthanc)) == 1


def test_bad_segmentation_fails_the_job_with_a_reason(orthanc_and_node: tuple[Orthanc, Node], tmp_path: Path) -> None:
    _, node = orthanc_and_node
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
