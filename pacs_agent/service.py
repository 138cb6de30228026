"""The long-running processes: ``scp`` (receive, schedule, send), ``worker``, and ``serve`` (both).

``scp`` never imports torch or the pipelines. ``serve`` runs the scp in-process and supervises
one worker subprocess, restarting it if it dies (a crashing job then counts as one attempt).
SIGTERM / SIGINT end every loop cleanly and the process exits 0.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from pacs_agent.config import Settings
from pacs_agent.db import Database
from pacs_agent.jobs.queue import requeue_stale
from pacs_agent.receive.server import ReceiveServer
from pacs_agent.receive.spool import Spool
from pacs_agent.send.outbox import DestinationSender
from pacs_agent.studies.scheduler import readiness_rules, run_once

logger = logging.getLogger(__name__)

SCHEDULER_PERIOD_SECONDS = 1.0


def install_stop_signals(stop: threading.Event) -> None:
    """Make SIGTERM and SIGINT set ``stop`` (main thread only)."""

    def _handler(signum: int, _frame: FrameType | None) -> None:
        logger.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)


def prepare_state(settings: Settings) -> None:
    """Create the state directory (mode 0700) before anything writes into it."""
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

    def _schedule_forever(self) -> None:
        rules = readiness_rules(self.settings)
        jobs = self.settings.jobs
        while not self.stop.is_set():
            try:
                with self.db.session() as session, session.begin():
                    run_once(session, rules, jobs.methods, jobs.max_attempts)
                    requeue_stale(session, jobs.lease_seconds)
            except Exception:
                logger.exception("scheduler pass failed; retrying")
            self.stop.wait(SCHEDULER_PERIOD_SECONDS)

    def start(self) -> None:
        """Start listening and the background loops."""
        self.server.start()
        loops: list[tuple[str, threading.Thread]] = [
            ("scheduler", threading.Thread(target=self._schedule_forever, name="scheduler", daemon=True))
        ]
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
        self.db.dispose()


def run_scp(settings: Settings) -> int:
    """``pacs-agent scp``: run until SIGTERM."""
    service = ScpService(settings)
    install_stop_signals(service.stop)
    service.start()
    service.stop.wait()
    service.shutdown()
    return 0


def run_worker(settings: Settings) -> int:
    """``pacs-agent worker``: run jobs until SIGTERM."""
    from pacs_agent.jobs.worker import Worker

    prepare_state(settings)
    worker = Worker(settings, Database(settings.database_url))
    install_stop_signals(worker.stop)
    worker.run_forever()
    worker.db.dispose()
    return 0


class WorkerSupervisor:
    """Keeps one ``pacs-agent worker`` subprocess alive while the scp runs."""

    def __init__(self, command: Sequence[str], stop: threading.Event) -> None:
        self.command = list(command)
        self.stop = stop
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._thread = threading.Thread(target=self._supervise, name="worker-supervisor", daemon=True)

    def start(self) -> None:
        """Start the worker and watch it."""
        self._thread.start()

    def _supervise(self) -> None:
        delay = 1.0
        while not self.stop.is_set():
            started = time.monotonic()
            self.process = subprocess.Popen(self.command)
            logger.info("worker process started (pid %d)", self.process.pid)
            while self.process.poll() is None and not self.stop.is_set():
                self.stop.wait(0.2)
            if self.stop.is_set():
                return
            code = self.process.returncode
            logger.error("worker process exited with code %s; restarting in %.0f s", code, delay)
            self.restarts += 1
            delay = 1.0 if time.monotonic() - started > 60 else min(delay * 2, 30.0)
            self.stop.wait(delay)

    def shutdown(self, timeout: float = 60.0) -> None:
        """SIGTERM the worker (it finishes its job), then kill it after ``timeout``."""
        self.stop.set()
        self._thread.join(5)
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.error("worker did not stop within %.0f s; killing it (its job will be retried)", timeout)
            proc.kill()
            proc.wait()


def run_serve(settings: Settings, config_path: Path | None) -> int:
    """``pacs-agent serve``: the scp in this process plus a supervised worker process."""
    service = ScpService(settings)
    install_stop_signals(service.stop)
    command = [sys.executable, "-m", "pacs_agent", "worker"]
    if config_path is not None:
        command += ["--config", str(config_path)]
    supervisor = WorkerSupervisor(command, threading.Event())
    service.start()
    supervisor.start()
    service.stop.wait()
    supervisor.shutdown()
    service.shutdown()
    return 0
