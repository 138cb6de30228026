"""Health checks, worker heartbeat files, the Prometheus exposition and the HTTP endpoint."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import stat
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests

from pacs_agent.config import Settings, settings_from_mapping
from pacs_agent.db import Database
from pacs_agent.db.tables import Delivery, Event, Instance, Job, Result, Series, Study, utcnow
from pacs_agent.health import HealthMonitor, HealthServer, WorkerHeartbeat, read_worker_heartbeats
from pacs_agent.metrics import Exposition
from tests.ports import free_port

_SAMPLE = re.compile(
    r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\]|\\.)*",?)*)\})?'
    r" (?P<value>[-+]?(?:[0-9.]+(?:e[-+]?[0-9]+)?|Inf|NaN))$"
)
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
Metrics = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_prometheus(text: str) -> Metrics:
    """Parse the text format strictly: every line is HELP, TYPE or a sample of a declared family."""
    assert text.endswith("\n")
    samples: Metrics = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            assert name not in types, f"family declared twice: {name}"
            types[name] = kind
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a Prometheus sample line: {line!r}"
        name = match["name"]
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
        assert family in types, f"sample of an undeclared family: {line!r}"
        labels = frozenset(
            (k, v.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\"))
            for k, v in _LABEL.findall(match["labels"] or "")
        )
        key = (name, labels)
        assert key not in samples, f"duplicate sample: {line!r}"
        samples[key] = float(match["value"])
    return samples


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics[(name, frozenset(labels.items()))]


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[Settings, Database]]:
    settings = settings_from_mapping(
        {
            "storage": {"state_dir": str(tmp_path / "state"), "min_free_mb": 10},
            "jobs": {"lease_seconds": 60},
            "destinations": [
                {"name": "pacs", "ae_title": "PACS", "host": "10.0.0.5", "port": 104},
                {"name": "archive", "ae_title": "ARCH", "host": "10.0.0.6", "port": 104},
            ],
        }
    )
    settings.storage.spool_dir.mkdir(parents=True)
    db = Database(settings.database_url)
    yield settings, db
    db.dispose()


@pytest.fixture
def monitor(node: tuple[Settings, Database]) -> Iterator[HealthMonitor]:
    monitor = HealthMonitor(node[0])
    monitor.free_bytes = lambda: 500 * 1024 * 1024
    yield monitor
    monitor.close()


def frozen_datetime(at: datetime) -> type[datetime]:
    """A ``datetime`` class whose ``now()`` is always ``at``, for a module that reads the clock with it."""

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):  # type: ignore[override]
            return at.astimezone(tz or UTC)

    return Frozen


def add_study(db: Database, uid: str = "1.2.3", state: str = "receiving") -> int:
    with db.session() as session, session.begin():
        study = Study(study_instance_uid=uid, state=state)
        session.add(study)
        session.flush()
        return study.id


def add_job(
    db: Database,
    study_id: int,
    state: str,
    *,
    seconds: float | None = None,
    age: float = 0,
    now: datetime | None = None,
) -> None:
    now = now or utcnow()
    with db.session() as session, session.begin():
        job = Job(
            study_id=study_id, method="radiomics", state=state, inputs="{}", created_at=now - timedelta(seconds=age)
        )
        if seconds is not None:
            job.started_at = now - timedelta(seconds=seconds)
            job.finished_at = now
        session.add(job)


def add_event(db: Database, kind: str, **fields: object) -> None:
    with db.session() as session, session.begin():
        session.add(Event(kind=kind, **fields))


# -- heartbeat files --------------------------------------------------------------------------


def test_heartbeat_file_is_written_private_rate_limited_and_removed(tmp_path: Path) -> None:
    beat = WorkerHeartbeat(tmp_path, "host:123")
    beat.beat("idle")
    assert beat.path == tmp_path / "workers" / "host-123.alive"
    record = json.loads(beat.path.read_text())
    assert record["worker_id"] == "host:123"
    assert record["activity"] == "idle"
    assert stat.S_IMODE(beat.path.stat().st_mode) == 0o600
    os.utime(beat.path, (1, 1))
    beat.last_beat = -math.inf  # as if the worker had never beaten
    beat.beat("idle")  # same activity within HEARTBEAT_SECONDS: liveness only, no rewrite
    assert beat.path.stat().st_mtime == 1
    assert math.isfinite(beat.seconds_since_beat())  # the liveness the watchdog reads was refreshed
    beat.beat("job 7")  # new activity: rewritten at once
    assert json.loads(beat.path.read_text())["activity"] == "job 7"
    [state] = read_worker_heartbeats(tmp_path, now=beat.path.stat().st_mtime + 2)
    assert (state.worker_id, state.activity) == ("host:123", "job 7")
    assert state.age_seconds == 2
    beat.remove()
    assert read_worker_heartbeats(tmp_path) == []


def test_heartbeat_reader_skips_garbage_and_prunes_very_old_files(tmp_path: Path) -> None:
    WorkerHeartbeat(tmp_path, "a:1").beat()
    old = WorkerHeartbeat(tmp_path, "b:2")
    old.beat()
    os.utime(old.path, (time.time() - 30 * 24 * 3600,) * 2)
    (tmp_path / "workers" / "junk.alive").write_text("{not json")
    states = read_worker_heartbeats(tmp_path)
    assert [s.worker_id for s in states] == ["a:1"]
    assert not old.path.exists()


def test_heartbeat_of_an_unwritable_state_dir_is_only_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with caplog.at_level(logging.WARNING):
        WorkerHeartbeat(blocker, "a:1").beat()
    assert "cannot write the worker heartbeat" in caplog.text


# -- checks -----------------------------------------------------------------------------------


def test_fresh_node_is_healthy(monitor: HealthMonitor) -> None:
    report = monitor.report()
    assert report.ok, report.reasons
    body = report.as_json()
    assert body["status"] == "ok"
    assert set(body["checks"]) == {"database", "workers", "spool", "destination pacs", "destination archive"}


def test_spool_below_watermark_is_unhealthy(monitor: HealthMonitor) -> None:
    monitor.free_bytes = lambda: 5 * 1024 * 1024
    report = monitor.report()
    assert not report.ok
    assert any("below [storage] min_free_mb = 10" in r and r.startswith("spool:") for r in report.reasons)


def test_waiting_job_needs_a_live_worker(
    node: tuple[Settings, Database], monitor: HealthMonitor, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, db = node
    add_job(db, add_study(db, state="queued"), "pending")
    report = monitor.report()
    assert not report.ok
    assert any("1 job(s) waiting and no worker alive (no heartbeat ever" in r for r in report.reasons)
    beat = WorkerHeartbeat(settings.storage.state_dir, "host:1")
    beat.beat()
    assert monitor.report().ok
    frozen = time.time()  # the monitor's clock stands still: the age is exactly what the file says
    monkeypatch.setattr("pacs_agent.health.time", SimpleNamespace(time=lambda: frozen, monotonic=time.monotonic))
    os.utime(beat.path, (frozen - 61,) * 2)  # older than [jobs] lease_seconds = 60
    assert any("newest heartbeat 61 s ago" in r for r in monitor.report().reasons)


def test_last_delivery_attempt_decides_destination_health(
    node: tuple[Settings, Database], monitor: HealthMonitor
) -> None:
    _, db = node
    failed = {"ae_title": "PACS", "peer": "10.0.0.5:104", "level": "WARNING"}
    add_event(db, "delivery_retry", detail="pacs: attempt 1: association rejected", **failed)
    add_event(db, "delivery_retry", detail="archive: attempt 1: refused", ae_title="PACS", peer="10.0.0.5:104")
    report = monitor.report()
    [reason] = [r for r in report.reasons if r.startswith("destination")]
    assert reason.startswith("destination pacs: last delivery attempt failed at")
    assert reason.endswith("attempt 1: association rejected")
    assert report.as_json()["checks"]["destination archive"]["ok"]  # the event matched another AE
    add_event(db, "delivered", detail="pacs: sr.dcm: Success", ae_title="PACS", peer="10.0.0.5:104")
    assert monitor.report().ok


def test_unreachable_database_is_unhealthy(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    settings = settings_from_mapping(
        {"storage": {"state_dir": str(tmp_path)}, "database": {"url": f"sqlite:///{blocker}/nope/db.sqlite"}}
    )
    monitor = HealthMonitor(settings, alive=lambda: False)
    try:
        report = monitor.report()
        assert not report.ok
        assert any(r.startswith("database: not reachable: OperationalError") for r in report.reasons)
        assert "loops: a loop is stuck" in report.reasons
        assert "pacs_agent_healthy 0" in monitor.metrics()  # still answers, without database metrics
    finally:
        monitor.close()


# -- metrics ----------------------------------------------------------------------------------


def test_exposition_escapes_and_formats() -> None:
    out = Exposition()
    out.add("x_total", "counter", "help with \\ backslash", [({"a": 'q"uote\\back\nline'}, 3), ({}, 0.25)])
    out.add("h_seconds", "histogram", "h", [({"le": "1"}, 1), ({"le": "+Inf"}, 2), ({"__suffix__": "_sum"}, 1.5)])
    text = out.render()
    assert 'x_total{a="q\\"uote\\\\back\\nline"} 3\n' in text
    assert "x_total 0.25\n" in text
    assert "# HELP x_total help with \\\\ backslash\n" in text
    assert 'h_seconds_bucket{le="+Inf"} 2\n' in text
    assert "h_seconds_sum 1.5\n" in text
    metrics = parse_prometheus(text)
    assert value(metrics, "x_total", a='q"uote\\back\nline') == 3


def test_metrics_count_what_the_database_holds(
    node: tuple[Settings, Database], monitor: HealthMonitor, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, db = node
    now = utcnow()
    study = add_study(db, state="done")
    add_study(db, "1.2.4", state="incomplete")
    with db.session() as session, session.begin():
        series = Series(study_id=study, series_instance_uid="1.2.3.1", modality="CT")
        session.add(series)
        session.flush()
        for n in range(3):
            session.add(
                Instance(
                    series_id=series.id,
                    sop_instance_uid=f"1.2.3.1.{n}",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    path=f"x/{n}.dcm",
                    size_bytes=10,
                    duplicates=2 if n == 0 else 0,
                )
            )
    for seconds in (0.5, 4.0, 700.0):
        add_job(db, study, "done", seconds=seconds)
    add_job(db, study, "pending", age=90, now=now)
    with db.session() as session, session.begin():
        job_id = session.query(Job.id).filter(Job.state == "done").first()[0]
        result = Result(
            job_id=job_id,
            study_id=study,
            kind="sr",
            method="radiomics",
            sop_instance_uid="1.9.1",
            series_instance_uid="1.9",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
            path="r.dcm",
            algorithm_name="a",
            algorithm_version="1",
        )
        session.add(result)
        session.flush()
        session.add(Delivery(result_id=result.id, destination="pacs", state="pending", created_at=utcnow()))
    add_event(db, "store_refused", status=0xA700, detail="disk")
    add_event(db, "store_refused", status=0xA700, detail="disk")
    add_event(db, "store_refused", status=0xC210, detail="garbage")
    add_event(db, "store_refused", status=0xFFFF, detail="odd")
    add_event(db, "association_rejected", detail="host")
    add_event(db, "delivered", detail="pacs: r.dcm: Success", ae_title="PACS", peer="10.0.0.5:104")

    monkeypatch.setattr("pacs_agent.metrics.datetime", frozen_datetime(now))  # the metrics' clock stands still
    metrics = parse_prometheus(monitor.metrics())
    assert value(metrics, "pacs_agent_instances_received_total", outcome="stored") == 3
    assert value(metrics, "pacs_agent_instances_received_total", outcome="duplicate") == 2
    refused = "pacs_agent_instances_refused_total"
    assert value(metrics, refused, reason="out_of_resources", status="0xA700") == 2
    assert value(metrics, refused, reason="cannot_understand", status="0xC210") == 1
    assert value(metrics, refused, reason="other", status="0xFFFF") == 1
    assert value(metrics, "pacs_agent_associations_rejected_total") == 1
    assert value(metrics, "pacs_agent_studies", state="done") == 1
    assert value(metrics, "pacs_agent_studies", state="incomplete") == 1
    assert value(metrics, "pacs_agent_studies", state="failed") == 0
    assert value(metrics, "pacs_agent_jobs", state="done") == 3
    assert value(metrics, "pacs_agent_jobs", state="pending") == 1
    assert value(metrics, "pacs_agent_oldest_pending_job_age_seconds") == 90
    assert value(metrics, "pacs_agent_deliveries", destination="pacs", state="pending") == 1
    assert value(metrics, "pacs_agent_deliveries", destination="archive", state="done") == 0
    assert value(metrics, "pacs_agent_destination_up", destination="pacs") == 1
    assert ("pacs_agent_destination_up", frozenset({("destination", "archive")})) not in metrics
    hist = "pacs_agent_job_duration_seconds"
    buckets = {le: value(metrics, f"{hist}_bucket", method="radiomics", le=le) for le in ("1", "5", "600", "3600")}
    assert buckets == {"1": 1, "5": 2, "600": 2, "3600": 3}
    assert value(metrics, f"{hist}_bucket", method="radiomics", le="+Inf") == 3
    assert value(metrics, f"{hist}_count", method="radiomics") == 3
    assert value(metrics, f"{hist}_sum", method="radiomics") == pytest.approx(704.5, abs=0.05)
    assert value(metrics, "pacs_agent_spool_free_bytes") == 500 * 1024 * 1024
    assert value(metrics, "pacs_agent_spool_min_free_bytes") == 10 * 1024 * 1024
    assert value(metrics, "pacs_agent_healthy") == 0  # a job waits and no worker is alive
    assert value(metrics, "pacs_agent_health_check", check="workers") == 0


# -- HTTP ---------------------------------------------------------------------------------------


def _with_port(settings: Settings, port: int) -> Settings:
    data = settings.model_dump(mode="json")
    data["observability"] = {"http_host": "127.0.0.1", "http_port": port}
    return settings_from_mapping(data)


def test_http_endpoint(node: tuple[Settings, Database]) -> None:
    settings = _with_port(node[0], free_port())
    server = HealthServer(settings)
    assert server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        with requests.Session() as http:
            health = http.get(f"{base}/healthz", timeout=5)
            assert health.status_code == 200
            assert health.json()["status"] == "ok"
            metrics = http.get(f"{base}/metrics", timeout=5)
            assert metrics.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            assert value(parse_prometheus(metrics.text), "pacs_agent_healthy") == 1
            assert http.get(f"{base}/other", timeout=5).status_code == 404
            server.monitor.free_bytes = lambda: 0
            sick = http.get(f"{base}/healthz", timeout=5)
            assert sick.status_code == 503
            assert sick.json()["reasons"][0].startswith("spool: 0 MB free")
    finally:
        server.stop()


def test_http_endpoint_disabled_or_port_taken(
    node: tuple[Settings, Database], caplog: pytest.LogCaptureFixture
) -> None:
    disabled = HealthServer(_with_port(node[0], 0))
    assert not disabled.start()
    disabled.stop()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = HealthServer(_with_port(node[0], taken.getsockname()[1]))
        with caplog.at_level(logging.ERROR):
            assert not server.start()
        server.stop()
    assert "cannot serve /healthz and /metrics" in caplog.text
