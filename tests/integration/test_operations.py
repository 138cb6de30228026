"""``pacs-agent status``, ``events`` and ``retry`` as an operator runs them, against a running node."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from inference.phantom import generate_study
from tests.integration.peers import Node, Nodes, storescu, wait_for

pytestmark = pytest.mark.integration


def pacs_agent(node: Node, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pacs_agent", *args, "--config", str(node.config)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_operator_follows_and_retries_a_study(tmp_path: Path, nodes: Nodes) -> None:
    study = generate_study(
        tmp_path / "study", seed=31, lesions=1, slices=20, rows=64, columns=64, patient_id="PAT-OPS-0815"
    )
    # scp, no worker: jobs stay pending, the scheduler runs
    node = nodes.start("scp", extra_config='[security]\nallowed_calling_aets = ["MODALITY", "ECHOSCU"]\n')
    assert storescu(node.port, study.ct_files, aet="INTRUDER").returncode != 0
    assert storescu(node.port, study.ct_files, aet="MODALITY").returncode == 0

    def events(*args: str) -> list[dict]:
        result = pacs_agent(node, "events", "--json", *args)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    # no segmentation: quiet for [readiness] quiet_seconds, then incomplete with the reason
    wait_for(lambda: events("--kind", "study_incomplete"), 30, "the study to be marked incomplete")
    rejected = events("--kind", "association_rejected")
    assert [(e["ae_title"], e["peer"]) for e in rejected] == [("INTRUDER", "127.0.0.1")]
    text = pacs_agent(node, "events", "--study", study.study_instance_uid).stdout
    assert "study_incomplete" in text and "no segmentation" in text

    retried = pacs_agent(node, "retry", "--study", study.study_instance_uid)
    assert retried.returncode == 0, retried.stderr
    assert "will be evaluated again" in retried.stdout
    wait_for(lambda: len(events("--kind", "study_incomplete")) == 2, 30, "the running node to evaluate again")
    assert events("--kind", "study_retry_requested")[0]["study_instance_uid"] == study.study_instance_uid

    assert storescu(node.port, [study.seg_file], aet="MODALITY").returncode == 0
    scheduled = wait_for(lambda: events("--kind", "job_scheduled"), 30, "a job for the completed study")
    job_id = scheduled[0]["job_id"]
    refused = pacs_agent(node, "retry", str(job_id))
    assert refused.returncode == 1 and f"job {job_id} is pending already" in refused.stderr

    status = pacs_agent(node, "status")
    assert status.returncode == 0, status.stderr
    assert f"study {study.study_instance_uid}  [queued]" in status.stdout
    assert f"from MODALITY: {len(study.ct_files) + 1} instance(s) in 2 series" in status.stdout
    assert f"job {job_id} radiomics: pending (attempt 0/3)" in status.stdout
    assert "association_rejected aet=INTRUDER peer=127.0.0.1" in status.stdout
    everything = status.stdout + pacs_agent(node, "events", "--limit", "1000").stdout
    for secret in ("PAT-OPS-0815", str(study.patient_name).split("^")[0]):
        assert secret not in everything
    assert node.stop() == 0
