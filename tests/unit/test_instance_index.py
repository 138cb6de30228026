"""The grouped durable index write (InstanceIndex): one COMMIT for concurrent rows, each waiter its own outcome."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from pacs_agent.db import Database
from pacs_agent.db.tables import Instance
from pacs_agent.receive.index import IndexEntry, InstanceIndex, Outcome
from pacs_agent.receive.processes import RemoteIndexError, decode_outcome, encode_outcome
from pacs_agent.studies.store import StoreOutcome
from tests.unit.test_store_and_queue import CT


def entry(n: int) -> IndexEntry:
    return IndexEntry(replace(CT, sop_instance_uid=f"1.2.3.100.{n}"), f"{n}.dcm", 100, "SENDER")


@pytest.fixture
def db(tmp_path: Path) -> Database:
    return Database(f"sqlite:///{tmp_path / 'index.db'}")


def test_concurrent_rows_share_commits_and_each_gets_its_outcome(db: Database) -> None:
    index = InstanceIndex(db)
    gate = threading.Event()
    real = index._transaction

    held: list[int] = []

    def slow_first(entries: list[IndexEntry]) -> list[Outcome]:
        if not held:
            held.append(len(entries))
            gate.wait(10)  # the first transaction waits until every thread has submitted
        return real(entries)

    index._transaction = slow_first  # type: ignore[method-assign]
    outcomes: dict[int, StoreOutcome] = {}
    threads = [threading.Thread(target=lambda n=n: outcomes.update({n: index.record(entry(n))})) for n in range(20)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while not held or held[0] + len(index._pending) < 20:  # in the held transaction or waiting
        assert time.monotonic() < deadline, "the rows were not submitted"
        time.sleep(0.01)
    gate.set()
    for thread in threads:
        thread.join(10)
    index.stop()
    assert outcomes == {n: StoreOutcome.STORED for n in range(20)}
    assert index.rows == 20 and index.groups == (2 if held[0] < 20 else 1)  # the held group, then the rest at once
    with db.engine.connect() as connection:
        assert connection.execute(select(func.count(Instance.id))).scalar_one() == 20
    assert InstanceIndex(db).record(entry(3)) is StoreOutcome.DUPLICATE


def test_a_failing_row_fails_only_its_own_store(db: Database) -> None:
    index = InstanceIndex(db)
    real = index._transaction

    def refuse_row_7(entries: list[IndexEntry]) -> list[Outcome]:
        if any(e.header.sop_instance_uid.endswith(".7") for e in entries):
            raise SQLAlchemyError("disk I/O error")
        return real(entries)

    index._transaction = refuse_row_7  # type: ignore[method-assign]
    results: dict[int, object] = {}
    done = threading.Event()
    pending = set(range(5, 10))

    def finished(n: int, outcome: object) -> None:
        results[n] = outcome
        pending.discard(n)
        if not pending:
            done.set()

    def callback(n: int) -> Callable[[Outcome], None]:
        return lambda outcome: finished(n, outcome)

    for n in range(5, 10):
        index.record_async(entry(n), callback(n))
    assert done.wait(10)
    index.stop()
    assert isinstance(results.pop(7), SQLAlchemyError)
    assert results == {n: StoreOutcome.STORED for n in (5, 6, 8, 9)}
    with pytest.raises(RemoteIndexError, match="disk I/O error"):
        decode_outcome(encode_outcome(SQLAlchemyError("disk I/O error")))
    assert decode_outcome(encode_outcome(StoreOutcome.DUPLICATE)) is StoreOutcome.DUPLICATE
