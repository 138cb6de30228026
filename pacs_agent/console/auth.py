"""Sessions in signed cookies, CSRF tokens, the login rate limit and the session key file.

A session cookie holds the user name, a random CSRF token and nothing else, signed (not encrypted)
with the key of ``[console] session_secret_file`` and valid for ``[console] session_hours``. The
user's role is read from the database on every request, so removing a user or changing a role
takes effect at once. Every form carries the session's CSRF token; the login form (before any
session) carries a token that must match a signed pre-login cookie (double submit).
"""

from __future__ import annotations

import hmac
import os
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from itsdangerous import BadSignature, URLSafeTimedSerializer

from pacs_agent.errors import ConfigError

SESSION_COOKIE = "pacs_console"
LOGIN_COOKIE = "pacs_console_login"
LOGIN_TOKEN_SECONDS = 3600


def load_secret(path: Path) -> bytes:
    """The session key in ``path``; a new random one is written (mode 0600) when the file is missing.

    Raises
    ------
    ConfigError
        The file cannot be read or written, is readable by others, or holds fewer than 32 characters.
    """
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_hex(32) + "\n")
        mode = path.stat().st_mode & 0o077
        key = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError([f"console.session_secret_file {path}: cannot read or create it ({exc.strerror})"]) from None
    if mode:
        raise ConfigError([f"console.session_secret_file {path}: readable by others; chmod 600 {path}"])
    if len(key) < 32:
        raise ConfigError(
            [f"console.session_secret_file {path}: holds fewer than 32 characters; delete it for a new key"]
        )
    return key.encode()


@dataclass(frozen=True)
class Session:
    """What a valid session cookie says."""

    user: str
    csrf: str
    sso: bool = False
    """Named by the trusted reverse proxy's header (no cookie): its CSRF token is signed, not stored."""


class Sessions:
    """Signs and reads session and pre-login cookies with one key."""

    def __init__(self, secret: bytes, max_age_seconds: float) -> None:
        self._sessions = URLSafeTimedSerializer(secret, salt="pacs-agent-console-session")
        self._login = URLSafeTimedSerializer(secret, salt="pacs-agent-console-login")
        self._sso = URLSafeTimedSerializer(secret, salt="pacs-agent-console-sso-csrf")
        self.max_age_seconds = max_age_seconds

    def sso(self, user: str) -> Session:
        """The session of a user the trusted proxy names: a CSRF token signed with the user's name."""
        return Session(user, self._sso.dumps(user), sso=True)

    def csrf_ok(self, session: Session, token: str | None) -> bool:
        """True when a form's token belongs to ``session`` (a proxy user's: signed for them, not expired)."""
        if not session.sso:
            return csrf_ok(session, token)
        if not token:
            return False
        try:
            name = self._sso.loads(token, max_age=int(self.max_age_seconds))
        except BadSignature:
            return False
        return isinstance(name, str) and hmac.compare_digest(name, session.user)

    def issue(self, user: str) -> tuple[str, Session]:
        """A new session for ``user`` (a fresh CSRF token): the cookie value and the session."""
        session = Session(user, secrets.token_urlsafe(24))
        return self._sessions.dumps({"u": session.user, "c": session.csrf}), session

    def read(self, cookie: str | None) -> Session | None:
        """The session of a cookie value, None when missing, forged or expired."""
        if not cookie:
            return None
        try:
            data = self._sessions.loads(cookie, max_age=int(self.max_age_seconds))
        except BadSignature:
            return None
        if not isinstance(data, dict) or not isinstance(data.get("u"), str) or not isinstance(data.get("c"), str):
            return None
        return Session(data["u"], data["c"])

    def login_token(self) -> tuple[str, str]:
        """A pre-login CSRF token: the cookie value and the token the form carries."""
        token = secrets.token_urlsafe(24)
        return self._login.dumps(token), token

    def login_token_ok(self, cookie: str | None, token: str | None) -> bool:
        """True when the form's token matches the signed pre-login cookie."""
        if not cookie or not token:
            return False
        try:
            expected = self._login.loads(cookie, max_age=LOGIN_TOKEN_SECONDS)
        except BadSignature:
            return False
        return isinstance(expected, str) and hmac.compare_digest(expected, token)


def csrf_ok(session: Session, token: str | None) -> bool:
    """True when a form's token is the session's (constant-time comparison)."""
    return bool(token) and hmac.compare_digest(session.csrf, token or "")


class LoginLimiter:
    """At most ``attempts`` failed logins per client address within ``window_seconds``.

    Parameters
    ----------
    attempts, window_seconds
        The limit.
    clock
        Monotonic seconds (a test gives its own).
    """

    def __init__(
        self, attempts: int = 5, window_seconds: float = 300.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.attempts = attempts
        self.window_seconds = window_seconds
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, address: str) -> deque[float]:
        now = self.clock()
        failures = self._failures.setdefault(address, deque())
        while failures and now - failures[0] > self.window_seconds:
            failures.popleft()
        if not failures:
            del self._failures[address]
            return deque()
        return failures

    def blocked_for(self, address: str) -> float:
        """Seconds until ``address`` may try again (0: it may try now)."""
        failures = self._recent(address)
        if len(failures) < self.attempts:
            return 0.0
        return max(self.window_seconds - (self.clock() - failures[0]), 1.0)

    def failed(self, address: str) -> None:
        """Count one failed login from ``address``."""
        self._recent(address)
        self._failures.setdefault(address, deque()).append(self.clock())
        if len(self._failures) > 10_000:  # a flood of addresses must not grow memory without end
            oldest = min(self._failures, key=lambda a: self._failures[a][-1])
            del self._failures[oldest]

    def succeeded(self, address: str) -> None:
        """Forget the failures of ``address``."""
        self._failures.pop(address, None)
