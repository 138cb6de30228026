"""Every operations command against SQLite and against a real PostgreSQL, with the same data.

A study is received, scheduled, run (results and an outbox row recorded), and then each command
that reads or changes the database is run through :func:`pacs_agent.cli.main` with a
configuration whose ``[database] url`` names the backend. What the commands print must be the
same story on both (``status --json`` once crashed on PostgreSQL: its sums came back as Decimal).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import select

from pacs_agent.cli import main
from pacs_agent.config import load_settings
from pacs_agent.db import Database
from pacs_agent.db.tables import Delivery, Job, Result
from pacs_agent.jobs import queue
from tests.unit.test_cli_ops import SECRET_PATIENT_ID, STUDY, receive_ready_study


@pytest.fixture(params=["sqlite", "postgresql"])
def config(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A configuration file on SQLite (in the state dir) or on its own fresh PostgreSQL database."""
    lines = ["[storage]", f'state_dir = "{tmp_path / "state"}"', ""]
    if request.param == "postgresql":
        lines += ["[database]", f'url = "{request.getfixturevalue("postgres_url")}"', ""]
    lines += ["[[destinations]]", 'name = "pacs"', 'ae_title = "PACS"', 'host = "127.0.0.1"', "port = 11112"]
    path = tmp_path / "pacs-agent.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _processed_study(config: Path) -> tuple[int, int]:
    """Receive a study, run its job to ``done`` with one result and one delivery; a second study fails."""
    db = Database(load_settings(config, environ={}).database_url)
    try:
        receive_ready_study(db)
        with db.session() as session, session.begin():
            claimed = queue.claim_next(session, "hostA:1")
            assert claimed is not None
            result = Result(
                job_id=claimed.id,
                study_id=claimed.study_id,
                kind="sr",
                method=claimed.method,
                sop_instance_uid=f"{STUDY}.77.1",
                series_instance_uid=f"{STUDY}.77",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.88.22",
                path="sr.dcm",
                algorithm_name="radiomics",
                algorithm_version="1.0",
            )
            session.add(result)
            session.flush()
            dead = Delivery(result_id=result.id, destination="pacs", state="dead", attempts=4, last_error="refused")
            session.add(dead)
            queue.complete(session, claimed.id, "1 lesion", duration_seconds=2.5)
        receive_ready_study(db, "1.2.826.0.1.3680043.10.99.2")
        with db.session() as session, session.begin():
            failing = queue.claim_next(session, "hostB:2")
            assert failing is not None
            queue.fail(session, failing.id, "segment 1 is empty", retryable=False, retry_delay_seconds=0)
        with db.session() as session:
            delivery = session.execute(select(Delivery.id)).scalar_one()
        return failing.id, delivery
    finally:
        db.dispose()


def test_every_command_reads_and_acts_on_either_backend(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    failed_job, delivery = _processed_study(config)
    cfg = ["--config", str(config)]

    assert main(["config", "check", *cfg]) == 0
    assert "configuration OK" in capsys.readouterr().out
    assert main(["status", "--json", *cfg]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["jobs_by_state"] == {"done": 1, "failed": 1}
    done = next(s for s in status["studies"] if s["study_instance_uid"] == STUDY)
    assert (done["state"], done["instances"], done["duplicates"], done["size_bytes"]) == ("done", 4, 1, 4000)
    assert [(j["state"], j["worker_id"], j["attempts"]) for j in done["jobs"]] == [("done", "hostA:1", 1)]
    assert done["results"] == [{"kind": "sr", "method": "radiomics", "algorithm_version": "1.0", "count": 1}]
    assert [d["state"] for d in done["deliveries"]] == ["dead"]

    assert main(["status", *cfg]) == 0
    text = capsys.readouterr().out
    assert f"study {STUDY}  [done]" in text and "segment 1 is empty" in text
    assert "4 instance(s) in 2 series, 1 duplicate(s) kept once" in text

    assert main(["events", "--json", "--study", STUDY, *cfg]) == 0
    kinds = [e["kind"] for e in json.loads(capsys.readouterr().out)]
    assert kinds[-2:] == ["job_started", "job_done"]
    assert main(["events", "--level", "error", *cfg]) == 0
    assert "job_failed" in capsys.readouterr().out

    assert main(["send", "list", "--json", *cfg]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["id"], r["state"], r["attempts"]) for r in rows] == [(delivery, "dead", 4)]
    assert main(["send", "list", *cfg]) == 0
    assert "dead" in capsys.readouterr().out
    assert main(["send", "retry", str(delivery), *cfg]) == 0
    capsys.readouterr()

    assert main(["retry", str(failed_job), *cfg]) == 0
    assert "is pending again" in capsys.readouterr().out
    assert main(["retry", "--study", STUDY, *cfg]) == 0
    assert "will be evaluated again" in capsys.readouterr().out

    assert main(["status", "--json", *cfg]) == 0
    after = json.loads(capsys.readouterr().out)
    assert after["jobs_by_state"] == {"done": 1, "pending": 1}
    everything = json.dumps(after) + json.dumps(status) + text
    assert SECRET_PATIENT_ID not in everything

    db = Database(load_settings(config, environ={}).database_url)
    try:
        with db.session() as session:
            assert session.execute(select(Delivery.state)).scalar_one() == "pending"
            assert session.get(Job, failed_job).state == "pending"  # type: ignore[union-attr]
    finally:
        db.dispose()
