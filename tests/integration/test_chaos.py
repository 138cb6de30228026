"""Crash safety: the whole node is SIGKILLed at random moments while studies flow through it.

After the last restart every instance that was acknowledged with Success is in the spool and
the database, no temp file is left, and every study has exactly one set of results in Orthanc.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from inference.phantom import PhantomStudy, generate_study
from pacs_agent.config import Destination
from pacs_agent.db.tables import Delivery, Instance, Job
from pacs_agent.send.scu import store_files
from tests.integration.peers import Node, Nodes, Orthanc, wait_for

pytestmark = pytest.mark.integration

STUDIES = 10
KILLS = 3


class ChaosNode(Node):
    """The node in its own process group: a kill takes the scp, its receiving processes and its worker down."""

    receive_processes = 1

    def launch(self) -> None:
        self.write_config()
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pacs_agent", "serve", "--config", str(self.config)],
                stdout=out,
                stderr=out,
                start_new_session=True,
                env={k: v for k, v in os.environ.items() if not k.startswith("PACS_AGENT")}
                | {"PACS_AGENT__NODE__RECEIVE_PROCESSES": str(self.receive_processes)},
            )
        wait_for(self.listening, 60, "the node to listen")

    def kill_all(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.process = None


def sender(node: ChaosNode, studies: list[PhantomStudy], acknowledged: set[str], done: threading.Event) -> None:
    """A modality that re-sends whatever was not acknowledged, until everything is."""
    pending = [p for s in studies for p in (*s.ct_files, s.seg_file)]
    uid_of = {p: str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in pending}
    while pending:
        batch, pending = pending[:25], pending[25:]
        outcomes = store_files(
            Destination(name="node", ae_title=node.ae_title, host="127.0.0.1", port=node.port),
            batch,
            calling_ae_title="CHAOS",
            timeout_seconds=10,
        )
        for outcome in outcomes:
            if outcome.ok:
                acknowledged.add(uid_of[outcome.path])
            else:
                pending.append(outcome.path)
        if any(not o.ok for o in outcomes):
            time.sleep(0.5)
    done.set()


@pytest.mark.parametrize(("seed", "receive_processes"), [(1, 1), (2, 2)])
def test_random_kills_lose_nothing_and_duplicate_nothing(
    tmp_path: Path, orthanc: Orthanc, nodes: Nodes, seed: int, receive_processes: int
) -> None:
    rng = random.Random(seed)
    studies = [
        generate_study(
            tmp_path / f"s{n}", seed=1000 * seed + n, lesions=1, slices=20, rows=64, columns=64, segmentation="seg"
        )
        for n in range(STUDIES)
    ]
    node = nodes.add(ChaosNode(nodes.workdir("node")))
    node.receive_processes = receive_processes  # seed 2: the series arrive through two receiving processes
    node.extra_config = (
        orthanc.destination_toml("pacs") + "[jobs]\nlease_seconds = 10\nretry_delay_seconds = 1\nmax_attempts = 10\n"
    )
    orthanc.start()
    node.launch()
    acknowledged: set[str] = set()
    done = threading.Event()
    thread = threading.Thread(target=sender, args=(node, studies, acknowledged, done), daemon=True)
    thread.start()
    for _ in range(KILLS):  # kill during receiving, processing and delivering alike
        time.sleep(rng.uniform(0.5, 6.0))
        node.kill_all()
        time.sleep(rng.uniform(0.0, 1.0))
        node.launch()
    assert done.wait(240), "the sender could not deliver every instance"
    thread.join(10)

    def finished() -> bool:
        jobs = node.scalars(select(Job.state))
        deliveries = node.scalars(select(Delivery.state))
        return (
            len(jobs) >= STUDIES
            and all(s == "done" for s in jobs)
            and bool(deliveries)
            and all(s == "done" for s in deliveries)
        )

    wait_for(finished, 240, "every job and delivery to finish")
    stored = dict(node.rows(select(Instance.sop_instance_uid, Instance.path)))
    missing = acknowledged - set(stored)
    assert not missing, f"{len(missing)} acknowledged instance(s) lost"
    for uid in acknowledged:
        assert (node.state_dir / "spool" / stored[uid]).stat().st_size > 0
    assert not list((node.state_dir / "spool" / "tmp").glob("*.part"))
    srs = orthanc.instances_with_modality("SR")
    per_study: dict[str, int] = {}
    for sr in srs:
        per_study[sr["StudyInstanceUID"]] = per_study.get(sr["StudyInstanceUID"], 0) + 1
    assert per_study == {s.study_instance_uid: 1 for s in studies}, per_study
    captures = orthanc.instances_with_modality("OT")
    assert len(captures) == 2 * STUDIES  # a summary and one lesion page per study, once each
