"""The durable index write of received instances, committed in groups.

A C-STORE is answered Success only after its Instance row is committed. Each row is one short
transaction's worth of work, but its COMMIT is a synchronous write of the database's log (SQLite:
the WAL with ``synchronous=FULL``; PostgreSQL: its WAL flush) - per instance, that flush is the
costly part. :class:`InstanceIndex` runs one committer thread: every association hands it its row
and waits; the committer takes all rows waiting at that moment, writes them in one transaction,
commits once and wakes each waiter with the outcome of its own row. With one sender a group is one
row (no extra wait: the committer takes what is there); with several concurrent associations -
threads of this process or receiving processes (:mod:`pacs_agent.receive.processes`) - one COMMIT
covers several instances, and each Success still follows its own instance's durable row.

When a group's transaction fails, its rows are written again one transaction each, so that one
bad row fails only its own C-STORE.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.exc import SQLAlchemyError

from pacs_agent.db import Database
from pacs_agent.receive.header import InstanceHeader
from pacs_agent.studies.store import NewInstance, StoreOutcome, count_duplicate, record_instances

logger = logging.getLogger(__name__)

MAX_GROUP = 256
"""At most this many rows share one transaction."""


@dataclass(frozen=True)
class IndexEntry:
    """One row to write: a durably spooled instance, or a duplicate receipt of a stored one (``path`` None)."""

    header: InstanceHeader
    path: str | None
    size_bytes: int
    calling_ae_title: str | None


Outcome = StoreOutcome | BaseException
"""What writing an entry did, or the exception that kept it from being written."""


class _Waiter:
    __slots__ = ("done", "entry", "event", "outcome")

    def __init__(self, entry: IndexEntry, done: Callable[[Outcome], None] | None) -> None:
        self.entry = entry
        self.done = done
        self.event = threading.Event() if done is None else None
        self.outcome: Outcome | None = None


class InstanceIndex:
    """Writes Instance rows for every association of this node, grouping concurrent ones into one COMMIT."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._series_ids: dict[str, tuple[int, int]] = {}
        """Series Instance UID -> (study id, series id) of committed rows (see record_instance); committer only."""
        self._pending: list[_Waiter] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.groups = 0
        """Transactions committed (for the benchmarks: rows / groups is the mean group size)."""
        self.rows = 0

    def record(self, entry: IndexEntry) -> StoreOutcome:
        """Write ``entry`` durably; returns when its transaction is committed.

        Raises
        ------
        SQLAlchemyError
            The row could not be written (nothing of it is in the database).
        """
        waiter = self._submit(entry, None)
        assert waiter.event is not None
        waiter.event.wait()
        if isinstance(waiter.outcome, BaseException):
            raise waiter.outcome
        assert waiter.outcome is not None
        return waiter.outcome

    def record_async(self, entry: IndexEntry, done: Callable[[Outcome], None]) -> None:
        """Write ``entry``; ``done`` is called on the committer thread with the outcome once it is durable."""
        self._submit(entry, done)

    def _submit(self, entry: IndexEntry, done: Callable[[Outcome], None] | None) -> _Waiter:
        waiter = _Waiter(entry, done)
        with self._cond:
            if self._thread is None:
                self._stopping = False
                self._thread = threading.Thread(target=self._run, name="InstanceIndex", daemon=True)
                self._thread.start()
            self._pending.append(waiter)
            self._cond.notify()
        return waiter

    def stop(self) -> None:
        """Write what is waiting, then end the committer thread."""
        with self._cond:
            thread, self._stopping = self._thread, True
            self._cond.notify()
        if thread is not None:
            thread.join(timeout=30)
        with self._cond:
            self._thread = None

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if not self._pending:
                    return
                group, self._pending = self._pending[:MAX_GROUP], self._pending[MAX_GROUP:]
            outcomes = self._write(group)
            for waiter, outcome in zip(group, outcomes, strict=True):
                waiter.outcome = outcome
                if waiter.done is not None:
                    try:
                        waiter.done(outcome)
                    except Exception:  # one waiter's reply must not stop the others'
                        logger.exception("could not hand over the outcome of an index write")
                else:
                    assert waiter.event is not None
                    waiter.event.set()

    def _write(self, group: list[_Waiter]) -> list[Outcome]:
        """Write the group in one transaction; when that fails, each row in its own."""
        try:
            outcomes: list[Outcome] = self._transaction([w.entry for w in group])
            self.groups += 1
            self.rows += len(group)
            return outcomes
        except SQLAlchemyError as exc:
            self._forget(group)
            if len(group) == 1:
                return [exc]
        except Exception as exc:  # a bug must fail the C-STOREs, not end the committer
            logger.exception("index write failed")
            self._forget(group)
            return [exc for _ in group]
        single: list[Outcome] = []
        for waiter in group:
            try:
                single += self._transaction([waiter.entry])
            except Exception as exc:
                self._forget([waiter])
                single.append(exc)
        return single

    def _forget(self, group: list[_Waiter]) -> None:
        """Drop cached series ids of a failed group: they may have been rolled back."""
        for waiter in group:
            self._series_ids.pop(waiter.entry.header.series_instance_uid, None)

    def _transaction(self, entries: list[IndexEntry]) -> list[Outcome]:
        """Write ``entries`` in one transaction: the new instances' rows in one INSERT, then the duplicates."""
        new = [NewInstance(e.header, e.path, e.size_bytes, e.calling_ae_title) for e in entries if e.path is not None]
        with self.db.engine.begin() as connection:
            stored = iter(record_instances(connection, new, series_ids=self._series_ids))
            outcomes: list[Outcome] = []
            for entry in entries:
                if entry.path is None:
                    count_duplicate(connection, entry.header.sop_instance_uid)
                    outcomes.append(StoreOutcome.DUPLICATE)
                else:
                    outcomes.append(next(stored))
        return outcomes
