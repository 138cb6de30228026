"""``pacs-agent send list`` and ``pacs-agent send retry``: look at the outbox, requeue dead deliveries.

``retry`` turns ``dead`` deliveries back into ``pending`` with the next attempt due now; the
attempt count is kept and an audit event (``delivery_requeued``) records each one. A requeued
delivery gets one more attempt at once; if that fails too, the usual backoff applies while the
delivery is younger than ``[delivery] max_age_hours``, after that it is dead again with the new
reason. Only UIDs, destinations and states are printed, never patient data; stored text is escaped
(:func:`pacs_agent.text.printable`) in the table and by JSON in ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pacs_agent.config import Settings
from pacs_agent.text import printable

if TYPE_CHECKING:
    from pacs_agent.db import Database

STATES = ("pending", "done", "dead")


def list_deliveries(
    db: Database, *, state: str | None = None, destination: str | None = None, limit: int = 100
) -> list[dict[str, Any]]:
    """The newest deliveries (newest first), optionally of one state and one destination.

    Returns
    -------
    list of dict
        ``id, destination, state, attempts, kind, sop_instance_uid, study_instance_uid,
        created_at, next_attempt_at, delivered_at, last_status, last_error`` (times as ISO text).
    """
    from sqlalchemy import select

    from pacs_agent.db.tables import Delivery, Result, Study

    query = (
        select(Delivery, Result.kind, Result.sop_instance_uid, Study.study_instance_uid)
        .join(Result, Result.id == Delivery.result_id)
        .join(Study, Study.id == Result.study_id)
        .order_by(Delivery.id.desc())
        .limit(limit)
    )
    if state is not None:
        query = query.where(Delivery.state == state)
    if destination is not None:
        query = query.where(Delivery.destination == destination)

    def iso(value: datetime | None) -> str | None:
        return value.isoformat(timespec="seconds") if value is not None else None

    with db.session() as session:
        rows = session.execute(query).all()
        return [
            {
                "id": d.id,
                "destination": d.destination,
                "state": d.state,
                "attempts": d.attempts,
                "kind": kind,
                "sop_instance_uid": sop_uid,
                "study_instance_uid": study_uid,
                "created_at": iso(d.created_at),
                "next_attempt_at": iso(d.next_attempt_at) if d.state == "pending" else None,
                "delivered_at": iso(d.delivered_at),
                "last_status": d.last_status,
                "last_error": d.last_error,
            }
            for d, kind, sop_uid, study_uid in rows
        ]


@dataclass
class RetryReport:
    """What :func:`retry_deliveries` did: requeued ids, ids left alone (with why), unknown ids."""

    requeued: list[int] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)
    unknown: list[int] = field(default_factory=list)


def retry_deliveries(
    db: Database,
    *,
    ids: Sequence[int] = (),
    destination: str | None = None,
    now: datetime | None = None,
) -> RetryReport:
    """Requeue deliveries: ``dead`` -> ``pending``, due at ``now``; attempts are kept.

    Parameters
    ----------
    db
        The node's database.
    ids
        Delivery ids to requeue; empty means every dead delivery (of ``destination`` when given).
        A ``pending`` delivery named here is made due now; a ``done`` one is left alone.
    destination
        Only deliveries to this destination.
    now
        The time of the requeue (default: the current time).

    Returns
    -------
    RetryReport
        Each requeued delivery also gets a ``delivery_requeued`` audit event.
    """
    from sqlalchemy import select

    from pacs_agent.audit import record_event
    from pacs_agent.db.tables import Delivery, DeliveryState, Result, Study, utcnow
    from pacs_agent.send.outbox import requeue

    now = now or utcnow()
    report = RetryReport()
    query = (
        select(Delivery, Study.study_instance_uid)
        .join(Result, Result.id == Delivery.result_id)
        .join(Study, Study.id == Result.study_id)
        .order_by(Delivery.id)
    )
    query = query.where(Delivery.id.in_(list(ids)) if ids else Delivery.state == DeliveryState.DEAD)
    if destination is not None:
        query = query.where(Delivery.destination == destination)
    with db.session() as session, session.begin():
        rows = session.execute(query.with_for_update()).all()
        found = {delivery.id for delivery, _ in rows}
        report.unknown = [i for i in ids if i not in found]
        for delivery, study_uid in rows:
            if delivery.state == DeliveryState.DONE:
                report.skipped[delivery.id] = "already delivered"
                continue
            was = delivery.state
            requeue(delivery, now)
            report.requeued.append(delivery.id)
            detail = f"{delivery.destination}: delivery {delivery.id} requeued (was {was}"
            detail += f" after {delivery.attempts} attempt(s)"
            detail += f": {delivery.last_error})" if delivery.last_error else ")"
            record_event(session, "delivery_requeued", study_instance_uid=study_uid, detail=detail)
    return report


def _format_table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "no deliveries"
    lines = []
    for row in rows:
        when = row["delivered_at"] if row["state"] == "done" else row["next_attempt_at"] or row["created_at"]
        label = {"done": "delivered", "pending": "next attempt"}.get(row["state"], "queued")
        line = printable(
            f"{row['id']:>6}  {row['destination']}  {row['state']:<7}  {row['attempts']} attempt(s)  "
            f"{row['kind']} {row['sop_instance_uid']}  ({label} {when})"
        )
        if row["last_error"] and row["state"] != "done":
            line += f"\n        {printable(row['last_error'])}"
        lines.append(line)
    return "\n".join(lines)


def add_send_parser(
    sub: Any, with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]
) -> argparse.ArgumentParser:
    """Add ``send list`` and ``send retry`` to the sub-command parsers ``sub`` of ``pacs-agent``."""
    send = sub.add_parser("send", help="the outbox: list deliveries, requeue dead ones")
    send_sub = send.add_subparsers(dest="send_command", required=True)
    listing = with_config(send_sub.add_parser("list", help="deliveries, newest first"))
    listing.add_argument("--state", choices=STATES, help="only deliveries in this state")
    listing.add_argument("--destination", help="only deliveries to this destination")
    listing.add_argument("--limit", type=int, default=100, help="how many to show (default 100)")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    retry = with_config(
        send_sub.add_parser(
            "retry",
            help="requeue dead deliveries (all, those of --destination, or the ids given)",
            description="Dead deliveries become pending, due now; attempts are kept; an audit event is recorded.",
        )
    )
    retry.add_argument("--destination", help="only deliveries to this destination")
    retry.add_argument("ids", nargs="*", type=int, metavar="DELIVERY_ID", help="delivery ids (see `send list`)")
    return send


def run_send(args: argparse.Namespace, settings: Settings) -> int:
    """Run ``send list`` or ``send retry``; returns the exit code (1 when an id is unknown)."""
    from pacs_agent.db import Database

    db = Database(settings.database_url)
    try:
        if args.send_command == "list":
            rows = list_deliveries(db, state=args.state, destination=args.destination, limit=args.limit)
            print(json.dumps(rows, indent=2) if args.json else _format_table(rows))
            return 0
        report = retry_deliveries(db, ids=args.ids, destination=args.destination)
    finally:
        db.dispose()
    configured = {d.name for d in settings.destinations}
    print(f"requeued {len(report.requeued)} delivery(ies){': ' if report.requeued else ''}", end="")
    print(" ".join(str(i) for i in report.requeued))
    for delivery_id, why in report.skipped.items():
        print(f"  {delivery_id}: not requeued ({why})")
    if args.destination and args.destination not in configured:
        print(f"  note: destination {args.destination!r} is not configured: nothing sends to it", file=sys.stderr)
    if report.unknown:
        where = f" to {args.destination}" if args.destination else ""
        print(f"no delivery{where} with id(s): {' '.join(map(str, report.unknown))}", file=sys.stderr)
        return 1
    return 0
