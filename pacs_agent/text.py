r"""Untrusted text made safe to print: one line, no terminal control sequences.

Values that came from the network (UIDs, AE titles, peer addresses, descriptions, error texts that
quote them) end up in log lines, audit events and CLI output. Written raw, a newline forges a log
line, an ANSI escape (``ESC [ ...``) rewrites the operator's terminal, a NUL makes the log file
binary, a bidirectional override reorders what the reader sees. :func:`printable` turns every such
character into a visible escape (``\n``, ``\x1b``, ``\x00``, ``\u202e``); everything else, any
letter of any script included, is kept as it is.

Backslashes are kept as they are, so a value may spell ``\x1b`` itself: the escapes make text
harmless and readable, not reversible.
"""

from __future__ import annotations

import re

_UNSAFE = re.compile(
    "["
    "\x00-\x1f\x7f-\x9f"  # C0 controls (newline, tab, ESC, NUL, ...), DEL, C1 controls (CSI U+009B, ...)
    "\u2028\u2029"  # line and paragraph separator
    "\u200e\u200f\u202a-\u202e\u2066-\u2069"  # bidirectional marks, embeddings, overrides and isolates
    "\ud800-\udfff"  # lone surrogates (undecodable bytes kept by surrogateescape): unencodable as UTF-8
    "]"
)
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(value: object) -> str:
    r"""``value`` as one line of text with every control character shown as a visible escape.

    Parameters
    ----------
    value
        Any value; ``str(value)`` is escaped (``None`` becomes ``"None"``: callers that print
        nothing for a missing value test for ``None`` first).

    Returns
    -------
    str
        The text with newlines, carriage returns and tabs as ``\n``, ``\r``, ``\t``; other C0 and
        C1 control characters, DEL and lone surrogates as ``\xNN`` / ``\uNNNN``; line separators and
        bidirectional controls as ``\uNNNN``. Text without any of them is returned unchanged.
    """
    text = value if isinstance(value, str) else str(value)
    if _UNSAFE.search(text) is None:
        return text
    return _UNSAFE.sub(_escape, text)
