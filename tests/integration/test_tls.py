"""DICOM TLS with real peers: DCMTK storescu ``+tls`` and pynetdicom against the node's TLS port,
and the node sending results over TLS to a pynetdicom TLS SCP standing in for the PACS.

Every certificate is made by openssl in the test's temporary directory (``tests/pki.py``).
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.presentation import StoragePresentationContexts
from pynetdicom.sop_class import Verification
from sqlalchemy import func, select

from inference.phantom import PhantomStudy
from pacs_agent.config import Destination
from pacs_agent.db.tables import Delivery, Event, Instance, Job, Result, Study, utcnow
from pacs_agent.receive.server import PLAIN_ON_TLS_PORT
from pacs_agent.send.scu import store_files
from tests.integration.peers import Node, Nodes, require_tool, storescu, wait_for
from tests.integration.test_receive_processes import receiving_process, sockets_of
from tests.pki import Identity, Pki
from tests.ports import free_port

pytestmark = pytest.mark.integration

UNKNOWN_CA = (
    "certificate not accepted: unable to get local issuer certificate (not signed by a CA in the configured ca_file)"
)


@dataclass
class Certificates:
    pki: Pki
    node: Identity
    modality: Identity
    expired: Identity
    stranger: Identity
    other_ca: Path
    pacs_wrong_host: Identity


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    pki = Pki(tmp_path_factory.mktemp("pki"))
    other = Pki(tmp_path_factory.mktemp("other-pki"), "Other CA")
    return Certificates(
        pki=pki,
        node=pki.issue("node"),
        modality=pki.issue("modality", hosts=("modality.example",)),
        expired=pki.issue("expired", start="20200101000000Z", end="20200201000000Z"),
        stranger=other.issue("stranger"),
        other_ca=other.ca.cert,
        pacs_wrong_host=pki.issue("pacs-elsewhere", hosts=("pacs.elsewhere.example",)),
    )


class TlsNode(Node):
    """The node as a real ``pacs-agent scp`` process with a DICOM TLS port besides (or instead of) the plain one."""

    def __init__(self, workdir: Path, certs: Certificates, *, plain: bool = True) -> None:
        super().__init__(
            workdir,
            extra_config=(
                f'[tls]\ncert_file = "{certs.node.cert}"\nkey_file = "{certs.node.key}"\n'
                f'ca_file = "{certs.pki.ca.cert}"\n'
                '[security]\nallowed_calling_aets = ["STORESCU", "PYNETDICOM", "ECHOSCU"]\n'
            ),
        )
        self.tls_port = free_port()
        self.plain = plain
        self.processes = 1

    def start_tls(self, processes: int = 1) -> None:
        """Start with ``[node] tls_port`` (and ``plain_port_enabled``) set; wait until the TLS port listens.

        ``processes``: ``[node] receive_processes`` (more than 1: the scp hands TLS connections over too).
        """
        self.processes = processes
        env = {
            "PACS_AGENT__NODE__TLS_PORT": str(self.tls_port),
            "PACS_AGENT__NODE__PLAIN_PORT_ENABLED": "true" if self.plain else "false",
            "PACS_AGENT__NODE__NETWORK_TIMEOUT_SECONDS": "3",  # also the TLS handshake time limit
            "PACS_AGENT__NODE__RECEIVE_PROCESSES": str(processes),
        }
        if self.plain:
            self.start("scp", env=env)
        else:  # Node.start waits for the plain port: start the process, then wait for the TLS port
            self.write_config()
            with self.log.open("ab") as out:
                self.process = subprocess.Popen(
                    [sys.executable, "-m", "pacs_agent", "scp", "--config", str(self.config)],
                    stdout=out,
                    stderr=out,
                    env={**{k: v for k, v in os.environ.items() if not k.startswith("PACS_AGENT")}, **env},
                )
        wait_for(lambda: self._tcp_open(self.tls_port), 60, "the TLS port to listen")

    def _tcp_open(self, port: int) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"node exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True  # closed without a byte: the node does not record such a probe
        except OSError:
            return False


@pytest.fixture(scope="module", params=[1, 2], ids=["one-process", "two-processes"])
def node(request: pytest.FixtureRequest, module_nodes: Nodes, certs: Certificates) -> TlsNode:
    """A node with a plain and a TLS port for the module's receiving tests: one receiving process, then two.

    With two, the scp hands the TLS port's connections to a receiving process before their
    handshake (a lone sender's always: :data:`~pacs_agent.receive.processes.SCP_OWN_LOAD`), so
    every test below also runs the handshake, its refusals and the association there.
    """
    node = module_nodes.add(TlsNode(module_nodes.workdir(f"node-{request.param}"), certs))
    node.start_tls(processes=request.param)
    return node


def events(node: TlsNode, kind: str) -> list[Event]:
    return node.scalars(select(Event).where(Event.kind == kind).order_by(Event.id))


def instance_count(node: TlsNode) -> int:
    return int(node.scalar(select(func.count(Instance.id))) or 0)


def storescu_tls(port: int, files: list[Path], *tls_args: str) -> subprocess.CompletedProcess[str]:
    if "+tls" not in subprocess.run([require_tool("storescu"), "--help"], capture_output=True, text=True).stdout:
        pytest.skip("this DCMTK build has no TLS (OpenSSL) support")
    return subprocess.run(
        [require_tool("storescu"), "-R", "-aet", "STORESCU", "-aec", "PACS_AGENT", *tls_args, "127.0.0.1", str(port)]
        + [str(f) for f in files],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def new_refusal(node: TlsNode, before: int) -> str:
    """The reason of the first ``tls_refused`` event after the first ``before`` ones."""
    found = wait_for(lambda: events(node, "tls_refused")[before:], 10, "a tls_refused event")
    return str(found[0].detail)


# -- receiving ------------------------------------------------------------------------------------


def test_dcmtk_storescu_with_a_good_certificate_stores(
    node: TlsNode, certs: Certificates, phantom: PhantomStudy
) -> None:
    result = storescu_tls(
        node.tls_port,
        phantom.ct_files[:3],
        "+tls",
        str(certs.modality.key),
        str(certs.modality.cert),
        "+cf",
        str(certs.pki.ca.cert),
    )
    assert result.returncode == 0, result.stderr
    assert instance_count(node) == 3
    association = wait_for(lambda: events(node, "association"), 10, "the association event")[-1]
    assert association.ae_title == "STORESCU"
    assert "over TLSv1." in association.detail and "client certificate CN=modality.example" in association.detail
    assert "3 stored" in association.detail


@pytest.mark.parametrize(
    ("client", "expected"),
    [
        (
            "stranger",
            UNKNOWN_CA,
        ),
        ("expired", "certificate not accepted: certificate has expired"),
        ("none", "the peer sent no client certificate (tls.require_client_cert = true)"),
        ("distrusts us", "the peer does not trust the CA of our certificate"),
    ],
)
def test_dcmtk_storescu_with_a_bad_certificate_is_refused(
    node: TlsNode, certs: Certificates, phantom: PhantomStudy, client: str, expected: str
) -> None:
    args = {
        "stranger": ["+tls", str(certs.stranger.key), str(certs.stranger.cert), "+cf", str(certs.pki.ca.cert)],
        "expired": ["+tls", str(certs.expired.key), str(certs.expired.cert), "+cf", str(certs.pki.ca.cert)],
        "none": ["+tla", "+cf", str(certs.pki.ca.cert)],
        "distrusts us": ["+tls", str(certs.modality.key), str(certs.modality.cert), "+cf", str(certs.other_ca)],
    }[client]
    stored, before = instance_count(node), len(events(node, "tls_refused"))
    result = storescu_tls(node.tls_port, phantom.ct_files[3:4], *args)
    assert result.returncode != 0
    assert new_refusal(node, before) == expected
    assert instance_count(node) == stored
    refused = events(node, "tls_refused")[-1]
    assert refused.peer == "127.0.0.1" and refused.level == "WARNING"


def pynetdicom_echo(port: int, context: ssl.SSLContext, hostname: str) -> bool:
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACS_AGENT", tls_args=(context, hostname))
    if not assoc.is_established:
        return False
    try:
        return int(assoc.send_c_echo().Status) == 0
    finally:
        assoc.release()


def test_pynetdicom_scu_checks_the_nodes_certificate(node: TlsNode, certs: Certificates, phantom: PhantomStudy) -> None:
    def context(ca: Path) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(ca))  # TLS 1.2+, verification and host name check on
        ctx.load_cert_chain(str(certs.modality.cert), str(certs.modality.key))
        return ctx

    port = node.tls_port
    assert pynetdicom_echo(port, context(certs.pki.ca.cert), "localhost")
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(dcmread(phantom.ct_files[5]).SOPClassUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACS_AGENT", tls_args=(context(certs.pki.ca.cert), "localhost"))
    assert assoc.is_established
    try:
        assert int(assoc.send_c_store(phantom.ct_files[5]).Status) == 0
    finally:
        assoc.release()
    before = len(events(node, "tls_refused"))
    # verification on: the node's certificate names localhost and 127.0.0.1, not this host
    assert not pynetdicom_echo(port, context(certs.pki.ca.cert), "pacs.elsewhere.example")
    assert new_refusal(node, before) == "the peer refused our certificate (bad certificate)"
    assert not pynetdicom_echo(port, context(certs.other_ca), "localhost")  # a CA that did not sign the node


def test_a_tls_association_is_served_by_the_process_the_scp_chose(node: TlsNode, certs: Certificates) -> None:
    """With receiving processes, the handshake and the association run in one of them, not in the scp."""
    context = ssl.create_default_context(cafile=str(certs.pki.ca.cert))
    context.load_cert_chain(str(certs.modality.cert), str(certs.modality.key))
    assert node.process is not None
    serving = node.process.pid
    if node.processes > 1:
        serving = receiving_process(node)
        # the port probes of the start were handed to it before it ran: they count until it reports them closed
        wait_for(lambda: "serving connections handed over" in node.log.read_text(), 60, "the receiving process")

    def served_there() -> bool:
        recorded = len(events(node, "association"))
        ae = AE(ae_title="PYNETDICOM")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", node.tls_port, ae_title="PACS_AGENT", tls_args=(context, "localhost"))
        assert assoc.is_established
        try:
            assert int(assoc.send_c_echo().Status) == 0
            return sockets_of(serving, node.tls_port) == 1
        finally:
            assoc.release()
            # its event is written as the association ends: before the next test counts events
            wait_for(lambda: len(events(node, "association")) > recorded, 10, "the association event")

    wait_for(served_there, 30, f"a TLS association served by process {serving}")


def test_a_silent_client_does_not_block_the_tls_port(node: TlsNode, certs: Certificates, phantom: PhantomStudy) -> None:
    refused_before, stored_before = len(events(node, "tls_refused")), len(events(node, "association"))
    with socket.create_connection(("127.0.0.1", node.tls_port)):
        result = storescu_tls(
            node.tls_port,
            phantom.ct_files[6:7],
            "+tls",
            str(certs.modality.key),
            str(certs.modality.cert),
            "+cf",
            str(certs.pki.ca.cert),
        )
        assert result.returncode == 0, result.stderr
        refusal = wait_for(lambda: events(node, "tls_refused")[refused_before:], 10, "a tls_refused event")[0]
        assert refusal.detail == "no TLS handshake within the time limit"  # network_timeout = 3 s
    stored = wait_for(lambda: events(node, "association")[stored_before:], 10, "the association event")[0]
    assert stored.ae_title == "STORESCU" and "1 stored" in stored.detail
    assert stored.id < refusal.id  # served (and recorded) while the silent handshake was still pending


def test_plain_dicom_to_the_tls_port_is_refused_and_explained(node: TlsNode, phantom: PhantomStudy) -> None:
    before = len(events(node, "tls_refused"))
    assert storescu(node.tls_port, phantom.ct_files[7:8]).returncode != 0
    assert new_refusal(node, before) == PLAIN_ON_TLS_PORT
    assert storescu(node.port, phantom.ct_files[7:8]).returncode == 0  # the plain port still serves


def test_tls_only_node(nodes: Nodes, certs: Certificates, phantom: PhantomStudy) -> None:
    node = nodes.add(TlsNode(nodes.workdir("node"), certs, plain=False))
    node.start_tls()
    assert not node._tcp_open(node.port)  # the plain port is not opened at all
    result = storescu_tls(
        node.tls_port,
        phantom.ct_files[8:9],
        "+tls",
        str(certs.modality.key),
        str(certs.modality.cert),
        "+cf",
        str(certs.pki.ca.cert),
    )
    assert result.returncode == 0, result.stderr
    assert instance_count(node) == 1
    assert events(node, "tls_refused") == []  # the readiness probe above is not a refusal
    assert node.stop() == 0


# -- sending --------------------------------------------------------------------------------------


@dataclass
class TlsPacs:
    """A pynetdicom storage SCP with DICOM TLS, standing in for the hospital PACS."""

    identity: Identity
    ca: Path
    require_client_cert: bool = True
    port: int = field(default_factory=free_port)
    received: list[tuple[str, str]] = field(default_factory=list)  # (SOP Instance UID, client CN)

    def __enter__(self) -> TlsPacs:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(self.identity.cert), str(self.identity.key))
        context.load_verify_locations(cafile=str(self.ca))
        context.verify_mode = ssl.CERT_REQUIRED if self.require_client_cert else ssl.CERT_OPTIONAL
        self.ae = AE(ae_title="TLSPACS")
        self.ae.supported_contexts = StoragePresentationContexts
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            ssl_context=context,
            evt_handlers=[(evt.EVT_C_STORE, self._store)],
        )
        return self

    def _store(self, event: evt.Event) -> int:
        cert = event.assoc.dul.socket.socket.getpeercert() or {}
        subject = dict(item[0] for item in cert.get("subject", ()))
        self.received.append((str(event.request.AffectedSOPInstanceUID), subject.get("commonName", "")))
        return 0x0000

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.ae.shutdown()


def test_node_sends_results_over_tls(nodes: Nodes, certs: Certificates, phantom: PhantomStudy) -> None:
    """The scp process delivers a result from its outbox over mutual TLS; the PACS sees our certificate."""
    pacs_id = certs.pki.issue("pacs", hosts=("127.0.0.1",))
    with TlsPacs(pacs_id, certs.pki.ca.cert) as pacs:
        node = nodes.start(
            "scp",
            extra_config=(
                f'[[destinations]]\nname = "pacs"\nae_title = "TLSPACS"\nhost = "127.0.0.1"\nport = {pacs.port}\n'
                f'tls = true\nca_file = "{certs.pki.ca.cert}"\n'
                f'cert_file = "{certs.node.cert}"\nkey_file = "{certs.node.key}"\n'
            ),
        )
        try:
            result_file = node.state_dir / "results" / "1" / "result.dcm"
            result_file.parent.mkdir(parents=True)
            shutil.copy(phantom.ct_files[0], result_file)
            uid = str(dcmread(result_file).SOPInstanceUID)
            with node.database() as db:
                with db.session() as session, session.begin():
                    study = Study(study_instance_uid="1.2.3.4.5", state="done")
                    session.add(study)
                    session.flush()
                    job = Job(study_id=study.id, method="radiomics", state="done", inputs="{}")
                    session.add(job)
                    session.flush()
                    row = Result(
                        job_id=job.id,
                        study_id=study.id,
                        kind="sc",
                        method="radiomics",
                        sop_instance_uid=uid,
                        series_instance_uid="1.2.3.4.5.6",
                        sop_class_uid=str(dcmread(result_file).SOPClassUID),
                        path="1/result.dcm",
                        algorithm_name="test",
                        algorithm_version="1",
                    )
                    session.add(row)
                    session.flush()
                    session.add(Delivery(result_id=row.id, destination="pacs", next_attempt_at=utcnow()))

                def delivered() -> bool:
                    with db.session() as session:
                        return session.execute(select(Delivery.state)).scalar_one() == "done"

                wait_for(delivered, 30, "the delivery over TLS")
        finally:
            assert node.stop() == 0
    assert pacs.received == [(uid, "localhost")]  # our node certificate, CN=localhost


def test_sending_refuses_a_pacs_certificate_for_another_host(certs: Certificates, phantom: PhantomStudy) -> None:
    with TlsPacs(certs.pacs_wrong_host, certs.pki.ca.cert) as pacs:
        destination = Destination(
            name="pacs",
            ae_title="TLSPACS",
            host="127.0.0.1",
            port=pacs.port,
            tls=True,
            ca_file=str(certs.pki.ca.cert),
            cert_file=str(certs.node.cert),
            key_file=str(certs.node.key),
        )
        [outcome] = store_files(destination, phantom.ct_files[:1], calling_ae_title="PACS_AGENT", timeout_seconds=10)
        assert not outcome.ok
        assert outcome.reason.startswith(f"TLS handshake with 127.0.0.1:{pacs.port} failed: certificate not accepted:")
        assert "IP address mismatch" in outcome.reason
        unchecked = destination.model_copy(update={"check_hostname": False})
        [outcome] = store_files(unchecked, phantom.ct_files[:1], calling_ae_title="PACS_AGENT", timeout_seconds=10)
        assert outcome.ok, outcome.reason
        untrusted = destination.model_copy(update={"check_hostname": False, "ca_file": str(certs.other_ca)})
        [outcome] = store_files(untrusted, phantom.ct_files[:1], calling_ae_title="PACS_AGENT", timeout_seconds=10)
        assert "certificate not accepted: " in outcome.reason
        assert outcome.reason.endswith("(not signed by a CA in the configured ca_file)")
    assert len(pacs.received) == 1


def test_sending_without_the_client_certificate_the_pacs_requires(certs: Certificates, phantom: PhantomStudy) -> None:
    pacs_id = certs.pki.issue("pacs-mtls", hosts=("127.0.0.1",))
    with TlsPacs(pacs_id, certs.pki.ca.cert) as pacs:
        destination = Destination(
            name="pacs", ae_title="TLSPACS", host="127.0.0.1", port=pacs.port, tls=True, ca_file=str(certs.pki.ca.cert)
        )
        [outcome] = store_files(destination, phantom.ct_files[:1], calling_ae_title="PACS_AGENT", timeout_seconds=10)
        assert not outcome.ok
        assert outcome.reason == (
            f"TLS handshake with 127.0.0.1:{pacs.port} failed: the peer requires a client certificate and we sent none"
        )
        broken = destination.model_copy(update={"ca_file": "/nonexistent/ca.pem"})
        [outcome] = store_files(broken, phantom.ct_files[:1], calling_ae_title="PACS_AGENT", timeout_seconds=10)
        assert outcome.reason.startswith(
            "TLS configuration: destinations.pacs.ca_file: /nonexistent/ca.pem does not exist"
        )
    assert pacs.received == []
