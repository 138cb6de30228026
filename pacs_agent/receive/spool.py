"""The spool: received objects on disk, written so that a crash never leaves half a file.

Each object is written to ``<spool>/tmp/<random>.part``, fsync'ed, renamed to its final name and
the directory fsync'ed; only then is the Instance row committed and Success answered. File and
directory names come from UIDs; a UID that is not a well-formed UID is replaced by a hash so that
a crafted UID can never escape the spool directory.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from pacs_agent.errors import StorageError

logger = logging.getLogger(__name__)

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
TMP_DIR_NAME = "tmp"
PART_SUFFIX = ".part"


def safe_name(uid: str) -> str:
    """Return a file-system-safe name for a UID.

    Well-formed UIDs (digits and dots, at most 64 characters) are used as they are; anything else
    becomes ``x`` + the first 32 hex digits of its SHA-256, so ``../../etc`` cannot traverse.
    """
    if len(uid) <= 64 and _UID_RE.match(uid):
        return uid
    return "x" + hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def fsync_dir(path: Path) -> None:
    """Fsync a directory so that a rename inside it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_write(data: bytes, final_path: Path, tmp_dir: Path) -> None:
    """Write ``data`` to ``final_path`` atomically and durably (temp file, fsync, rename, fsync dir).

    ``tmp_dir`` must be on the same file system as ``final_path``.
    """
    final_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = tmp_dir / f"{uuid.uuid4().hex}{PART_SUFFIX}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        os.replace(tmp, final_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(final_path.parent)


class Spool:
    """Received instances under ``root``: ``<study>/<series>/<sop>.dcm``.

    ``free_bytes`` can be replaced (tests simulate a full disk with it).
    """

    def __init__(self, root: Path, min_free_mb: int) -> None:
        self.root = root
        self.tmp_dir = root / TMP_DIR_NAME
        self.min_free_bytes = min_free_mb * 1024 * 1024
        self.free_bytes: Callable[[], int] = lambda: shutil.disk_usage(self.root).free
        try:
            self.tmp_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(self.root, 0o700)
        except OSError as exc:
            raise StorageError(f"cannot create the spool directory {root}: {exc.strerror}") from None

    def has_room(self, incoming_bytes: int = 0) -> bool:
        """True when storing ``incoming_bytes`` keeps free space above the watermark."""
        return self.free_bytes() - incoming_bytes >= self.min_free_bytes

    def relative_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Where an instance lives, relative to the spool root."""
        return Path(safe_name(study_uid)) / safe_name(series_uid) / f"{safe_name(sop_uid)}.dcm"

    def write(self, relative: Path, data: bytes) -> Path:
        """Store ``data`` durably at ``relative``; returns the absolute path."""
        final = self.root / relative
        durable_write(data, final, self.tmp_dir)
        return final

    def absolute(self, relative: str | Path) -> Path:
        """The absolute path of a spool-relative path from the database."""
        return self.root / relative

    def remove_orphan_parts(self) -> int:
        """Delete temp files left by a crash mid-write (never acknowledged); returns how many."""
        removed = 0
        for part in self.tmp_dir.glob(f"*{PART_SUFFIX}"):
            part.unlink(missing_ok=True)
            removed += 1
        if removed:
            logger.warning("removed %d incomplete temp file(s) left by an earlier crash", removed)
        return removed
