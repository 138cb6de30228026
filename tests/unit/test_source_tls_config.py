"""``[[sources]]`` TLS keys: validation, the ssl context built from them, ``config check``, and the retrieve
functions refusing to start with unusable TLS files (the handshakes themselves run against a real Orthanc in
``tests/integration/test_source_tls.py``).
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest

from pacs_agent.config import Source, settings_from_mapping
from pacs_agent.errors import ConfigError
from pacs_agent.routing.retrieve import RetrieveError, find_studies, get_study, move_study
from pacs_agent.tls import client_context, tls_problems
from tests.pki import Identity, Pki

SOURCE = {"name": "pacs", "ae_title": "PACS", "host": "localhost", "port": 2762}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def node_id(pki: Pki) -> Identity:
    return pki.issue("node")


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"ca_file": "ca.pem"}, "ca_file: only used with tls = true (add it, or remove these keys)"),
        ({"cert_file": "c.pem", "key_file": "k.pem"}, "cert_file, key_file: only used with tls = true"),
        ({"tls": True, "cert_file": "c.pem"}, "cert_file and key_file go together"),
        ({"tls": True, "key_file": "k.pem"}, "cert_file and key_file go together"),
        ({"tls": "maybe"}, "sources.0.tls"),
        ({"tls": True, "check_hostname": "perhaps"}, "sources.0.check_hostname"),
    ],
)
def test_source_tls_keys_are_validated(keys: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_mapping({"sources": [SOURCE | keys]})
    assert any(expected in problem for problem in info.value.problems), info.value.problems


def test_source_tls_keys_default_to_plain_dicom_and_take_the_destination_keys() -> None:
    plain = settings_from_mapping({"sources": [SOURCE]}).sources[0]
    assert (plain.tls, plain.ca_file, plain.cert_file, plain.key_file, plain.check_hostname) == (
        False,
        None,
        None,
        None,
        True,
    )
    keys = {"tls": True, "ca_file": "ca.pem", "cert_file": "c.pem", "key_file": "k.pem", "check_hostname": False}
    secure = settings_from_mapping({"sources": [SOURCE | keys]}).sources[0]
    assert secure.model_dump(include=set(keys)) == keys


def test_source_context_verifies_the_source_and_presents_our_certificate(pki: Pki, node_id: Identity) -> None:
    context = client_context(
        Source(**SOURCE, tls=True, ca_file=str(pki.ca.cert), cert_file=str(node_id.cert), key_file=str(node_id.key))
    )
    assert context.verify_mode.name == "CERT_REQUIRED" and context.check_hostname
    assert context.minimum_version.name == "TLSv1_2"
    assert not client_context(Source(**SOURCE, tls=True, ca_file=str(pki.ca.cert), check_hostname=False)).check_hostname


def test_source_file_problems_name_the_source_key(pki: Pki, node_id: Identity, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(ConfigError) as info:
        client_context(Source(**SOURCE, tls=True, ca_file=str(garbage)))
    [problem] = info.value.problems
    assert problem.startswith(f"sources.pacs.ca_file: {garbage} holds no PEM CA certificate (")
    with pytest.raises(ConfigError) as info:
        client_context(
            Source(**SOURCE, tls=True, ca_file=str(pki.ca.cert), cert_file=str(node_id.cert), key_file=str(garbage))
        )
    assert info.value.problems == [
        f"sources.pacs.key_file: {garbage} holds no PEM private key (-----BEGIN ... PRIVATE KEY-----)"
    ]


def test_config_check_covers_sources(pki: Pki, tmp_path: Path) -> None:
    expired = pki.issue("expired-source-client", start="20200101000000Z", end="20200201000000Z")
    expired.key.chmod(0o644)
    keys = {"tls": True, "ca_file": str(pki.ca.cert), "cert_file": str(expired.cert), "key_file": str(expired.key)}
    problems = tls_problems(settings_from_mapping({"sources": [SOURCE | keys]}))
    assert problems == [
        f"sources.pacs.cert_file: the certificate {expired.cert} expired on 2020-02-01 00:00 UTC; peers will refuse it",
        f"sources.pacs.key_file: {expired.key} is readable by every user; chmod 0640 (owner root, group pacs-agent) "
        "or 0600",
    ]
    missing = {"tls": True, "ca_file": str(tmp_path / "missing.pem")}
    assert tls_problems(settings_from_mapping({"sources": [SOURCE | missing]})) == [
        f"sources.pacs.ca_file: {tmp_path / 'missing.pem'} does not exist (PEM CA certificate(s))"
    ]
    assert tls_problems(settings_from_mapping({"sources": [SOURCE]})) == []  # plain sources have no files


def test_unusable_tls_files_stop_every_retrieve_before_connecting(tmp_path: Path) -> None:
    source = Source(**SOURCE, tls=True, ca_file=str(tmp_path / "missing.pem"))
    attempts = {
        "C-FIND": lambda: find_studies(
            source,
            calling_ae_title="NODE",
            patient_id="P",
            issuer_of_patient_id=None,
            dates=(date(2024, 1, 1), date(2024, 3, 1)),
        ),
        "C-MOVE": lambda: move_study(source, "1.2.3", calling_ae_title="NODE", destination_ae_title="NODE"),
        "C-GET": lambda: get_study(source, "1.2.3", calling_ae_title="NODE", on_store=lambda _event: 0),
    }
    for what, attempt in attempts.items():
        with pytest.raises(RetrieveError) as info:
            attempt()
        assert str(info.value) == (
            f"source pacs (localhost:2762): {what} not attempted: TLS configuration: "
            f"sources.pacs.ca_file: {tmp_path / 'missing.pem'} does not exist (PEM CA certificate(s))"
        )
