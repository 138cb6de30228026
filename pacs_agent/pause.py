"""Pause / resume the processing of new studies (an operator's switch, kept in the database).

While paused, the receiver still receives, stores and records every instance (nothing is lost)
and the scheduler still decides readiness and queues jobs, but no worker *starts* a job: the
check sits where a worker claims its next job (:meth:`pacs_agent.jobs.worker.Worker.run_one`;
on PostgreSQL, a job the queue engine hands a worker while paused is handed back untouched, no
attempt counted, and offered again ten seconds later). Jobs already running finish. The switch is
a row of ``node_flags``, so it holds for every process of the node (scp, workers on other hosts
of a PostgreSQL set-up) and across restarts.
Pausing and resuming are audit events naming who did it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from pacs_agent.audit import record_event
from pacs_agent.db.tables import NodeFlag, utcnow

PAUSED = "paused"


@dataclass(frozen=True)
class Pause:
    """Processing is paused: since when, by whom, why."""

    since: datetime
    by: str
    reason: str

    def describe(self) -> str:
        """``paused since 2026-12-03 10:00 UTC by console user otto: model update``."""
        text = f"paused since {self.since:%Y-%m-%d %H:%M} UTC by {self.by}"
        return f"{text}: {self.reason}" if self.reason else text

    def as_json(self) -> dict[str, str]:
        """For ``status --json`` and the console's ``/api/overview``."""
        return {"since": self.since.isoformat(timespec="seconds"), "by": self.by, "reason": self.reason}


def current_pause(session: Session) -> Pause | None:
    """The pause in force, or None when new jobs may start."""
    row = session.execute(select(NodeFlag).where(NodeFlag.name == PAUSED)).scalar_one_or_none()
    return None if row is None else Pause(row.set_at, row.set_by, row.value)


def pause_processing(session: Session, *, by: str, reason: str = "") -> str:
    """Stop new jobs from starting (the caller commits); the message says what happened."""
    existing = current_pause(session)
    if existing is not None:
        return f"processing was already {existing.describe()}"
    reason = " ".join(reason.split())[:200]
    session.add(NodeFlag(name=PAUSED, value=reason, set_by=by[:128], set_at=utcnow()))
    record_event(
        session,
        "processing_paused",
        level="WARNING",
        detail=f"by {by}" + (f": {reason}" if reason else "") + "; studies are still received and stored",
    )
    return "processing of new studies paused: studies are still received and stored; no new job starts until resumed"


def resume_processing(session: Session, *, by: str) -> str:
    """Let jobs start again (the caller commits); the message says what happened."""
    row = session.execute(select(NodeFlag).where(NodeFlag.name == PAUSED)).scalar_one_or_none()
    if row is None:
        return "processing was not paused"
    session.delete(row)
    record_event(session, "processing_resumed", detail=f"by {by} (paused since {row.set_at:%Y-%m-%d %H:%M} UTC)")
    return "processing resumed: queued jobs start again"
