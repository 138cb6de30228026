"""Prometheus metrics of a node, computed from the database at each scrape.

The text format (version 0.0.4) is written by hand in :class:`Exposition`; no client library is
needed. Counters come from tables, so they survive restarts (and decrease only if rows are purged,
which Prometheus treats as a counter reset). Every query is a single aggregate; nothing here
reads patient data. Served by :mod:`pacs_agent.health` at ``/metrics``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import Integer, case, cast, extract, func, select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from pacs_agent.config import Destination
from pacs_agent.db.tables import Delivery, DeliveryState, Event, Instance, Job, JobState, Study, StudyState
from pacs_agent.receive.access import ConnectionClosing

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STUDY_STATES = tuple(state.value for state in StudyState)
JOB_STATES = tuple(state.value for state in JobState)
DELIVERY_STATES = tuple(state.value for state in DeliveryState)
DURATION_BUCKETS = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
"""Upper bounds (seconds) of the job duration histogram."""
DELIVERY_EVENTS = ("delivered", "delivery_retry", "delivery_dead")
REFUSAL_REASONS = {
    0xA700: "out_of_resources",
    0xA900: "dataset_does_not_match_sop_class",
    0xC210: "cannot_understand",
    0x0110: "processing_failure",
}
"""``reason`` label of a C-STORE failure status (anything else is ``other``)."""

Sample = tuple[dict[str, str], float]


def format_value(value: float) -> str:
    """A sample value as Prometheus writes it (``21``, ``0.5``, ``+Inf``, ``NaN``)."""
    if isinstance(value, bool):
        return str(int(value))
    number = float(value)
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "+Inf" if number > 0 else "-Inf"
    if number.is_integer():
        return str(int(number))
    return repr(number)


def escape_label(value: str) -> str:
    """Escape a label value (backslash, double quote, newline)."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Exposition:
    """Builds a Prometheus text exposition family by family."""

    def __init__(self) -> None:
        self._lines: list[str] = []

    def add(
        self,
        name: str,
        kind: Literal["counter", "gauge", "histogram"],
        help_text: str,
        samples: Iterable[Sample],
    ) -> None:
        """Add one metric family.

        Parameters
        ----------
        name
            Metric name (counters end in ``_total``).
        kind
            ``counter``, ``gauge`` or ``histogram``.
        help_text
            One line of help.
        samples
            ``(labels, value)`` pairs. A histogram sample with an ``le`` label is a ``_bucket``;
            one with the pseudo-label ``__suffix__`` (``_sum`` or ``_count``) gets that suffix.
        """
        help_line = help_text.replace("\\", "\\\\").replace("\n", "\\n")
        self._lines += [f"# HELP {name} {help_line}", f"# TYPE {name} {kind}"]
        for labels, value in samples:
            labels = dict(labels)
            suffix = labels.pop("__suffix__", "")
            if kind == "histogram" and not suffix:
                suffix = "_bucket"
            rendered = ",".join(f'{key}="{escape_label(str(val))}"' for key, val in labels.items())
            selector = f"{name}{suffix}{{{rendered}}}" if rendered else f"{name}{suffix}"
            self._lines.append(f"{selector} {format_value(value)}")

    def render(self) -> str:
        """The exposition text (ends with a newline)."""
        return "\n".join(self._lines) + "\n"


def last_delivery_attempts(
    conn: Connection, destinations: Sequence[Destination]
) -> dict[str, tuple[str, datetime, str]]:
    """The newest delivery event of each destination: ``name -> (kind, at, detail)``.

    ``kind`` is ``delivered`` (success), ``delivery_retry`` or ``delivery_dead``. Destinations
    never attempted are absent.
    """
    found = {}
    for dest in destinations:
        row = conn.execute(
            select(Event.kind, Event.at, Event.detail)
            .where(
                Event.kind.in_(DELIVERY_EVENTS),
                Event.ae_title == dest.ae_title,
                Event.peer == dest.peer,
                Event.detail.startswith(f"{dest.name}: ", autoescape=True),
            )
            .order_by(Event.id.desc())
            .limit(1)
        ).first()
        if row is not None:
            found[dest.name] = (row[0], row[1], row[2] or "")
    return found


def _by_state(conn: Connection, column: Any, states: Iterable[str]) -> list[Sample]:
    counts: dict[str, int] = dict(conn.execute(select(column, func.count()).group_by(column)).all())
    return [({"state": s}, counts.get(s, 0)) for s in dict.fromkeys([*states, *sorted(counts)])]


def _age(now: datetime, then: datetime | None) -> float:
    return round(max((now - then).total_seconds(), 0.0), 1) if then is not None else 0.0


def duration_histogram(conn: Connection) -> list[Sample]:
    """Histogram samples of the run time of done jobs per method, aggregated in SQL."""
    if conn.dialect.name == "sqlite":
        seconds: Any = (func.julianday(Job.finished_at) - func.julianday(Job.started_at)) * 86400.0
    else:
        seconds = extract("epoch", Job.finished_at - Job.started_at)
    done = (
        select(Job.method.label("method"), seconds.label("seconds"))
        .where(Job.state == "done", Job.started_at.is_not(None), Job.finished_at.is_not(None))
        .subquery()
    )
    columns = [func.count(), func.coalesce(func.sum(done.c.seconds), 0.0)]
    columns += [func.coalesce(func.sum(case((done.c.seconds <= b, 1), else_=0)), 0) for b in DURATION_BUCKETS]
    samples: list[Sample] = []
    rows = conn.execute(select(done.c.method, *columns).group_by(done.c.method).order_by(done.c.method)).all()
    for method, count, total, *cumulative in rows:
        for bound, n in zip(DURATION_BUCKETS, cumulative, strict=True):
            samples.append(({"method": method, "le": format_value(bound)}, n))
        samples.append(({"method": method, "le": "+Inf"}, count))
        samples.append(({"method": method, "__suffix__": "_sum"}, round(float(total), 3)))
        samples.append(({"method": method, "__suffix__": "_count"}, count))
    return samples


def connection_counts(conn: Connection, kind: str) -> list[Sample]:
    """Connections closed before their association, by reason, from the ``kind`` events.

    One ``connection_refused`` / ``connection_timeout`` event stands for several connections (see
    :class:`~pacs_agent.receive.access.ConnectionTally`); its detail starts with their number.
    """
    if conn.dialect.name == "sqlite":
        number: Any = cast(Event.detail, Integer)  # SQLite converts the leading digits
    else:
        number = cast(func.substring(Event.detail, "^[0-9]+"), Integer)
    closings = [c for c in ConnectionClosing if c.kind == kind]
    reason = case(*((Event.detail.contains(c.marker, autoescape=True), c.label) for c in closings), else_="other")
    rows = conn.execute(
        select(reason, func.coalesce(func.sum(number), 0)).where(Event.kind == kind).group_by(reason)
    ).all()
    counts: dict[str, int] = {label: int(n) for label, n in rows}
    labels = dict.fromkeys([*(c.label for c in closings), *sorted(counts)])
    return [({"reason": label}, counts.get(label, 0)) for label in labels]


def worker_samples(conn: Connection, lease_seconds: float = 120.0) -> list[Sample]:
    """One sample per worker process: its host, device and queues as labels, 1 when alive."""
    from pacs_agent.status import worker_status  # status reads the queue engine's heartbeats too

    with Session(bind=conn) as session:
        workers = worker_status(session, lease_seconds)
    return [
        (
            {"worker": w["name"], "host": w["host"], "device": w["device"], "queues": ",".join(w["queues"])},
            int(w["alive"]),
        )
        for w in workers
    ]


def database_metrics(
    conn: Connection, destinations: Sequence[Destination], out: Exposition, lease_seconds: float = 120.0
) -> None:
    """Add every metric that comes from the database to ``out`` (a worker is up within ``lease_seconds``)."""
    now = datetime.now(UTC)
    stored, duplicates = conn.execute(
        select(func.count(Instance.id), func.coalesce(func.sum(Instance.duplicates), 0))
    ).one()
    out.add(
        "pacs_agent_instances_received_total",
        "counter",
        "Instances answered with Success: stored, or duplicates of stored ones (kept once).",
        [({"outcome": "stored"}, stored), ({"outcome": "duplicate"}, duplicates)],
    )
    refused = conn.execute(
        select(Event.status, func.count(Event.id)).where(Event.kind == "store_refused").group_by(Event.status)
    ).all()
    out.add(
        "pacs_agent_instances_refused_total",
        "counter",
        "C-STORE requests answered with a failure status, by reason.",
        [
            ({"reason": REFUSAL_REASONS.get(status or 0, "other"), "status": f"0x{status or 0:04X}"}, n)
            for status, n in refused
        ],
    )
    rejected = conn.execute(select(func.count(Event.id)).where(Event.kind == "association_rejected")).scalar_one()
    out.add(
        "pacs_agent_associations_rejected_total",
        "counter",
        "Association requests refused: AE title allow-lists, called AE title, association limits.",
        [({}, rejected)],
    )
    out.add(
        "pacs_agent_connections_refused_total",
        "counter",
        "TCP connections closed at accept: host not in allowed_hosts, or host at max_connections_per_host.",
        connection_counts(conn, "connection_refused"),
    )
    out.add(
        "pacs_agent_connections_timed_out_total",
        "counter",
        "TCP connections closed without an A-ASSOCIATE-RQ: request timeout, or room made for a newer one.",
        connection_counts(conn, "connection_timeout"),
    )
    out.add("pacs_agent_studies", "gauge", "Studies by state.", _by_state(conn, Study.state, STUDY_STATES))
    out.add("pacs_agent_jobs", "gauge", "Jobs by state.", _by_state(conn, Job.state, JOB_STATES))
    pending = conn.execute(
        select(Job.queue, func.count(Job.id)).where(Job.state == "pending").group_by(Job.queue).order_by(Job.queue)
    ).all()
    out.add(
        "pacs_agent_jobs_pending_by_queue",
        "gauge",
        "Pending jobs per queue ([jobs.queues]); a queue no running worker takes keeps growing.",
        [({"queue": queue}, n) for queue, n in pending],
    )
    out.add(
        "pacs_agent_worker_up",
        "gauge",
        "1 per worker process (any host) whose queue heartbeat is fresh, 0 when silent or stopped (last 24 h).",
        worker_samples(conn, lease_seconds),
    )
    rows = conn.execute(
        select(Delivery.destination, Delivery.state, func.count(Delivery.id)).group_by(
            Delivery.destination, Delivery.state
        )
    ).all()
    counts = {(d, s): n for d, s, n in rows}
    names = sorted({d.name for d in destinations} | {d for d, _ in counts})
    states = list(dict.fromkeys([*DELIVERY_STATES, *sorted({s for _, s in counts})]))
    out.add(
        "pacs_agent_deliveries",
        "gauge",
        "Result deliveries by destination and state.",
        [({"destination": d, "state": s}, counts.get((d, s), 0)) for d in names for s in states],
    )
    oldest_job = conn.execute(select(func.min(Job.created_at)).where(Job.state == "pending")).scalar_one()
    oldest_delivery = conn.execute(
        select(func.min(Delivery.created_at)).where(Delivery.state == "pending")
    ).scalar_one()
    out.add(
        "pacs_agent_oldest_pending_job_age_seconds",
        "gauge",
        "Age of the oldest job waiting for a worker (0 when none).",
        [({}, _age(now, oldest_job))],
    )
    out.add(
        "pacs_agent_oldest_pending_delivery_age_seconds",
        "gauge",
        "Age of the oldest result not yet delivered (0 when none).",
        [({}, _age(now, oldest_delivery))],
    )
    out.add(
        "pacs_agent_destination_up",
        "gauge",
        "1 when the last delivery attempt to the destination succeeded, 0 when it failed.",
        [
            ({"destination": name}, int(kind == "delivered"))
            for name, (kind, _, _) in last_delivery_attempts(conn, destinations).items()
        ],
    )
    out.add(
        "pacs_agent_job_duration_seconds",
        "histogram",
        "Run time of finished jobs (state done), by method.",
        duration_histogram(conn),
    )
