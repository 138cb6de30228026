"""Delivery to a PACS that goes away and comes back, STOW-RS with credentials, dead letters and retry.

Orthanc stands in for the PACS. What is proved here:

* Orthanc stopped while results wait for delivery: the node keeps receiving and processing new
  studies, retries with backoff, and once Orthanc is back every result is there exactly once.
  A forced re-run of a job, a re-send of the same results, and the same study processed again by a
  node with an empty state all leave Orthanc with the same SOP Instance UIDs and counts.
* STOW-RS (Orthanc's DICOMweb plugin) with an Authorization header from an environment variable:
  results arrive; a destination with wrong credentials fails on its own (401), goes dead after
  ``max_age_hours``, and ``pacs-agent send retry`` delivers it once the credentials are fixed. The
  secret never appears in the node's log or audit events.
* Every SR and Secondary Capture that arrives passes ``dciodvfy`` without errors.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select, update

from inference.phantom import PhantomStudy
from pacs_agent.db.tables import Delivery, Event, Job, Result, Study, utcnow
from tests.integration.peers import Node, Nodes, Orthanc, require_tool, storescu, wait_for
from tests.integration.phantoms import Phantoms

pytestmark = pytest.mark.integration

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SC_CLASSES = {"1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.4"}


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def studies(phantoms: Phantoms) -> tuple[PhantomStudy, PhantomStudy]:
    return (
        phantoms.study(seed=31, lesions=2, slices=30, rows=96, columns=96),
        phantoms.study(seed=32, lesions=1, slices=30, rows=96, columns=96),
    )


def deliveries(node: Node, study_uid: str | None = None) -> list[tuple]:
    """``(id, destination, state, attempts, last_error, sop_instance_uid)`` of the node's deliveries."""
    statement = (
        select(
            Delivery.id,
            Delivery.destination,
            Delivery.state,
            Delivery.attempts,
            Delivery.last_error,
            Result.sop_instance_uid,
        )
        .join(Result, Result.id == Delivery.result_id)
        .join(Study, Study.id == Result.study_id)
        .order_by(Delivery.id)
    )
    if study_uid is not None:
        statement = statement.where(Study.study_instance_uid == study_uid)
    return [tuple(row) for row in node.rows(statement)]


def result_uids(node: Node) -> set[str]:
    return set(node.scalars(select(Result.sop_instance_uid)))


def stored_in(orthanc: Orthanc) -> list[str]:
    """SOP Instance UIDs of every instance Orthanc holds (one entry per stored instance)."""
    found = orthanc.post("/tools/find", {"Level": "Instance", "Query": {}, "Expand": True})
    uids = [item["MainDicomTags"]["SOPInstanceUID"] for item in found]
    assert len(uids) == orthanc.get("/statistics")["CountInstances"]
    return uids


def dciodvfy(data: bytes, path: Path) -> tuple[list[str], list[str]]:
    """``(errors, warnings)`` that dicom3tools' dciodvfy reports for one object."""
    tool = require_tool("dciodvfy")
    path.write_bytes(data)
    out = subprocess.run([tool, "-new", str(path)], capture_output=True, text=True, check=False, timeout=60)
    lines = (out.stdout + out.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")], [line for line in lines if line.startswith("Warning")]


def check_objects_in(orthanc: Orthanc, expected_uids: set[str], tmp_path: Path) -> dict[str, int]:
    """Every expected object is in Orthanc, passes dciodvfy; returns the count per SOP class."""
    found = orthanc.post("/tools/find", {"Level": "Instance", "Query": {}, "Expand": True})
    classes: dict[str, int] = {}
    for item in found:
        if item["MainDicomTags"]["SOPInstanceUID"] not in expected_uids:
            continue
        data = orthanc.file(item["ID"])
        ds = dcmread(BytesIO(data))
        classes[str(ds.SOPClassUID)] = classes.get(str(ds.SOPClassUID), 0) + 1
        errors, _ = dciodvfy(data, tmp_path / f"{item['ID']}.dcm")
        assert errors == [], f"{ds.SOPClassUID} {ds.SeriesDescription}:\n" + "\n".join(errors)
    return classes


def pacs_agent_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pacs_agent", *args], capture_output=True, text=True, check=False, timeout=60, env=env
    )


# ---------------------------------------------------------------- DIMSE: the PACS goes down and comes back


def test_pacs_down_then_up_every_result_exactly_once(
    orthanc: Orthanc, nodes: Nodes, studies: tuple[PhantomStudy, PhantomStudy], tmp_path: Path
) -> None:
    a, b = studies
    node = nodes.new(extra_config=orthanc.destination_toml())
    orthanc.start()
    node.start("serve")
    orthanc.stop()  # the PACS goes down before any result exists

    assert storescu(node.port, [*a.ct_files, a.seg_file]).returncode == 0

    def retried(study_uid: str) -> bool:
        rows = deliveries(node, study_uid)
        return bool(rows) and all(r[2] == "pending" and r[3] >= 2 for r in rows)

    wait_for(lambda: retried(a.study_instance_uid), 120, "deliveries of study A to be retried")
    assert all(r[4].startswith("cannot connect to 127.0.0.1:") for r in deliveries(node))

    # the node still receives and processes new studies while the PACS is down
    assert node.echo()
    assert storescu(node.port, [*b.ct_files, b.seg_file]).returncode == 0
    wait_for(lambda: retried(b.study_instance_uid), 120, "study B to be processed and its deliveries tried")
    states = node.rows(select(Job.state).order_by(Job.id))
    assert [s for (s,) in states] == ["done", "done"]

    orthanc.start()  # the PACS is back (same storage, same ports)
    wait_for(lambda: all(r[2] == "done" for r in deliveries(node)), 60, "every delivery to be done")
    expected = result_uids(node)
    assert len(expected) == len(deliveries(node)) == (len(a.lesions) + 2) + (len(b.lesions) + 2)
    in_pacs = stored_in(orthanc)
    assert sorted(in_pacs) == sorted(expected)  # every result, each exactly once
    classes = check_objects_in(orthanc, expected, tmp_path)
    assert classes.pop(SR_CLASS) == 2 and set(classes) <= SC_CLASSES and sum(classes.values()) == len(expected) - 2
    retry_events = node.rows(select(Event.kind).where(Event.kind == "delivery_retry"))
    assert len(retry_events) >= 2 * len(expected)

    # a forced re-run of job A: same UIDs, so no new results and nothing new in the PACS
    job_a = node.rows(
        select(Job.id).join(Study, Study.id == Job.study_id).where(Study.study_instance_uid == a.study_instance_uid)
    )[0][0]
    done_before = deliveries(node)
    before = utcnow()
    node.write(update(Job).where(Job.id == job_a).values(state="pending", not_before=before))
    wait_for(
        lambda: (
            (row := node.rows(select(Job.state, Job.finished_at).where(Job.id == job_a))[0])[0] == "done"
            and row[1] > before
        ),
        120,
        "the re-run of job A",
    )
    assert result_uids(node) == expected
    assert {r[0]: r[2:4] for r in deliveries(node)} == {r[0]: r[2:4] for r in done_before}  # nothing re-queued
    # ... and a re-send of every result (as after lost acknowledgements): Orthanc keeps one copy each
    attempts = {r[0]: r[3] for r in deliveries(node)}
    node.write(update(Delivery).values(state="pending", next_attempt_at=utcnow()))
    wait_for(lambda: all(r[2] == "done" and r[3] == attempts[r[0]] + 1 for r in deliveries(node)), 60, "the re-send")
    assert sorted(stored_in(orthanc)) == sorted(expected)

    # the same study processed again from scratch by a node with an empty state: the same UIDs
    assert node.stop() == 0
    fresh = nodes.new("fresh", extra_config=orthanc.destination_toml())
    fresh.start("serve")
    assert storescu(fresh.port, [*a.ct_files, a.seg_file]).returncode == 0
    wait_for(lambda: (rows := deliveries(fresh)) and all(r[2] == "done" for r in rows), 120, "the fresh node")
    assert result_uids(fresh) <= expected and len(result_uids(fresh)) == len(a.lesions) + 2
    assert sorted(stored_in(orthanc)) == sorted(expected)


# ---------------------------------------------------------------- STOW-RS


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_stowrs_with_credentials_dead_letter_and_retry(
    nodes: Nodes, studies: tuple[PhantomStudy, PhantomStudy], tmp_path: Path
) -> None:
    a, _ = studies
    good, wrong = basic("pacs-agent", "correct horse"), basic("pacs-agent", "wrong horse")
    web = Orthanc(tmp_path / "orthanc-web", plugins=["dicomweb"], users={"pacs-agent": "correct horse"})
    web.start()
    try:
        config = (
            f'[[destinations]]\nname = "web"\ntype = "stowrs"\nurl = "{web.dicomweb_url}"\n'
            'auth_header_env = "STOW_AUTH_WEB"\n'
            f'[[destinations]]\nname = "web2"\ntype = "stowrs"\nurl = "{web.dicomweb_url}/"\n'
            'auth_header_env = "STOW_AUTH_WEB2"\ntimeout_seconds = 10\n'
        )
        node = nodes.new(extra_config=config)
        # web2's credentials are wrong; deliveries give up after 7 s
        env = {"STOW_AUTH_WEB": good, "STOW_AUTH_WEB2": wrong, "PACS_AGENT__DELIVERY__MAX_AGE_HOURS": "0.002"}
        node.start("serve", env=env)
        assert storescu(node.port, [*a.ct_files, a.seg_file]).returncode == 0
        expected_count = len(a.lesions) + 2

        def by_destination(name: str) -> list[tuple]:
            return [r for r in deliveries(node) if r[1] == name]

        wait_for(
            lambda: len(by_destination("web")) == expected_count and all(r[2] == "done" for r in by_destination("web")),
            120,
            "STOW-RS deliveries to web",
        )
        expected = result_uids(node)
        assert sorted(stored_in(web)) == sorted(expected)
        classes = check_objects_in(web, expected, tmp_path)
        assert classes.pop(SR_CLASS) == 1 and sum(classes.values()) == expected_count - 1

        # web2: refused (401), retried, then dead with the reason
        wait_for(lambda: all(r[2] == "dead" for r in by_destination("web2")), 60, "web2 deliveries to go dead")
        for row in by_destination("web2"):
            assert row[3] >= 2
            assert row[4] == (
                "HTTP 401: not authorised (check the Authorization value in $STOW_AUTH_WEB2) - not confirmed as stored"
            )
        listing = pacs_agent_cli("send", "list", "--state", "dead", "--config", str(node.config), "--json")
        assert listing.returncode == 0, listing.stderr
        assert sorted(r["id"] for r in json.loads(listing.stdout)) == [r[0] for r in by_destination("web2")]

        # the operator fixes the credentials, restarts, and requeues the dead deliveries
        assert node.stop() == 0
        node.start("serve", env={**env, "STOW_AUTH_WEB2": good})
        retry = pacs_agent_cli("send", "retry", "--destination", "web2", "--config", str(node.config))
        assert retry.returncode == 0, retry.stderr
        assert retry.stdout.startswith(f"requeued {expected_count} delivery(ies): ")
        wait_for(lambda: all(r[2] == "done" for r in by_destination("web2")), 60, "web2 after the retry")
        assert all(r[3] >= 3 for r in by_destination("web2"))  # attempts were kept
        assert sorted(stored_in(web)) == sorted(expected)  # the second destination's copy is the same instances
        requeued = node.rows(select(Event.detail).where(Event.kind == "delivery_requeued"))
        assert len(requeued) == expected_count and all("was dead after" in d for (d,) in requeued)

        # the secret is in no log line and no event
        details = " ".join(d or "" for (d,) in node.rows(select(Event.detail)))
        for secret in (good, wrong, "correct horse", "wrong horse"):
            assert secret not in node.log.read_text()
            assert secret not in details
        assert node.stop() == 0
    finally:
        web.stop()
