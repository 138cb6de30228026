"""``pacs-agent send list`` and ``send retry`` on a real database (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from pacs_agent.cli import main
from pacs_agent.db import Database
from pacs_agent.db.tables import Delivery, Event, Job, Result, Study, utcnow
from pacs_agent.send.cli import list_deliveries, retry_deliveries


def seed(db: Database) -> dict[str, int]:
    """Three results; deliveries to "pacs": done, dead, pending; to "archive": dead."""
    long_ago = utcnow() - timedelta(hours=100)
    with db.session() as session, session.begin():
        study = Study(study_instance_uid="1.2.3", patient_id="SECRET-PID")
        session.add(study)
        session.flush()
        job = Job(study_id=study.id, method="radiomics", inputs="{}", state="done")
        session.add(job)
        session.flush()
        ids = {}
        for n, (destination, state) in enumerate(
            [("pacs", "done"), ("pacs", "dead"), ("pacs", "pending"), ("archive", "dead")]
        ):
            result = Result(
                job_id=job.id,
                study_id=study.id,
                kind="sr" if n == 0 else "sc",
                method="radiomics",
                sop_instance_uid=f"1.2.3.9.{n}",
                series_instance_uid="1.2.3.9",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
                path=f"1.2.3/{n}.dcm",
                algorithm_name="pacs-agent radiomics",
                algorithm_version="0.1.0",
            )
            session.add(result)
            session.flush()
            delivery = Delivery(
                result_id=result.id,
                destination=destination,
                state=state,
                attempts=7 if state == "dead" else 1,
                created_at=long_ago,
                next_attempt_at=long_ago + timedelta(hours=200),
                last_error="cannot connect to 10.0.0.5:104" if state != "done" else None,
            )
            session.add(delivery)
            session.flush()
            ids[f"{destination}-{state}"] = delivery.id
    return ids


def test_list_filters(any_db: Database) -> None:
    ids = seed(any_db)
    rows = list_deliveries(any_db)
    assert [r["id"] for r in rows] == sorted(ids.values(), reverse=True)
    dead = list_deliveries(any_db, state="dead")
    assert {r["id"] for r in dead} == {ids["pacs-dead"], ids["archive-dead"]}
    assert dead[0]["last_error"] == "cannot connect to 10.0.0.5:104"
    assert [r["id"] for r in list_deliveries(any_db, state="dead", destination="archive")] == [ids["archive-dead"]]
    assert list_deliveries(any_db, limit=1)[0]["id"] == max(ids.values())


def test_retry_requeues_dead_keeps_attempts_and_records_an_event(any_db: Database) -> None:
    ids = seed(any_db)
    before = utcnow()
    report = retry_deliveries(any_db, destination="pacs")
    assert report.requeued == [ids["pacs-dead"]] and not report.skipped and not report.unknown
    with any_db.session() as session:
        delivery = session.get(Delivery, ids["pacs-dead"])
        assert delivery is not None
        assert delivery.state == "pending"
        assert delivery.attempts == 7  # kept
        assert before <= delivery.next_attempt_at <= utcnow()  # due now
        assert delivery.last_error == "cannot connect to 10.0.0.5:104"  # the reason stays until the next attempt
        other = session.get(Delivery, ids["archive-dead"])
        assert other is not None and other.state == "dead"  # another destination: untouched
        [event] = session.execute(select(Event).where(Event.kind == "delivery_requeued")).scalars().all()
        assert event.study_instance_uid == "1.2.3"
        assert event.detail == (
            f"pacs: delivery {ids['pacs-dead']} requeued (was dead after 7 attempt(s): cannot connect to 10.0.0.5:104)"
        )


def test_retry_by_id(any_db: Database) -> None:
    ids = seed(any_db)
    report = retry_deliveries(any_db, ids=[ids["pacs-done"], ids["pacs-pending"], ids["archive-dead"], 999])
    assert report.requeued == [ids["pacs-pending"], ids["archive-dead"]]
    assert report.skipped == {ids["pacs-done"]: "already delivered"}
    assert report.unknown == [999]
    with any_db.session() as session:
        pending = session.get(Delivery, ids["pacs-pending"])
        assert pending is not None and pending.next_attempt_at <= utcnow()  # made due now
        done = session.get(Delivery, ids["pacs-done"])
        assert done is not None and done.state == "done"


def test_cli(sqlite_db: Database, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ids = seed(sqlite_db)
    config = tmp_path / "node.toml"
    config.write_text(
        f'[database]\nurl = "{sqlite_db.engine.url}"\n'
        '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "10.0.0.5"\nport = 104\n'
    )
    assert main(["send", "list", "--config", str(config), "--state", "dead"]) == 0
    out = capsys.readouterr().out
    assert "cannot connect to 10.0.0.5:104" in out and "SECRET-PID" not in out
    assert f"{ids['pacs-dead']:>6}  pacs  dead" in out and f"{ids['archive-dead']:>6}  archive  dead" in out
    assert main(["send", "list", "--config", str(config), "--json"]) == 0
    assert {r["state"] for r in json.loads(capsys.readouterr().out)} == {"done", "dead", "pending"}

    assert main(["send", "retry", "--config", str(config), "--destination", "pacs"]) == 0
    assert capsys.readouterr().out == f"requeued 1 delivery(ies): {ids['pacs-dead']}\n"
    assert main(["send", "retry", "--config", str(config), str(ids["pacs-done"]), "4242"]) == 1
    captured = capsys.readouterr()
    assert f"{ids['pacs-done']}: not requeued (already delivered)" in captured.out
    assert "no delivery with id(s): 4242" in captured.err
    assert main(["send", "retry", "--config", str(config), "--destination", "archive"]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"requeued 1 delivery(ies): {ids['archive-dead']}\n"
    assert "destination 'archive' is not configured" in captured.err
    assert main(["send", "retry", "--config", str(config)]) == 0
    assert capsys.readouterr().out == "requeued 0 delivery(ies)\n"
