"""TLS and access-control settings: validation, ssl contexts, real in-memory handshakes, config check.

The handshakes run between the node's contexts and client contexts over a socket pair in this
process, so each refusal reason is the one a real peer would cause.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
import warnings
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pacs_agent.cli import main
from pacs_agent.config import Destination, SecuritySettings, Settings, TlsSettings, settings_from_mapping
from pacs_agent.errors import ConfigError
from pacs_agent.receive.access import (
    CALLED_AET_NOT_RECOGNISED,
    CALLING_AET_NOT_RECOGNISED,
    LOCAL_LIMIT_EXCEEDED,
    REJECTED_TRANSIENT,
    AssociationLimiter,
    check_request,
)
from pacs_agent.tls import client_context, describe_tls_error, server_context, tls_problems
from tests.pki import Identity, Pki

UNKNOWN_CA = (
    "certificate not accepted: unable to get local issuer certificate (not signed by a CA in the configured ca_file)"
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def node_id(pki: Pki) -> Identity:
    return pki.issue("node")


@pytest.fixture(scope="module")
def client_id(pki: Pki) -> Identity:
    return pki.issue("client", hosts=("modality.example",))


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> tuple[Pki, Identity]:
    other = Pki(tmp_path_factory.mktemp("other"), "Other CA")
    return other, other.issue("stranger")


def tls(node: Identity, ca: Path | None, **kwargs: object) -> TlsSettings:
    return TlsSettings(cert_file=str(node.cert), key_file=str(node.key), ca_file=str(ca or ""), **kwargs)


def client(ca: Path | None, identity: Identity | None = None, check_hostname: bool = True) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = check_hostname
    if ca is not None:
        context.load_verify_locations(cafile=str(ca))
    else:
        context.verify_mode = ssl.CERT_NONE
    if identity is not None:
        context.load_cert_chain(str(identity.cert), str(identity.key))
    return context


def handshake(
    server: ssl.SSLContext, client_ctx: ssl.SSLContext, hostname: str = "localhost"
) -> tuple[BaseException | None, BaseException | None]:
    """Run a TLS handshake plus one message; returns (server error, client error)."""
    left, right = socket.socketpair()
    left.settimeout(10)
    right.settimeout(10)
    errors: dict[str, BaseException | None] = {"server": None, "client": None}

    def serve() -> None:
        try:
            with server.wrap_socket(left, server_side=True) as tls_sock:
                tls_sock.sendall(b"ok")
        except (OSError, ValueError) as exc:
            errors["server"] = exc

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client_ctx.wrap_socket(right, server_hostname=hostname) as tls_sock:
            assert tls_sock.recv(2) == b"ok"
    except (OSError, ValueError, AssertionError) as exc:
        errors["client"] = exc
    finally:
        thread.join(10)
        left.close()
        right.close()
    return errors["server"], errors["client"]


# -- settings -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"node": {"tls_port": 2762}}, "node.tls_port = 2762 needs tls.cert_file, tls.key_file, tls.ca_file"),
        (
            {"node": {"tls_port": 2762}, "tls": {"cert_file": "c", "key_file": "k", "require_client_cert": False}},
            None,
        ),
        ({"node": {"plain_port_enabled": False}}, "plain_port_enabled = false needs tls_port"),
        ({"node": {"tls_port": 11112}}, "tls_port must differ from port"),
        ({"node": {"tls_port": 70000}}, "node.tls_port"),
        ({"tls": {"min_version": "1.1"}}, "tls.min_version"),
        (
            {"destinations": [{"name": "p", "ae_title": "P", "host": "h", "port": 1, "ca_file": "ca.pem"}]},
            "ca_file: only used with tls = true",
        ),
        (
            {"destinations": [{"name": "p", "ae_title": "P", "host": "h", "port": 1, "tls": True, "cert_file": "c"}]},
            "cert_file and key_file go together",
        ),
        (
            {"destinations": [{"name": "p", "type": "stowrs", "url": "https://x/dicom-web", "tls": True}]},
            "are for DIMSE destinations",
        ),
        ({"security": {"peers": [{"ae_title": "CT1", "hosts": []}]}}, "security.peers.0.hosts"),
        ({"security": {"peers": [{"ae_title": "CT1", "hosts": ["ct-host"]}]}}, "is not an IP address or network"),
        (
            {
                "security": {
                    "peers": [{"ae_title": "CT1", "hosts": ["10.0.0.1"]}, {"ae_title": "CT1", "hosts": ["::1"]}]
                }
            },
            "AE title(s) listed twice: CT1",
        ),
        (
            {"security": {"allowed_calling_aets": ["CT1"], "peers": [{"ae_title": "CT1", "hosts": ["10.0.0.1"]}]}},
            "CT1: in both allowed_calling_aets (any host) and peers",
        ),
        ({"security": {"max_associations": 0}}, "security.max_associations"),
        ({"security": {"max_associations_per_aet": -1}}, "security.max_associations_per_aet"),
        ({"security": {"max_instance_mb": -1}}, "security.max_instance_mb"),
    ],
)
def test_tls_and_security_settings_validate(data: dict, expected: str | None) -> None:
    if expected is None:
        settings_from_mapping(data)
        return
    with pytest.raises(ConfigError) as info:
        settings_from_mapping(data)
    assert any(expected in problem for problem in info.value.problems), info.value.problems


def test_secure_defaults() -> None:
    settings = Settings()
    assert settings.node.tls_port == 0 and settings.node.plain_port_enabled
    assert settings.tls.require_client_cert and settings.tls.min_version == "1.2"
    assert settings.security.require_called_aet
    assert settings.security.max_associations == 32 and settings.security.max_instance_mb == 2048


# -- access decisions -----------------------------------------------------------------------------


def test_access_rules_in_order() -> None:
    security = SecuritySettings(
        allowed_hosts=("10.0.0.0/8",),
        allowed_calling_aets=("ANYWHERE",),
        peers=({"ae_title": "PACS", "hosts": ("10.1.2.3", "10.9.0.0/16")},),  # type: ignore[arg-type]
    )

    def check(calling: str, address: str, called: str = "NODE") -> tuple[str, int] | None:
        refusal = check_request(security, "NODE", calling, called, address)
        return None if refusal is None else (refusal.reason, refusal.diagnostic)

    assert check("PACS", "10.1.2.3") is None
    assert check("PACS ", "10.9.4.4") is None  # trailing spaces of a padded AE title do not matter
    assert check("PACS", "::ffff:10.1.2.3") is None  # IPv4 seen through a dual-stack socket
    assert check("ANYWHERE", "10.200.0.1") is None
    assert check("PACS", "192.168.0.1") == ("host 192.168.0.1 is not in [security] allowed_hosts", 1)
    reason, diagnostic = check("PACS", "10.5.5.5")  # type: ignore[misc]
    assert reason == (
        "calling AE title 'PACS' may only connect from 10.1.2.3, 10.9.0.0/16 ([security] peers), not from 10.5.5.5"
    )
    assert diagnostic == CALLING_AET_NOT_RECOGNISED
    assert check("INTRUDER", "10.1.2.3") == (
        "calling AE title 'INTRUDER' is not in [security] allowed_calling_aets or peers",
        CALLING_AET_NOT_RECOGNISED,
    )
    reason, diagnostic = check("PACS", "10.1.2.3", called="OTHER")  # type: ignore[misc]
    assert reason.startswith("called AE title not recognised: 'OTHER' (this node is 'NODE'")
    assert diagnostic == CALLED_AET_NOT_RECOGNISED
    lenient = SecuritySettings(require_called_aet=False)
    assert check_request(lenient, "NODE", "X", "OTHER", "1.2.3.4") is None


def test_limiter_counts_total_and_per_calling_aet() -> None:
    limiter = AssociationLimiter(max_total=3, max_per_aet=2)
    alive = {1: True, 2: True, 3: True, 4: True}
    assert limiter.admit(1, "A", lambda: alive[1]) is None
    assert limiter.admit(2, "A", lambda: alive[2]) is None
    refusal = limiter.admit(3, "A ", lambda: alive[3])
    assert refusal is not None and "calling AE title 'A' has 2 associations open" in refusal.reason
    assert (refusal.result, refusal.source, refusal.diagnostic) == (REJECTED_TRANSIENT, 3, LOCAL_LIMIT_EXCEEDED)
    assert limiter.admit(3, "B", lambda: alive[3]) is None
    refusal = limiter.admit(4, "C", lambda: alive[4])
    assert refusal is not None and "3 associations are open ([security] max_associations = 3)" in refusal.reason
    limiter.release(1)
    assert limiter.admit(4, "C", lambda: alive[4]) is None
    alive[2] = False  # ended without a release event: reclaimed at the next admission
    assert limiter.admit(5, "A", lambda: True) is None
    assert limiter.open_count() == 3


# -- contexts and real handshakes -----------------------------------------------------------------


def test_server_context_is_tls12_plus_with_required_client_certificates(pki: Pki, node_id: Identity) -> None:
    context = server_context(tls(node_id, pki.ca.cert))
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert server_context(tls(node_id, pki.ca.cert, min_version="1.3")).minimum_version == ssl.TLSVersion.TLSv1_3
    assert server_context(tls(node_id, pki.ca.cert, require_client_cert=False)).verify_mode == ssl.CERT_OPTIONAL
    assert server_context(tls(node_id, None, require_client_cert=False)).verify_mode == ssl.CERT_NONE


def test_good_client_certificate_is_accepted(pki: Pki, node_id: Identity, client_id: Identity) -> None:
    assert handshake(server_context(tls(node_id, pki.ca.cert)), client(pki.ca.cert, client_id)) == (None, None)


def test_client_without_certificate_is_refused(pki: Pki, node_id: Identity) -> None:
    server_error, client_error = handshake(server_context(tls(node_id, pki.ca.cert)), client(pki.ca.cert))
    assert server_error is not None and client_error is not None
    assert describe_tls_error(server_error) == "the peer sent no client certificate (tls.require_client_cert = true)"
    assert describe_tls_error(client_error) == "the peer requires a client certificate and we sent none"
    optional = server_context(tls(node_id, pki.ca.cert, require_client_cert=False))
    assert handshake(optional, client(pki.ca.cert)) == (None, None)


def test_client_of_an_untrusted_ca_is_refused(pki: Pki, node_id: Identity, stranger: tuple[Pki, Identity]) -> None:
    server_error, _ = handshake(server_context(tls(node_id, pki.ca.cert)), client(pki.ca.cert, stranger[1]))
    assert server_error is not None
    assert describe_tls_error(server_error) == UNKNOWN_CA


def test_expired_client_certificate_is_refused(pki: Pki, node_id: Identity) -> None:
    expired = pki.issue("expired-client", start="20200101000000Z", end="20200201000000Z")
    server_error, _ = handshake(server_context(tls(node_id, pki.ca.cert)), client(pki.ca.cert, expired))
    assert server_error is not None
    assert describe_tls_error(server_error) == "certificate not accepted: certificate has expired"


def test_old_tls_versions_are_refused(pki: Pki, node_id: Identity, client_id: Identity) -> None:
    old = client(pki.ca.cert, client_id)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSv1_1 itself is deprecated in Python
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    server_error, client_error = handshake(server_context(tls(node_id, pki.ca.cert)), old)
    assert server_error is not None and client_error is not None
    assert "no common TLS version" in describe_tls_error(server_error)
    modern_only = server_context(tls(node_id, pki.ca.cert, min_version="1.3"))
    tls12 = client(pki.ca.cert, client_id)
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    server_error, _ = handshake(modern_only, tls12)
    assert server_error is not None and "no common TLS version" in describe_tls_error(server_error)


def test_destination_certificate_is_verified(pki: Pki, node_id: Identity, stranger: tuple[Pki, Identity]) -> None:
    """The sending side: trusted CA, host name on the certificate, and an untrusted CA."""
    pacs = server_context(tls(node_id, None, require_client_cert=False))

    def destination(**kwargs: object) -> Destination:
        return Destination(name="pacs", ae_title="PACS", host="localhost", port=2762, tls=True, **kwargs)

    assert handshake(pacs, client_context(destination(ca_file=str(pki.ca.cert)))) == (None, None)
    _, client_error = handshake(pacs, client_context(destination(ca_file=str(pki.ca.cert))), hostname="pacs.other")
    assert client_error is not None
    assert describe_tls_error(client_error).startswith("certificate not accepted: Hostname mismatch")
    unchecked = client_context(destination(ca_file=str(pki.ca.cert), check_hostname=False))
    assert handshake(pacs, unchecked, hostname="pacs.other") == (None, None)
    _, client_error = handshake(pacs, client_context(destination(ca_file=str(stranger[0].ca.cert))))
    assert client_error is not None
    assert describe_tls_error(client_error) == UNKNOWN_CA
    system_trust = client_context(destination())  # no ca_file: the system's CAs, which do not know ours
    _, client_error = handshake(pacs, system_trust)
    assert client_error is not None and "certificate not accepted" in describe_tls_error(client_error)


# -- file problems in words -----------------------------------------------------------------------


def test_every_file_problem_names_the_setting(pki: Pki, node_id: Identity, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    other_key = pki.issue("other").key
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(
        ["openssl", "pkey", "-in", str(node_id.key), "-aes256", "-passout", "pass:x", "-out", str(encrypted)],
        check=True,
        capture_output=True,
    )
    cases = [
        (dict(cert_file=str(tmp_path / "missing.pem")), "tls.cert_file: ", "missing.pem does not exist"),
        (dict(cert_file=str(tmp_path)), "tls.cert_file: ", "is not a file"),
        (dict(cert_file=str(garbage)), "tls.cert_file: ", "holds no PEM certificate"),
        (dict(key_file=str(garbage)), "tls.key_file: ", "holds no PEM private key"),
        (dict(key_file=str(node_id.cert)), "tls.key_file: ", "holds no PEM private key"),
        (dict(key_file=str(other_key)), "tls.key_file: ", "does not belong to the certificate"),
        (dict(key_file=str(encrypted)), "tls.key_file: ", "is encrypted; store the key without a passphrase"),
        (dict(ca_file=str(garbage)), "tls.ca_file: ", "holds no PEM CA certificate"),
        (dict(ca_file=""), "tls.ca_file: ", "needed when tls.require_client_cert = true"),
    ]
    for change, key, message in cases:
        values = {"cert_file": str(node_id.cert), "key_file": str(node_id.key), "ca_file": str(pki.ca.cert)} | change
        with pytest.raises(ConfigError) as info:
            server_context(TlsSettings(**values))
        assert any(p.startswith(key) and message in p for p in info.value.problems), (change, info.value.problems)
    with pytest.raises(ConfigError) as info:
        client_context(Destination(name="pacs", ae_title="P", host="h", port=1, tls=True, ca_file=str(garbage)))
    assert info.value.problems[0].startswith("destinations.pacs.ca_file: ")


def test_tls_problems_finds_expired_certificates_and_open_keys(pki: Pki, tmp_path: Path) -> None:
    expired = pki.issue("expired-node", start="20200101000000Z", end="20200201000000Z")
    settings = settings_from_mapping(
        {
            "node": {"tls_port": 2762},
            "tls": {"cert_file": str(expired.cert), "key_file": str(expired.key), "ca_file": str(pki.ca.cert)},
        }
    )
    problems = tls_problems(settings)
    assert problems == [
        f"tls.cert_file: the certificate {expired.cert} expired on 2020-02-01 00:00 UTC; peers will refuse it"
    ]
    expired.key.chmod(0o644)
    assert any("is readable by every user; chmod 0640" in p for p in tls_problems(settings))
    good = pki.issue("good-node")
    fine = settings_from_mapping(
        {
            "node": {"tls_port": 2762},
            "tls": {"cert_file": str(good.cert), "key_file": str(good.key), "ca_file": str(pki.ca.cert)},
            "destinations": [
                {"name": "pacs", "ae_title": "P", "host": "h", "port": 1, "tls": True, "ca_file": str(pki.ca.cert)}
            ],
        }
    )
    assert tls_problems(fine) == []
    # the same certificate, seen from after its end date
    assert "expired on" in tls_problems(fine, now=datetime(2100, 1, 1, tzinfo=UTC))[0]


def test_config_check_reports_tls_problems(
    pki: Pki, node_id: Identity, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.toml"
    base = f'[storage]\nstate_dir = "{tmp_path / "state"}"\n[node]\ntls_port = 2762\n'
    config.write_text(
        base
        + f'[tls]\ncert_file = "{node_id.cert}"\nkey_file = "{tmp_path / "nokey.pem"}"\nca_file = "{pki.ca.cert}"\n'
    )
    assert main(["config", "check", "--config", str(config)]) == 1
    assert "tls.key_file: " in capsys.readouterr().err
    config.write_text(
        base + f'[tls]\ncert_file = "{node_id.cert}"\nkey_file = "{node_id.key}"\nca_file = "{pki.ca.cert}"\n'
    )
    assert main(["config", "check", "--config", str(config)]) == 0
    assert "DICOM TLS on port 2762 (client certificate required)" in capsys.readouterr().out
