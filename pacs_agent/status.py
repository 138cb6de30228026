"""``pacs-agent status``: recent studies with their state and reason, jobs, deliveries, errors.

Shows UIDs, AE titles and states; never patient names or IDs.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pacs_agent.config import Settings
from pacs_agent.db import Database
from pacs_agent.models import Delivery, Event, Instance, Job, Pairing, Result, Series, Study


def collect_status(db: Database, limit: int = 20) -> dict[str, Any]:
    """Gather the status as plain data (what ``--json`` prints)."""
    with db.session() as session:
        studies = session.execute(select(Study).order_by(Study.last_received_at.desc()).limit(limit)).scalars().all()
        out: list[dict[str, Any]] = []
        for study in studies:
            series = session.execute(
                select(Series.series_instance_uid, Series.modality, func.count(Instance.id))
                .join(Instance, Instance.series_id == Series.id)
                .where(Series.study_id == study.id)
                .group_by(Series.id)
                .order_by(Series.series_instance_uid)
            ).all()
            jobs = session.execute(select(Job).where(Job.study_id == study.id).order_by(Job.id)).scalars().all()
            deliveries = session.execute(
                select(
                    Result.sop_instance_uid,
                    Result.kind,
                    Delivery.destination,
                    Delivery.state,
                    Delivery.attempts,
                    Delivery.last_error,
                )
                .join(Delivery, Delivery.result_id == Result.id)
                .where(Result.study_id == study.id)
                .order_by(Delivery.id)
            ).all()
            out.append(
                {
                    "study_instance_uid": study.study_instance_uid,
                    "state": study.state,
                    "reason": study.state_reason,
                    "series_notes": json.loads(study.series_notes) if study.series_notes else [],
                    "pairing": _pairing(session, study.id),
                    "last_received_at": study.last_received_at.isoformat(),
                    "series": [{"series_instance_uid": s[0], "modality": s[1], "instances": s[2]} for s in series],
                    "jobs": [
                        {
                            "id": j.id,
                            "method": j.method,
                            "state": j.state,
                            "attempts": j.attempts,
                            "max_attempts": j.max_attempts,
                            "last_error": j.last_error,
                        }
                        for j in jobs
                    ],
                    "deliveries": [
                        {
                            "sop_instance_uid": d[0],
                            "kind": d[1],
                            "destination": d[2],
                            "state": d[3],
                            "attempts": d[4],
                            "last_error": d[5],
                        }
                        for d in deliveries
                    ],
                }
            )
        errors = (
            session.execute(
                select(Event).where(Event.level.in_(["WARNING", "ERROR"])).order_by(Event.id.desc()).limit(10)
            )
            .scalars()
            .all()
        )
        counts = dict(session.execute(select(Job.state, func.count(Job.id)).group_by(Job.state)).all())
    return {
        "studies": out,
        "jobs_by_state": counts,
        "recent_problems": [
            {
                "at": e.at.isoformat(),
                "kind": e.kind,
                "study_instance_uid": e.study_instance_uid,
                "ae_title": e.ae_title,
                "status": e.status,
                "detail": e.detail,
            }
            for e in errors
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


def format_status(status: dict[str, Any]) -> str:
    """Render :func:`collect_status` output for a terminal."""
    lines = []
    jobs = ", ".join(f"{k} {v}" for k, v in sorted(status["jobs_by_state"].items())) or "none"
    lines.append(f"jobs: {jobs}")
    if not status["studies"]:
        lines.append("no studies received yet")
    for study in status["studies"]:
        lines.append("")
        lines.append(
            f"study {study['study_instance_uid']}  [{study['state']}]  last received {study['last_received_at']}"
        )
        if study["reason"]:
            lines.append(f"  why: {study['reason']}")
        notes = {n["series_instance_uid"]: n for n in study["series_notes"]}
        for s in study["series"]:
            line = f"  series {s['series_instance_uid']} {s['modality'] or '?'} x{s['instances']}"
            note = notes.get(s["series_instance_uid"])
            if note:
                line += f" - {note['role']}: {note['reason']}"
            lines.append(line)
        if study.get("pairing"):
            lines.append(f"  baseline search: {study['pairing']['state']} - {study['pairing']['reason']}")
        for j in study["jobs"]:
            line = f"  job {j['id']} {j['method']}: {j['state']} (attempt {j['attempts']}/{j['max_attempts']})"
            if j["last_error"]:
                line += f" - {j['last_error']}"
            lines.append(line)
        for d in study["deliveries"]:
            line = f"  {d['kind']} {d['sop_instance_uid']} -> {d['destination']}: {d['state']}"
            line += f" ({d['attempts']} attempt(s))"
            if d["last_error"] and d["state"] != "done":
                line += f" - {d['last_error']}"
            lines.append(line)
    if status["recent_problems"]:
        lines.append("")
        lines.append("recent problems:")
        for e in status["recent_problems"]:
            lines.append(f"  {e['at']} {e['kind']}: {e['detail'] or ''}")
    return "\n".join(lines)


def print_status(settings: Settings, *, as_json: bool, limit: int) -> int:
    """Print the status of the node configured by ``settings``."""
    db = Database(settings.database_url)
    try:
        status = collect_status(db, limit)
    finally:
        db.dispose()
    print(json.dumps(status, indent=2) if as_json else format_status(status))
    return 0
