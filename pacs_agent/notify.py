"""systemd notification protocol (``sd_notify``): READY, WATCHDOG, STOPPING and STATUS.

systemd starts a ``Type=notify`` unit with ``$NOTIFY_SOCKET`` (a path, or an abstract socket
written with a leading ``@``) and, when the unit has ``WatchdogSec=``, with ``$WATCHDOG_USEC``
(and ``$WATCHDOG_PID``, the process that must ping). Each message is one datagram of
``KEY=VALUE`` lines. Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op.

The watchdog proves liveness, not health: :class:`Watchdog` pings only while the process's loops
make progress, so a hung process is restarted; a full disk or an unreachable PACS is reported by
``/healthz`` instead (a restart would not cure it).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping

logger = logging.getLogger(__name__)

NOTIFY_SOCKET = "NOTIFY_SOCKET"
WATCHDOG_USEC = "WATCHDOG_USEC"
WATCHDOG_PID = "WATCHDOG_PID"
SYSTEMD_VARIABLES = (NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID)
"""What a child process must not inherit (it would speak for the unit's main process)."""


def socket_address(value: str) -> str | bytes:
    """The ``connect`` address of a ``$NOTIFY_SOCKET`` value.

    Parameters
    ----------
    value
        A file-system path (``/run/systemd/notify``) or an abstract socket name starting with ``@``.

    Returns
    -------
    str or bytes
        The path as it is, or the abstract name as bytes with the leading NUL byte Linux expects.

    Raises
    ------
    ValueError
        When ``value`` is neither an absolute path nor an abstract name.
    """
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    raise ValueError(f"{NOTIFY_SOCKET}={value!r} is neither an absolute path nor an abstract socket (@name)")


def watchdog_interval(environ: Mapping[str, str], pid: int | None = None) -> float | None:
    """Seconds between two WATCHDOG=1 pings, half the timeout systemd gives; None without a watchdog.

    Parameters
    ----------
    environ
        The process environment (``WATCHDOG_USEC``, ``WATCHDOG_PID``).
    pid
        This process's id (default :func:`os.getpid`). A ``WATCHDOG_PID`` naming another process
        means the watchdog is not ours (we were started by the unit's main process).
    """
    raw = environ.get(WATCHDOG_USEC, "").strip()
    if not raw:
        return None
    watched_pid = environ.get(WATCHDOG_PID, "").strip()
    if watched_pid and watched_pid != str(os.getpid() if pid is None else pid):
        return None
    try:
        usec = int(raw)
    except ValueError:
        logger.warning("ignoring %s=%r: not a number of microseconds", WATCHDOG_USEC, raw)
        return None
    if usec <= 0:
        return None
    return usec / 1_000_000 / 2


class Notifier:
    """Sends notifications to systemd; every method is a no-op when not started by systemd.

    Parameters
    ----------
    address
        The ``$NOTIFY_SOCKET`` value, or None (notifications disabled).
    watchdog_seconds
        Ping interval (see :func:`watchdog_interval`), or None when the unit has no watchdog.
    """

    def __init__(self, address: str | None, watchdog_seconds: float | None = None) -> None:
        self.address = address or None
        self.watchdog_seconds = watchdog_seconds if self.address else None
        self._lock = threading.Lock()
        self._warned = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """A notifier configured from ``$NOTIFY_SOCKET`` / ``$WATCHDOG_USEC`` (default: os.environ)."""
        env = os.environ if environ is None else environ
        return cls(env.get(NOTIFY_SOCKET) or None, watchdog_interval(env))

    @property
    def enabled(self) -> bool:
        """True when started by systemd with a notification socket."""
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines as one datagram; returns True when it was sent.

        A failure is logged once and otherwise ignored: the service must not stop because its
        supervisor cannot be told something.
        """
        if self.address is None:
            return False
        message = "\n".join(assignments).encode()
        try:
            target = socket_address(self.address)
            with self._lock, socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.connect(target)
                sock.sendall(message)
        except (OSError, ValueError) as exc:
            if not self._warned:
                logger.warning("cannot notify systemd through %s: %s", self.address, exc)
                self._warned = True
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1 (start-up finished), with an optional STATUS line."""
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        """WATCHDOG=1: the process is alive."""
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1 (shut-down started), with an optional STATUS line."""
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        """STATUS=...: one line shown by ``systemctl status``."""
        return self.notify(f"STATUS={' '.join(text.splitlines())}")


class Watchdog:
    """A thread that sends WATCHDOG=1 every :attr:`Notifier.watchdog_seconds` while ``alive()`` is True.

    ``alive`` must say whether the process's loops made progress recently; when it returns False
    the pings stop and systemd restarts the unit after ``WatchdogSec``.
    """

    def __init__(self, notifier: Notifier, alive: Callable[[], bool]) -> None:
        self.notifier = notifier
        self.alive = alive
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reported_stall = False

    def start(self) -> None:
        """Start pinging (nothing happens when the unit has no watchdog)."""
        interval = self.notifier.watchdog_seconds
        if interval is None or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, args=(interval,), name="watchdog", daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while True:
            try:
                alive = self.alive()
            except Exception:
                logger.exception("liveness check failed")
                alive = False
            if alive:
                self.notifier.watchdog()
                if self._reported_stall:
                    logger.warning("the service loops make progress again; watchdog pings resumed")
                    self._reported_stall = False
            elif not self._reported_stall:
                logger.error("a service loop made no progress; watchdog pings stop so that systemd restarts us")
                self._reported_stall = True
            if self._stop.wait(interval):
                return

    def stop(self) -> None:
        """Stop pinging."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
