"""Audit trail: one Event row (and one log line) per thing that happened.

Events carry UIDs, AE titles, peer addresses, statuses and reasons; never patient names, IDs or
birth dates. Log lines name studies by a short hash of the Study Instance UID.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from sqlalchemy.orm import Session

from pacs_agent.db.tables import Event

audit_logger = logging.getLogger("pacs_agent.audit")

_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING, "ERROR": logging.ERROR}


def uid_hash(uid: str | None) -> str:
    """A short, stable, non-identifying handle for a UID in log lines (8 hex digits)."""
    if not uid:
        return "-"
    return hashlib.sha256(uid.encode()).hexdigest()[:8]


def record_event(
    session: Session,
    kind: str,
    *,
    level: str = "INFO",
    study_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    job_id: int | None = None,
    ae_title: str | None = None,
    peer: str | None = None,
    status: int | None = None,
    detail: str | None = None,
    duration_seconds: float | None = None,
    log: bool = True,
) -> Event:
    """Add an Event to ``session`` (the caller commits) and write the matching log line."""
    event = Event(
        kind=kind,
        level=level,
        study_instance_uid=study_instance_uid,
        sop_instance_uid=sop_instance_uid,
        job_id=job_id,
        ae_title=ae_title,
        peer=peer,
        status=status,
        detail=detail,
        duration_seconds=duration_seconds,
    )
    session.add(event)
    if log:
        parts: list[str] = [kind]
        extras: dict[str, Any] = {
            "study": uid_hash(study_instance_uid) if study_instance_uid else None,
            "job": job_id,
            "aet": ae_title,
            "peer": peer,
            "status": f"0x{status:04X}" if status is not None else None,
        }
        parts += [f"{k}={v}" for k, v in extras.items() if v is not None]
        if detail:
            parts.append(f"- {detail}")
        audit_logger.log(_LEVELS.get(level, logging.INFO), " ".join(parts))
    return event
