"""Logging set-up: one line per event on stdout (journald adds its own timestamp and unit)."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s"
QUIET_LIBRARIES = ("pynetdicom", "alembic", "radiomics", "pykwalify", "highdicom", "pydicom")


def configure_logging(level: str = "INFO") -> None:
    """Send log records to stdout at ``level``; third-party libraries only from WARNING."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLevelName(level)))
