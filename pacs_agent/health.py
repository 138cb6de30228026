"""Health and metrics: worker heartbeat files, ``/healthz`` and ``/metrics`` on a localhost port.

Worker heartbeat: every worker process keeps ``<state_dir>/workers/<host>-<pid>.alive`` up to date
(a small JSON file rewritten atomically at least every :data:`HEARTBEAT_SECONDS` while its loop
runs, and by the job heartbeat while a job runs; removed when the worker stops). A worker counts
as alive while its file is younger than ``[jobs] lease_seconds``, the same limit after which its
job is given to another worker. No schema change and no database write is needed.

``/healthz`` answers 200 with JSON when every check passes, else 503 with the reasons:
the database answers, the spool has more free space than ``[storage] min_free_mb``, some worker is
alive whenever a job is waiting, and the last delivery attempt to each destination succeeded.
``/metrics`` is the Prometheus text format (:mod:`pacs_agent.metrics`), computed from the
database on each scrape. The server binds ``[observability] http_host:http_port`` (port 0 disables it).

Health and metrics read through an engine of their own without the write-lock hook of
:mod:`pacs_agent.db`, so a scrape never delays a C-STORE. Nothing here contains patient data.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from pacs_agent import __version__
from pacs_agent.config import Settings
from pacs_agent.db import read_engine
from pacs_agent.db.tables import Job
from pacs_agent.metrics import CONTENT_TYPE, Exposition, database_metrics, last_delivery_attempts

logger = logging.getLogger(__name__)

HEARTBEAT_DIR = "workers"
HEARTBEAT_SUFFIX = ".alive"
HEARTBEAT_SECONDS = 5.0
"""Longest interval between two rewrites of a worker's heartbeat file while its loop runs."""
PRUNE_SECONDS = 7 * 24 * 3600.0
"""Heartbeat files of workers gone for this long are deleted by the health check."""
WORKER_INSTANCE_ENV = "PACS_AGENT_WORKER_INSTANCE"
"""Set by ``pacs-agent-worker@.service`` to the instance name (GPU index or ``cpu0``)."""


# -- worker heartbeat files ------------------------------------------------------------------


class WorkerHeartbeat:
    """The heartbeat file of one worker process.

    Parameters
    ----------
    state_dir
        ``[storage] state_dir``; the file goes to ``<state_dir>/workers/``.
    worker_id
        ``host:pid`` as recorded on the jobs the worker runs.
    """

    def __init__(self, state_dir: Path, worker_id: str) -> None:
        self.directory = state_dir / HEARTBEAT_DIR
        safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in worker_id)
        self.path = self.directory / f"{safe}{HEARTBEAT_SUFFIX}"
        self.worker_id = worker_id
        self.last_beat = time.monotonic()
        self._written_at = -math.inf
        self._activity = ""
        self._lock = threading.Lock()

    def beat(self, activity: str = "idle") -> None:
        """Record progress; rewrites the file when ``activity`` changed or it is due."""
        now = time.monotonic()
        with self._lock:
            self.last_beat = now
            if activity == self._activity and now - self._written_at < HEARTBEAT_SECONDS:
                return
            record = {
                "worker_id": self.worker_id,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "instance": os.environ.get(WORKER_INSTANCE_ENV, ""),
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "activity": activity,
                "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            try:
                self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
                tmp = self.path.with_suffix(".tmp")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w", encoding="utf-8") as out:
                    json.dump(record, out)
                os.replace(tmp, self.path)
            except OSError as exc:
                logger.warning("cannot write the worker heartbeat %s: %s", self.path, exc.strerror)
                return
            self._written_at = now
            self._activity = activity

    def seconds_since_beat(self) -> float:
        """Seconds since :meth:`beat` was last called (the worker's liveness)."""
        return time.monotonic() - self.last_beat

    def remove(self) -> None:
        """Delete the file (the worker stops cleanly)."""
        self.path.unlink(missing_ok=True)


@dataclass(frozen=True)
class WorkerState:
    """What a worker's heartbeat file says, and how old it is."""

    worker_id: str
    instance: str
    activity: str
    age_seconds: float


def read_worker_heartbeats(state_dir: Path, *, now: float | None = None) -> list[WorkerState]:
    """Every worker heartbeat file under ``state_dir``, newest first; very old files are deleted."""
    directory = state_dir / HEARTBEAT_DIR
    now = time.time() if now is None else now
    found = []
    for path in directory.glob(f"*{HEARTBEAT_SUFFIX}"):
        try:
            age = now - path.stat().st_mtime
            if age > PRUNE_SECONDS:
                path.unlink(missing_ok=True)
                continue
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        found.append(
            WorkerState(
                worker_id=str(record.get("worker_id", path.stem)),
                instance=str(record.get("instance") or ""),
                activity=str(record.get("activity", "")),
                age_seconds=max(age, 0.0),
            )
        )
    return sorted(found, key=lambda w: w.age_seconds)


# -- checks ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One health check: its name, whether it passed, and what was found."""

    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class HealthReport:
    """All checks; the node is healthy when every check passed."""

    checks: tuple[Check, ...]
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when every check passed."""
        return all(c.ok for c in self.checks)

    @property
    def reasons(self) -> list[str]:
        """``name: detail`` of every failed check."""
        return [f"{c.name}: {c.detail}" for c in self.checks if not c.ok]

    def as_json(self) -> dict[str, Any]:
        """The ``/healthz`` body."""
        return {
            "status": "ok" if self.ok else "unhealthy",
            "reasons": self.reasons,
            "checks": {c.name: {"ok": c.ok, "detail": c.detail} for c in self.checks},
            **self.details,
        }


def _short_error(exc: Exception) -> str:
    orig = getattr(exc, "orig", None)
    message = str(orig if orig is not None else exc).splitlines()[0] if str(exc) else ""
    return f"{type(orig or exc).__name__}: {message}"[:300]


class HealthMonitor:
    """Computes the health report and the metrics of one node.

    Parameters
    ----------
    settings
        The node's settings.
    alive
        Optional liveness of the calling process's loops (the scp's scheduler), reported as the
        ``loops`` check.
    """

    def __init__(self, settings: Settings, alive: Callable[[], bool] | None = None) -> None:
        self.settings = settings
        self.alive = alive
        self.engine = read_engine(settings.database_url)
        self.free_bytes: Callable[[], int] = lambda: shutil.disk_usage(self.settings.storage.spool_dir).free
        self.started = time.monotonic()

    def close(self) -> None:
        """Release database connections."""
        self.engine.dispose()

    # -- health ----------------------------------------------------------------------------

    def report(self) -> HealthReport:
        """Run every check (each catches its own errors)."""
        checks: list[Check] = []
        details: dict[str, Any] = {"version": __version__, "uptime_seconds": round(time.monotonic() - self.started)}
        if self.alive is not None:
            alive = self.alive()
            checks.append(Check("loops", alive, "scheduler and senders running" if alive else "a loop is stuck"))
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
                checks.append(Check("database", True, "reachable"))
                checks.append(self._check_workers(conn, details))
                checks.extend(self._check_destinations(conn))
        except Exception as exc:
            checks.append(Check("database", False, f"not reachable: {_short_error(exc)}"))
        checks.append(self._check_spool())
        return HealthReport(tuple(checks), details)

    def _check_spool(self) -> Check:
        minimum = self.settings.storage.min_free_mb
        try:
            free_mb = self.free_bytes() / 1024 / 1024
        except OSError as exc:
            return Check("spool", False, f"cannot read free space of {self.settings.storage.spool_dir}: {exc}")
        if free_mb < minimum:
            return Check(
                "spool",
                False,
                f"{free_mb:.0f} MB free under the spool, below [storage] min_free_mb = {minimum}: "
                "C-STORE answers 0xA700 (Out of Resources)",
            )
        return Check("spool", True, f"{free_mb:.0f} MB free (minimum {minimum} MB)")

    def _check_workers(self, conn: Connection, details: dict[str, Any]) -> Check:
        limit = self.settings.jobs.lease_seconds
        workers = read_worker_heartbeats(self.settings.storage.state_dir)
        alive = [w for w in workers if w.age_seconds <= limit]
        details["workers"] = [asdict(w) | {"age_seconds": round(w.age_seconds, 1)} for w in alive]
        # Workers on other hosts (several hosts: only the database is common) have no file here:
        # the workers table and the queue's heartbeat say which are alive.
        from pacs_agent.status import worker_status

        local = {w.worker_id for w in alive}
        with Session(bind=conn) as session:
            remote = [w for w in worker_status(session, limit) if w["alive"] and w["name"] not in local]
        details["workers"] += [
            {"worker_id": w["name"], "host": w["host"], "device": w["device"]}
            | {"age_seconds": w["heartbeat_age_seconds"]}
            for w in remote
        ]
        if alive or remote:
            return Check("workers", True, f"{len(alive) + len(remote)} worker(s) alive")
        waiting = conn.execute(
            select(func.count(Job.id)).where(Job.state == "pending", Job.not_before <= datetime.now(UTC))
        ).scalar_one()
        newest = f"newest heartbeat {workers[0].age_seconds:.0f} s ago" if workers else "no heartbeat ever"
        if waiting:
            return Check(
                "workers",
                False,
                f"{waiting} job(s) waiting and no worker alive ({newest}; limit [jobs] lease_seconds = {limit:g})",
            )
        return Check("workers", True, f"no worker alive ({newest}), but no job is waiting")

    def _check_destinations(self, conn: Connection) -> list[Check]:
        checks = []
        last = last_delivery_attempts(conn, self.settings.destinations)
        for dest in self.settings.destinations:
            name = f"destination {dest.name}"
            if dest.name not in last:
                checks.append(Check(name, True, "no delivery attempted yet"))
                continue
            kind, at, detail = last[dest.name]
            when = at.isoformat(timespec="seconds")
            if kind == "delivered":
                checks.append(Check(name, True, f"last delivery succeeded at {when}"))
            else:
                reason = detail.removeprefix(f"{dest.name}: ")
                checks.append(Check(name, False, f"last delivery attempt failed at {when}: {reason}"))
        return checks

    # -- metrics ---------------------------------------------------------------------------

    def metrics(self) -> str:
        """All metrics in the Prometheus text format."""
        report = self.report()
        out = Exposition()
        out.add("pacs_agent_info", "gauge", "Version of the running node.", [({"version": __version__}, 1)])
        out.add("pacs_agent_healthy", "gauge", "1 when /healthz answers 200.", [({}, int(report.ok))])
        out.add(
            "pacs_agent_health_check",
            "gauge",
            "1 per passing health check, 0 per failing one.",
            [({"check": c.name}, int(c.ok)) for c in report.checks],
        )
        try:
            free = self.free_bytes()
            out.add("pacs_agent_spool_free_bytes", "gauge", "Free disk space under the spool.", [({}, free)])
        except OSError:
            pass
        out.add(
            "pacs_agent_spool_min_free_bytes",
            "gauge",
            "Watermark below which C-STORE answers Out of Resources.",
            [({}, self.settings.storage.min_free_mb * 1024 * 1024)],
        )
        out.add(
            "pacs_agent_workers_alive",
            "gauge",
            "Workers whose heartbeat is younger than [jobs] lease_seconds.",
            [({}, len(report.details.get("workers", [])))],
        )
        try:
            with self.engine.connect() as conn:
                database_metrics(conn, self.settings.destinations, out, self.settings.jobs.lease_seconds)
        except Exception as exc:
            logger.warning("metrics from the database unavailable: %s", _short_error(exc))
        return out.render()


# -- HTTP server -----------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = f"pacs-agent/{__version__}"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path == "/healthz":
                report = self.server.monitor.report()
                status = HTTPStatus.OK if report.ok else HTTPStatus.SERVICE_UNAVAILABLE
                self._send(status, "application/json", json.dumps(report.as_json(), indent=2) + "\n")
            elif path == "/metrics":
                self._send(HTTPStatus.OK, CONTENT_TYPE, self.server.monitor.metrics())
            else:
                self._send(HTTPStatus.NOT_FOUND, "text/plain", "not found: try /healthz or /metrics\n")
        except Exception:
            logger.exception("health endpoint %s failed", path)
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, "text/plain", "internal error (see the service log)\n")

    def _send(self, status: HTTPStatus, content_type: str, body: str) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    monitor: HealthMonitor


class HealthServer:
    """``/healthz`` and ``/metrics`` served from a background thread.

    Parameters
    ----------
    settings
        The node's settings (``[observability] http_host, http_port``).
    alive
        Optional liveness of the calling process's loops (see :class:`HealthMonitor`).
    """

    def __init__(self, settings: Settings, alive: Callable[[], bool] | None = None) -> None:
        self.settings = settings
        self.monitor = HealthMonitor(settings, alive)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int | None:
        """The bound port, or None when not serving."""
        return int(self._server.server_address[1]) if self._server is not None else None

    def start(self) -> bool:
        """Start serving; returns False when disabled (port 0) or the address cannot be bound.

        A failure to bind is logged as an error and does not stop the node: receiving DICOM
        matters more than reporting on it.
        """
        obs = self.settings.observability
        if obs.http_port == 0:
            logger.info("health and metrics endpoint disabled ([observability] http_port = 0)")
            return False
        try:
            server = _Server((obs.http_host, obs.http_port), _Handler)
        except OSError as exc:
            logger.error(
                "cannot serve /healthz and /metrics on %s:%d: %s (check [observability] http_port)",
                obs.http_host,
                obs.http_port,
                exc.strerror,
            )
            return False
        server.monitor = self.monitor
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="health-http", daemon=True)
        self._thread.start()
        logger.info("health and metrics on http://%s:%d/healthz and /metrics", obs.http_host, self.port)
        return True

    def stop(self) -> None:
        """Stop serving and release the port and database connections."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        self.monitor.close()
