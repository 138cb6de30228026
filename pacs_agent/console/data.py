"""What each console page shows, as plain data (the JSON twins under ``/api/`` return exactly this).

Reuses the queries of the command line (:mod:`pacs_agent.status`, :mod:`pacs_agent.events_cli`,
:mod:`pacs_agent.send.cli`, :mod:`pacs_agent.health`) so that the console and ``pacs-agent status``
tell the same story. Only :func:`study_page` returns patient data (the patient ID), and only the
study page shows it.
"""

from __future__ import annotations

import json
import tomllib
import zipfile
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from inference.registry.files import MANIFEST, sha256_file
from inference.registry.package import list_packages
from pacs_agent.config import Settings
from pacs_agent.console.markdown import PNG_NAME
from pacs_agent.db import Database
from pacs_agent.db.tables import Delivery, Event, Instance, Job, Result, Series, Study
from pacs_agent.events_cli import EventQuery, query_events
from pacs_agent.health import HealthMonitor
from pacs_agent.pause import current_pause
from pacs_agent.send.cli import list_deliveries
from pacs_agent.status import study_status, unserved_queue_warnings, worker_status

STUDY_STATES = ("receiving", "waiting", "queued", "processing", "done", "failed", "skipped")
JOB_STATES = ("pending", "running", "done", "failed", "dead")
DELIVERY_STATES = ("pending", "done", "dead")
REDACTED = "(redacted)"


def _iso(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value is not None else None


def _counts(db: Database, column: Any) -> dict[str, int]:
    with db.read_session() as session:
        return {str(k): int(v) for k, v in session.execute(select(column, func.count()).group_by(column)).all()}


def _hours(now: datetime | None, hours: int) -> datetime:
    """Start of the first of the last ``hours`` whole hours (the current hour is the last)."""
    now = now or datetime.now(UTC)
    return now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1) - timedelta(hours=hours)


def _per_hour(start: datetime, hours: int, series: dict[str, list[datetime]]) -> list[dict[str, Any]]:
    buckets = {key: [0] * hours for key in series}
    for key, times in series.items():
        for at in times:
            index = int((at - start).total_seconds() // 3600)
            if 0 <= index < hours:
                buckets[key][index] += 1
    return [
        {"hour": _iso(start + timedelta(hours=i)), **{key: counts[i] for key, counts in buckets.items()}}
        for i in range(hours)
    ]


def instances_per_hour(db: Database, now: datetime | None = None, hours: int = 24) -> list[dict[str, Any]]:
    """Instances received in each of the last ``hours`` whole hours (oldest first), the current one last."""
    start = _hours(now, hours)
    with db.read_session() as session:
        times = session.execute(select(Instance.received_at).where(Instance.received_at >= start)).scalars().all()
    return _per_hour(start, hours, {"instances": list(times)})


def delivery_failures_per_hour(db: Database, now: datetime | None = None, hours: int = 24) -> list[dict[str, Any]]:
    """Failed sends per hour (oldest first): ``retry`` (will be tried again) and ``dead`` (gave up)."""
    start = _hours(now, hours)
    with db.read_session() as session:
        rows = session.execute(
            select(Event.kind, Event.at).where(Event.at >= start, Event.kind.in_(("delivery_retry", "delivery_dead")))
        ).all()
    return _per_hour(
        start,
        hours,
        {
            "retry": [at for kind, at in rows if kind == "delivery_retry"],
            "dead": [at for kind, at in rows if kind == "delivery_dead"],
        },
    )


def job_durations(db: Database, now: datetime | None = None, hours: int = 24) -> list[dict[str, Any]]:
    """Per method, the run time of the jobs done in the last ``hours``: count, median and longest (seconds)."""
    since = (now or datetime.now(UTC)) - timedelta(hours=hours)
    with db.read_session() as session:
        rows = session.execute(
            select(Job.method, Job.started_at, Job.finished_at).where(
                Job.state == "done", Job.finished_at >= since, Job.started_at.is_not(None)
            )
        ).all()
    per_method: dict[str, list[float]] = {}
    for method, started, finished in rows:
        if started is not None and finished is not None:
            per_method.setdefault(method, []).append(max((finished - started).total_seconds(), 0.0))
    out = []
    for method, seconds in sorted(per_method.items()):
        seconds.sort()
        middle = len(seconds) // 2
        median = seconds[middle] if len(seconds) % 2 else (seconds[middle - 1] + seconds[middle]) / 2
        out.append(
            {
                "method": method,
                "jobs": len(seconds),
                "median_seconds": round(median, 2),
                "max_seconds": round(seconds[-1], 2),
            }
        )
    return out


def overview(db: Database, settings: Settings) -> dict[str, Any]:
    """Health (as ``/healthz``), workers on every host, counts by state, and charts of the last 24 h.

    Workers, pending jobs per queue and the warning for a queue no running worker takes are those
    of ``pacs-agent status`` (:func:`pacs_agent.status.worker_status`). The charts: instances
    received and delivery failures per hour, job run times per method.
    """
    monitor = HealthMonitor(settings)
    try:
        health = monitor.report().as_json()
    finally:
        monitor.close()
    with db.read_session() as session:
        pause = current_pause(session)
        workers = worker_status(session, settings.jobs.lease_seconds)
        pending = session.execute(
            select(Job.queue, func.count(Job.id)).where(Job.state == "pending").group_by(Job.queue)
        ).all()
    pending_by_queue = {str(q): int(n) for q, n in pending}
    return {
        "paused": pause.as_json() if pause else None,
        "health": health,
        "workers": workers,
        "pending_by_queue": pending_by_queue,
        "queue_warnings": unserved_queue_warnings(pending_by_queue, workers),
        "studies_by_state": _counts(db, Study.state),
        "jobs_by_state": _counts(db, Job.state),
        "deliveries_by_state": _counts(db, Delivery.state),
        "instances_per_hour": instances_per_hour(db),
        "delivery_failures_per_hour": delivery_failures_per_hour(db),
        "job_durations": job_durations(db),
    }


def studies(
    db: Database,
    *,
    state: str | None = None,
    search: str | None = None,
    received_from: date | None = None,
    received_to: date | None = None,
    method: str | None = None,
    calling_ae: str | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """Studies, newest first, with their methods and the AE titles that sent them.

    ``search`` matches the Study Instance UID (or its start) or the accession number;
    ``received_from`` / ``received_to`` (UTC days, both included) the day the study's first
    instance arrived; ``method`` a study with a job of that method; ``calling_ae`` a study with an
    instance sent by that AE title.
    """
    query = select(Study).order_by(Study.last_received_at.desc(), Study.id.desc()).limit(limit)
    if state:
        query = query.where(Study.state == state)
    if search:
        term = search.strip()
        query = query.where(
            or_(Study.study_instance_uid.startswith(term, autoescape=True), Study.accession_number == term)
        )
    if received_from:
        query = query.where(Study.first_received_at >= datetime.combine(received_from, time(), UTC))
    if received_to:
        query = query.where(Study.first_received_at < datetime.combine(received_to + timedelta(days=1), time(), UTC))
    if method:
        query = query.where(select(Job.id).where(Job.study_id == Study.id, Job.method == method).exists())
    if calling_ae:
        query = query.where(
            select(Instance.id)
            .join(Series, Series.id == Instance.series_id)
            .where(Series.study_id == Study.id, Instance.calling_ae_title == calling_ae)
            .exists()
        )
    with db.read_session() as session:
        rows = session.execute(query).scalars().all()
        ids = [r.id for r in rows]
        counts = dict(
            session.execute(
                select(Series.study_id, func.count(Instance.id))
                .join(Instance, Instance.series_id == Series.id)
                .where(Series.study_id.in_(ids))
                .group_by(Series.study_id)
            ).all()
        )
        senders: dict[int, set[str]] = {}
        for study_id, ae in session.execute(
            select(Series.study_id, Instance.calling_ae_title)
            .join(Instance, Instance.series_id == Series.id)
            .where(Series.study_id.in_(ids), Instance.calling_ae_title.is_not(None))
            .distinct()
        ).all():
            senders.setdefault(study_id, set()).add(str(ae))
        methods: dict[int, set[str]] = {}
        for study_id, name in session.execute(
            select(Job.study_id, Job.method).where(Job.study_id.in_(ids)).distinct()
        ).all():
            methods.setdefault(study_id, set()).add(name)
        return [
            {
                "study_instance_uid": r.study_instance_uid,
                "state": r.state,
                "reason": r.state_reason,
                "study_date": r.study_date,
                "study_description": r.study_description,
                "first_received_at": _iso(r.first_received_at),
                "last_received_at": _iso(r.last_received_at),
                "instances": int(counts.get(r.id, 0)),
                "calling_ae_titles": sorted(senders.get(r.id, ())),
                "methods": sorted(methods.get(r.id, ())),
            }
            for r in rows
        ]


def calling_ae_titles(db: Database, limit: int = 200) -> list[str]:
    """The AE titles that have sent instances (for the Studies filter)."""
    with db.read_session() as session:
        rows = session.execute(
            select(Instance.calling_ae_title)
            .where(Instance.calling_ae_title.is_not(None))
            .distinct()
            .order_by(Instance.calling_ae_title)
            .limit(limit)
        ).scalars()
        return [str(r) for r in rows]


def study_page(db: Database, settings: Settings, study_instance_uid: str) -> dict[str, Any] | None:
    """Everything about one study, with its patient ID, results (ids for thumbnails) and events; None if unknown."""
    with db.read_session() as session:
        study = session.execute(
            select(Study).where(Study.study_instance_uid == study_instance_uid)
        ).scalar_one_or_none()
        if study is None:
            return None
        page = study_status(session, study)
        page.update(
            patient_id=study.patient_id,
            accession_number=study.accession_number,
            study_date=study.study_date,
            study_description=study.study_description,
        )
        results = session.execute(select(Result).where(Result.study_id == study.id).order_by(Result.id)).scalars().all()
        page["result_objects"] = [
            {
                "id": r.id,
                "job_id": r.job_id,
                "kind": r.kind,
                "method": r.method,
                "sop_instance_uid": r.sop_instance_uid,
                "algorithm": f"{r.algorithm_name} {r.algorithm_version}",
                "created_at": _iso(r.created_at),
                "stored": (settings.storage.results_dir / r.path).is_file(),
            }
            for r in results
        ]
    page["events"] = query_events(db, EventQuery(study_instance_uid=study_instance_uid, limit=500))
    return page


def result_file(db: Database, settings: Settings, study_instance_uid: str, result_id: int) -> tuple[str, Path] | None:
    """``(kind, path)`` of a result object of this study, None when there is no such result.

    The stored path is relative to ``[storage] state_dir``/results; one that would lead outside it
    counts as no result.
    """
    with db.read_session() as session:
        row = session.execute(
            select(Result.kind, Result.path)
            .join(Study, Study.id == Result.study_id)
            .where(Result.id == result_id, Study.study_instance_uid == study_instance_uid)
        ).first()
    if row is None:
        return None
    root = settings.storage.results_dir.resolve()
    path = (root / row[1]).resolve()
    return (row[0], path) if path.is_relative_to(root) else None


def queue(db: Database, *, state: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
    """Jobs, newest first (not yet done ones unless ``state`` says otherwise)."""
    query = select(Job, Study.study_instance_uid).join(Study, Study.id == Job.study_id).order_by(Job.id.desc())
    query = query.where(Job.state == state) if state else query.where(Job.state != "done")
    with db.read_session() as session:
        rows = session.execute(query.limit(limit)).all()
        return [
            {
                "id": j.id,
                "study_instance_uid": uid,
                "method": j.method,
                "state": j.state,
                "attempts": j.attempts,
                "max_attempts": j.max_attempts,
                "created_at": _iso(j.created_at),
                "started_at": _iso(j.started_at),
                "finished_at": _iso(j.finished_at),
                "worker_id": j.worker_id,
                "wait_reason": j.wait_reason if j.state == "pending" else None,
                "last_error": j.last_error,
            }
            for j, uid in rows
        ]


def deliveries(db: Database, *, state: str | None = None, destination: str | None = None) -> list[dict[str, Any]]:
    """The outbox, newest first (:func:`pacs_agent.send.cli.list_deliveries`)."""
    return list_deliveries(db, state=state or None, destination=destination or None, limit=200)


def events(db: Database, query: EventQuery) -> list[dict[str, Any]]:
    """Audit events, newest first (the filters of ``pacs-agent events``)."""
    return list(reversed(query_events(db, query)))


def _manifest(path: Path) -> dict[str, Any]:
    try:
        if path.is_dir():
            return tomllib.loads((path / MANIFEST).read_text(encoding="utf-8"))
        with zipfile.ZipFile(path) as archive:
            return tomllib.loads(archive.read(MANIFEST).decode("utf-8"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return {}


def _checksums(path: Path, manifest: dict[str, Any]) -> str:
    """``verified`` when every weights file of a package folder has its sha256, else what differs."""
    weights = manifest.get("weights") or {}
    if not path.is_dir():
        return "zip package (pacs-agent models verify checks it)"
    bad = []
    for role, spec in weights.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("file"), str):
            bad.append(f"{role}: no file")
            continue
        target = path / spec["file"]
        if not target.resolve().is_relative_to(path.resolve()) or not target.is_file():
            bad.append(f"{role}: {spec['file']} missing")
        elif sha256_file(target) != spec.get("sha256"):
            bad.append(f"{role}: {spec['file']} sha256 differs")
    if not weights:
        return "no weights listed"
    return "verified" if not bad else "; ".join(bad)


def models(settings: Settings) -> list[dict[str, Any]]:
    """Installed and demo packages: name, version, method, validation status, intended use, checksums."""
    out = []
    for index, directory in enumerate(settings.model_dirs):
        for entry in list_packages(directory):
            manifest = _manifest(entry.path)
            has_report = report_file(entry.path, "report.md") is not None
            out.append(
                {
                    "key": f"{index}/{entry.path.name}",
                    "where": "installed" if index == 0 else "demo",
                    "path": str(entry.path),
                    "name": entry.name,
                    "version": entry.version,
                    "method": entry.method,
                    "validation_status": entry.validation_status,
                    "labels": list(entry.labels),
                    "intended_use": str(manifest.get("intended_use", "")),
                    "checksums": _checksums(entry.path, manifest),
                    "training_report": has_report,
                    "problems": list(entry.problems),
                }
            )
    return out


def model_package(settings: Settings, index: int, name: str) -> Path | None:
    """The package ``name`` (its folder or zip name) in the ``index``-th models directory, None if there is none.

    Found by listing the directory, never by joining a path from the request.
    """
    dirs = settings.model_dirs
    if not 0 <= index < len(dirs):
        return None
    return next((e.path for e in list_packages(dirs[index]) if e.path.name == name), None)


def report_file(package: Path, name: str) -> bytes | None:
    """``report/NAME`` of a package folder or zip (``report.md`` or a PNG), None when it has none.

    ``name`` must be ``report.md`` or a plain PNG file name; the file must lie inside the package's
    ``report`` folder (no ``..``, no symbolic link out of it).
    """
    if name != "report.md" and not PNG_NAME.match(name):
        return None
    try:
        if package.is_dir():
            root = (package / "report").resolve()
            target = (root / name).resolve()
            if not target.is_relative_to(root) or not target.is_file():
                return None
            return target.read_bytes()
        with zipfile.ZipFile(package) as archive:
            return archive.read(f"report/{name}")
    except (OSError, KeyError, zipfile.BadZipFile):
        return None


def report_images(package: Path) -> list[str]:
    """The PNG file names in a package's ``report`` folder (e.g. ``roc-test.png``), sorted."""
    try:
        if package.is_dir():
            folder = package / "report"
            names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
        else:
            with zipfile.ZipFile(package) as archive:
                names = [n.removeprefix("report/") for n in archive.namelist() if n.startswith("report/")]
    except (OSError, zipfile.BadZipFile):
        return []
    return sorted(n for n in names if PNG_NAME.match(n) and report_file(package, n) is not None)


def _redact(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _redact(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v, key) for v in value]
    if key == "url" and isinstance(value, str) and value:
        try:
            return make_url(value).render_as_string(hide_password=True)
        except ArgumentError:
            return value
    if any(word in key for word in ("password", "secret", "token")) and value and not key.endswith("_file"):
        return REDACTED
    return value


def configuration(settings: Settings) -> dict[str, Any]:
    """The effective settings (passwords in URLs redacted) and the problems ``config check`` finds."""
    from pacs_agent.checks import check_settings
    from pacs_agent.tls import tls_problems

    return {
        "settings": _redact(json.loads(settings.model_dump_json())),
        "problems": check_settings(settings) + tls_problems(settings),
    }
