"""``[[sources]]`` over DICOM TLS: the baseline lives only in a PACS (Orthanc) whose DICOM port speaks only TLS.

* With ``tls = true`` (the CA of Orthanc's certificate, and this node's certificate because Orthanc asks for
  one) the node finds the baseline by C-FIND and fetches it by C-GET on the same TLS association, or by
  C-MOVE, which Orthanc answers by opening a TLS association of its own to the node's ``tls_port``.
* With a plain-text source entry the query fails, and the pairing says why (the source closed the
  connection; set ``tls = true``), as does a TLS entry whose CA does not match Orthanc's certificate.

Every certificate is made by openssl in the test's temporary directory (``tests/pki.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select

from inference.phantom import PhantomStudy
from pacs_agent.db.tables import Event, Pairing, Study
from tests.integration.peers import Node, Nodes, Orthanc, OrthancTls, storescu, wait_for
from tests.integration.phantoms import Phantoms
from tests.pki import Identity, Pki
from tests.ports import free_port

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Certificates:
    pki: Pki
    orthanc: Identity
    node: Identity
    other_ca: Path


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    pki = Pki(tmp_path_factory.mktemp("pki"))
    other = Pki(tmp_path_factory.mktemp("other-pki"), "Other CA")
    return Certificates(pki=pki, orthanc=pki.issue("orthanc"), node=pki.issue("node"), other_ca=other.ca.cert)


@pytest.fixture(scope="module")
def pair(phantoms: Phantoms) -> tuple[PhantomStudy, PhantomStudy]:
    baseline = phantoms.study(seed=51, lesions=1, slices=24, rows=96, columns=96, segmentation="seg")
    return baseline, phantoms.follow_up(baseline, shrink=0.7)


@pytest.fixture
def tls_orthanc(orthanc: Orthanc, certs: Certificates, pair: tuple[PhantomStudy, PhantomStudy]) -> Orthanc:
    """The ``orthanc`` fixture, DICOM TLS only (a client certificate of the test CA required), holding the baseline.

    Not started: the test declares the node as a modality first.
    """
    orthanc.tls = OrthancTls(cert=certs.orthanc.cert, key=certs.orthanc.key, trusted=certs.pki.ca.cert)
    return orthanc


def start_with_baseline(orthanc: Orthanc, baseline: PhantomStudy) -> None:
    orthanc.start()
    orthanc.upload([*baseline.ct_files, baseline.seg_file])  # REST: not DICOM, so no TLS needed here


def tls_keys(certs: Certificates, ca_file: Path | None = None) -> str:
    """The TLS keys of a ``[[sources]]`` entry that reaches the test Orthanc."""
    return (
        f'tls = true\nca_file = "{ca_file or certs.pki.ca.cert}"\n'
        f'cert_file = "{certs.node.cert}"\nkey_file = "{certs.node.key}"\n'
    )


def pairing_state(node: Node, followup_uid: str) -> tuple[str, str, str | None] | None:
    rows = node.rows(
        select(Pairing.state, Pairing.reason, Pairing.source)
        .join(Study, Study.id == Pairing.followup_study_id)
        .where(Study.study_instance_uid == followup_uid)
    )
    return tuple(rows[0]) if rows else None


def finished_pairing(node: Node, followup: PhantomStudy) -> tuple[str, str, str | None]:
    assert storescu(node.port, [*followup.ct_files, followup.seg_file]).returncode == 0
    return wait_for(
        lambda: (s := pairing_state(node, followup.study_instance_uid)) and s[0] in ("paired", "failed", "none") and s,
        180,
        "the pairing to finish",
    )


@pytest.mark.parametrize("retrieve", ["get", "move"])
def test_baseline_found_and_retrieved_over_tls(
    tls_orthanc: Orthanc,
    nodes: Nodes,
    certs: Certificates,
    pair: tuple[PhantomStudy, PhantomStudy],
    retrieve: str,
) -> None:
    baseline, followup = pair
    tls_port = free_port()
    node = nodes.new(
        extra_config=(
            '[jobs]\nmethods = ["radiomics", "response"]\n'
            # the TLS port Orthanc connects to for a C-MOVE; it trusts the test CA, which signed Orthanc's certificate
            f'[tls]\ncert_file = "{certs.node.cert}"\nkey_file = "{certs.node.key}"\nca_file = "{certs.pki.ca.cert}"\n'
            + tls_orthanc.source_toml("pacs", retrieve=retrieve, extra=tls_keys(certs))
        )
    )
    tls_orthanc.add_modality("pacsagent", node.ae_title, tls_port, tls=True)
    start_with_baseline(tls_orthanc, baseline)
    node.start("scp", env={"PACS_AGENT__NODE__TLS_PORT": str(tls_port)})

    state = finished_pairing(node, followup)
    assert state[0] == "paired", state
    assert state[2] == "local"  # found locally once the retrieved baseline became ready
    [row] = node.scalars(select(Study).where(Study.study_instance_uid == baseline.study_instance_uid))
    assert row.ct_series_instance_uid == baseline.ct_series_instance_uid
    details = [detail or "" for detail in node.scalars(select(Event.detail).order_by(Event.id))]
    assert any(f"retrieving from pacs by C-{retrieve.upper()}" in d for d in details)
    assert f"{baseline.study_instance_uid} from pacs: {len(baseline.ct_files) + 1} instance(s) retrieved" in " ".join(
        details
    )
    if retrieve == "move":  # the instances came back over the node's TLS port, with Orthanc's certificate
        kinds = node.scalars(select(Event.kind))
        assert "tls_refused" not in kinds


def test_plain_source_against_a_tls_only_pacs_fails_with_the_reason(
    tls_orthanc: Orthanc, nodes: Nodes, pair: tuple[PhantomStudy, PhantomStudy]
) -> None:
    baseline, followup = pair
    node = nodes.new(extra_config='[jobs]\nmethods = ["radiomics", "response"]\n' + tls_orthanc.source_toml("pacs"))
    tls_orthanc.add_modality("pacsagent", node.ae_title, node.port)
    start_with_baseline(tls_orthanc, baseline)
    node.start("scp")

    state = finished_pairing(node, followup)
    assert state[0] == "failed", state
    assert state[1].endswith(
        f"; problems: source pacs (127.0.0.1:{tls_orthanc.dicom_port}): C-FIND failed: closed the connection "
        "without answering the association request (if it accepts only DICOM TLS, set tls = true for this source)"
    ), state
    failures = node.scalars(select(Event.detail).where(Event.kind == "pairing_failed"))
    assert failures == [state[1]]
    assert not node.scalars(select(Study).where(Study.study_instance_uid == baseline.study_instance_uid))


def test_tls_source_with_the_wrong_ca_fails_with_the_reason(
    tls_orthanc: Orthanc, nodes: Nodes, certs: Certificates, pair: tuple[PhantomStudy, PhantomStudy]
) -> None:
    baseline, followup = pair
    config = tls_orthanc.source_toml("pacs", retrieve="get", extra=tls_keys(certs, ca_file=certs.other_ca))
    node = nodes.new(extra_config='[jobs]\nmethods = ["radiomics", "response"]\n' + config)
    tls_orthanc.add_modality("pacsagent", node.ae_title, node.port)
    start_with_baseline(tls_orthanc, baseline)
    node.start("scp")

    state = finished_pairing(node, followup)
    assert state[0] == "failed", state
    assert state[1].endswith(
        f"; problems: source pacs (127.0.0.1:{tls_orthanc.dicom_port}): C-FIND failed: TLS handshake failed: "
        "certificate not accepted: self-signed certificate in certificate chain "
        "(not signed by a CA in the configured ca_file)"
    ), state
