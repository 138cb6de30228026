"""The ``pacs-agent`` command.

Exit codes: 0 success, 1 invalid configuration or a failed check, 2 usage error, 3 start-up
failure (database or state directory not usable).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pacs_agent import __version__
from pacs_agent.config import Settings, load_settings
from pacs_agent.errors import ConfigError, PacsAgentError
from pacs_agent.events_cli import add_parsers as add_event_parsers
from pacs_agent.events_cli import run_events, run_retry
from pacs_agent.logs import configure_logging
from pacs_agent.send.cli import add_send_parser, run_send
from pacs_agent.text import printable

EXIT_OK, EXIT_INVALID, EXIT_USAGE, EXIT_STARTUP = 0, 1, 2, 3
CONFIG_ENV = "PACS_AGENT_CONFIG"


def _config_path(args: argparse.Namespace) -> Path | None:
    given = getattr(args, "config", None) or os.environ.get(CONFIG_ENV)
    return Path(given) if given else None


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(_config_path(args))


def _cmd_config_check(args: argparse.Namespace) -> int:
    from pacs_agent.checks import check_settings
    from pacs_agent.tls import tls_problems

    try:
        settings = _settings(args)
    except ConfigError as exc:
        print(f"configuration has {len(exc.problems)} problem(s):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return EXIT_INVALID
    problems = check_settings(settings) + tls_problems(settings)
    if problems:
        print(f"configuration has {len(problems)} problem(s):", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return EXIT_INVALID
    node = settings.node
    print(f"configuration OK: AE {node.ae_title} on {node.host}:{node.port}")
    if node.tls_port:
        clients = "client certificate required" if settings.tls.require_client_cert else "no client certificate needed"
        plain = "" if node.plain_port_enabled else "; plain port closed"
        print(f"  DICOM TLS on port {node.tls_port} ({clients}{plain})")
    print(f"  state directory {settings.storage.state_dir}, database {settings.database_url.split(':')[0]}")
    for dest in settings.destinations:
        where = f"STOW-RS {dest.url}" if dest.type == "stowrs" else f"{dest.ae_title}@{dest.host}:{dest.port}"
        print(f"  destination {dest.name}: {where}")
    return EXIT_OK


def _run_service(args: argparse.Namespace) -> int:
    from pacs_agent import service

    settings = _settings(args)
    configure_logging(settings.logging.level)
    if args.command == "scp":
        return service.run_scp(settings)
    if args.command == "worker":
        return service.run_worker(settings, tuple(args.queue) if args.queue else None)
    return service.run_serve(settings, _config_path(args))


def _cmd_status(args: argparse.Namespace) -> int:
    from pacs_agent.status import print_status

    return print_status(_settings(args), as_json=args.json, limit=args.limit)


def _cmd_pause(args: argparse.Namespace) -> int:
    import getpass

    from pacs_agent.db import Database
    from pacs_agent.pause import pause_processing, resume_processing

    db = Database(_settings(args).database_url)
    by = f"command line ({getpass.getuser()})"
    try:
        with db.session() as session, session.begin():
            if args.command == "pause":
                message = pause_processing(session, by=by, reason=args.reason)
            else:
                message = resume_processing(session, by=by)
    finally:
        db.dispose()
    print(message)
    return EXIT_OK


def _cmd_show(args: argparse.Namespace) -> int:
    from pacs_agent.show import show

    return show(Path(args.path), png_dir=Path(args.png_dir) if args.png_dir else None)


def _cmd_demo(args: argparse.Namespace) -> int:
    from pacs_agent.demo import run_demo

    return run_demo(Path(args.out), timeout_seconds=args.timeout, stay=args.stay)


def _cmd_phantom(argv: Sequence[str]) -> int:
    from inference.phantom import main as phantom_main

    return phantom_main(argv)


def _cmd_radiomics(argv: Sequence[str]) -> int:
    from inference.radiomics.cli import main as radiomics_main

    return radiomics_main(argv)


def _cmd_train(argv: Sequence[str]) -> int:
    # lazy: training imports torch, the scp process never does
    from inference.training.cli import main as train_main

    return train_main(argv)


def _cmd_models(args: argparse.Namespace) -> int:
    # lazy: the registry reads torch / skops files only inside these calls, never in the scp process
    from inference.registry.cli import models_install, models_list, models_verify

    if args.models_command == "verify":
        return models_verify(Path(args.path))
    settings = _settings(args)
    if args.models_command == "install":
        return models_install(Path(args.path), settings.models_dir)
    print(f"installed packages ([models] dir): {settings.models_dir}")
    code = models_list(settings.models_dir, verify=args.verify)
    for directory in settings.model_dirs[1:]:
        print(f"\ndemo packages ([models] use_demo = true; DEMO - NOT FOR CLINICAL USE): {directory}")
        code = max(code, models_list(directory, verify=args.verify))
    return code


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command (except ``phantom``, which has its own)."""
    parser = argparse.ArgumentParser(prog="pacs-agent", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"pacs-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", help=f"TOML settings file (default: ${CONFIG_ENV}, else embedded defaults)")
        return p

    with_config(sub.add_parser("serve", help="run the receiving process and one worker (embedded default)"))
    with_config(sub.add_parser("scp", help="run the receiving process only (receive, schedule, send)"))
    worker = with_config(sub.add_parser("worker", help="run a worker process only (runs jobs; any host)"))
    worker.add_argument(
        "--queue",
        action="append",
        metavar="NAME",
        help="take jobs of this queue only (repeatable; overrides [worker] queues; e.g. --queue gpu)",
    )
    config = sub.add_parser("config", help="configuration tools")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    with_config(config_sub.add_parser("check", help="validate a configuration; prints every problem"))
    status = with_config(sub.add_parser("status", help="recent studies, jobs and deliveries"))
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--limit", type=int, default=20, help="how many studies to show (default 20)")
    pause = with_config(
        sub.add_parser(
            "pause",
            help="stop new jobs from starting (studies are still received and stored); undo with resume",
        )
    )
    pause.add_argument("--reason", default="", help="why (shown by status and in the console), e.g. 'model update'")
    with_config(sub.add_parser("resume", help="let jobs start again after pacs-agent pause"))
    show = sub.add_parser("show", help="print SRs as text and write Secondary Captures as PNG")
    show.add_argument("path", help="a DICOM file or a folder of them")
    show.add_argument("--png-dir", help="where to write PNGs of image objects")
    demo = sub.add_parser("demo", help="end-to-end demonstration on a synthetic study")
    demo.add_argument("--out", default="demo-output", help="working folder (default demo-output)")
    demo.add_argument("--timeout", type=float, default=300, help="seconds to wait for the result")
    demo.add_argument(
        "--stay",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep the node and its web console running until Ctrl-C (default: only when run from a terminal)",
    )
    sub.add_parser("phantom", help="write a synthetic CT study with SEG and RTSTRUCT", add_help=False)
    sub.add_parser("radiomics", help="pyradiomics features of one segment of a DICOM CT, as JSON", add_help=False)
    sub.add_parser(
        "train",
        help="train m1 .. m4, the radiomics comparator or the response score into a model package",
        add_help=False,
    )
    models = sub.add_parser("models", help="model packages of the methods m1 .. m4: list, verify, install")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    models_list = with_config(models_sub.add_parser("list", help="packages in [models] dir (and the demo packages)"))
    models_list.add_argument("--verify", action="store_true", help="also check checksums and weights (slower)")
    models_sub.add_parser("verify", help="check a package (directory or zip); exit 1 if refused").add_argument(
        "path", help="package directory or zip"
    )
    install = with_config(models_sub.add_parser("install", help="verify a package and copy it into [models] dir"))
    install.add_argument("path", help="package directory or zip")
    add_send_parser(sub, with_config)
    add_event_parsers(sub, with_config)
    from pacs_agent.console.cli import add_console_parser

    add_console_parser(sub, with_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pacs-agent`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "phantom":
        return _cmd_phantom(argv[1:])
    if argv and argv[0] == "radiomics":
        return _cmd_radiomics(argv[1:])
    if argv and argv[0] == "train":
        return _cmd_train(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "config":
            return _cmd_config_check(args)
        if args.command in ("serve", "scp", "worker"):
            return _run_service(args)
        if args.command == "status":
            return _cmd_status(args)
        if args.command == "show":
            return _cmd_show(args)
        if args.command in ("pause", "resume"):
            return _cmd_pause(args)
        if args.command == "send":
            return run_send(args, _settings(args))
        if args.command == "events":
            return run_events(args, _settings(args))
        if args.command == "retry":
            return run_retry(args, _settings(args))
        if args.command == "models":
            return _cmd_models(args)
        if args.command == "demo":
            return _cmd_demo(args)
        if args.command == "console":
            from pacs_agent.console.cli import run_console_command
            from pacs_agent.service import prepare_state

            settings = _settings(args)
            configure_logging(settings.logging.level)
            prepare_state(settings)
            return run_console_command(args, settings)
    except ConfigError as exc:  # one problem per line, from the operator's own file
        print(f"pacs-agent: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except PacsAgentError as exc:  # may quote stored or network text (a UID, a reason): escaped
        print(f"pacs-agent: {printable(exc)}", file=sys.stderr)
        return EXIT_STARTUP
    return EXIT_USAGE
