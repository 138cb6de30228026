"""The long-running processes: ``scp`` (receive, schedule, send), ``worker``, and ``serve`` (both).

``scp`` never imports torch or the pipelines. ``serve`` runs the scp in-process and supervises
one worker subprocess, restarting it if it dies (a crashing job then counts as one attempt); the
worker ends with ``serve``, and ``serve`` stops workers a killed predecessor left behind
(:mod:`pacs_agent.supervision`).
SIGTERM / SIGINT end every loop cleanly and the process exits 0.

Under systemd (``Type=notify``) each process sends READY=1 once it listens / can claim jobs,
WATCHDOG=1 while its loops make progress, and STOPPING=1 when SIGTERM arrives
(:mod:`pacs_agent.notify`). The scp process also serves ``/healthz`` and ``/metrics``
(:mod:`pacs_agent.health`).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from pacs_agent.audit import record_event
from pacs_agent.config import Settings
from pacs_agent.db import Database
from pacs_agent.errors import ConfigError
from pacs_agent.health import WORKER_INSTANCE_ENV, HealthServer
from pacs_agent.jobs.backend import backend_for
from pacs_agent.notify import Notifier, Watchdog
from pacs_agent.receive.server import ReceiveServer
from pacs_agent.receive.spool import Spool
from pacs_agent.routing.agent import PairingAgent
from pacs_agent.routing.pairing import RESPONSE_METHOD
from pacs_agent.send.outbox import DestinationSender
from pacs_agent.studies.scheduler import readiness_rules, run_once
from pacs_agent.supervision import SUPERVISOR_ENV, WorkerSupervisor, die_with_parent, stop_stale_workers

if TYPE_CHECKING:
    from pacs_agent.console.server import ConsoleThread

logger = logging.getLogger(__name__)

SCHEDULER_PERIOD_SECONDS = 1.0
STALL_SECONDS = 120.0
"""A scheduler pass that has not come round for this long counts as hung (watchdog pings stop)."""
WORKER_STALL_MIN_SECONDS = 30.0


def install_stop_signals(stop: threading.Event, on_stop: Callable[[], object] | None = None) -> None:
    """Make SIGTERM and SIGINT set ``stop`` and call ``on_stop`` (main thread only)."""

    def _handler(signum: int, _frame: FrameType | None) -> None:
        logger.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()
        if on_stop is not None:
            on_stop()

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)


def prepare_state(settings: Settings) -> None:
    """Create the state directory (mode 0700) before anything writes into it.

    Also sets the process umask to 0077, as the systemd units do (``UMask=0077``), so that the
    database (patient IDs), results and every other file are private when started by hand too.
    """
    os.umask(0o077)
    state = settings.storage.state_dir
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    state.chmod(0o700)
    settings.storage.results_dir.mkdir(parents=True, exist_ok=True, mode=0o700)


class ScpService:
    """Receiving AE + readiness scheduler + one sender per destination, in one process."""

    def __init__(self, settings: Settings) -> None:
        prepare_state(settings)
        self.settings = settings
        self.db = Database(settings.database_url)
        self.spool = Spool(settings.storage.spool_dir, settings.storage.min_free_mb)
        self.spool.remove_orphan_parts()
        self.server = ReceiveServer(settings, self.db, self.spool)
        self.stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.last_tick = time.monotonic()
        self.health = HealthServer(settings, self.alive)

    def alive(self) -> bool:
        """True while the scheduler comes round and no loop thread has died (watchdog liveness)."""
        if self.stop.is_set():
            return True  # shutting down: the loops end on purpose
        if time.monotonic() - self.last_tick > STALL_SECONDS:
            return False
        return all(thread.is_alive() for thread in self._threads)

    def _schedule_forever(self) -> None:
        rules = readiness_rules(self.settings)
        jobs = self.settings.jobs
        backend = backend_for(self.db.url)
        while not self.stop.is_set():
            self.last_tick = time.monotonic()
            try:
                with self.db.session() as session, session.begin():
                    run_once(session, rules, jobs.methods, jobs.max_attempts, settings=self.settings)
                    backend.recover(session, jobs.lease_seconds)  # SQLite; procrastinate's workers do it
            except Exception:
                logger.exception("scheduler pass failed; retrying")
            self.stop.wait(SCHEDULER_PERIOD_SECONDS)

    def start(self) -> None:
        """Start the health endpoint, listening and the background loops."""
        self.health.start()  # first: once the DICOM port answers, /healthz does too
        try:
            self.server.start()
        except BaseException:
            self.health.stop()
            raise
        loops: list[tuple[str, threading.Thread]] = [
            ("scheduler", threading.Thread(target=self._schedule_forever, name="scheduler", daemon=True))
        ]
        if RESPONSE_METHOD in self.settings.jobs.methods and self.settings.sources:
            agent = PairingAgent(self.settings, self.db, self.server.handlers.on_store)
            loops.append(
                ("pairing", threading.Thread(target=agent.run_forever, args=(self.stop,), name="pairing", daemon=True))
            )
        for destination in self.settings.destinations:
            sender = DestinationSender(self.settings, self.db, destination)
            loops.append(
                (
                    destination.name,
                    threading.Thread(
                        target=sender.run_forever,
                        args=(self.stop,),
                        name=f"send-{destination.name}",
                        daemon=True,
                    ),
                )
            )
        for _, thread in loops:
            thread.start()
            self._threads.append(thread)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop accepting associations, finish the loops, close the database."""
        self.stop.set()
        self.server.stop()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(deadline - time.monotonic(), 0.1))
        self.health.stop()
        self.db.dispose()

    def describe(self) -> str:
        """One line for ``systemctl status``."""
        node = self.settings.node
        return f"listening as {node.ae_title} on {node.host}:{node.port}"


def run_scp(settings: Settings) -> int:
    """``pacs-agent scp``: run until SIGTERM."""
    notifier = Notifier.from_environment()
    service = ScpService(settings)
    install_stop_signals(service.stop, lambda: notifier.stopping("stopping: closing associations"))
    service.start()
    watchdog = Watchdog(notifier, service.alive)
    watchdog.start()
    notifier.ready(service.describe())
    service.stop.wait()
    service.shutdown()
    watchdog.stop()
    return 0


_GPU_INSTANCE = re.compile(r"^(?:gpu)?(\d+(?:,\d+)*)$")


def cuda_devices_for_instance(instance: str) -> str:
    """``CUDA_VISIBLE_DEVICES`` for a worker instance name (``pacs-agent-worker@NAME.service``).

    Parameters
    ----------
    instance
        ``0``, ``1,2`` or ``gpu0`` select those GPUs; a name starting with ``cpu`` (``cpu0``,
        ``cpu-batch``) hides every GPU.

    Returns
    -------
    str
        The value to put into ``CUDA_VISIBLE_DEVICES`` (empty for CPU workers).

    Raises
    ------
    ConfigError
        For any other name.
    """
    name = instance.strip().lower()
    if name.startswith("cpu"):
        return ""
    match = _GPU_INSTANCE.match(name)
    if match is None:
        raise ConfigError(
            [
                f"{WORKER_INSTANCE_ENV}={instance!r}: a worker instance is a GPU index (0, 1, ...), "
                "gpuN, or a name starting with cpu (pacs-agent-worker@cpu0.service)"
            ]
        )
    return match.group(1)


def run_worker(settings: Settings, queues: tuple[str, ...] | None = None) -> int:
    """``pacs-agent worker``: run jobs until SIGTERM.

    ``queues`` (``--queue``) overrides ``[worker] queues``. ``[worker] device`` picks where the
    models run before any is loaded (:func:`pacs_agent.jobs.device.resolve_device`);
    ``$PACS_AGENT_WORKER_INSTANCE`` (set by ``pacs-agent-worker@.service``) selects the GPU first,
    see :func:`cuda_devices_for_instance`. ``$PACS_AGENT_SUPERVISOR_PID`` (set
    by ``serve``) ties the worker to that process: it gets SIGTERM when ``serve`` dies and checks
    between jobs that ``serve`` still runs (:func:`pacs_agent.supervision.die_with_parent`).
    """
    supervisor = os.environ.get(SUPERVISOR_ENV)
    # Started by serve: end with it (first thing, before the slow imports below).
    parent_alive = die_with_parent(int(supervisor)) if supervisor and supervisor.isdigit() else None
    if parent_alive is not None and not parent_alive():
        logger.warning("pacs-agent serve (pid %s) that started this worker is gone; exiting", supervisor)
        return 0
    instance = os.environ.get(WORKER_INSTANCE_ENV)
    if instance:
        os.environ["CUDA_VISIBLE_DEVICES"] = cuda_devices_for_instance(instance)
    from pacs_agent.jobs.device import resolve_device
    from pacs_agent.jobs.worker import Worker

    device = resolve_device(settings.worker.device)
    notifier = Notifier.from_environment()
    prepare_state(settings)
    worker = Worker(settings, Database(settings.database_url), queues=queues, device=device)
    worker.on_status = notifier.status
    if parent_alive is not None:
        worker.parent_alive = parent_alive
    install_stop_signals(worker.stop, lambda: notifier.stopping("stopping: finishing the current job"))
    stall = max(settings.jobs.lease_seconds, WORKER_STALL_MIN_SECONDS)
    watchdog = Watchdog(notifier, lambda: worker.heartbeat.seconds_since_beat() < stall)
    watchdog.start()
    takes = ", ".join(worker.queues) or "every queue"
    worker.run_forever(on_ready=lambda: notifier.ready(f"waiting for jobs ({device}; {takes})"))
    watchdog.stop()
    worker.db.dispose()
    return 0


def stop_orphan_workers(settings: Settings, db: Database) -> int:
    """Stop the workers a killed ``serve`` of this state directory left running; one audit event each.

    Returns how many were stopped (see :func:`pacs_agent.supervision.stop_stale_workers`).
    """
    stopped = stop_stale_workers(settings.storage.state_dir)
    if stopped:
        with db.session() as session, session.begin():
            for worker in stopped:
                record_event(session, "worker_orphan_stopped", level="WARNING", detail=worker.detail())
    return len(stopped)


def run_serve(settings: Settings, config_path: Path | None) -> int:
    """``pacs-agent serve``: the scp in this process plus a supervised worker process.

    Before its own worker starts, workers a previous ``serve`` of the same state directory left
    behind (it was killed) are stopped: :func:`stop_orphan_workers`.
    """
    notifier = Notifier.from_environment()
    service = ScpService(settings)
    install_stop_signals(service.stop, lambda: notifier.stopping("stopping: worker and associations"))
    stop_orphan_workers(settings, service.db)
    command = [sys.executable, "-m", "pacs_agent", "worker"]
    if config_path is not None:
        command += ["--config", str(config_path)]
    supervisor = WorkerSupervisor(command, threading.Event(), settings.storage.state_dir)
    service.start()
    supervisor.start()
    console = start_console(settings, service.db)
    watchdog = Watchdog(notifier, service.alive)
    watchdog.start()
    notifier.ready(service.describe() + (f"; console at {console.url}" if console else ""))
    service.stop.wait()
    if console is not None:
        console.stop()
    supervisor.shutdown()
    service.shutdown()
    watchdog.stop()
    return 0


def start_console(settings: Settings, db: Database) -> ConsoleThread | None:
    """Start the web console on a thread when ``[console] enabled`` (None otherwise).

    Imported only then: a node without the console never loads the web stack.
    """
    if not settings.console.enabled:
        return None
    from pacs_agent.console.server import ConsoleThread

    console = ConsoleThread(settings, db)
    console.start()
    return console
