"""``pacs-agent demo`` (what ``make demo`` runs): the whole path on a synthetic study, unattended.

1. start a local receiver standing in for the PACS, 2. start the node (``serve``) on embedded
defaults with that receiver as its destination and every method enabled (the mutation models
run from the committed DEMO packages), 3. generate a phantom CT + SEG study, 4. send it with
C-STORE, 5. wait for every result to come back, 6. print the SRs as text and write the Secondary
Captures as PNG, 7. print the web console's address with a one-time password of the user ``admin``,
8. on a terminal (or with ``--stay``), keep the node and console running until Ctrl-C; otherwise
(CI, ``--no-stay``, stdin not a terminal) stop everything.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import cast

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # pynetdicom sets it via globals()
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import select

from inference.methods import method_names
from pacs_agent.config import Destination
from pacs_agent.console.users import add_one_time_user
from pacs_agent.db import Database
from pacs_agent.db.tables import Delivery, Job
from pacs_agent.receive.header import COMPREHENSIVE_3D_SR, SECONDARY_CAPTURE
from pacs_agent.receive.spool import durable_write, safe_name
from pacs_agent.send.scu import store_files


def _free_port() -> int:
    """A TCP port nobody listens on right now (for the demo's receiver, node and health endpoint)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _LocalReceiver:
    """A minimal storage SCP that writes what it receives into a folder (the demo's PACS)."""

    def __init__(self, folder: Path, ae_title: str = "DEMO_PACS", port: int | None = None) -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.port = port or _free_port()
        self.received: list[Path] = []
        self._lock = threading.Lock()
        self._ae = AE(ae_title=ae_title)
        self._ae.add_supported_context(Verification)
        for sop_class in (COMPREHENSIVE_3D_SR, SECONDARY_CAPTURE):
            self._ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self._server: ThreadedAssociationServer | None = None

    def _on_store(self, event: evt.Event) -> int:
        sop_uid = str(cast(C_STORE, event.request).AffectedSOPInstanceUID)
        target = self.folder / f"{safe_name(sop_uid)}.dcm"
        tmp = self.folder / ".tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        durable_write(event.encoded_dataset(include_meta=True), target, tmp)
        with self._lock:
            if target not in self.received:
                self.received.append(target)
        return 0x0000

    def start(self) -> None:
        """Listen on 127.0.0.1:``port``."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self._server = self._ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )

    def stop(self) -> None:
        """Close the listening socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def files(self) -> list[Path]:
        """What has arrived so far."""
        with self._lock:
            return list(self.received)

    def destination(self) -> Destination:
        """Return this receiver as a ``[[destinations]]`` entry."""
        return Destination(name="demo-pacs", ae_title=self.ae_title, host="127.0.0.1", port=self.port)


def _write_config(path: Path, state_dir: Path, node_port: int, console_port: int, receiver: _LocalReceiver) -> None:
    dest = receiver.destination()
    path.write_text(
        "\n".join(
            [
                "# Written by `pacs-agent demo`: embedded defaults plus a local port and destination.",
                "[node]",
                'ae_title = "PACS_AGENT"',
                'host = "127.0.0.1"',
                f"port = {node_port}",
                "[storage]",
                f'state_dir = "{state_dir}"',
                "min_free_mb = 100",
                "[readiness]",
                "quiet_seconds = 2",
                "[jobs]",
                "# every method; routing skips the chest models (m2, m4) on this abdominal study",
                f"methods = {json.dumps(list(method_names(pair=False)))}",
                "[models]",
                "use_demo = true  # the committed DEMO packages: NOT FOR CLINICAL USE",
                "[delivery]",
                "initial_backoff_seconds = 2",
                "[observability]",
                'http_host = "127.0.0.1"',
                f"http_port = {_free_port()}",
                "[console]",
                "enabled = true",
                'host = "127.0.0.1"',
                f"port = {console_port}",
                "[[destinations]]",
                f'name = "{dest.name}"',
                f'ae_title = "{dest.ae_title}"',
                f'host = "{dest.host}"',
                f"port = {dest.port}",
                "",
            ]
        ),
        encoding="utf-8",
    )


def _wait_for_node(port: int, deadline: float, node: subprocess.Popen[bytes]) -> None:
    ae = AE(ae_title="DEMO_SCU")
    ae.add_requested_context(Verification)
    while time.monotonic() < deadline:
        if node.poll() is not None:
            raise RuntimeError(f"the node exited with code {node.returncode} during start-up")
        assoc = ae.associate("127.0.0.1", port, ae_title="PACS_AGENT")
        if assoc.is_established:
            status = assoc.send_c_echo()
            assoc.release()
            if status and status.Status == 0:
                return
        time.sleep(0.5)
    raise RuntimeError("the node did not answer C-ECHO in time")


def _wait_for_results(state_dir: Path, node: subprocess.Popen[bytes], deadline: float) -> str | None:
    """Wait until the node has run every job and delivered every result; None when it has."""
    db = Database(f"sqlite:///{state_dir / 'pacs-agent.db'}", run_migrations=False)
    try:
        while time.monotonic() < deadline:
            if node.poll() is not None:
                return f"the node exited with code {node.returncode}"
            with db.session() as session:
                jobs = session.execute(select(Job.state, Job.last_error)).all()
                deliveries = session.execute(select(Delivery.state, Delivery.last_error)).all()
            failed = [error for state, error in jobs if state in ("failed", "dead")]
            if failed:
                return f"the job failed: {failed[0]}"
            dead = [error for state, error in deliveries if state == "dead"]
            if dead:
                return f"a result could not be delivered: {dead[0]}"
            if (
                jobs
                and all(state == "done" for state, _ in jobs)
                and deliveries
                and all(state == "done" for state, _ in deliveries)
            ):
                return None
            time.sleep(0.5)
        return "no result in time"
    finally:
        db.dispose()


def _step(text: str) -> None:
    print(f"==> {text}", flush=True)


def _console_admin(state_dir: Path) -> tuple[str, str]:
    """A one-time password for the console user ``admin`` (only its hash is stored): (password, valid until)."""
    db = Database(f"sqlite:///{state_dir / 'pacs-agent.db'}", run_migrations=False)
    try:
        with db.session() as session, session.begin():
            _, password, until = add_one_time_user(session, "admin", "admin")
    finally:
        db.dispose()
    return password, f"{until:%Y-%m-%d %H:%M} UTC"


def _stay_until_interrupted(node: subprocess.Popen[bytes]) -> int:
    """Wait for Ctrl-C (SIGINT) or SIGTERM; 0 then, 1 when the node stopped on its own."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while node.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("", flush=True)
        _step("stopping the node")
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"demo: the node exited with code {node.returncode}", file=sys.stderr)
    return 1


def run_demo(out: Path, *, timeout_seconds: float = 300, seed: int = 7, stay: bool | None = None) -> int:
    """Run the demonstration in folder ``out``; returns the process exit code.

    ``stay``: keep the node and console running until Ctrl-C after the results (None: when stdin
    is a terminal).
    """
    from inference.phantom import generate_study
    from pacs_agent.show import show

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    out = out.absolute()
    receiver = _LocalReceiver(out / "received")
    receiver.start()
    node_port, console_port = _free_port(), _free_port()
    config = out / "pacs-agent.toml"
    _write_config(config, out / "state", node_port, console_port, receiver)
    _step(f"starting pacs-agent on 127.0.0.1:{node_port} (log: {out / 'node.log'})")
    log = (out / "node.log").open("wb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_AGENT__")}
    node = subprocess.Popen(
        [sys.executable, "-m", "pacs_agent", "serve", "--config", str(config)], stdout=log, stderr=log, env=env
    )
    deadline = time.monotonic() + timeout_seconds
    try:
        _wait_for_node(node_port, deadline, node)
        _step("generating a synthetic portal-venous CT study with 3 liver lesions and a DICOM SEG")
        study = generate_study(out / "study", seed=seed, lesions=3, segmentation="seg")
        files = [*study.ct_files, *([study.seg_file] if study.seg_file else [])]
        _step(f"sending {len(files)} instances with C-STORE")
        outcomes = store_files(
            Destination(name="node", ae_title="PACS_AGENT", host="127.0.0.1", port=node_port),
            files,
            calling_ae_title="DEMO_MODALITY",
        )
        failed = [o for o in outcomes if not o.ok]
        if failed:
            print(f"demo: {len(failed)} instance(s) were refused, e.g. {failed[0].reason}", file=sys.stderr)
            return 1
        _step("waiting for the result (quiet period, then processing and delivery)")
        outcome = _wait_for_results(out / "state", node, deadline)
        if outcome is not None:
            print(f"demo: {outcome}; see {out / 'node.log'} and `pacs-agent status --config {config}`", file=sys.stderr)
            return 1
        _step(f"received {len(receiver.files())} result object(s) in {receiver.folder}")
        show(receiver.folder, png_dir=out / "png")
        password, until = _console_admin(out / "state")
        _step(f"done. Node state: {out / 'state'}; inspect it with `pacs-agent status --config {config}`")
        stays = sys.stdin.isatty() if stay is None else stay  # by default only for a person at a terminal
        print(
            f"Console: http://127.0.0.1:{console_port}/ user admin, one-time password {password} "
            f"(valid until {until}; choose your own at the first login)"
            + (
                " - press Ctrl-C to stop"
                if stays
                else f"; the node stops now, `pacs-agent serve --config {config}` restarts it"
            ),
            flush=True,
        )
        if not stays:
            return 0
        return _stay_until_interrupted(node)
    finally:
        if node.poll() is None:
            node.send_signal(signal.SIGTERM)
            try:
                node.wait(60)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()
        log.close()
        receiver.stop()
