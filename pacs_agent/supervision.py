"""``serve``'s worker process: started, restarted, tied to its parent, and cleaned up after a crash.

A worker started by ``pacs-agent serve`` must not outlive it: a ``serve`` killed with SIGKILL (or
by the OOM killer) cannot stop its child, and an orphaned worker keeps claiming jobs beside the
one the next ``serve`` starts. Three things prevent that:

- The worker asks the kernel for SIGTERM when its parent dies (Linux ``PR_SET_PDEATHSIG``, set by
  :func:`die_with_parent` first thing in the child) and checks between jobs that its parent is
  still the ``serve`` that started it (``$PACS_AGENT_SUPERVISOR_PID``): that covers a parent that
  died before the ``prctl`` call and systems without it. SIGTERM lets the running job finish.
- ``serve`` writes a pid file per worker into ``<state_dir>/serve-workers/`` with both processes'
  start times (from ``/proc``, so a reused pid is never taken for the worker).
- On start, ``serve`` stops every worker of a pid file whose ``serve`` is gone
  (:func:`stop_stale_workers`): SIGTERM, SIGKILL after :data:`STALE_WORKER_GRACE_SECONDS`, and an
  audit event ``worker_orphan_stopped`` for each.

Under systemd the unit's control group does the same (``KillMode=control-group``, the default,
kills every process of the unit); the pid files cover ``serve`` run by hand, in a container or by
another supervisor.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pacs_agent.notify import SYSTEMD_VARIABLES

logger = logging.getLogger(__name__)

SUPERVISOR_ENV = "PACS_AGENT_SUPERVISOR_PID"
"""Set by ``serve`` in its worker's environment: the pid of the ``serve`` process."""
PID_DIR = "serve-workers"
STALE_WORKER_GRACE_SECONDS = 30.0
"""How long a stale worker gets after SIGTERM (to finish or give up its job) before SIGKILL."""
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@dataclass(frozen=True)
class ProcessIdentity:
    """A process as pid plus start time (clock ticks since boot), so that a reused pid does not match."""

    pid: int
    start_time: int

    @classmethod
    def of(cls, pid: int) -> ProcessIdentity | None:
        """The identity of the running process ``pid``; None when it is gone (or a zombie) or unknowable."""
        start = process_start_time(pid)
        return None if start is None else cls(pid, start)

    def running(self) -> bool:
        """True while this very process runs (not a zombie, not another process with the same pid)."""
        return process_start_time(self.pid) == self.start_time


def process_start_time(pid: int) -> int | None:
    """Start time of a running process from ``/proc/<pid>/stat``; None if gone, a zombie, or no ``/proc``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ... starttime ...": comm may hold spaces and parentheses.
    fields = stat[stat.rfind(")") + 2 :].split()
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _command_line(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def die_with_parent(parent_pid: int) -> Callable[[], bool]:
    """Have this process get SIGTERM when its parent dies; returns a check that the parent still lives.

    Call it first thing in a worker started by ``serve`` (``parent_pid`` from ``$PACS_AGENT_SUPERVISOR_PID``).
    On Linux the kernel sends SIGTERM when the parent thread that started this process ends (``serve``
    starts the worker from its supervising thread, which ends only when ``serve`` stops the worker
    anyway). The returned check - is the parent still ``parent_pid``? - covers the moment before the
    ``prctl`` call and systems without it; the worker runs it between jobs.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
                logger.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
        except (OSError, AttributeError) as exc:
            logger.warning("cannot ask for a signal when serve ends (%s); checking between jobs only", exc)
    return lambda: os.getppid() == parent_pid


@dataclass(frozen=True)
class WorkerRecord:
    """What a pid file says: a worker and the ``serve`` that started it."""

    worker: ProcessIdentity
    supervisor: ProcessIdentity
    path: Path


def pid_directory(state_dir: Path) -> Path:
    """Where ``serve`` keeps the pid files of its workers."""
    return state_dir / PID_DIR


def write_pid_file(state_dir: Path, worker: ProcessIdentity, supervisor: ProcessIdentity) -> Path:
    """Record that ``supervisor`` (a ``serve``) started ``worker``; returns the file (atomic write)."""
    directory = pid_directory(state_dir)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / f"worker-{worker.pid}.json"
    record = {
        "pid": worker.pid,
        "start_time": worker.start_time,
        "supervisor_pid": supervisor.pid,
        "supervisor_start_time": supervisor.start_time,
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(path)
    return path


def read_pid_files(state_dir: Path) -> list[WorkerRecord]:
    """Every readable pid file of the state directory; unreadable ones are removed with a warning."""
    records = []
    for path in sorted(pid_directory(state_dir).glob("worker-*.json")):
        try:
            data = json.loads(path.read_text())
            records.append(
                WorkerRecord(
                    worker=ProcessIdentity(int(data["pid"]), int(data["start_time"])),
                    supervisor=ProcessIdentity(int(data["supervisor_pid"]), int(data["supervisor_start_time"])),
                    path=path,
                )
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("removing unreadable worker pid file %s (%s)", path, exc)
            path.unlink(missing_ok=True)
    return records


@dataclass(frozen=True)
class StoppedWorker:
    """A stale worker :func:`stop_stale_workers` stopped, and how."""

    pid: int
    supervisor_pid: int
    killed: bool
    """True when it had to be killed (SIGKILL) after the grace period."""

    def detail(self) -> str:
        """The audit event's text."""
        how = (
            f"did not stop within {STALE_WORKER_GRACE_SECONDS:.0f} s of SIGTERM and was killed (SIGKILL); "
            "a job it ran goes back to the queue when its lease runs out"
            if self.killed
            else "stopped with SIGTERM"
        )
        return (
            f"pacs-agent worker pid {self.pid} of this state directory was left running by pacs-agent serve "
            f"pid {self.supervisor_pid}, which is gone: {how}"
        )


def _wait_gone(worker: ProcessIdentity, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while worker.running():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def stop_stale_workers(state_dir: Path, *, grace_seconds: float = STALE_WORKER_GRACE_SECONDS) -> list[StoppedWorker]:
    """Stop the workers a previous ``serve`` of ``state_dir`` left behind; returns those stopped.

    A pid file names a worker and its ``serve``. The worker is stopped when it still runs (same pid
    and start time, and its command line is a ``pacs-agent worker``) while its ``serve`` does not:
    SIGTERM, then SIGKILL after ``grace_seconds``. A worker whose ``serve`` still runs (a second
    ``serve`` on the same state directory) is left alone with a warning. Pid files of processes
    that are gone are removed. The caller records an audit event per stopped worker.
    """
    stopped = []
    for record in read_pid_files(state_dir):
        worker = record.worker
        if not worker.running():
            record.path.unlink(missing_ok=True)
            continue
        if record.supervisor.running():
            logger.warning(
                "worker pid %d belongs to pacs-agent serve pid %d, still running on this state directory: left alone",
                worker.pid,
                record.supervisor.pid,
            )
            continue
        command = _command_line(worker.pid)
        if "worker" not in command or not any("pacs_agent" in part or "pacs-agent" in part for part in command):
            logger.warning(
                "pid %d of %s is not a pacs-agent worker (%s): not touched", worker.pid, record.path, command
            )
            record.path.unlink(missing_ok=True)
            continue
        logger.warning("stopping pacs-agent worker pid %d left by serve pid %d", worker.pid, record.supervisor.pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signal.SIGTERM)
        killed = False
        if not _wait_gone(worker, grace_seconds):
            killed = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGKILL)
            _wait_gone(worker, 10.0)
        record.path.unlink(missing_ok=True)
        stopped.append(StoppedWorker(worker.pid, record.supervisor.pid, killed))
    return stopped


class WorkerSupervisor:
    """Keeps one subprocess alive while the scp runs and records it in a pid file.

    ``serve``'s ``pacs-agent worker``, and each extra receiving process of ``[node]
    receive_processes`` (:mod:`pacs_agent.receive.processes`), which starts itself through
    ``spawn`` (it is handed a socket) - ``command`` then only names it.
    """

    def __init__(
        self,
        command: Sequence[str],
        stop: threading.Event,
        state_dir: Path,
        *,
        spawn: Callable[[dict[str, str]], subprocess.Popen[bytes]] | None = None,
        name: str = "worker",
    ) -> None:
        self.command = list(command)
        self.stop = stop
        self.state_dir = state_dir
        self.spawn = spawn
        self.name = name
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._pid_file: Path | None = None
        self._thread = threading.Thread(target=self._supervise, name=f"{name}-supervisor", daemon=True)

    def start(self) -> None:
        """Start the worker and watch it."""
        self._thread.start()

    def _record(self, process: subprocess.Popen[bytes]) -> None:
        me, child = ProcessIdentity.of(os.getpid()), ProcessIdentity.of(process.pid)
        if me is None or child is None:
            return  # no /proc: the worker's own parent check still ends it with serve
        try:
            self._pid_file = write_pid_file(self.state_dir, child, me)
        except OSError as exc:
            logger.warning("cannot write the worker's pid file (%s); a stale worker could not be found", exc)

    def _forget(self) -> None:
        if self._pid_file is not None:
            self._pid_file.unlink(missing_ok=True)
            self._pid_file = None

    def _supervise(self) -> None:
        delay = 1.0
        while not self.stop.is_set():
            started = time.monotonic()
            # The worker must not speak to systemd for the unit of this process; it ends with this process.
            env = {k: v for k, v in os.environ.items() if k not in SYSTEMD_VARIABLES}
            env[SUPERVISOR_ENV] = str(os.getpid())
            try:
                self.process = self.spawn(env) if self.spawn is not None else subprocess.Popen(self.command, env=env)
            except OSError as exc:
                logger.error("cannot start the %s process (%s); retrying in %.0f s", self.name, exc, delay)
                self.stop.wait(delay)
                delay = min(delay * 2, 30.0)
                continue
            self._record(self.process)
            logger.info("%s process started (pid %d)", self.name, self.process.pid)
            while self.process.poll() is None and not self.stop.is_set():
                self.stop.wait(0.2)
            if self.stop.is_set():
                return
            self._forget()
            code = self.process.returncode
            logger.error("%s process exited with code %s; restarting in %.0f s", self.name, code, delay)
            self.restarts += 1
            delay = 1.0 if time.monotonic() - started > 60 else min(delay * 2, 30.0)
            self.stop.wait(delay)

    def shutdown(self, timeout: float = 60.0) -> None:
        """SIGTERM the worker (it finishes its job), then kill it after ``timeout``."""
        self.stop.set()
        self._thread.join(5)
        proc = self.process
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.error("%s did not stop within %.0f s; killing it (its work will be retried)", self.name, timeout)
                proc.kill()
                proc.wait()
        self._forget()
