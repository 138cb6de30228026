"""Run the console with uvicorn: on its own (``pacs-agent console``) or as a thread of ``pacs-agent serve``."""

from __future__ import annotations

import logging
import threading

import uvicorn

from pacs_agent.config import Settings
from pacs_agent.console.app import create_app
from pacs_agent.console.auth import load_secret
from pacs_agent.db import Database

logger = logging.getLogger(__name__)


def uvicorn_config(settings: Settings, db: Database) -> uvicorn.Config:
    """The uvicorn configuration of the console (HTTPS when ``[console] cert_file`` is set; no access log).

    The access log is off because a request line names the study a user looked at: that is the
    audit trail's job (``console_study_viewed`` events), not the log's.
    """
    console = settings.console
    app = create_app(settings, db, load_secret(settings.console_secret_file))
    return uvicorn.Config(
        app,
        host=console.host,
        port=console.port,
        access_log=False,
        log_config=None,
        ssl_certfile=console.cert_file or None,
        ssl_keyfile=console.key_file or None,
        proxy_headers=False,  # X-Forwarded-For: from [console] trusted_proxies only (console.app.ForwardedFor)
        server_header=False,
        lifespan="off",
    )


def address(settings: Settings) -> str:
    """Where people reach the console: ``[console] base_url``, else ``http(s)://host:port``."""
    console = settings.console
    if console.base_url:
        return console.base_url
    return f"{'https' if console.cert_file else 'http'}://{console.host}:{console.port}"


def run_console(settings: Settings) -> int:
    """``pacs-agent console``: serve until SIGTERM / SIGINT (uvicorn handles both), then exit 0."""
    db = Database(settings.database_url)
    try:
        server = uvicorn.Server(uvicorn_config(settings, db))
        logger.info("console at %s", address(settings))
        server.run()
        return 0 if server.started else 3
    finally:
        db.dispose()


class ConsoleThread:
    """The console inside ``pacs-agent serve``: a uvicorn server on a thread of its own."""

    def __init__(self, settings: Settings, db: Database) -> None:
        self.server = uvicorn.Server(uvicorn_config(settings, db))
        self.thread = threading.Thread(target=self.server.run, name="console", daemon=True)
        self.url = address(settings)

    def start(self, timeout: float = 10.0) -> None:
        """Start serving; wait until the port listens (or the server gave up)."""
        self.thread.start()
        ready = threading.Event()
        while not self.server.started and self.thread.is_alive() and not ready.wait(0.05):
            timeout -= 0.05
            if timeout <= 0:
                break
        if self.server.started:
            logger.info("console at %s", self.url)
        else:
            logger.error("the console did not start on %s (see the messages above)", self.url)

    def alive(self) -> bool:
        """True while the console's thread runs."""
        return self.thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and wait for the thread."""
        self.server.should_exit = True
        self.thread.join(timeout)
