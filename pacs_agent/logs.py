"""Logging set-up: one line per event on stdout (journald adds its own timestamp and unit).

Every record goes through :class:`EscapingFormatter` on the root handler, pynetdicom's and pydicom's
own records included (they quote UIDs and AE titles from the network): its text is one line in
which control characters, escape sequences and NUL are visible escapes (:func:`pacs_agent.text.printable`).
A traceback keeps its lines, each indented, so only a record starts at column 0. Python warnings
(pydicom warns about invalid values with :mod:`warnings`) and uncaught exceptions of threads are
logged the same way instead of going raw to stderr.
"""

from __future__ import annotations

import logging
import sys
import threading

from pacs_agent.text import printable

FORMAT = "%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s"
QUIET_LIBRARIES = ("pynetdicom", "alembic", "radiomics", "pykwalify", "highdicom", "pydicom", "py.warnings")
CONTINUATION = "  | "
"""Prefix of the lines of a traceback or stack below its record."""

logger = logging.getLogger(__name__)


class EscapingFormatter(logging.Formatter):
    r"""A formatter whose output is one escaped line per record (plus indented traceback lines).

    The message, its arguments and every other field are escaped after formatting, so a UID
    holding ``ESC [ 31 m``, a newline or a NUL prints as ``\x1b[31m``, ``\n``, ``\x00``.
    """

    def format(self, record: logging.LogRecord) -> str:
        """The record as one escaped line; a traceback / stack follows on lines starting with ``  | ``."""
        record.message = record.getMessage()
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        text = printable(self.formatMessage(record))
        blocks = []
        if record.exc_info:
            blocks.append(self.formatException(record.exc_info))  # not record.exc_text: another formatter's
        elif record.exc_text:
            blocks.append(record.exc_text)
        if record.stack_info:
            blocks.append(self.formatStack(record.stack_info))
        for block in blocks:
            text += "".join(f"\n{CONTINUATION}{printable(line)}" for line in block.splitlines())
        return text


def _log_uncaught_thread_exception(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    if args.exc_value is None:
        logger.error("uncaught %s in thread %s", args.exc_type.__name__, name)
        return
    logger.error("uncaught exception in thread %s", name, exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def configure_logging(level: str = "INFO") -> None:
    """Send log records to stdout at ``level``, escaped; third-party libraries only from WARNING."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(EscapingFormatter(FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    for name in QUIET_LIBRARIES:
        library = logging.getLogger(name)
        library.setLevel(max(logging.WARNING, logging.getLevelName(level)))
        # A library's own stream handler (pynetdicom's debug_logger(), pydicom's config.debug())
        # would write its records unescaped: every record goes through the root handler only.
        for own in list(library.handlers):
            if not isinstance(own, logging.NullHandler):
                library.removeHandler(own)
        library.propagate = True
    logging.captureWarnings(True)
    threading.excepthook = _log_uncaught_thread_exception
