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
    return problems + console_problems(settings)


def console_problems(settings: Settings) -> list[str]:
    """The console's files: its certificate and key readable, its session key private and long enough.

    A missing session key file is no problem (the console creates one, mode 0600, at its start).
    """
    problems: list[str] = []
    console = settings.console
    for key in ("cert_file", "key_file"):
        value = getattr(console, key)
        if value and not os.access(value, os.R_OK):
            problems.append(f"console.{key}: {value} does not exist or is not readable by this user")
    secret = settings.console_secret_file
    if secret.exists():
        if not os.access(secret, os.R_OK):
            problems.append(f"console.session_secret_file: {secret} is not readable by this user")
        elif secret.stat().st_mode & 0o077:
            problems.append(f"console.session_secret_file: {secret} is readable by others; chmod 600 {secret}")
        elif len(secret.read_text(encoding="utf-8", errors="replace").strip()) < 32:
            problems.append(
                f"console.session_secret_file: {secret} holds fewer than 32 characters; delete it for a new key"
            )
    return problems
