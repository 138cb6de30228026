"""The spool: received objects on disk, written so that a crash never leaves half a file.

Each object is written to ``<spool>/tmp/<random>.part`` and renamed to its final name; the file
and its directory entry are made durable (see below); only then is the Instance row committed and
Success answered. File and directory names come from UIDs; a UID that is not a well-formed UID is
replaced by a hash so that a crafted UID can never escape the spool directory.

Directory entries. On ext4 (with its journal, the default) and XFS the file is renamed first and
then fsync'ed: one journal commit makes its data, its inode and its new name durable. Both file
systems log metadata in one ordered journal, and fsync forces that journal up to the file inode's
last change; the rename changed the inode (its ctime) in the rename's own transaction, so the
rename - and every earlier metadata change, the ``mkdir`` of a new study or series directory
included - is durable when fsync returns (ext4: ``jbd2_complete_transaction`` of the inode's
``i_sync_tid``; XFS: a log force up to the inode's last commit sequence). A power cut between the
rename and the fsync can leave an incomplete file under its final name, but no Instance row refers
to it and nothing was acknowledged: the sender sends it again and it is replaced. On every other
file system (or when the type cannot be told) the file is fsync'ed, renamed, and the directory
fsync'ed, as POSIX asks - and a directory just created is fsync'ed in its parent too.

A C-STORE dataset is streamed into its ``.part`` file while its P-DATA fragments arrive
(:class:`IncomingFile`), so that a large instance is never held in memory: the first
``memory_bytes`` stay in memory (a small instance is written once, as before), beyond that every
fragment goes to the file. ``[security] max_instance_mb`` and the free-space watermark are
enforced as the bytes arrive: past them nothing more is written or kept, only counted, and the
C-STORE handler refuses the instance with 0xA700.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pacs_agent.errors import StorageError

logger = logging.getLogger(__name__)

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
TMP_DIR_NAME = "tmp"
PART_SUFFIX = ".part"
PENDING_DIR_NAME = "pending"
"""``<spool>/pending``: the journal of instances acknowledged before their Instance row was committed."""


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


ORDERED_JOURNAL_FILE_SYSTEMS = frozenset({"ext4", "xfs"})
"""File systems on which fsync of a renamed file makes its new name durable (see the module docstring)."""


def file_system_type(path: Path) -> str:
    """The type of the file system ``path`` is on (``ext4``, ``xfs``, ...), from /proc/self/mountinfo; "" if unknown."""
    try:
        target = os.path.realpath(path)
        best, kind = "", ""
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mounts:
            for line in mounts:
                fields = line.split()
                if " - " not in line or len(fields) < 5:
                    continue
                mount_point = fields[4].replace("\\040", " ")
                inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
                if inside and len(mount_point) >= len(best):
                    best, kind = mount_point, line.split(" - ", 1)[1].split()[0]
        return kind
    except OSError:
        return ""


def _link_marker(final_path: Path, marker: Path | None) -> None:
    """Hard-link the journal ``marker`` to ``final_path`` (one already there names the same instance)."""
    if marker is not None:
        with contextlib.suppress(FileExistsError):
            os.link(final_path, marker)


def _remove(final_path: Path, marker: Path | None) -> None:
    """Undo a write that is not durable: it is not acknowledged, and nothing of it is left behind."""
    final_path.unlink(missing_ok=True)
    if marker is not None:
        marker.unlink(missing_ok=True)


def durable_write(
    data: bytes | bytearray | memoryview,
    final_path: Path,
    tmp_dir: Path,
    *,
    rename_then_fsync: bool = False,
    make_parent: bool = True,
    marker: Path | None = None,
) -> None:
    """Write ``data`` to ``final_path`` atomically and durably; ``tmp_dir`` is on the same file system.

    ``rename_then_fsync`` (ext4, XFS): temp file, rename, fsync of the file - which makes the new
    name durable too on those file systems (module docstring). Otherwise: temp file, fsync,
    rename, fsync of the directory. ``make_parent``: create ``final_path.parent`` if missing.
    ``marker``: a journal entry (:meth:`Spool.marker`) hard-linked to the file, durable with it.
    """
    if make_parent:
        final_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = tmp_dir / f"{uuid.uuid4().hex}{PART_SUFFIX}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    renamed = False
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        if rename_then_fsync:
            os.replace(tmp, final_path)
            renamed = True
            _link_marker(final_path, marker)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        if renamed:
            _remove(final_path, marker)
        else:
            tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    if rename_then_fsync:
        return
    try:
        os.replace(tmp, final_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync_names(final_path, marker)


def _sync_names(final_path: Path, marker: Path | None) -> None:
    """Make a renamed file's name durable by fsync of its directory (and its journal marker's, if any)."""
    try:
        _link_marker(final_path, marker)
        fsync_dir(final_path.parent)
        if marker is not None:
            fsync_dir(marker.parent)
    except BaseException:
        _remove(final_path, marker)
        raise


class Spool:
    """Received instances under ``root``: ``<study>/<series>/<sop>.dcm``.

    ``free_bytes`` can be replaced (tests simulate a full disk with it).
    """

    def __init__(self, root: Path, min_free_mb: int) -> None:
        self.root = root
        self.tmp_dir = root / TMP_DIR_NAME
        self.pending_dir = root / PENDING_DIR_NAME
        self.min_free_bytes = min_free_mb * 1024 * 1024
        self.free_bytes: Callable[[], int] = lambda: shutil.disk_usage(self.root).free
        try:
            self.tmp_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.pending_dir.mkdir(exist_ok=True, mode=0o700)
            os.chmod(self.root, 0o700)
        except OSError as exc:
            raise StorageError(f"cannot create the spool directory {root}: {exc.strerror}") from None
        self.file_system = file_system_type(root)
        self.rename_then_fsync = self.file_system in ORDERED_JOURNAL_FILE_SYSTEMS
        """True on ext4 and XFS: fsync of the renamed file makes its name durable (module docstring)."""
        self._directories: set[Path] = set()
        """Series directories known to exist (created, and durable, by this process)."""
        self._directories_lock = threading.Lock()

    @property
    def durability(self) -> str:
        """How a file's directory entry is made durable here, for the log and the docs."""
        if self.rename_then_fsync:
            return f"{self.file_system}: rename, then fsync of the file (commits the name with it)"
        return f"{self.file_system or 'unknown file system'}: fsync of the file, rename, fsync of the directory"

    def _directory(self, directory: Path) -> None:
        """Create ``directory`` (and its parents) unless known to exist; durable in its parent when created."""
        if directory in self._directories:
            return
        created: list[Path] = []
        missing = directory
        while not missing.exists() and missing != self.root:
            created.append(missing)
            missing = missing.parent
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.rename_then_fsync:
            for path in reversed(created):  # each new directory's entry in its parent
                fsync_dir(path.parent)
        with self._directories_lock:
            if len(self._directories) > 100_000:
                self._directories.clear()
            self._directories.add(directory)

    def has_room(self, incoming_bytes: int = 0) -> bool:
        """True when storing ``incoming_bytes`` keeps free space above the watermark."""
        return self.free_bytes() - incoming_bytes >= self.min_free_bytes

    def relative_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Where an instance lives, relative to the spool root."""
        return Path(safe_name(study_uid)) / safe_name(series_uid) / f"{safe_name(sop_uid)}.dcm"

    def write(self, relative: Path, data: bytes | bytearray | memoryview, *, journal: bool = False) -> Path:
        """Store ``data`` durably at ``relative``; returns the absolute path.

        ``journal``: its marker (:meth:`marker`) is durable with it, until :meth:`settled`.
        """
        final = self.root / relative
        marker = self.marker(relative) if journal else None
        self._directory(final.parent)
        try:
            durable_write(
                data, final, self.tmp_dir, rename_then_fsync=self.rename_then_fsync, make_parent=False, marker=marker
            )
        except FileNotFoundError:  # the directory was removed since (retention): create it again
            self._forget(final.parent)
            self._directory(final.parent)
            durable_write(
                data, final, self.tmp_dir, rename_then_fsync=self.rename_then_fsync, make_parent=False, marker=marker
            )
        return final

    def _forget(self, directory: Path) -> None:
        with self._directories_lock:
            self._directories.discard(directory)

    def commit(self, incoming: IncomingFile, relative: Path, *, journal: bool = False) -> Path:
        """Make a completely received ``incoming`` file durable at ``relative`` (fsync, rename, fsync dir).

        The file is already in the spool's temp directory, on the same file system: it is renamed
        into place, never copied. Returns the absolute path. ``journal``: as for :meth:`write`.
        """
        if incoming.in_memory:
            return self.write(relative, incoming.buffer(), journal=journal)
        final = self.root / relative
        marker = self.marker(relative) if journal else None
        self._forget(final.parent)  # rare (over 8 MB): check the directory afresh
        self._directory(final.parent)
        if not self.rename_then_fsync:
            incoming.sync()
        os.replace(incoming.path, final)
        incoming.committed = True
        if not self.rename_then_fsync:
            _sync_names(final, marker)
            return final
        try:
            _link_marker(final, marker)
            incoming.sync()
        except BaseException:
            _remove(final, marker)
            raise
        return final

    # -- the journal -------------------------------------------------------------------------

    def marker(self, relative: Path) -> Path:
        """The journal entry of the instance at ``relative``: a hard link to its file in ``pending/``.

        An instance written with ``journal=True`` is acknowledged once its file (and with it this
        link) is durable, before its Instance row is committed; the row's commit removes the link
        (:meth:`settled`). After a crash, every link left is indexed again
        (:func:`pacs_agent.receive.journal.replay`).
        """
        digest = hashlib.sha256(str(relative).encode("utf-8", "surrogateescape")).hexdigest()[:40]
        return self.pending_dir / f"{digest}.dcm"

    def is_pending(self, relative: Path) -> bool:
        """True while the instance at ``relative`` is acknowledged but its row may not be committed yet."""
        return self.marker(relative).exists()

    def settled(self, relative: Path) -> None:
        """The instance's row is committed: its journal entry goes (no fsync: a left-over link is harmless)."""
        self.marker(relative).unlink(missing_ok=True)

    def pending(self) -> list[Path]:
        """The journal entries left: instances acknowledged whose rows may not be committed."""
        try:
            return sorted(self.pending_dir.glob("*.dcm"))
        except OSError:
            return []

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


ROOM_CHECK_BYTES = 16 * 1024 * 1024
"""While a large instance streams in, free space is checked again after every this many bytes."""


class IncomingFile:
    """One C-STORE dataset as it arrives: what pynetdicom writes in place of its ``NamedTemporaryFile``.

    pynetdicom writes the preamble, ``DICM`` and a file meta built from the C-STORE request, then
    every P-DATA fragment of the dataset as it arrives (:mod:`pynetdicom.dimse_messages`,
    ``decode_msg``), and unlinks ``name`` after the C-STORE handler ran. The first
    ``memory_bytes`` are kept in memory; when the instance grows beyond, they and every later
    fragment go to ``path`` (mode 0600, in the spool's temp directory). Past ``limit_bytes``
    (``[security] max_instance_mb``; 0 = no limit), below the free-space watermark or after a write
    error, the file is removed and the rest only counted: ``size`` is then still the size of the
    whole instance, and :attr:`refusal` says why it cannot be stored.

    ``write`` never raises: an exception there would abort the association without a status.
    """

    def __init__(self, path: Path, spool: Spool, *, limit_bytes: int, memory_bytes: int) -> None:
        self.path = path
        self.name = str(path)
        """pynetdicom's name for the file (it unlinks it after the handler)."""
        self.spool = spool
        self.limit_bytes = limit_bytes
        self.memory_bytes = memory_bytes
        self.size = 0
        """Bytes received so far: preamble, file meta and dataset."""
        self.over_limit = False
        self.no_room = False
        self.write_error: OSError | None = None
        self.committed = False
        """Renamed into the spool (see :meth:`Spool.commit`)."""
        self.owner: object = threading.current_thread()
        """The thread that receives it (the association's reader)."""
        self._buffer: bytearray | None = bytearray()
        self._fd: int | None = None
        self._room_checked_at = -ROOM_CHECK_BYTES  # checked when the first bytes go to the file

    @property
    def file(self) -> IncomingFile:
        """The object itself: pynetdicom flushes ``NamedTemporaryFile.file`` after each fragment."""
        return self

    @property
    def in_memory(self) -> bool:
        """True while all bytes are still in memory (a small instance)."""
        return self._buffer is not None

    @property
    def refused(self) -> bool:
        """True when the instance cannot be stored (too large, no room, a write error)."""
        return self.over_limit or self.no_room or self.write_error is not None

    def write(self, data: Any) -> int:
        """Take one piece of the stream (pynetdicom passes bytes); returns its length."""
        length = len(data)
        self.size += length
        if self.refused:
            return length
        if self.limit_bytes and self.size > self.limit_bytes:
            self.over_limit = True
            self._drop()
            return length
        try:
            if self._buffer is not None:
                self._buffer += data
                if self.size <= self.memory_bytes:
                    return length
                data, self._buffer = self._buffer, None
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            assert self._fd is not None
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            if self.size - self._room_checked_at >= ROOM_CHECK_BYTES:
                self._room_checked_at = self.size
                if not self.spool.has_room():
                    self.no_room = True
                    self._drop()
        except OSError as exc:
            self.write_error = exc
            self._drop()
        return length

    def flush(self) -> None:
        """Nothing to flush: every write goes straight to the file (fsync happens in :meth:`sync`)."""

    def getvalue(self) -> bytes:
        """The received bytes of an instance that stayed in memory."""
        return bytes(self.buffer())

    def buffer(self) -> bytearray:
        """The received bytes of an instance that stayed in memory, not copied."""
        if self._buffer is None:
            raise ValueError("the instance was written to a file, not kept in memory")
        return self._buffer

    def sync(self) -> None:
        """Fsync the file (its bytes are durable before it is renamed into place)."""
        if self._fd is None:
            raise ValueError("the instance is not in a file")
        os.fsync(self._fd)

    def _close_fd(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def _drop(self) -> None:
        """Free what was received so far (memory and file); the rest will only be counted."""
        self._buffer = None
        self._close_fd()
        self.path.unlink(missing_ok=True)

    def close(self) -> None:
        """Close the file; it stays where it is (renamed by :meth:`Spool.commit` or removed by :meth:`discard`)."""
        self._close_fd()

    def discard(self) -> None:
        """Close and remove the file unless it was committed into the spool."""
        self._close_fd()
        self._buffer = None
        if not self.committed:
            self.path.unlink(missing_ok=True)


class IncomingFiles:
    """Makes an :class:`IncomingFile` for every C-STORE dataset pynetdicom receives, and keeps track of them.

    :meth:`open` stands in for pynetdicom's ``NamedTemporaryFile``; the C-STORE handler
    :meth:`take`s the file of its request; a file whose association ended before the handler ran
    (the sender aborted in the middle) is removed by :meth:`discard_of`.
    """

    def __init__(self, spool: Spool, *, limit_bytes: int, memory_bytes: int) -> None:
        self.spool = spool
        self.limit_bytes = limit_bytes
        self.memory_bytes = memory_bytes
        self._open: dict[str, IncomingFile] = {}
        self._lock = threading.Lock()

    def open(self, *args: Any, **kwargs: Any) -> IncomingFile:
        """A new incoming file in the spool's temp directory (pynetdicom's arguments are ignored)."""
        path = self.spool.tmp_dir / f"{uuid.uuid4().hex}{PART_SUFFIX}"
        incoming = IncomingFile(path, self.spool, limit_bytes=self.limit_bytes, memory_bytes=self.memory_bytes)
        with self._lock:
            self._open[incoming.name] = incoming
        return incoming

    def take(self, path: Path | str) -> IncomingFile | None:
        """The incoming file at ``path``, now the caller's to commit or discard; None if unknown."""
        with self._lock:
            return self._open.pop(str(path), None)

    def discard_of(self, owner: object) -> int:
        """Remove the files ``owner`` received that no handler took (its association ended); how many."""
        with self._lock:
            left = [name for name, incoming in self._open.items() if incoming.owner is owner]
            dropped = [self._open.pop(name) for name in left]
        for incoming in dropped:
            incoming.discard()
        return len(dropped)
