"""Index again what the spool's journal holds: instances acknowledged whose rows were not committed.

With the node's own DICOM upper layer a C-STORE is answered Success once the instance's file is
durable in the spool together with its journal entry, a hard link in ``<spool>/pending``
(:meth:`~pacs_agent.receive.spool.Spool.marker`); its Instance row is committed just after, by
the group committer, and the commit removes the link. A crash (or a database that refuses the
write) in between leaves the link. :func:`replay` reads each one left - the file is the complete
record: its header gives every column of the row, its file meta the calling AE title - writes
the row and removes the link. The scp runs it once before it listens and then periodically for
entries older than a minute (younger ones are in flight).

An entry whose file does not parse to its end was never acknowledged (the fsync that makes an
acknowledged file durable makes all of it durable): the entry is moved to
``<spool>/pending/unreadable`` and the fact logged; no row refers to the file, and the sender's
next copy replaces it.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Protocol

from pydicom.filereader import read_file_meta_info
from sqlalchemy.exc import SQLAlchemyError

from pacs_agent.db import Database
from pacs_agent.receive.header import HeaderError, read_header
from pacs_agent.receive.index import IndexEntry
from pacs_agent.receive.spool import Spool
from pacs_agent.studies.store import StoreOutcome, is_known_instance

logger = logging.getLogger(__name__)

UNREADABLE_DIR_NAME = "unreadable"
IN_FLIGHT_SECONDS = 60.0
"""The periodic replay leaves entries younger than this: their rows are being committed."""


class _Index(Protocol):
    def record(self, entry: IndexEntry) -> StoreOutcome: ...


def _calling_ae_title(path: Path) -> str | None:
    """Source Application Entity Title (0002,0016) of the file meta: the AE that sent the instance."""
    try:
        value = read_file_meta_info(path).get("SourceApplicationEntityTitle")
    except Exception:  # the title is a courtesy; the instance is recorded without it
        return None
    if value is None:
        return None
    return str(value).strip() or None


def replay(spool: Spool, index: _Index, db: Database, *, older_than_seconds: float = 0.0) -> int:
    """Write the rows of the journal's instances that are not indexed; returns how many were written.

    Raises
    ------
    SQLAlchemyError
        The database cannot be written (the entries stay for the next replay).
    """
    written = 0
    now = time.time()
    for marker in spool.pending():
        try:
            info = marker.stat()
        except FileNotFoundError:  # settled meanwhile
            continue
        if now - info.st_ctime < older_than_seconds:
            continue
        try:
            header = read_header(marker)
        except (HeaderError, OSError) as exc:
            _set_aside(spool, marker, exc)
            continue
        relative = spool.relative_path(header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid)
        final = spool.absolute(relative)
        if not final.exists() or not final.samefile(marker):
            marker.unlink(missing_ok=True)  # replaced by a later copy (indexed with it) or removed
            continue
        with db.reader.connect() as reader:
            known = is_known_instance(reader, header.sop_instance_uid)
        if not known:
            entry = IndexEntry(header, str(relative), info.st_size, _calling_ae_title(marker))
            index.record(entry)  # SQLAlchemyError: the entry stays for the next replay
            written += 1
        marker.unlink(missing_ok=True)
    if written:
        logger.warning(
            "indexed %d instance(s) that were acknowledged but not yet indexed when the node stopped", written
        )
    return written


def _set_aside(spool: Spool, marker: Path, exc: Exception) -> None:
    """An entry whose file is incomplete: it was never acknowledged; the entry is kept aside."""
    aside = spool.pending_dir / UNREADABLE_DIR_NAME
    logger.warning(
        "journal entry %s is not a complete DICOM file (%s): it was never acknowledged; moved to %s",
        marker.name,
        exc,
        aside,
    )
    try:
        aside.mkdir(exist_ok=True, mode=0o700)
        os.replace(marker, aside / marker.name)
    except OSError:
        logger.exception("could not move journal entry %s aside", marker.name)


def replay_logged(spool: Spool, index: _Index, db: Database, *, older_than_seconds: float = 0.0) -> int:
    """:func:`replay` that logs a database failure instead of raising (the entries wait for the next one)."""
    try:
        return replay(spool, index, db, older_than_seconds=older_than_seconds)
    except SQLAlchemyError:
        logger.exception(
            "could not index the %d instance(s) of the spool's journal; retried later", len(spool.pending())
        )
        return 0
