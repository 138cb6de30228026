"""Real peers for integration tests: Orthanc as the PACS, a pynetdicom storage SCP as a small PACS, the node as
real processes (and its database), DCMTK tools.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification
from sqlalchemy import Row
from sqlalchemy.sql import Executable

from pacs_agent.db import Database
from pacs_agent.receive.header import COMPREHENSIVE_3D_SR, SECONDARY_CAPTURE
from tests.ports import free_port

ORTHANC_BINARY = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
ORTHANC_PLUGINS = {"dicomweb": ("orthanc-dicomweb", Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"))}
"""Orthanc plugins the tests can load: name -> (Debian package, shared library)."""


def require_tool(name: str) -> str:
    """Path of a command-line tool, or skip the test with the package to install."""
    path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)
    if path is None:
        package = {"Orthanc": "orthanc", "dciodvfy": "dicom3tools"}.get(name, "dcmtk")
        pytest.skip(f"{name} is not installed (apt-get install {package}; `make test` installs it)")
    return path


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll ``predicate`` until it returns something truthy, or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def destination_toml(name: str, ae_title: str, port: int, host: str = "127.0.0.1") -> str:
    """A DIMSE ``[[destinations]]`` entry of the node's TOML."""
    return f'[[destinations]]\nname = "{name}"\nae_title = "{ae_title}"\nhost = "{host}"\nport = {port}\n'


@dataclass(frozen=True)
class OrthancTls:
    """DICOM TLS of an Orthanc: its certificate and key, the CA(s) it trusts (for peers connecting to it and for
    the peers it connects to), whether a connecting peer must present a certificate.
    """

    cert: Path
    key: Path
    trusted: Path
    require_client_cert: bool = True


class Orthanc:
    """An Orthanc server of its own (temp storage, free ports), standing in for the hospital PACS.

    With ``tls`` its DICOM port speaks only DICOM TLS. ``lua_scripts`` are loaded at each start (change the
    list between a :meth:`kill` and the next :meth:`start` to restart without them).
    """

    def __init__(
        self,
        workdir: Path,
        ae_title: str = "ORTHANC",
        *,
        plugins: Sequence[str] = (),
        users: dict[str, str] | None = None,
        tls: OrthancTls | None = None,
        lua_scripts: Sequence[Path] = (),
    ) -> None:
        """``plugins``: names from ``ORTHANC_PLUGINS`` (e.g. ``dicomweb``, served under ``/dicom-web``);
        ``users``: HTTP basic-auth users (user -> password); the helper's own requests use the first;
        ``tls``: DICOM TLS on the DICOM port; ``lua_scripts``: Lua files Orthanc runs (e.g. a
        ``ReceivedInstanceFilter``).
        """
        self.workdir = workdir
        self.ae_title = ae_title
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.modalities: dict[str, Any] = {}
        self.process: subprocess.Popen[bytes] | None = None
        unknown = sorted(set(plugins) - set(ORTHANC_PLUGINS))
        if unknown:
            raise ValueError(f"unknown Orthanc plugin(s) {unknown}; known: {sorted(ORTHANC_PLUGINS)}")
        self.plugins = tuple(plugins)
        self.users = dict(users or {})
        self.auth: tuple[str, str] | None = next(iter(self.users.items()), None)
        self.tls = tls
        self.lua_scripts = list(lua_scripts)

    @property
    def url(self) -> str:
        """Base URL of the REST API."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """Base URL of the DICOMweb API (QIDO-RS, WADO-RS, STOW-RS) of the ``dicomweb`` plugin."""
        return f"{self.url}/dicom-web"

    def destination_toml(self, name: str = "pacs") -> str:
        """This Orthanc as a DIMSE ``[[destinations]]`` entry of the node's TOML."""
        return destination_toml(name, self.ae_title, self.dicom_port)

    def source_toml(self, name: str = "pacs", retrieve: str = "move", extra: str = "") -> str:
        """This Orthanc as a ``[[sources]]`` entry (C-FIND, then C-MOVE or C-GET) of the node's TOML; ``extra``:
        more keys of the entry (e.g. its TLS keys), one per line.
        """
        return (
            f'[[sources]]\nname = "{name}"\nae_title = "{self.ae_title}"\nhost = "127.0.0.1"\n'
            f'port = {self.dicom_port}\nretrieve = "{retrieve}"\n{extra}'
        )

    def add_modality(self, name: str, ae_title: str, port: int, host: str = "127.0.0.1", *, tls: bool = False) -> None:
        """Declare a DICOM peer Orthanc may send to (takes effect at the next start); ``tls``: reach it over DICOM
        TLS (with this Orthanc's certificate, trusting ``OrthancTls.trusted``).
        """
        if tls:
            self.modalities[name] = {"AET": ae_title, "Host": host, "Port": port, "UseDicomTls": True}
        else:
            self.modalities[name] = [ae_title, host, port]

    def start(self, env: dict[str, str] | None = None) -> None:
        """Write the configuration and start Orthanc; wait until its REST API answers."""
        require_tool("Orthanc")
        libraries = []
        for name in self.plugins:
            package, library = ORTHANC_PLUGINS[name]
            if not library.exists():
                pytest.skip(f"Orthanc plugin {name} is not installed (apt-get install {package}; `make test` does)")
            libraries.append(str(library))
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "pacs-agent-test",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.ae_title,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users,
            "DicomAlwaysAllowStore": True,
            "DicomCheckModalityHost": False,
            "DicomModalities": self.modalities,
            "Plugins": libraries,
            "StableAge": 1,
            "HttpTimeout": 60,
            "LuaScripts": [str(script) for script in self.lua_scripts],
        }
        if self.tls is not None:
            config |= {
                "DicomTlsEnabled": True,
                "DicomTlsCertificate": str(self.tls.cert),
                "DicomTlsPrivateKey": str(self.tls.key),
                "DicomTlsTrustedCertificates": str(self.tls.trusted),
                "DicomTlsRemoteCertificateRequired": self.tls.require_client_cert,
            }
        if "dicomweb" in self.plugins:
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False}
        (self.workdir / "orthanc.json").write_text(json.dumps(config, indent=2))
        with (self.workdir / "orthanc.log").open("ab") as log:  # the child keeps its own handle
            self.process = subprocess.Popen(
                [ORTHANC_BINARY, str(self.workdir / "orthanc.json")], stdout=log, stderr=log
            )
        wait_for(self._alive, 30, "Orthanc to start")

    def _alive(self) -> bool:
        try:
            return requests.get(f"{self.url}/system", auth=self.auth, timeout=1).ok
        except requests.RequestException:
            return False

    def stop(self) -> None:
        """Stop Orthanc (its storage stays for a restart)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """SIGKILL Orthanc, as a crash or a power cut would end it (its storage stays for a restart)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def get(self, path: str) -> Any:
        """GET a REST resource as JSON."""
        response = requests.get(f"{self.url}{path}", auth=self.auth, timeout=30)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: Any) -> Any:
        """POST JSON (or raw bytes) to the REST API."""
        data = body if isinstance(body, bytes) else json.dumps(body)
        response = requests.post(f"{self.url}{path}", data=data, auth=self.auth, timeout=120)
        response.raise_for_status()
        return response.json() if response.content else None

    def upload(self, files: Sequence[Path]) -> list[str]:
        """Store files through the REST API; returns the Orthanc instance ids."""
        return [self.post("/instances", Path(f).read_bytes())["ID"] for f in files]

    def instances_with_modality(self, modality: str) -> list[dict[str, Any]]:
        """Every stored instance whose series has ``modality`` (e.g. SR), with its tags."""
        found = []
        for series_id in self.get("/series"):
            series = self.get(f"/series/{series_id}")
            if series["MainDicomTags"].get("Modality") == modality:
                for instance_id in series["Instances"]:
                    found.append(self.get(f"/instances/{instance_id}/simplified-tags") | {"ID": instance_id})
        return found

    def file(self, instance_id: str) -> bytes:
        """The DICOM file of an instance."""
        response = requests.get(f"{self.url}/instances/{instance_id}/file", auth=self.auth, timeout=30)
        response.raise_for_status()
        return response.content


class Receiver:
    """A pynetdicom storage SCP on a free port that keeps the SRs and Secondary Captures it receives in a folder:
    a PACS for tests that need no Orthanc.
    """

    def __init__(self, folder: Path, ae_title: str = "TEST_PACS") -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.port = free_port()
        self._received: list[Path] = []
        self._lock = threading.Lock()
        self._ae = AE(ae_title=ae_title)
        self._ae.add_supported_context(Verification)
        for sop_class in (COMPREHENSIVE_3D_SR, SECONDARY_CAPTURE):
            self._ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self._server: Any = None

    def _on_store(self, event: evt.Event) -> int:
        target = self.folder / f"{event.request.AffectedSOPInstanceUID}.dcm"
        target.write_bytes(event.encoded_dataset(include_meta=True))
        with self._lock:
            if target not in self._received:
                self._received.append(target)
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
        """What has arrived so far, once per SOP Instance UID."""
        with self._lock:
            return list(self._received)

    def destination_toml(self, name: str = "pacs") -> str:
        """This receiver as a ``[[destinations]]`` entry of the node's TOML."""
        return destination_toml(name, self.ae_title, self.port)


class Node:
    """pacs-agent run as real processes (``pacs-agent serve``) with a config file of the test's."""

    def __init__(self, workdir: Path, *, extra_config: str = "", ae_title: str = "PACS_AGENT") -> None:
        self.workdir = workdir
        self.ae_title = ae_title
        self.port = free_port()
        self.state_dir = workdir / "state"
        self.http_port = free_port()
        self.config = workdir / "pacs-agent.toml"
        self.extra_config = extra_config
        self.process: subprocess.Popen[bytes] | None = None
        self.log = workdir / "node.log"

    def write_config(self) -> None:
        """(Re)write the node's TOML file."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            f'[node]\nae_title = "{self.ae_title}"\nhost = "127.0.0.1"\nport = {self.port}\n'
            f'[storage]\nstate_dir = "{self.state_dir}"\nmin_free_mb = 10\n'
            f"[readiness]\nquiet_seconds = 1\n"
            f"[delivery]\ninitial_backoff_seconds = 1\nmax_backoff_seconds = 2\n"
            + ("" if "[observability]" in self.extra_config else f"[observability]\nhttp_port = {self.http_port}\n")
            + f"{self.extra_config}\n"
        )

    def start(self, command: str = "serve", env: dict[str, str] | None = None) -> None:
        """Start ``pacs-agent <command>`` and wait until it answers C-ECHO."""
        self.write_config()
        with self.log.open("ab") as out:  # the child keeps its own handle
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pacs_agent", command, "--config", str(self.config)],
                stdout=out,
                stderr=out,
                env={**{k: v for k, v in os.environ.items() if not k.startswith("PACS_AGENT")}, **(env or {})},
            )
        if command != "worker":
            wait_for(self.listening, 60, "the node to listen")

    def listening(self) -> bool:
        """True when the node's port accepts TCP connections."""
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"node exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def echo(self) -> bool:
        """True when DCMTK echoscu gets an answer."""
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"node exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
        result = subprocess.run(
            [require_tool("echoscu"), "-aec", self.ae_title, "-to", "2", "127.0.0.1", str(self.port)],
            capture_output=True,
            check=False,
        )
        return result.returncode == 0

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Signal the node and wait; returns its exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout)
        code = self.process.returncode
        self.process = None
        return code

    def database_url(self) -> str:
        """The SQLite URL of the node's database."""
        return f"sqlite:///{self.state_dir / 'pacs-agent.db'}"

    @contextlib.contextmanager
    def database(self) -> Iterator[Database]:
        """The node's database for the block, opened beside the running node (which runs the migrations)."""
        db = Database(self.database_url(), run_migrations=False)
        try:
            yield db
        finally:
            db.dispose()

    def rows(self, statement: Executable) -> list[Row[Any]]:
        """Every row ``statement`` selects from the node's database."""
        with self.database() as db, db.session() as session:
            return list(session.execute(statement).all())

    def scalars(self, statement: Executable) -> list[Any]:
        """The first column of every row ``statement`` selects (``select(Model)``: loaded, detached objects)."""
        with self.database() as db, db.session() as session:
            return list(session.execute(statement).scalars().all())

    def scalar(self, statement: Executable) -> Any:
        """The first column of the first row ``statement`` selects, or None."""
        with self.database() as db, db.session() as session:
            return session.execute(statement).scalar()

    def write(self, statement: Executable) -> None:
        """Run an INSERT, UPDATE or DELETE in the node's database, in a transaction of its own."""
        with self.database() as db, db.session() as session, session.begin():
            session.execute(statement)


AnyNode = TypeVar("AnyNode", bound=Node)


class Nodes:
    """The nodes of one test (or one module), each in a folder of its own under ``root``.

    :meth:`stop_all` (the fixtures call it at the end) stops every node still running and fails when one
    did not exit with 0 after SIGTERM.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.made: list[Node] = []

    def workdir(self, name: str) -> Path:
        """A folder under ``root`` no node of this set uses: ``name``, else ``name-2``, ``name-3``, ..."""
        taken = {node.workdir for node in self.made}
        path, n = self.root / name, 2
        while path in taken or path.exists():
            path, n = self.root / f"{name}-{n}", n + 1
        return path

    def add(self, node: AnyNode) -> AnyNode:
        """Look after a node made elsewhere (a subclass of :class:`Node`)."""
        self.made.append(node)
        return node

    def new(self, name: str = "node", **options: Any) -> Node:
        """A node, not started yet; ``options`` as for :class:`Node`."""
        return self.add(Node(self.workdir(name), **options))

    def start(
        self, command: str = "scp", *, name: str = "node", env: dict[str, str] | None = None, **options: Any
    ) -> Node:
        """A node running ``pacs-agent <command>``; ``options`` as for :class:`Node`."""
        node = self.new(name, **options)
        node.start(command, env=env)
        return node

    def stop_all(self) -> None:
        """SIGTERM every node still running; fail naming each that did not exit with 0 (or had to be killed)."""
        unclean = []
        for node in self.made:
            if node.process is None:
                continue
            try:
                code = node.stop()
            except subprocess.TimeoutExpired:
                node.process.kill()
                code = node.process.wait()
                node.process = None
                unclean.append(f"{node.workdir.name} did not stop after SIGTERM and was killed")
                continue
            if code != 0:
                unclean.append(f"{node.workdir.name} exited with {code}:\n{node.log.read_text()[-2000:]}")
        assert not unclean, "\n".join(unclean)


def storescu(
    port: int, files: Sequence[Path], *, aec: str = "PACS_AGENT", aet: str = "STORESCU"
) -> subprocess.CompletedProcess[str]:
    """Send ``files`` with DCMTK storescu proposing only the SOP classes of the files (-R)."""
    return subprocess.run(
        [require_tool("storescu"), "-R", "-aet", aet, "-aec", aec, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
