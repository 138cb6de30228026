"""``pacs-agent status``: recent studies with their state and reason, jobs, deliveries, errors.

One block per study tells its whole story: when and from whom it arrived, its series and why each
was chosen or skipped, why it waits or failed, its jobs (attempts, run time, errors), its result
objects and where they went. Shows UIDs, AE titles and states; never patient names or IDs.
"""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from pacs_agent.config import Settings
from pacs_agent.db import Database
from pacs_agent.db.tables import Delivery, Event, Instance, Job, Pairing, Result, Series, Study, WorkerProcess, utcnow
from pacs_agent.pause import current_pause
from pacs_agent.routing.pairing import baseline_of
from pacs_agent.text import printable


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start).total_seconds(), 1)


def _clock(iso: str | None) -> str:
    """``2026-11-25 10:00:03`` (UTC) from an ISO timestamp, for the one-screen text."""
    return iso[:19].replace("T", " ") if iso else "-"


WORKERS_SHOWN_HOURS = 24.0
"""Stopped (or silent) workers are listed for this long after their last sign of life."""


def worker_status(session: Session, lease_seconds: float = 120.0) -> list[dict[str, Any]]:
    """Every worker process of the node, on any host: where it runs, what it takes, its last heartbeat.

    The heartbeat is the queue's own: ``workers.heartbeat_at`` on SQLite, procrastinate's
    ``procrastinate_workers.last_heartbeat`` on PostgreSQL. ``alive`` is false for a worker that
    stopped or has been silent for ``lease_seconds`` (its job then runs elsewhere).
    """
    engine_beats: dict[int, datetime] = {}
    if session.get_bind().dialect.name == "postgresql":
        rows = session.execute(text("SELECT id, last_heartbeat FROM procrastinate_workers")).all()
        engine_beats = {int(r[0]): r[1] for r in rows}
    now = utcnow()
    out = []
    for w in session.execute(select(WorkerProcess).order_by(WorkerProcess.host, WorkerProcess.name)).scalars():
        beat = engine_beats.get(w.queue_worker_id) if w.queue_worker_id is not None else None
        beat = beat or w.heartbeat_at
        last = beat or w.stopped_at or w.started_at
        if (now - last).total_seconds() > WORKERS_SHOWN_HOURS * 3600:
            continue
        alive = w.state == "running" and beat is not None and (now - beat).total_seconds() <= lease_seconds
        out.append(
            {
                "name": w.name,
                "host": w.host,
                "pid": w.pid,
                "device": w.device,
                "queues": w.queues.split(),
                "concurrency": w.concurrency,
                "backend": w.backend,
                "state": w.state if w.state != "running" or alive else "silent",
                "alive": alive,
                "started_at": w.started_at.isoformat(),
                "heartbeat_at": _iso(beat),
                "heartbeat_age_seconds": _seconds(beat, now),
                "current_job_id": w.current_job_id if w.state == "running" else None,
            }
        )
    return out


def unserved_queue_warnings(pending_by_queue: dict[str, int], workers: list[dict[str, Any]]) -> list[str]:
    """``queue gpu: 2 job(s) pending and no running worker takes it``, per queue no alive worker takes.

    ``workers`` as :func:`worker_status` gives them; a worker with the queue ``*`` takes every queue.
    """
    served = {q for w in workers if w["alive"] for q in w["queues"]}
    if "*" in served:
        return []
    return [
        f"queue {name}: {n} job(s) pending and no running worker takes it"
        for name, n in sorted(pending_by_queue.items())
        if name not in served
    ]


def collect_status(db: Database, limit: int = 20, lease_seconds: float = 120.0) -> dict[str, Any]:
    """Gather the status as plain data (what ``--json`` prints)."""
    with db.session() as session:
        studies = session.execute(select(Study).order_by(Study.last_received_at.desc()).limit(limit)).scalars().all()
        out = [study_status(session, study) for study in studies]
        errors = (
            session.execute(
                select(Event).where(Event.level.in_(["WARNING", "ERROR"])).order_by(Event.id.desc()).limit(10)
            )
            .scalars()
            .all()
        )
        counts = dict(session.execute(select(Job.state, func.count(Job.id)).group_by(Job.state)).all())
        pause = current_pause(session)
        queues = session.execute(
            select(Job.queue, func.count(Job.id)).where(Job.state == "pending").group_by(Job.queue)
        ).all()
        workers = worker_status(session, lease_seconds)
    return {
        "paused": pause.as_json() if pause else None,
        "studies": out,
        "jobs_by_state": counts,
        "pending_by_queue": {q: int(n) for q, n in queues},
        "workers": workers,
        "recent_problems": [
            {
                "at": e.at.isoformat(),
                "kind": e.kind,
                "study_instance_uid": e.study_instance_uid,
                "ae_title": e.ae_title,
                "peer": e.peer,
                "job_id": e.job_id,
                "status": e.status,
                "detail": e.detail,
            }
            for e in errors
        ],
    }


def study_status(session: Session, study: Study) -> dict[str, Any]:
    """One study's whole story as plain data: arrival, series notes, structures, jobs, results, deliveries."""
    series = session.execute(
        select(Series.series_instance_uid, Series.modality, func.count(Instance.id))
        .join(Instance, Instance.series_id == Series.id)
        .where(Series.study_id == study.id)
        .group_by(Series.id)
        .order_by(Series.series_instance_uid)
    ).all()
    jobs = session.execute(select(Job).where(Job.study_id == study.id).order_by(Job.id)).scalars().all()
    received = session.execute(
        select(
            func.count(Instance.id),
            func.coalesce(func.sum(Instance.duplicates), 0),
            func.coalesce(func.sum(Instance.size_bytes), 0),
        )
        .join(Series, Series.id == Instance.series_id)
        .where(Series.study_id == study.id)
    ).one()
    senders = (
        session.execute(
            select(Instance.calling_ae_title)
            .join(Series, Series.id == Instance.series_id)
            .where(Series.study_id == study.id, Instance.calling_ae_title.is_not(None))
            .distinct()
            .order_by(Instance.calling_ae_title)
        )
        .scalars()
        .all()
    )
    results = session.execute(
        select(Result.kind, Result.method, Result.algorithm_version, func.count(Result.id))
        .where(Result.study_id == study.id)
        .group_by(Result.kind, Result.method, Result.algorithm_version)
        .order_by(Result.method, Result.kind.desc())
    ).all()
    deliveries = session.execute(
        select(
            Result.sop_instance_uid,
            Result.kind,
            Delivery.destination,
            Delivery.state,
            Delivery.attempts,
            Delivery.last_error,
            Delivery.last_status,
            Delivery.delivered_at,
            Delivery.next_attempt_at,
        )
        .join(Delivery, Delivery.result_id == Result.id)
        .where(Result.study_id == study.id)
        .order_by(Delivery.id)
    ).all()
    return {
        "study_instance_uid": study.study_instance_uid,
        "state": study.state,
        "reason": study.state_reason,
        "series_notes": json.loads(study.series_notes) if study.series_notes else [],
        "pairing": _pairing(session, study.id),
        "baseline_for": baseline_of(session, study),
        "skipped_methods": json.loads(study.method_notes) if study.method_notes else [],
        "structures": json.loads(study.structure_notes) if study.structure_notes else [],
        "input_warnings": json.loads(study.input_warnings) if study.input_warnings else [],
        "first_received_at": study.first_received_at.isoformat(),
        "last_received_at": study.last_received_at.isoformat(),
        "senders": list(senders),
        # int(): PostgreSQL sums BIGINT / INTEGER columns as NUMERIC, which the driver gives as Decimal
        "instances": int(received[0]),
        "duplicates": int(received[1]),
        "size_bytes": int(received[2]),
        "series": [{"series_instance_uid": s[0], "modality": s[1], "instances": s[2]} for s in series],
        "jobs": [
            {
                "id": j.id,
                "method": j.method,
                "state": j.state,
                "attempts": j.attempts,
                "max_attempts": j.max_attempts,
                "last_error": j.last_error,
                "wait_reason": j.wait_reason if j.state == "pending" else None,
                "not_before": _iso(j.not_before) if j.state == "pending" else None,
                "created_at": j.created_at.isoformat(),
                "started_at": _iso(j.started_at),
                "finished_at": _iso(j.finished_at),
                "duration_seconds": _seconds(j.started_at, j.finished_at)
                if j.state in ("done", "failed", "dead")
                else None,
                "worker_id": j.worker_id,
            }
            for j in jobs
        ],
        "results": [{"kind": r[0], "method": r[1], "algorithm_version": r[2], "count": r[3]} for r in results],
        "deliveries": [
            {
                "sop_instance_uid": d[0],
                "kind": d[1],
                "destination": d[2],
                "state": d[3],
                "attempts": d[4],
                "last_error": d[5],
                "last_status": d[6],
                "delivered_at": _iso(d[7]),
                "next_attempt_at": _iso(d[8]) if d[3] == "pending" else None,
            }
            for d in deliveries
        ],
    }


def _pairing(session: Session, study_id: int) -> dict[str, Any] | None:
    pairing = session.execute(select(Pairing).where(Pairing.followup_study_id == study_id)).scalar_one_or_none()
    if pairing is None:
        return None
    return {
        "state": pairing.state,
        "reason": pairing.reason,
        "baseline_study_instance_uid": pairing.baseline_study_instance_uid,
        "source": pairing.source,
    }


def _delivery_lines(deliveries: list[dict[str, Any]]) -> list[str]:
    """One line per destination: counts by state, and the reason when something is not delivered."""
    by_destination: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for d in deliveries:
        by_destination[d["destination"]].append(d)
    lines = []
    for destination, rows in by_destination.items():
        counts: dict[str, int] = defaultdict(int)
        for d in rows:
            counts[d["state"]] += 1
        parts = [f"{counts[state]} {state}" for state in ("done", "pending", "dead") if counts.get(state)]
        line = f"  -> {destination}: {', '.join(parts)}"
        waiting = [d for d in rows if d["state"] != "done"]
        if waiting:
            first = waiting[0]
            line += f" ({first['attempts']} attempt(s)"
            if first.get("next_attempt_at"):
                line += f", next {_clock(first['next_attempt_at'])}"
            line += ")"
            if first["last_error"]:
                line += f" - {first['last_error']}"
        elif rows and rows[-1].get("delivered_at"):
            line += f", last at {_clock(max(d['delivered_at'] or '' for d in rows))}"
        lines.append(line)
    return lines


def _structure_lines(notes: list[dict[str, Any]]) -> list[str]:
    """One line per structure of each segmentation looked at: tumour, organ or skipped, and why."""
    lines = []
    words = {"tumour": "tumour", "organ": "organ (not a lesion)", "other": "skipped"}
    for note in notes:
        lines.append(
            f"  structure {note['number']} {note['label']!r} of {note['segmentation_sop_instance_uid']}: "
            f"{words.get(note['role'], note['role'])} - {note['reason']}"
        )
    return lines


def format_status(status: dict[str, Any]) -> str:
    """Render :func:`collect_status` output for a terminal: one line per item, control characters escaped."""
    lines = []
    jobs = ", ".join(f"{k} {v}" for k, v in sorted(status["jobs_by_state"].items())) or "none"
    if status.get("paused"):
        p = status["paused"]
        lines.append(
            f"PROCESSING PAUSED since {_clock(p['since'])} UTC by {p['by']}"
            + (f": {p['reason']}" if p["reason"] else "")
            + " - studies are received and stored, no new job starts (pacs-agent resume)"
        )
    lines.append(f"jobs: {jobs}")
    waiting = status.get("pending_by_queue", {})
    if set(waiting) - {"default"}:
        lines.append("pending by queue: " + ", ".join(f"{q} {n}" for q, n in sorted(waiting.items())))
    for w in status.get("workers", []):
        queues = ", ".join(w["queues"]) if w["queues"] != ["*"] else "every queue"
        line = f"worker {w['name']} [{w['state']}] {w['device']}, {queues}"
        if w["heartbeat_age_seconds"] is not None:
            line += f", heartbeat {w['heartbeat_age_seconds']:g} s ago"
        if w["current_job_id"] is not None:
            line += f", running job {w['current_job_id']}"
        lines.append(line)
    lines += unserved_queue_warnings(waiting, status.get("workers", []))
    if not status["studies"]:
        lines.append("no studies received yet")
    for study in status["studies"]:
        lines.append("")
        lines.append(f"study {study['study_instance_uid']}  [{study['state']}]")
        if "instances" in study:
            senders = ", ".join(study["senders"]) or "?"
            line = (
                f"  received {_clock(study['first_received_at'])} .. {_clock(study['last_received_at'])} UTC"
                f" from {senders}: {study['instances']} instance(s) in {len(study['series'])} series"
            )
            if study["duplicates"]:
                line += f", {study['duplicates']} duplicate(s) kept once"
            lines.append(line)
        if study["reason"]:
            lines.append(f"  why: {study['reason']}")
        notes = {n["series_instance_uid"]: n for n in study["series_notes"]}
        for s in study["series"]:
            line = f"  series {s['series_instance_uid']} {s['modality'] or '?'} x{s['instances']}"
            note = notes.get(s["series_instance_uid"])
            if note:
                line += f" - {note['role']}: {note['reason']}"
            lines.append(line)
        lines += _structure_lines(study.get("structures", []))
        for warning in study.get("input_warnings", []):
            lines.append(f"  warning: {warning}")
        for note in study.get("skipped_methods", []):
            lines.append(f"  method skipped: {note['reason']}")
        if study.get("pairing"):
            lines.append(f"  baseline search: {study['pairing']['state']} - {study['pairing']['reason']}")
        for follow_up in study.get("baseline_for", []):
            lines.append(f"  used as baseline for {follow_up} (response method)")
        for j in study["jobs"]:
            line = f"  job {j['id']} {j['method']}: {j['state']} (attempt {j['attempts']}/{j['max_attempts']})"
            if j.get("duration_seconds") is not None:
                line += f", {j['duration_seconds']:g} s, finished {_clock(j['finished_at'])}"
            if j.get("wait_reason"):
                line += f" - waiting: {j['wait_reason']}; retrying at {_clock(j['not_before'])} UTC"
            elif j["last_error"]:
                line += f" - {j['last_error']}"
            if j["state"] in ("failed", "dead"):
                line += f" [pacs-agent retry {j['id']}]"
            lines.append(line)
        if study.get("results"):
            made = ", ".join(f"{r['count']} {r['kind'].upper()}" for r in study["results"])
            methods = ", ".join(sorted({f"{r['method']} {r['algorithm_version']}" for r in study["results"]}))
            lines.append(f"  results: {made} ({methods})")
        lines += _delivery_lines(study["deliveries"])
    if status["recent_problems"]:
        lines.append("")
        lines.append("recent problems:")
        for e in status["recent_problems"]:
            who = " ".join(
                f"{label}={e[key]}"
                for label, key in (("job", "job_id"), ("aet", "ae_title"), ("peer", "peer"))
                if e.get(key)
            )
            code = f" 0x{e['status']:04X}" if e.get("status") is not None else ""
            lines.append(f"  {_clock(e['at'])} {e['kind']}{code}{' ' + who if who else ''}: {e['detail'] or ''}")
        lines.append("  (the whole audit trail: pacs-agent events; one study: pacs-agent events --study UID)")
    # Each line holds text from the network or from errors (UIDs, AE titles, reasons): escaped here,
    # where it leaves for the terminal, so that a newline or an escape sequence in it prints visibly.
    return "\n".join(printable(line) for line in lines)


def print_status(settings: Settings, *, as_json: bool, limit: int) -> int:
    """Print the status of the node configured by ``settings``."""
    db = Database(settings.database_url)
    try:
        status = collect_status(db, limit, settings.jobs.lease_seconds)
    finally:
        db.dispose()
    print(json.dumps(status, indent=2) if as_json else format_status(status))
    return 0
