"""The outbox: Delivery rows per (result, destination), sent by one thread per destination.

Each destination is reached by C-STORE (:mod:`pacs_agent.send.scu`) or STOW-RS
(:mod:`pacs_agent.send.stow`). A destination that is down only delays its own deliveries: each
destination has its own thread, retries with exponential backoff, and gives up (``dead``, with the
reason) after ``[delivery] max_age_hours``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from pacs_agent.audit import record_event
from pacs_agent.config import DeliverySettings, Destination, Settings
from pacs_agent.db import Database
from pacs_agent.db.tables import Delivery, DeliveryState, Result, Study, utcnow
from pacs_agent.send.scu import store_files
from pacs_agent.send.stow import stow_files

logger = logging.getLogger(__name__)

BATCH = 50


def enqueue(session: Session, result_id: int, destinations: Iterable[str]) -> None:
    """Add a pending delivery of ``result_id`` to each destination (once; the caller commits)."""
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    now = utcnow()
    for name in destinations:
        session.execute(
            insert(Delivery.__table__)
            .values(
                result_id=result_id,
                destination=name,
                state=DeliveryState.PENDING,
                attempts=0,
                created_at=now,
                next_attempt_at=now,
            )
            .on_conflict_do_nothing()
        )


def requeue(delivery: Delivery, now: datetime) -> None:
    """Put a delivery back to ``pending``, due now (an operator's ``send retry``); the caller records why."""
    delivery.state = DeliveryState.PENDING
    delivery.next_attempt_at = now


def backoff_seconds(attempts: int, policy: DeliverySettings) -> float:
    """Delay before the next attempt after ``attempts`` failed ones (exponential, capped)."""
    return min(policy.initial_backoff_seconds * 2 ** max(attempts - 1, 0), policy.max_backoff_seconds)


class DestinationSender:
    """Delivers due outbox rows of one destination; :meth:`run_once` is one pass."""

    def __init__(self, settings: Settings, db: Database, destination: Destination) -> None:
        self.settings = settings
        self.db = db
        self.destination = destination
        self.results_dir = settings.storage.results_dir

    def _due(self, now: datetime) -> list[tuple[int, Path, str]]:
        with self.db.session() as session, session.begin():
            rows = session.execute(
                select(Delivery.id, Result.path, Study.study_instance_uid)
                .join(Result, Result.id == Delivery.result_id)
                .join(Study, Study.id == Result.study_id)
                .where(
                    Delivery.destination == self.destination.name,
                    Delivery.state == "pending",
                    Delivery.next_attempt_at <= now,
                )
                .order_by(Delivery.id)
                .limit(BATCH)
            ).all()
        return [(row[0], self.results_dir / row[1], row[2]) for row in rows]

    def run_once(self, now: datetime | None = None) -> int:
        """Send what is due; returns how many deliveries were attempted."""
        now = now or utcnow()
        due = self._due(now)
        if not due:
            return 0
        paths = [path for _, path, _ in due]
        timeout = self.destination.timeout_seconds or self.settings.delivery.timeout_seconds
        if self.destination.type == "stowrs":
            outcomes = stow_files(self.destination, paths, timeout_seconds=timeout)
        else:
            outcomes = store_files(
                self.destination, paths, calling_ae_title=self.settings.node.ae_title, timeout_seconds=timeout
            )
        by_path = {outcome.path: outcome for outcome in outcomes}
        policy = self.settings.delivery
        with self.db.session() as session, session.begin():
            for delivery_id, path, study_uid in due:
                outcome = by_path[path]
                delivery = session.get(Delivery, delivery_id)
                assert delivery is not None
                delivery.attempts += 1
                delivery.last_status = outcome.status
                done_at = utcnow()
                if outcome.ok:
                    delivery.state = DeliveryState.DONE
                    delivery.delivered_at = done_at
                    delivery.last_error = None
                    record_event(
                        session,
                        "delivered",
                        study_instance_uid=study_uid,
                        ae_title=self.destination.ae_title,
                        peer=self.destination.peer,
                        status=outcome.status,
                        detail=f"{self.destination.name}: {path.name}: {outcome.reason}",
                    )
                    continue
                delivery.last_error = outcome.reason
                too_old = done_at - delivery.created_at > timedelta(hours=policy.max_age_hours)
                if too_old:
                    delivery.state = DeliveryState.DEAD
                else:
                    delay = backoff_seconds(delivery.attempts, policy)
                    delivery.next_attempt_at = done_at + timedelta(seconds=delay)
                record_event(
                    session,
                    "delivery_dead" if too_old else "delivery_retry",
                    level="ERROR" if too_old else "WARNING",
                    study_instance_uid=study_uid,
                    ae_title=self.destination.ae_title,
                    peer=self.destination.peer,
                    status=outcome.status,
                    detail=f"{self.destination.name}: {path.name}: attempt {delivery.attempts}: {outcome.reason}"
                    + (" - giving up (max_age_hours reached)" if too_old else ""),
                )
        return len(due)

    def run_forever(self, stop: threading.Event, poll_seconds: float = 1.0) -> None:
        """Loop until ``stop`` is set; an unexpected error is logged and the loop goes on."""
        while not stop.is_set():
            try:
                sent = self.run_once()
            except Exception:
                logger.exception("delivery to %s failed unexpectedly; will retry", self.destination.name)
                sent = 0
            if not sent:
                stop.wait(poll_seconds)
