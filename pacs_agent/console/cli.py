"""``pacs-agent console``: run the web console; ``pacs-agent console user add|remove|list``: its users."""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable
from pathlib import Path

from pacs_agent.config import Settings
from pacs_agent.console.users import (
    ONE_TIME_HOURS,
    ROLES,
    UserError,
    add_one_time_user,
    add_user,
    list_users,
    remove_user,
)
from pacs_agent.db import Database


def add_console_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser],
) -> None:
    """Add ``console`` (and ``console user ...``) to the ``pacs-agent`` sub-commands."""
    console = with_config(sub.add_parser("console", help="run the web console ([console] host:port); manage its users"))
    console_sub = console.add_subparsers(dest="console_command")
    user = console_sub.add_parser("user", help="local users of the console")
    user_sub = user.add_subparsers(dest="user_command", required=True)
    add = with_config(user_sub.add_parser("add", help="add a user (or set a user's role and password)"))
    add.add_argument("name", help="user name (letters, digits and . _ @ -)")
    add.add_argument("--role", choices=ROLES, required=True, help="viewer looks; operator and admin also act")
    given = add.add_mutually_exclusive_group()
    given.add_argument("--password-file", help="read the password from this file (first line) instead of a prompt")
    given.add_argument(
        "--one-time",
        action="store_true",
        help=f"make a random one-time password, print it once; valid {ONE_TIME_HOURS} h, replaced at the first login",
    )
    remove = with_config(user_sub.add_parser("remove", help="remove a user"))
    remove.add_argument("name")
    with_config(user_sub.add_parser("list", help="list the users and their roles"))


def _password(args: argparse.Namespace) -> str:
    if args.password_file:
        try:
            lines = Path(args.password_file).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise UserError(f"cannot read --password-file {args.password_file}: {exc.strerror}") from None
        return lines[0] if lines else ""
    first = getpass.getpass(f"password for {args.name}: ")
    if getpass.getpass("again: ") != first:
        raise UserError("the two passwords differ")
    return first


def run_console_command(args: argparse.Namespace, settings: Settings) -> int:
    """Serve the console, or manage its users; 1 when a user command is refused.

    The caller has prepared the state directory (:func:`pacs_agent.service.prepare_state`).
    """
    if args.console_command is None:
        from pacs_agent.console.server import run_console

        return run_console(settings)
    db = Database(settings.database_url)
    try:
        with db.session() as session, session.begin():
            if args.user_command == "add" and args.one_time:
                user, password, until = add_one_time_user(session, args.name, args.role)
                print(
                    f"console user {user.name} ({user.role}) saved; one-time password: {password} "
                    f"(valid until {until:%Y-%m-%d %H:%M} UTC; the user chooses their own at the first login)"
                )
            elif args.user_command == "add":
                user = add_user(session, args.name, args.role, _password(args))
                print(f"console user {user.name} ({user.role}) saved")
            elif args.user_command == "remove":
                if not remove_user(session, args.name):
                    print(f"pacs-agent console: there is no user {args.name!r}", file=sys.stderr)
                    return 1
                print(f"console user {args.name} removed")
            else:
                users = list_users(session)
                for u in users:
                    print(
                        f"{u.name:<32} {u.role}"
                        + ("  (one-time password not yet replaced)" if u.must_change_password else "")
                    )
                if not users:
                    print("no console users yet: pacs-agent console user add NAME --role admin")
    except UserError as exc:
        print(f"pacs-agent console: {exc}", file=sys.stderr)
        return 1
    finally:
        db.dispose()
    return 0
