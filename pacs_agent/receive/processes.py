"""Several receiving processes behind the one DICOM port (``[node] receive_processes``).

pynetdicom runs every association of a process under one interpreter lock, so one process uses
at most one core, however many senders there are. With ``receive_processes`` > 1 the scp process
starts that many minus one receiving processes (``python -m pacs_agent.receive.worker``) and
shares the plain DICOM port with them by handing over accepted connections - one acceptor, so
that everything decided per connection and per association stays in one place:

- The scp process accepts every connection on the plain port and admits it in its
  :class:`~pacs_agent.receive.access.ConnectionGuard` (``allowed_hosts``,
  ``max_connections_per_host``, the request timeout, the waiting-connection cap) exactly as with
  one process. An admitted connection is served by the process with the fewest connections: the
  scp process itself, or a receiving process, to which its socket is passed over a Unix socket
  (``SCM_RIGHTS``). The scp process keeps its copy of the socket until the receiving process
  reports the connection closed, so the guard's timeouts and evictions still close it.
- The receiving process runs the association with the node's own handlers. The association
  checks (``allowed_calling_aets``, ``peers``, called AE title) are the same code on the same
  settings; the association limits (``max_associations``, ``max_associations_per_aet``) are
  asked of the scp process's :class:`~pacs_agent.receive.access.AssociationLimiter`, which counts
  every process's associations together.
- The Instance row of each received instance is written by the scp process's
  :class:`~pacs_agent.receive.index.InstanceIndex` (one committer for all processes: concurrent
  associations share a COMMIT); the receiving process answers Success only once its own row is
  committed. The file is written and fsync'ed by the receiving process itself.
- Each receiving process is supervised like ``serve``'s worker
  (:class:`~pacs_agent.supervision.WorkerSupervisor`: restarted when it dies, a pid file, stopped
  as a stale worker by the next ``serve`` if the scp was killed) and dies with the scp process
  (``PR_SET_PDEATHSIG``, and the end of its Unix socket). When a receiving process dies, its
  connections close, their slots are given back, and nothing it had not answered was acknowledged.

The DICOM TLS port is served by the scp process alone.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from pacs_agent.receive.access import AssociationLimiter, Connection, ConnectionGuard, shutdown_of
from pacs_agent.receive.index import InstanceIndex, Outcome
from pacs_agent.studies.store import StoreOutcome
from pacs_agent.supervision import WorkerSupervisor

logger = logging.getLogger(__name__)

MESSAGE_BYTES = 1 << 20
"""Largest message on the Unix socket between the processes (a message is one pickled tuple)."""
WORKER_MODULE = "pacs_agent.receive.worker"


class Channel:
    """One end of the ``SOCK_SEQPACKET`` Unix socket between the scp and a receiving process.

    Both ends are this program: messages are pickled tuples, one per packet, and may carry file
    descriptors. ``send`` is thread-safe; one thread reads.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._lock = threading.Lock()

    def send(self, message: tuple[Any, ...], fds: tuple[int, ...] = ()) -> None:
        """Send one message (and file descriptors); OSError when the other end is gone."""
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        with self._lock:
            if fds:
                socket.send_fds(self.sock, [data], list(fds))
            else:
                self.sock.send(data)

    def receive(self) -> tuple[tuple[Any, ...], list[int]] | None:
        """The next message and the descriptors it carries; None when the other end closed."""
        try:
            data, fds, _flags, _address = socket.recv_fds(self.sock, MESSAGE_BYTES, 4)
        except OSError:
            return None
        if not data:
            for fd in fds:
                os.close(fd)
            return None
        return pickle.loads(data), fds  # noqa: S301 - the other end is this program, over a socketpair

    def close(self) -> None:
        """Close this end (the other end then reads the end)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def encode_outcome(outcome: Outcome) -> tuple[str, str]:
    """An index outcome as it crosses the process boundary."""
    if isinstance(outcome, StoreOutcome):
        return ("ok", outcome.value)
    return ("error", f"{type(outcome).__name__}: {outcome}")


class RemoteIndexError(SQLAlchemyError):
    """The scp process could not write the Instance row (its database error, as text)."""


def decode_outcome(encoded: tuple[str, str]) -> StoreOutcome:
    """The outcome sent by :func:`encode_outcome`; raises :class:`RemoteIndexError` for a failure."""
    kind, value = encoded
    if kind == "ok":
        return StoreOutcome(value)
    raise RemoteIndexError(value)


# -- the scp process's side ----------------------------------------------------------------------


@dataclass
class _Handed:
    sock: socket.socket
    connection: Connection


class WorkerLink:
    """The scp process's end of one receiving process: hands it connections and answers its requests."""

    def __init__(
        self,
        number: int,
        settings: Any,
        guard: ConnectionGuard,
        limiter: AssociationLimiter,
        index: InstanceIndex,
        slot_keys: itertools.count[int],
        on_tls_refused: Callable[[str, str], None],
    ) -> None:
        self.number = number
        self.on_tls_refused = on_tls_refused
        self.settings = settings
        self.guard = guard
        self.limiter = limiter
        self.index = index
        self._slot_keys = slot_keys
        self.channel: Channel | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._handed: dict[int, _Handed] = {}
        self._slots: dict[int, int] = {}
        """The receiving process's association key -> this process's limiter key."""
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    @property
    def alive(self) -> bool:
        """True while the receiving process runs and its channel is open."""
        return self.channel is not None and self.process is not None and self.process.poll() is None

    @property
    def load(self) -> int:
        """Connections this receiving process serves now."""
        with self._lock:
            return len(self._handed)

    def spawn(self, env: dict[str, str]) -> subprocess.Popen[bytes]:
        """Start the receiving process (called by its supervisor, again after it died)."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", WORKER_MODULE, str(theirs.fileno())], env=env, pass_fds=[theirs.fileno()]
            )
        finally:
            theirs.close()
        channel = Channel(mine)
        channel.send(("settings", self.settings))
        self.process = process
        self.channel = channel
        threading.Thread(target=self._read, args=(channel,), name=f"receive-process-{self.number}", daemon=True).start()
        return process

    def hand_off(
        self, request: socket.socket, client_address: tuple[str, int], connection: Connection, *, tls: bool = False
    ) -> bool:
        """Pass an admitted connection to the receiving process; False when it cannot take it.

        ``tls``: a connection of the TLS port, not yet handshaken (the receiving process does it).
        """
        channel = self.channel
        if channel is None or not self.alive:
            return False
        handle = next(self._ids)
        with self._lock:
            self._handed[handle] = _Handed(request, connection)
        try:
            message = ("connection", handle, str(client_address[0]), int(client_address[1]), tls)
            channel.send(message, (request.fileno(),))
        except OSError:
            with self._lock:
                self._handed.pop(handle, None)
            return False
        return True

    def _reply(self, channel: Channel, message: tuple[Any, ...]) -> None:
        with contextlib.suppress(OSError):  # the receiving process is gone: its waiters are too
            channel.send(message)

    def _read(self, channel: Channel) -> None:
        """Serve the receiving process's messages until its channel ends, then release what it held."""
        while True:
            received = channel.receive()
            if received is None:
                break
            message, fds = received
            for fd in fds:
                os.close(fd)
            try:
                self._dispatch(channel, message)
            except Exception:  # one bad message must not end the link
                logger.exception("receive process %d: cannot handle %r", self.number, message[:1])
        self._ended(channel)

    def _dispatch(self, channel: Channel, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "record":
            _, request_id, entry = message
            self.index.record_async(
                entry, lambda outcome: self._reply(channel, ("recorded", request_id, encode_outcome(outcome)))
            )
        elif kind == "admit":
            _, request_id, key, calling = message
            slot = next(self._slot_keys)
            refusal = self.limiter.admit(slot, calling, lambda: self.alive)
            if refusal is None:
                with self._lock:
                    self._slots[key] = slot
            self._reply(channel, ("admitted", request_id, refusal))
        elif kind == "release":
            with self._lock:
                released = self._slots.pop(message[1], None)
            if released is not None:
                self.limiter.release(released)
        elif kind == "requested":
            with self._lock:
                handed = self._handed.get(message[1])
            if handed is not None:
                self.guard.requested(handed.connection)
        elif kind in ("handshaking", "handshaken"):
            with self._lock:
                handed = self._handed.get(message[1])
            if handed is not None and kind == "handshaking":
                self.guard.handshaking(handed.connection)
            elif handed is not None:  # closing the plain socket ends the TLS one above it as well
                self.guard.restart(handed.connection, shutdown_of(handed.sock))
        elif kind == "tls_refused":
            self.on_tls_refused(message[1], message[2])
        elif kind == "closed":
            with self._lock:
                handed = self._handed.pop(message[1], None)
            if handed is not None:
                self.guard.closed(handed.connection)
                handed.sock.close()

    def _ended(self, channel: Channel) -> None:
        """The receiving process is gone: its connections close, its association slots are free."""
        if self.channel is channel:
            self.channel = None
        channel.close()
        with self._lock:
            handed, self._handed = list(self._handed.values()), {}
            slots, self._slots = list(self._slots.values()), {}
        for item in handed:
            with contextlib.suppress(OSError):
                item.sock.shutdown(socket.SHUT_RDWR)
            item.sock.close()
            self.guard.closed(item.connection)
        for slot in slots:
            self.limiter.release(slot)
        if handed:
            logger.warning("receive process %d ended; %d connection(s) it served closed", self.number, len(handed))

    def stop(self) -> None:
        """Ask the receiving process to stop (its associations are aborted, as the scp's own are)."""
        channel = self.channel
        if channel is not None:
            with contextlib.suppress(OSError):
                channel.send(("stop",))


SCP_OWN_LOAD = 1
"""The scp's index writes and accept loop, counted as this many of its connections (ReceiveProcesses.choose)."""


class ReceiveProcesses:
    """The receiving processes of the scp, their supervisors, and the choice of who serves a connection."""

    def __init__(
        self,
        count: int,
        settings: Any,
        guard: ConnectionGuard,
        limiter: AssociationLimiter,
        index: InstanceIndex,
        state_dir: Path,
        on_tls_refused: Callable[[str, str], None],
    ) -> None:
        slot_keys = itertools.count(-1, -1)  # never an id() of a local association
        self.links = [
            WorkerLink(n + 1, settings, guard, limiter, index, slot_keys, on_tls_refused) for n in range(count)
        ]
        self.state_dir = state_dir
        self._stop = threading.Event()
        self._supervisors: list[WorkerSupervisor] = []
        self.local_load: Callable[[], int] = lambda: 0
        """Connections the scp process serves itself (set by its server)."""

    def start(self) -> None:
        """Start every receiving process under its supervisor."""
        for link in self.links:
            supervisor = WorkerSupervisor(
                [sys.executable, "-m", WORKER_MODULE],
                self._stop,
                self.state_dir,
                spawn=link.spawn,
                name=f"receive process {link.number}",
            )
            supervisor.start()
            self._supervisors.append(supervisor)

    def choose(self) -> WorkerLink | None:
        """Who serves the next connection: the least loaded receiving process, or None for the scp itself.

        The scp process also accepts and writes every Instance row of the node (about half the CPU
        of an association's own work per instance, ``benchmarks/profile_ingest.py``): it counts
        as serving :data:`SCP_OWN_LOAD` connection more than it does, and on a tie a receiving
        process is preferred. A lone sender's association so runs beside the index, not under its
        GIL; four senders on two processes are served three and one.
        """
        best: WorkerLink | None = None
        best_load = self.local_load() + SCP_OWN_LOAD
        for link in self.links:
            if link.alive and (link.load < best_load or (best is None and link.load == best_load)):
                best, best_load = link, link.load
        return best

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the receiving processes (their associations end) and their supervisors."""
        self._stop.set()
        for link in self.links:
            link.stop()
        for supervisor in self._supervisors:
            supervisor.shutdown(timeout)
        self._supervisors = []


def process_count(setting: int | str) -> int:
    """The number of receiving processes for ``[node] receive_processes`` ("auto": one per CPU)."""
    if setting == "auto":
        return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    return int(setting)
