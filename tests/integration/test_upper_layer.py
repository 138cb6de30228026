"""The native upper layer over real sockets: protocol violations, fragmentation, time-outs, both stacks.

Raw PDUs are built with pynetdicom's PDU encoders (the same bytes any DICOM sender puts on the
wire) and written to a running ``pacs-agent scp``; what comes back is read off the socket.
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]
from sqlalchemy import select

from inference.phantom import generate_study
from pacs_agent.db.tables import Event, Instance
from tests.integration.peers import Node, Nodes, storescu, wait_for

pytestmark = pytest.mark.integration

ACCESS = '[security]\nallowed_calling_aets = ["STORESCU", "RAW", "PYNETDICOM", "ECHOSCU"]\n'


def associate_rq(calling: str = "RAW", context: str = "1.2.840.10008.3.1.1.1") -> bytes:
    """An A-ASSOCIATE-RQ proposing CT Image Storage (context 1) in Implicit VR Little Endian."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = context
    primitive.calling_ae_title = calling
    primitive.called_ae_title = "PACS_AGENT"
    cx = build_context(CTImageStorage)
    cx.context_id = 1
    primitive.presentation_context_definition_list = [cx]
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = 16384
    primitive.user_information = [maximum]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """The next PDU: (type, body)."""
    header = b""
    while len(header) < 6:
        chunk = sock.recv(6 - len(header))
        if not chunk:
            raise ConnectionError("closed")
        header += chunk
    pdu_type, _, length = struct.unpack(">BBI", header)
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            raise ConnectionError("closed")
        body += chunk
    return pdu_type, body


def p_data(context_id: int, control: int, data: bytes) -> bytes:
    item = struct.pack(">IBB", len(data) + 2, context_id, control) + data
    return struct.pack(">BBI", 0x04, 0, len(item)) + item


def association_events(node: Node) -> list[str]:
    return [str(e.detail) for e in node.scalars(select(Event).where(Event.kind == "association").order_by(Event.id))]


@pytest.fixture(scope="module")
def node(module_nodes: Nodes) -> Node:
    return module_nodes.start(
        "scp", name="native", extra_config=ACCESS, env={"PACS_AGENT__NODE__NETWORK_TIMEOUT_SECONDS": "2"}
    )


def test_unrecognised_first_pdu_is_aborted_and_the_node_goes_on(node: Node) -> None:
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        sock.sendall(b"\x09\x00\x00\x00\x00\x02ab")
        pdu_type, body = read_pdu(sock)
    assert pdu_type == 0x07 and body[2:] == b"\x02\x01"  # A-ABORT, service provider, unrecognised PDU
    assert node.echo()


def test_wrong_application_context_is_rejected(node: Node) -> None:
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        sock.sendall(associate_rq(context="1.2.3.4"))
        pdu_type, body = read_pdu(sock)
    assert pdu_type == 0x03 and body[1:] == b"\x01\x01\x02"  # rejected permanent, user, context not supported


def test_pdv_on_an_unknown_context_aborts_with_a_recorded_reason(node: Node) -> None:
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        sock.sendall(associate_rq())
        assert read_pdu(sock)[0] == 0x02  # A-ASSOCIATE-AC
        sock.sendall(p_data(99, 0x03, b"\x00" * 12))
        pdu_type, body = read_pdu(sock)
    assert pdu_type == 0x07 and body[2:] == b"\x02\x06"  # invalid PDU parameter value
    wait_for(lambda: any("presentation context 99" in d for d in association_events(node)), 10, "the association event")


def test_a_data_set_without_its_command_aborts(node: Node) -> None:
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        sock.sendall(associate_rq())
        assert read_pdu(sock)[0] == 0x02
        sock.sendall(p_data(1, 0x02, b"\x08\x00\x16\x00\x02\x00\x00\x001\x00"))
        pdu_type, body = read_pdu(sock)
    assert pdu_type == 0x07 and body[2:] == b"\x02\x02"  # unexpected PDU


def test_silent_peer_is_aborted_after_the_network_timeout(node: Node) -> None:
    with socket.create_connection(("127.0.0.1", node.port), timeout=20) as sock:
        sock.sendall(associate_rq())
        assert read_pdu(sock)[0] == 0x02
        pdu_type, _ = read_pdu(sock)  # nothing sent: the node gives up after 2 s
    assert pdu_type == 0x07
    wait_for(lambda: any("no data for 2 s" in d for d in association_events(node)), 10, "the time-out event")


def test_release_is_answered(node: Node) -> None:
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        sock.sendall(associate_rq())
        assert read_pdu(sock)[0] == 0x02
        sock.sendall(struct.pack(">BBII", 0x05, 0, 4, 0))
        assert read_pdu(sock)[0] == 0x06  # A-RELEASE-RP
    wait_for(lambda: any(d.startswith("released") for d in association_events(node)), 10, "the release event")


@pytest.mark.parametrize("stack", ["native", "pynetdicom"])
def test_small_pdus_store_the_exact_bytes_on_both_stacks(nodes: Nodes, tmp_path: Path, stack: str) -> None:
    """A 4 KB maximum PDU cuts every instance into many PDUs; the spooled file holds what was sent."""
    node = nodes.start(
        "scp",
        extra_config=ACCESS,
        env={"PACS_AGENT__NODE__MAX_PDU_BYTES": "4096", "PACS_AGENT__NODE__DICOM_STACK": stack},
    )
    study = generate_study(tmp_path / "study", slices=4, rows=128, columns=128, seed=3, lesions=0, segmentation="none")
    result = storescu(node.port, study.ct_files)
    assert result.returncode == 0, result.stderr
    rows = node.scalars(select(Instance))
    assert len(rows) == len(study.ct_files)
    sent = {dcmread(f).SOPInstanceUID: dcmread(f) for f in study.ct_files}
    for row in rows:
        stored = dcmread(node.state_dir / "spool" / row.path)
        assert stored.PixelData == sent[row.sop_instance_uid].PixelData
        assert stored.file_meta.MediaStorageSOPInstanceUID == row.sop_instance_uid
        if stack == "native":
            assert stored.file_meta.SourceApplicationEntityTitle == "STORESCU"


def test_pynetdicom_sender_with_its_defaults(node: Node, tmp_path: Path) -> None:
    study = generate_study(tmp_path / "study", slices=3, rows=64, columns=64, seed=4, lesions=0, segmentation="none")
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="PACS_AGENT")
    assert assoc.is_established
    try:
        statuses = [int(assoc.send_c_store(f).Status) for f in study.ct_files]
        assert int(assoc.send_c_echo().Status) == 0
    finally:
        assoc.release()
    assert statuses == [0, 0, 0]
