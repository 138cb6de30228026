"""The baseline lives only in the PACS: the node finds it (C-FIND), fetches it (C-MOVE / C-GET), pairs."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from inference.phantom import PhantomStudy
from pacs_agent.db.tables import Event, Job, Pairing, Study
from tests.integration.peers import Node, Orthanc, storescu, wait_for
from tests.integration.phantoms import Phantoms

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pair(phantoms: Phantoms) -> tuple[PhantomStudy, PhantomStudy]:
    baseline = phantoms.study(seed=31, lesions=2, slices=40, rows=128, columns=128, segmentation="seg")
    return baseline, phantoms.follow_up(baseline, shrink=0.6)


@pytest.fixture(params=["move", "get"])
def pacs_node_config(request: pytest.FixtureRequest, orthanc: Orthanc) -> str:
    """The node asks Orthanc for baselines and retrieves them by C-MOVE, then by C-GET."""
    return '[jobs]\nmethods = ["radiomics", "response"]\n' + orthanc.source_toml("pacs", retrieve=request.param)


def pairing_state(node: Node, followup_uid: str) -> tuple[str, str, str | None] | None:
    rows = node.rows(
        select(Pairing.state, Pairing.reason, Pairing.source)
        .join(Study, Study.id == Pairing.followup_study_id)
        .where(Study.study_instance_uid == followup_uid)
    )
    return tuple(rows[0]) if rows else None


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
    [baseline_row] = node.scalars(select(Study).where(Study.study_instance_uid == baseline.study_instance_uid))
    assert baseline_row.ct_series_instance_uid == baseline.ct_series_instance_uid
    jobs = node.scalars(
        select(Job.method)
        .join(Study, Study.id == Job.study_id)
        .where(Study.study_instance_uid == followup.study_instance_uid)
    )
    assert sorted(jobs) == ["radiomics", "response"]
    details = " ".join(detail or "" for detail in node.scalars(select(Event.detail)))
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
