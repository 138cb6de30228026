"""Four modalities at once, each sending a 300-slice study while a job runs: nothing lost, all processed.

The slices are 128x128 to keep the suite fast; the number of instances and associations is what
stresses the receiving path here (the ingest benchmark uses 512x512).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from sqlalchemy import func, select

from inference.phantom import PhantomStudy, generate_study
from pacs_agent.db.tables import Instance, Job, Study
from tests.integration.peers import Nodes, require_tool, storescu, wait_for

pytestmark = pytest.mark.integration

SENDERS = 4
SLICES = 300


def test_four_concurrent_senders_while_a_job_runs(tmp_path: Path, nodes: Nodes) -> None:
    storescu_bin = require_tool("storescu")
    studies: list[PhantomStudy] = [
        generate_study(
            tmp_path / f"s{n}", seed=500 + n, lesions=2, slices=SLICES, rows=128, columns=128, segmentation="seg"
        )
        for n in range(SENDERS + 1)
    ]
    node = nodes.start("serve")
    first = studies[0]
    assert storescu(node.port, [*first.ct_files, first.seg_file]).returncode == 0

    def job_running() -> bool:
        return node.scalar(select(func.count(Job.id)).where(Job.state.in_(["running", "done"]))) > 0

    wait_for(job_running, 60, "the first study's job to start", interval=0.05)
    senders = [
        subprocess.Popen(
            [
                storescu_bin,
                "-R",
                "-aet",
                f"MODALITY{n}",
                "-aec",
                node.ae_title,
                "127.0.0.1",
                str(node.port),
                *map(str, study.ct_files),
                str(study.seg_file),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for n, study in enumerate(studies[1:], start=1)
    ]
    for proc in senders:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode()[-2000:]
    assert node.scalar(select(func.count(Instance.id))) == (SENDERS + 1) * (SLICES + 1)

    def all_done() -> bool:
        states = node.scalars(select(Job.state))
        return len(states) == SENDERS + 1 and all(s == "done" for s in states)

    wait_for(all_done, 600, "every study to be processed")
    assert node.scalar(select(func.count(Study.id))) == SENDERS + 1
    assert node.stop() == 0
