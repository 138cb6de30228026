"""Checks of a valid configuration against the machine (``pacs-agent config check``)."""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from pacs_agent.config import Settings


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_settings(settings: Settings) -> list[str]:
    """Problems that the schema cannot see: permissions, URLs, privileged ports."""
    problems: list[str] = []
    state = settings.storage.state_dir
    existing = _nearest_existing(state)
    if existing.exists() and not existing.is_dir():
        problems.append(f"storage.state_dir: {existing} exists and is not a directory")
    elif not os.access(existing, os.W_OK | os.X_OK):
        problems.append(f"storage.state_dir: {existing} is not writable by this user")
    try:
        url = make_url(settings.database_url)
        if url.get_backend_name() not in ("sqlite", "postgresql"):
            problems.append(f"database.url: backend {url.get_backend_name()!r} is not supported (sqlite, postgresql)")
    except ArgumentError:
        problems.append("database.url: not a valid SQLAlchemy URL (e.g. postgresql+psycopg://user@host/db)")
    if settings.node.port < 1024 and os.geteuid() != 0:
        problems.append(
            f"node.port: {settings.node.port} is a privileged port; run as root, grant "
            "CAP_NET_BIND_SERVICE (the systemd unit does), or use a port >= 1024"
        )
    for dest in settings.destinations:
        if dest.ae_title == settings.node.ae_title and dest.port == settings.node.port:
            problems.append(f"destinations.{dest.name}: points at this node itself (same AE title and port)")
        if dest.auth_header_env and not os.environ.get(dest.auth_header_env):
            problems.append(
                f"destinations.{dest.name}: auth_header_env names {dest.auth_header_env}, which is not set here"
            )
    return problems
