"""Local console users: names, roles and argon2 password hashes in the ``console_users`` table.

The users live in the node's database (not a file) so that a console on another host of a
PostgreSQL set-up sees the same users, and backups of the database keep them.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import select
from sqlalchemy.orm import Session

from pacs_agent.db.tables import ConsoleRole, ConsoleUser, utcnow
from pacs_agent.errors import PacsAgentError

MIN_PASSWORD_LENGTH = 12
ONE_TIME_HOURS = 24
"""How long a one-time password (``console user add --one-time``, ``make demo``) may be used."""
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_HASHER = PasswordHasher()
_DUMMY_HASH = _HASHER.hash("not a password of anybody")
ROLES = tuple(role.value for role in ConsoleRole)


class UserError(PacsAgentError):
    """A user cannot be added or changed (bad name, short password, unknown role); the message says why."""


@dataclass(frozen=True)
class User:
    """A logged-in (or listed) console user."""

    name: str
    role: str
    must_change_password: bool = False
    """Logged in with a one-time password: every page leads to the password form until it is changed."""

    @property
    def can_act(self) -> bool:
        """Operators and admins may retry jobs, re-run studies and requeue deliveries."""
        return self.role in (ConsoleRole.OPERATOR, ConsoleRole.ADMIN)


def hash_password(password: str) -> str:
    """The argon2id hash of ``password`` (refuses passwords shorter than :data:`MIN_PASSWORD_LENGTH`)."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(f"the password must have at least {MIN_PASSWORD_LENGTH} characters")
    return _HASHER.hash(password)


def check_name(name: str) -> str:
    """``name`` if it is a valid user name: letters, digits and ``. _ @ -``, at most 64 characters."""
    if not _NAME.match(name):
        raise UserError(f"{name!r} is not a valid user name: letters, digits and . _ @ - (at most 64 characters)")
    return name


def add_user(session: Session, name: str, role: str, password: str) -> User:
    """Add a user, or give an existing one a new role and password (the caller commits)."""
    check_name(name)
    if role not in ROLES:
        raise UserError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
    hashed = hash_password(password)
    row = session.execute(select(ConsoleUser).where(ConsoleUser.name == name)).scalar_one_or_none()
    if row is None:
        session.add(ConsoleUser(name=name, role=role, password_hash=hashed))
    else:
        row.role, row.password_hash, row.password_expires_at = role, hashed, None
    return User(name, role)


def add_one_time_user(
    session: Session, name: str, role: str, *, hours: float = ONE_TIME_HOURS
) -> tuple[User, str, datetime]:
    """Add (or reset) a user with a random one-time password; ``(user, password, valid until)``.

    Only the password's argon2 hash is stored. It is refused after ``hours``, and the first login
    with it leads to the password form: the user must choose their own before seeing anything
    (the caller commits, and shows the password once).
    """
    password = secrets.token_urlsafe(12)  # 16 characters, 96 random bits
    user = add_user(session, name, role, password)
    until = utcnow() + timedelta(hours=hours)
    row = session.execute(select(ConsoleUser).where(ConsoleUser.name == name)).scalar_one()
    row.password_expires_at = until
    return User(user.name, user.role, must_change_password=True), password, until


def change_password(session: Session, name: str, current: str, new: str) -> User:
    """Replace a user's password (a one-time one by their own); the current password must be right.

    Raises
    ------
    UserError
        Wrong current password, a new one too short or equal to the current one (the caller commits).
    """
    if authenticate(session, name, current) is None:
        raise UserError("the current password is wrong (or a one-time password expired)")
    if new == current:
        raise UserError("the new password must differ from the current one")
    hashed = hash_password(new)
    row = session.execute(select(ConsoleUser).where(ConsoleUser.name == name)).scalar_one()
    row.password_hash, row.password_expires_at = hashed, None
    return User(row.name, row.role)


def remove_user(session: Session, name: str) -> bool:
    """Remove a user; False when there is none of that name (the caller commits)."""
    row = session.execute(select(ConsoleUser).where(ConsoleUser.name == name)).scalar_one_or_none()
    if row is None:
        return False
    session.delete(row)
    return True


def list_users(session: Session) -> list[User]:
    """Every user, by name."""
    rows = session.execute(select(ConsoleUser).order_by(ConsoleUser.name)).scalars().all()
    return [_user(r) for r in rows]


def _user(row: ConsoleUser) -> User:
    return User(row.name, row.role, must_change_password=row.password_expires_at is not None)


def find_user(session: Session, name: str) -> User | None:
    """The user of that name, or None."""
    row = session.execute(select(ConsoleUser).where(ConsoleUser.name == name)).scalar_one_or_none()
    return None if row is None else _user(row)


def authenticate(session: Session, name: str, password: str) -> User | None:
    """The user when ``password`` is theirs (and, if one-time, not expired), else None (the caller commits).

    Takes as long for unknown names as for known ones.
    """
    row = session.execute(select(ConsoleUser).where(ConsoleUser.name == name)).scalar_one_or_none()
    stored = row.password_hash if row is not None else _DUMMY_HASH
    try:
        _HASHER.verify(stored, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return None
    if row is None:
        return None
    if row.password_expires_at is not None and row.password_expires_at <= utcnow():
        return None
    if _HASHER.check_needs_rehash(row.password_hash):
        row.password_hash = _HASHER.hash(password)
    row.last_login_at = utcnow()
    return _user(row)
