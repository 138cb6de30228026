"""The 8-week response (M5) end to end, with Orthanc as the PACS holding only the baselines.

Two patients' follow-up studies are sent to the node (``pacs-agent serve``, methods radiomics +
response, Orthanc as ``[[sources]]`` and ``[[destinations]]``, the committed DEMO response package):

- patient A: lesion volume x0.2 and texture homogenised (planted RECIST partial response);
- patient B (bad input): a lesion segmented at baseline only (its follow-up segment is empty).

For each, the node finds no baseline locally, C-FINDs Orthanc, C-MOVEs the baseline to itself, pairs,
runs the response job and stores the response SR + Secondary Capture back into Orthanc, in the
follow-up's study. Small phantoms (128 x 128 x 40) keep it within about two minutes on two cores.
"""

from __future__ import annotations

import subprocess
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from dicom_sr.sr.text import render_sr_text
from inference.phantom import PhantomStudy
from pacs_agent.db.tables import Event, Job, Study
from tests.integration.peers import Node, Orthanc, require_tool, storescu, wait_for
from tests.integration.phantoms import Phantoms
from tests.unit.test_response_pipeline import blank_segments

pytestmark = pytest.mark.integration

RESPONSE_SERIES = "AI Response 8w M5"


@pytest.fixture(scope="module")
def patients(
    tmp_path_factory: pytest.TempPathFactory, phantoms: Phantoms
) -> dict[str, tuple[PhantomStudy, PhantomStudy, Path]]:
    """name -> (baseline, follow-up, follow-up segmentation file to send)."""
    root = tmp_path_factory.mktemp("response-e2e")
    out = {}
    for name, seed, shrink, texture in (("A", 41, 0.2, "homogenise"), ("B", 42, 0.9, None)):
        baseline = phantoms.study(
            seed=seed, lesions=2, slices=40, rows=128, columns=128, segmentation="seg", seg_per_lesion=True
        )
        follow = phantoms.follow_up(baseline, shrink=shrink, texture_change=texture)
        assert follow.seg_file is not None
        seg = follow.seg_file if name == "A" else blank_segments(follow, {2}, root / "B-follow-seg-blank2.dcm")
        out[name] = (baseline, follow, seg)
    return out


@pytest.fixture
def pacs_node_config(orthanc: Orthanc) -> str:
    """Orthanc is where the node finds the baselines (C-MOVE) and where it sends the results."""
    return (
        '[jobs]\nmethods = ["radiomics", "response"]\n'
        + orthanc.source_toml("pacs", retrieve="move")
        + orthanc.destination_toml("pacs")
    )


def response_objects(orthanc: Orthanc, modality: str) -> dict[str, dict]:
    """Response objects of one modality in Orthanc, by Study Instance UID."""
    return {
        i["StudyInstanceUID"]: i
        for i in orthanc.instances_with_modality(modality)
        if str(i.get("SeriesDescription", "")).startswith(RESPONSE_SERIES)
    }


def dciodvfy_errors(data: bytes, path: Path) -> list[str]:
    path.write_bytes(data)
    run = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, text=True, check=False)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def test_follow_ups_fetch_their_baselines_and_get_response_results_back(
    pacs_and_node: tuple[Orthanc, Node],
    patients: dict[str, tuple[PhantomStudy, PhantomStudy, Path]],
    tmp_path: Path,
) -> None:
    orthanc, node = pacs_and_node
    for baseline, _, _ in patients.values():
        assert baseline.seg_file is not None
        orthanc.upload([*baseline.ct_files, baseline.seg_file])
    node.start("serve")
    for _, follow, seg in patients.values():
        sent = storescu(node.port, [*follow.ct_files, seg])
        assert sent.returncode == 0, sent.stderr
    follow_uids = {name: follow.study_instance_uid for name, (_, follow, _) in patients.items()}

    def arrived() -> bool:
        return all(set(follow_uids.values()) <= set(response_objects(orthanc, modality)) for modality in ("SR", "OT"))

    wait_for(arrived, 170, "the response SRs and Secondary Captures in Orthanc")
    srs, scs = response_objects(orthanc, "SR"), response_objects(orthanc, "OT")

    # patient A: planted partial response, scored by the DEMO signature, both studies cited
    a_baseline, a_follow, _ = patients["A"]
    data = orthanc.file(srs[a_follow.study_instance_uid]["ID"])
    sr = pydicom.dcmread(BytesIO(data))
    assert sr.StudyInstanceUID == a_follow.study_instance_uid and sr.PatientID == a_follow.patient_id
    assert {s.StudyInstanceUID for s in sr.PertinentOtherEvidenceSequence} == {a_baseline.study_instance_uid}
    text = render_sr_text(sr)
    assert "Current Response: Target Lesion Partial Response" in text
    assert "Probability of treatment insensitivity: " in text
    assert "Treatment insensitivity risk group: Low risk" in text  # shrunk + homogenised = sensitive
    assert "Usage warning: DEMO MODEL - NOT FOR CLINICAL USE" in text
    assert text.count("Lesion status between time points: Seen at both time points") == 2
    assert dciodvfy_errors(data, tmp_path / "a-sr.dcm") == []
    sc_data = orthanc.file(scs[a_follow.study_instance_uid]["ID"])
    sc = pydicom.dcmread(BytesIO(sc_data))
    assert sc.BurnedInAnnotation == "YES" and sc.StudyInstanceUID == a_follow.study_instance_uid
    assert dciodvfy_errors(sc_data, tmp_path / "a-sc.dcm") == []

    # patient B: a lesion segmented at baseline only is reported as disappeared, not a failure
    _, b_follow, _ = patients["B"]
    b_data = orthanc.file(srs[b_follow.study_instance_uid]["ID"])
    b_text = render_sr_text(pydicom.dcmread(BytesIO(b_data)))
    assert "Lesion status between time points: Disappeared (baseline only)" in b_text
    assert "1 lesion(s) matched, 0 new, 1 disappeared" in b_text
    assert "segmented at baseline only: reported as disappeared" in b_text
    assert dciodvfy_errors(b_data, tmp_path / "b-sr.dcm") == []
    assert dciodvfy_errors(orthanc.file(scs[b_follow.study_instance_uid]["ID"]), tmp_path / "b-sc.dcm") == []

    # the node queried and retrieved each baseline; both response jobs are done
    response_jobs = node.rows(
        select(Study.study_instance_uid, Job.state, Job.last_error)
        .join(Study, Study.id == Job.study_id)
        .where(Job.method == "response")
    )
    details = " ".join(detail or "" for detail in node.scalars(select(Event.detail)))
    assert sorted((uid, state) for uid, state, _ in response_jobs) == sorted(
        (uid, "done") for uid in follow_uids.values()
    ), response_jobs
    assert details.count("retrieving from pacs by C-MOVE") == 2
    for baseline, _, _ in patients.values():
        assert f"{baseline.study_instance_uid} from pacs: {len(baseline.ct_files) + 1} instance(s) retrieved" in details
