"""The baseline lives only in the PACS: the node finds it (C-FIND), fetches it (C-MOVE / C-GET), pairs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from inference.phantom import PhantomStudy, generate_follow_up, generate_study
from pacs_agent.db import Database
from pacs_agent.db.tables import Event, Job, Pairing, Study
from tests.integration.peers import Node, Orthanc, storescu, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[PhantomStudy, PhantomStudy]:
    root = tmp_path_factory.mktemp("pair")
    baseline = generate_study(
        root / "baseline", seed=31, lesions=2, slices=40, rows=128, columns=128, segmentation="seg"
    )
    return baseline, generate_follow_up(baseline, root / "followup", shrink=0.6)


@pytest.fixture(params=["move", "get"])
def pacs_and_node(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Orthanc, Node]]:
    orthanc = Orthanc(tmp_path / "orthanc")
    node = Node(tmp_path / "node")
    node.extra_config = (
        '[jobs]\nmethods = ["radiomics", "response"]\n'
        f'[[sources]]\nname = "pacs"\nae_title = "{orthanc.ae_title}"\nhost = "127.0.0.1"\n'
        f'port = {orthanc.dicom_port}\nretrieve = "{request.param}"\n'
    )
    orthanc.add_modality("pacsagent", node.ae_title, node.port)
    orthanc.start()
    try:
        yield orthanc, node
    finally:
        if node.process is not None:
            node.stop()
        orthanc.stop()


def pairing_state(node: Node, followup_uid: str) -> tuple[str, str, str | None] | None:
    db = Database(node.database_url(), run_migrations=False)
    try:
        with db.session() as session:
            row = session.execute(
                select(Pairing.state, Pairing.reason, Pairing.source)
                .join(Study, Study.id == Pairing.followup_study_id)
                .where(Study.study_instance_uid == followup_uid)
            ).first()
    finally:
        db.dispose()
    return tuple(row) if row else None


def test_followup_fetches_its_baseline_from_the_pacs(
    pacs_and_node: tuple[Orthanc, Node], pair: tuple[PhantomStudy, PhantomStudy]
) -> None:
    orthanc, node = pacs_and_node
    baseline, followup = pair
    orthanc.upload([*baseline.ct_files, baseline.seg_file])
    node.start("scp")  # receive, schedule, pair; the jobs themselves are not needed here
    assert storescu(node.port, [*followup.ct_files, followup.seg_file]).returncode == 0
    state = wait_for(
        lambda: (s := pairing_state(node, followup.study_instance_uid)) and s[0] in ("paired", "failed", "none") and s,
        120,
        "the pairing to finish",
    )
    assert state[0] == "paired", state
    assert state[2] == "local"  # found locally once the retrieved baseline became ready
    db = Database(node.database_url(), run_migrations=False)
    with db.session() as session:
        baseline_row = session.execute(
            select(Study).where(Study.study_instance_uid == baseline.study_instance_uid)
        ).scalar_one()
        assert baseline_row.ct_series_instance_uid == baseline.ct_series_instance_uid
        jobs = (
            session.execute(
                select(Job.method)
                .join(Study, Study.id == Job.study_id)
                .where(Study.study_instance_uid == followup.study_instance_uid)
            )
            .scalars()
            .all()
        )
        assert sorted(jobs) == ["radiomics", "response"]
        details = " ".join(e.detail or "" for e in session.execute(select(Event)).scalars())
    db.dispose()
    assert "asking pacs" in details
    assert "retrieving from pacs" in details
    assert f"{len(baseline.ct_files) + 1} instance(s) retrieved" in details


def test_no_baseline_anywhere_is_recorded(
    pacs_and_node: tuple[Orthanc, Node], pair: tuple[PhantomStudy, PhantomStudy]
) -> None:
    _, node = pacs_and_node
    _, followup = pair
    node.start("scp")
    assert storescu(node.port, [*followup.ct_files, followup.seg_file]).returncode == 0
    state = wait_for(
        lambda: (s := pairing_state(node, followup.study_instance_uid)) and s[0] in ("none", "failed") and s,
        60,
        "the pairing to give up",
    )
    assert state[0] == "none"
    assert "queried 1 source(s): no baseline study" in state[1]
