"""``pacs-agent events`` (the audit trail) and ``pacs-agent retry`` (jobs and studies).

``events`` prints Event rows: associations, refusals, stores, readiness decisions, jobs and
deliveries, with UIDs, AE titles, peer addresses, statuses and reasons. Events never hold patient
names, IDs or birth dates, so neither does this output.

``retry JOB_ID`` puts a ``failed`` or ``dead`` job back to ``pending`` with its attempts reset;
``retry --study UID`` asks the receiver to evaluate the study again, which schedules new jobs
(for instance after the routing rules or the input changed). Both record an audit event naming
the operating-system user. Dead deliveries are requeued with ``pacs-agent send retry``.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import TYPE_CHECKING, Any

from pacs_agent.config import Settings
from pacs_agent.errors import PacsAgentError  # noqa: F401 - callers catch it from here
from pacs_agent.jobs.queue import RetryRefused, retry_job
from pacs_agent.studies.store import retry_study
from pacs_agent.text import printable

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from pacs_agent.db import Database

EVENT_KINDS = (
    "association",
    "association_rejected",
    "tls_refused",
    "store_refused",
    "study_incomplete",
    "job_scheduled",
    "job_started",
    "job_done",
    "job_retry",
    "job_failed",
    "job_dead",
    "job_retry_requested",
    "study_retry_requested",
    "delivered",
    "delivery_retry",
    "delivery_dead",
    "delivery_requeued",
    "pairing_query",
    "pairing_retrieving",
    "pairing_paired",
    "pairing_none",
    "pairing_failed",
    "baseline_retrieved",
    "worker_orphan_stopped",
    "console_login",
    "console_login_failed",
    "console_study_viewed",
    "console_action",
    "console_action_refused",
    "console_rules_tested",
    "console_password_changed",
    "processing_paused",
    "processing_resumed",
)
"""Kinds the node records (others may be added by newer versions; ``--kind`` accepts any)."""
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """The start time of ``--since``.

    Parameters
    ----------
    text
        An ISO date (``2026-11-25``: midnight UTC), an ISO date and time (without a zone: UTC),
        or a duration back from now: ``30m``, ``2h``, ``7d`` (units s, m, h, d, w).
    now
        The current time (aware); default now.

    Raises
    ------
    ValueError
        When ``text`` is none of these.
    """
    now = now or datetime.now(UTC)
    match = _DURATION.match(text)
    if match:
        return now - timedelta(**{_UNITS[match.group(2)]: float(match.group(1))})
    try:
        if len(text.strip()) == 10:
            return datetime.combine(date.fromisoformat(text.strip()), time(), UTC)
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{text!r} is not an ISO date or date-time (2026-11-25, 2026-11-25T14:00) or a duration (30m, 2h, 7d)"
        ) from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


@dataclass(frozen=True)
class EventQuery:
    """Which events to show; every given criterion must hold."""

    since: datetime | None = None
    study_instance_uid: str | None = None
    kinds: tuple[str, ...] = ()
    job_id: int | None = None
    min_level: str | None = None
    limit: int = 50


def query_events(db: Database, query: EventQuery) -> list[dict[str, Any]]:
    """The newest ``query.limit`` matching events, returned oldest first (as a log reads).

    Returns
    -------
    list of dict
        ``id, at, level, kind, study_instance_uid, sop_instance_uid, job_id, ae_title, peer,
        status, detail, duration_seconds`` (``at`` as ISO text, UTC).
    """
    from sqlalchemy import select

    from pacs_agent.db.tables import Event

    statement = select(Event).order_by(Event.id.desc()).limit(query.limit)
    if query.since is not None:
        statement = statement.where(Event.at >= query.since)
    if query.study_instance_uid:
        statement = statement.where(Event.study_instance_uid == query.study_instance_uid)
    if query.kinds:
        statement = statement.where(Event.kind.in_(query.kinds))
    if query.job_id is not None:
        statement = statement.where(Event.job_id == query.job_id)
    if query.min_level:
        statement = statement.where(Event.level.in_(LEVELS[LEVELS.index(query.min_level) :]))
    with db.session() as session:
        rows = session.execute(statement).scalars().all()
        return [
            {
                "id": e.id,
                "at": e.at.isoformat(),
                "level": e.level,
                "kind": e.kind,
                "study_instance_uid": e.study_instance_uid,
                "sop_instance_uid": e.sop_instance_uid,
                "job_id": e.job_id,
                "ae_title": e.ae_title,
                "peer": e.peer,
                "status": e.status,
                "detail": e.detail,
                "duration_seconds": e.duration_seconds,
            }
            for e in reversed(rows)
        ]


def format_event(event: dict[str, Any]) -> str:
    """One line: ``time level kind key=value ... - detail``; stored text escaped (:func:`printable`)."""
    parts = [event["at"][:19].replace("T", " "), f"{printable(event['level']):<7}", printable(event["kind"])]
    for label, key in (
        ("study", "study_instance_uid"),
        ("sop", "sop_instance_uid"),
        ("job", "job_id"),
        ("aet", "ae_title"),
        ("peer", "peer"),
    ):
        if event.get(key) is not None:
            parts.append(f"{label}={printable(event[key])}")
    if event.get("status") is not None:
        parts.append(f"status=0x{event['status']:04X}")
    if event.get("duration_seconds") is not None:
        parts.append(f"{event['duration_seconds']:.1f}s")
    if event.get("detail"):
        parts.append(f"- {printable(event['detail'])}")
    return " ".join(parts)


def _operator() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no user name for this uid (containers)
        return f"uid {os.getuid()}"


def _record(session: Session, kind: str, **kwargs: Any) -> None:
    from pacs_agent.audit import record_event

    record_event(session, kind, log=False, **kwargs)


def add_parsers(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser],
) -> None:
    """Add ``events`` and ``retry`` to the ``pacs-agent`` sub-commands."""
    events = with_config(
        sub.add_parser(
            "events",
            help="audit trail: associations, refusals, stores, jobs and deliveries",
            description="Print audit events, oldest first (the newest --limit that match). "
            f"Kinds: {', '.join(EVENT_KINDS)}.",
        )
    )
    events.add_argument("--since", help="ISO date or date-time (UTC), or a duration back from now: 30m, 2h, 7d")
    events.add_argument("--study", metavar="UID", help="events of one Study Instance UID")
    events.add_argument(
        "--kind", action="append", default=[], help="event kind (repeat or separate with commas), e.g. job_dead"
    )
    events.add_argument("--job", type=int, metavar="ID", help="events of one job")
    events.add_argument("--level", choices=LEVELS, type=str.upper, help="this level and above, e.g. WARNING")
    events.add_argument("--limit", type=int, default=50, help="how many events at most (default 50)")
    events.add_argument("--json", action="store_true", help="machine-readable output (a JSON list)")
    retry = with_config(
        sub.add_parser(
            "retry",
            help="run a failed or dead job again, or evaluate a study again",
            description="JOB_ID: a failed or dead job goes back to pending with its attempts reset. "
            "--study UID: the running receiver evaluates the study again and schedules new jobs. "
            "Dead deliveries: pacs-agent send retry.",
        )
    )
    target = retry.add_mutually_exclusive_group(required=True)
    target.add_argument("job", nargs="?", type=int, metavar="JOB_ID", help="id of a failed or dead job")
    target.add_argument("--study", metavar="UID", help="Study Instance UID to evaluate again")


def _open(settings: Settings) -> Database:
    from pacs_agent.db import Database

    return Database(settings.database_url)


def run_events(args: argparse.Namespace, settings: Settings) -> int:
    """``pacs-agent events``: print the matching audit events."""
    try:
        since = parse_since(args.since) if args.since else None
    except ValueError as exc:
        print(f"pacs-agent events: --since: {printable(exc)}", file=sys.stderr)
        return 2
    if args.limit < 1:
        print("pacs-agent events: --limit must be at least 1", file=sys.stderr)
        return 2
    kinds = tuple(k.strip() for value in args.kind for k in value.split(",") if k.strip())
    query = EventQuery(
        since=since,
        study_instance_uid=args.study,
        kinds=kinds,
        job_id=args.job,
        min_level=args.level,
        limit=args.limit,
    )
    db = _open(settings)
    try:
        rows = query_events(db, query)
    finally:
        db.dispose()
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print("no matching events")
    else:
        print("\n".join(format_event(row) for row in rows))
    return 0


def run_retry(args: argparse.Namespace, settings: Settings) -> int:
    """``pacs-agent retry``: requeue a job or have a study evaluated again; 1 when refused."""
    db = _open(settings)
    try:
        with db.session() as session, session.begin():
            if args.study:
                message = retry_study(session, args.study.strip(), operator=_operator())
            else:
                message = retry_job(session, args.job, operator=_operator())
    except RetryRefused as exc:
        print(f"pacs-agent retry: {printable(exc)}", file=sys.stderr)
        return 1
    finally:
        db.dispose()
    print(printable(message))
    return 0
