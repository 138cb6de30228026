"""The spool's journal: instances acknowledged before their rows are committed are never lost."""

from __future__ import annotations

import os
import time
from io import BytesIO
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from pacs_agent.db import Database
from pacs_agent.db.tables import Instance
from pacs_agent.receive.header import read_header
from pacs_agent.receive.index import IndexEntry, InstanceIndex
from pacs_agent.receive.journal import UNREADABLE_DIR_NAME, replay, replay_logged
from pacs_agent.receive.spool import Spool
from pacs_agent.studies.store import StoreOutcome
from tests.unit.test_header_spool import ct_dataset, encode


@pytest.fixture
def db(tmp_path: Path) -> Database:
    return Database(f"sqlite:///{tmp_path / 'index.db'}")


@pytest.fixture(params=[True, False], ids=["rename-then-fsync", "fsync-directories"])
def spool(tmp_path: Path, request: pytest.FixtureRequest) -> Spool:
    spool = Spool(tmp_path / "spool", min_free_mb=0)
    spool.rename_then_fsync = request.param  # both ways of making the names durable
    return spool


def instance(calling: str | None = "MODALITY1") -> tuple[bytes, Path]:
    """An encoded CT instance (sent by ``calling``) and its path in the spool."""
    ds = ct_dataset()
    data = encode(ds)
    if calling is not None:
        ds.file_meta.SourceApplicationEntityTitle = calling
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        data = buffer.getvalue()
    relative = Path("1.2.3") / "1.2.3.4" / f"{ds.SOPInstanceUID}.dcm"
    return data, relative


def rows(db: Database) -> dict[str, tuple[str, str | None]]:
    with db.session() as session:
        return {i.sop_instance_uid: (i.path, i.calling_ae_title) for i in session.scalars(select(Instance)).all()}


def test_a_journalled_write_links_its_entry_durably_with_the_file(spool: Spool) -> None:
    data, relative = instance()
    final = spool.write(relative, data, journal=True)
    marker = spool.marker(relative)
    assert marker.parent == spool.pending_dir and marker.samefile(final)
    assert spool.is_pending(relative) and spool.pending() == [marker]
    spool.settled(relative)
    assert not spool.is_pending(relative) and final.read_bytes() == data
    assert spool.write(relative, data).exists() and not spool.is_pending(relative)  # not journalled


def test_a_failed_write_leaves_no_journal_entry(spool: Spool, tmp_path: Path) -> None:
    data, relative = instance()
    (spool.root / "1.2.3").write_text("a file where a directory must go")
    with pytest.raises(OSError):
        spool.write(relative, data, journal=True)
    assert spool.pending() == []


def test_replay_indexes_what_was_acknowledged_and_not_committed(spool: Spool, db: Database) -> None:
    sent = [instance("MODALITY1"), instance(None)]
    for data, relative in sent:
        spool.write(relative, data, journal=True)  # acknowledged; the node stopped before the rows
    index = InstanceIndex(db)
    try:
        assert replay(spool, index, db) == 2
        assert replay(spool, index, db) == 0  # once
    finally:
        index.stop()
    recorded = rows(db)
    uids = [read_header(spool.absolute(relative)).sop_instance_uid for _, relative in sent]
    assert recorded == {uids[0]: (str(sent[0][1]), "MODALITY1"), uids[1]: (str(sent[1][1]), None)}
    assert spool.pending() == []


def test_replay_drops_entries_of_instances_already_indexed(spool: Spool, db: Database) -> None:
    data, relative = instance()
    spool.write(relative, data, journal=True)
    index = InstanceIndex(db)
    try:
        header = read_header(spool.absolute(relative))
        assert index.record(IndexEntry(header, str(relative), len(data), "X")) is StoreOutcome.STORED
        assert replay(spool, index, db) == 0  # the row committed, the node stopped before the unlink
    finally:
        index.stop()
    assert spool.pending() == [] and rows(db)[header.sop_instance_uid] == (str(relative), "X")


def test_replay_leaves_young_entries_to_the_committer(spool: Spool, db: Database) -> None:
    data, relative = instance()
    spool.write(relative, data, journal=True)
    index = InstanceIndex(db)
    try:
        assert replay(spool, index, db, older_than_seconds=60) == 0
        assert spool.is_pending(relative)
        old = time.time() - 120
        os.utime(spool.marker(relative), (old, old))  # mtime only: the age is the link's ctime
        assert replay(spool, index, db, older_than_seconds=60) == 0
    finally:
        index.stop()


def test_an_incomplete_entry_is_set_aside_not_indexed(spool: Spool, db: Database) -> None:
    data, relative = instance()
    spool.write(relative, data[: len(data) // 2], journal=True)  # a power cut before the fsync
    index = InstanceIndex(db)
    try:
        assert replay(spool, index, db) == 0
    finally:
        index.stop()
    assert rows(db) == {}
    assert spool.pending() == []
    assert [p.name for p in (spool.pending_dir / UNREADABLE_DIR_NAME).iterdir()] == [spool.marker(relative).name]


def test_an_entry_of_a_replaced_file_is_dropped(spool: Spool, db: Database) -> None:
    data, relative = instance()
    spool.write(relative, data, journal=True)
    spool.absolute(relative).unlink()
    spool.write(relative, data)  # a later copy, indexed with its own write
    index = InstanceIndex(db)
    try:
        assert replay(spool, index, db) == 0
    finally:
        index.stop()
    assert spool.pending() == [] and rows(db) == {}


class RefusingIndex:
    def record(self, entry: IndexEntry) -> StoreOutcome:
        raise OperationalError("INSERT", {}, Exception("database is locked"))


def test_entries_stay_while_the_database_refuses_them(spool: Spool, db: Database) -> None:
    data, relative = instance()
    spool.write(relative, data, journal=True)
    assert replay_logged(spool, RefusingIndex(), db) == 0
    assert spool.is_pending(relative)
    index = InstanceIndex(db)
    try:
        assert replay_logged(spool, index, db) == 1
    finally:
        index.stop()
    assert not spool.is_pending(relative)


def test_a_running_scp_indexes_entries_the_database_left_once_they_are_a_period_old(
    tmp_path: Path, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scp's own replay thread: an entry whose commit never came is indexed while the node runs."""
    from pacs_agent.config import settings_from_mapping
    from pacs_agent.receive import server as server_module
    from tests.ports import free_port

    monkeypatch.setattr(server_module, "JOURNAL_IN_FLIGHT_SECONDS", 0.3)
    settings = settings_from_mapping(
        {"node": {"port": free_port(), "host": "127.0.0.1"}, "storage": {"state_dir": str(tmp_path / "state")}}
    )
    spool = Spool(tmp_path / "spool", min_free_mb=0)
    receiver = server_module.ReceiveServer(settings, db, spool)
    receiver.start()
    try:
        data, relative = instance("MODALITY1")
        spool.write(relative, data, journal=True)  # acknowledged; its row was refused when it was due
        header = read_header(spool.absolute(relative))
        deadline = time.monotonic() + 30
        while header.sop_instance_uid not in rows(db) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        receiver.stop()
    assert rows(db) == {header.sop_instance_uid: (str(relative), "MODALITY1")}
    assert spool.pending() == []
