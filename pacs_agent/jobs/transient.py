"""Failures that pass: the disk, the spool or the database is away for a while.

Such a failure is not the job's fault and not a crash: the worker puts the job back to wait
(:func:`pacs_agent.jobs.queue.wait`: pending again later, with a growing delay, no attempt spent)
instead of counting it towards ``max_attempts``. :func:`wait_reason` tells a passing failure from a
crash and says it in one line; :func:`one_line` turns any other exception into the one-line reason
an operator reads in ``pacs-agent status``, with a reference to the traceback in the log.
"""

from __future__ import annotations

import errno
import secrets
from collections.abc import Iterator

from sqlalchemy.exc import DBAPIError, OperationalError

from pacs_agent.errors import StorageError

__all__ = ["ResourceUnavailable", "error_ref", "flatten", "one_line", "transient_errno", "wait_reason"]

TRANSIENT_ERRNOS: dict[int, str] = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EIO: "input/output error",
    errno.ESTALE: "stale handle of a network filesystem",
    errno.ENOTCONN: "filesystem not connected",
    errno.EHOSTDOWN: "file server down",
    errno.ETIMEDOUT: "file server timed out",
}
"""``OSError`` numbers that say the storage is away for a while, not that the input is bad."""

_DATABASE_AWAY_SQLSTATES = ("08", "53", "57P")
"""PostgreSQL SQLSTATE classes: connection exception, insufficient resources, operator intervention."""

_DATABASE_AWAY_PHRASES = (
    "database is locked",
    "disk i/o error",
    "database or disk is full",
    "unable to open database file",
    "could not connect",
    "connection refused",
    "server closed the connection",
    "terminating connection",
    "connection is closed",
    "connection timeout",
    "connection timed out",
)
"""Driver messages of a database that cannot be reached or written just now (SQLite, psycopg)."""

MAX_REASON_CHARS = 300


class ResourceUnavailable(StorageError):
    """Something a job needs is away for a while (disk under the watermark, spool not mounted).

    The message is the one-line reason the job waits, e.g. ``disk full writing results (free 12 MB
    < watermark 1024 MB)``; the worker puts the job back to wait instead of failing it.
    """


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or during (each once)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _database_away(exc: DBAPIError) -> bool:
    if exc.connection_invalidated:
        return True
    if not isinstance(exc, OperationalError):
        return False
    sqlstate = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
    if isinstance(sqlstate, str) and sqlstate.startswith(_DATABASE_AWAY_SQLSTATES):
        return True
    text = str(exc.orig).lower()
    return any(phrase in text for phrase in _DATABASE_AWAY_PHRASES)


def transient_errno(exc: BaseException) -> int | None:
    """The :data:`TRANSIENT_ERRNOS` number of ``exc`` or of what it was raised from, else None.

    Libraries re-raise an ``OSError`` without its number (pydicom: ``With tag (7FE0,0010) got
    exception: [Errno 28] ...``, the original as ``__cause__``), so the chain is looked at.
    """
    for item in _chain(exc):
        if isinstance(item, OSError) and item.errno in TRANSIENT_ERRNOS:
            return item.errno
    return None


def wait_reason(exc: BaseException) -> str | None:
    """The one-line reason to wait when ``exc`` (or what it was raised from) is a passing failure; else None.

    Passing: :class:`ResourceUnavailable`; an ``OSError`` of :data:`TRANSIENT_ERRNOS` (disk full,
    I/O error, network filesystem away); a database connection lost or the database busy or full
    (SQLAlchemy ``OperationalError`` / a DBAPI disconnect). Anything else is a crash.
    """
    for item in _chain(exc):
        if isinstance(item, ResourceUnavailable):
            return flatten(str(item))
        if isinstance(item, OSError) and item.errno in TRANSIENT_ERRNOS:
            return f"{TRANSIENT_ERRNOS[item.errno]} ({errno.errorcode.get(item.errno, item.errno)})"
        if isinstance(item, DBAPIError) and _database_away(item):
            return flatten(f"database unavailable ({item.orig})")
    return None


def error_ref() -> str:
    """A short random reference that ties a one-line reason to its traceback in the log."""
    return secrets.token_hex(3)


def _shorten(text: str) -> str:
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."


def flatten(text: str) -> str:
    """``text`` on one line (newlines and runs of white space become one space), at most ~300 characters."""
    return _shorten(" ".join(text.split()))


def one_line(exc: BaseException, ref: str | None = None) -> str:
    """``exc`` as one line for operators: ``ValueError: what (log ref 3f2a9c)``, at most ~300 characters.

    Newlines and runs of white space in the message become one space; ``ref`` names the log record
    that holds the traceback.
    """
    message = str(exc)
    text = flatten(f"{type(exc).__name__}: {message}" if message.strip() else type(exc).__name__)
    return f"{text} (log ref {ref})" if ref else text
