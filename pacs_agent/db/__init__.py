"""Database engine, sessions and schema migrations.

SQLite (the embedded default) runs in WAL mode with ``synchronous=FULL`` so that a committed
Instance row survives a power cut, like the fsync'ed file it describes. PostgreSQL is used for
multi-host set-ups (``[database] url = "postgresql+psycopg://..."``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.orm import Session, sessionmaker

from pacs_agent.errors import StorageError

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parents[1] / "migrations"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Autocommit at the driver level; SQLAlchemy's "begin" event below then opens every
    # transaction with BEGIN IMMEDIATE, so concurrent writers queue on the busy timeout instead
    # of failing with "database is locked" when a read transaction tries to become a write.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _sqlite_begin(connection: Any) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str) -> Engine:
    """Create an engine for ``url``; SQLite gets WAL, full sync and a generous busy timeout."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # No pre-ping: a SQLite file connection does not go stale.
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def read_engine(url: str, *, timeout: float = 5.0) -> Engine:
    """An engine for reads only: short timeouts and, on SQLite, no write lock (WAL readers never wait)."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": timeout})

        def _read_only(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA query_only=ON")
            cursor.close()

        event.listen(engine, "connect", _read_only)
        return engine
    connect_args = {"connect_timeout": int(timeout)} if url.startswith("postgresql") else {}
    return create_engine(url, pool_pre_ping=True, pool_size=2, max_overflow=4, connect_args=connect_args)


def alembic_config(engine: Engine) -> Config:
    """An Alembic configuration bound to ``engine`` (no alembic.ini needed)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False))
    cfg.attributes["engine"] = engine
    return cfg


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision (idempotent).

    Raises
    ------
    StorageError
        When the database cannot be reached or upgraded.
    """
    try:
        command.upgrade(alembic_config(engine), "head")
    except Exception as exc:  # database errors of every driver
        raise StorageError(
            f"cannot prepare the database at {engine.url.render_as_string(hide_password=True)}: {exc}"
        ) from exc


ENGINE_TABLE_PREFIX = "procrastinate_"
"""Tables of the job queue engine on PostgreSQL (created by migration 0009 from procrastinate's own schema)."""


def include_in_comparison(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    """Alembic ``include_object``: leave procrastinate's tables and their indexes out of schema comparisons."""
    table = obj if type_ == "table" else getattr(obj, "table", None)
    table_name = getattr(table, "name", name) or ""
    return not table_name.startswith(ENGINE_TABLE_PREFIX)


def schema_is_current(engine: Engine) -> bool:
    """True when every table exists (used by health checks)."""
    names = set(inspect(engine).get_table_names())
    return {"studies", "series", "instances", "jobs", "results", "deliveries", "events"} <= names


class Database:
    """The engine and session factory of one node process."""

    def __init__(self, url: str, *, run_migrations: bool = True) -> None:
        self.url = url
        self.engine = make_engine(url)
        if run_migrations:
            migrate(self.engine)
        self.sessions: sessionmaker[Session] = sessionmaker(self.engine, expire_on_commit=False)
        self._reads: sessionmaker[Session] | None = None
        self._read_engine: Engine | None = None

    def session(self) -> Session:
        """A new session; use it as a context manager."""
        return self.sessions()

    @property
    def reader(self) -> Engine:
        """The engine for reads that must not queue behind writers (SQLite: read-only connections)."""
        if self._read_engine is None:
            self._read_engine = read_engine(self.url)
        return self._read_engine

    def read_session(self) -> Session:
        """A session for reads that must not queue behind writers (a SQLite read-only connection)."""
        if self._reads is None:
            self._reads = sessionmaker(self.reader, expire_on_commit=False)
        return self._reads()

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()
        if self._read_engine is not None:
            self._read_engine.dispose()
