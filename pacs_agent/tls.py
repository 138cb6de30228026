"""DICOM TLS: ``ssl.SSLContext`` objects built from the settings, and readable TLS errors.

The receiving side uses :func:`server_context` for ``[node] tls_port`` (certificate, key and the
CA of the client certificates from ``[tls]``); each DIMSE destination and each source with
``tls = true`` gets :func:`client_context`. Both accept TLS 1.2 or newer only. Every problem with a file becomes a
:class:`~pacs_agent.errors.ConfigError` that names the setting (``tls.key_file: ...``), so
``pacs-agent config check`` and the start-up of the receiver report it in words.
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import stat
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from pacs_agent.config import Destination, Settings, Source, TlsSettings
from pacs_agent.errors import ConfigError

if TYPE_CHECKING:
    from socket import _Address  # typeshed's alias for what socket.connect() takes

logger = logging.getLogger(__name__)

TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
HANDSHAKE_TIMEOUT_SECONDS = 30.0
"""A peer that connects to the TLS port but does not finish the handshake within this is dropped."""


class RecordingContext(ssl.SSLContext):
    """An ``SSLContext`` that remembers the last handshake error of the sockets it wraps.

    pynetdicom catches the ``ssl.SSLError`` of a failed client handshake and only reports "cannot
    connect"; the sender reads ``last_error`` to say why.
    """

    last_error: OSError | None = None

    def __new__(cls, protocol: int) -> RecordingContext:
        """A context whose sockets record their handshake errors."""
        context = super().__new__(cls, protocol)
        context.sslsocket_class = _RecordingSocket
        return context


class _RecordingSocket(ssl.SSLSocket):
    def connect(self, address: _Address) -> None:
        try:
            super().connect(address)
        except OSError as exc:
            if isinstance(self.context, RecordingContext):
                self.context.last_error = exc
            raise

    def shutdown(self, how: int) -> None:
        # pynetdicom closes a socket only when shutdown() succeeds; after a failed handshake the
        # peer has often gone already (ENOTCONN): never let that leak the socket.
        with contextlib.suppress(OSError):
            super().shutdown(how)

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        # With TLS 1.3 the peer checks our certificate after our side of the handshake is done:
        # its refusal arrives as an alert on the first read.
        try:
            return super().recv(buflen, flags)
        except ssl.SSLError as exc:
            if isinstance(self.context, RecordingContext):
                self.context.last_error = exc
            raise


def _file(value: str, key: str, problems: list[str], what: str) -> str | None:
    """The path of a configured file, or None with a problem added when it cannot be read."""
    path = Path(value)
    if not path.exists():
        problems.append(f"{key}: {value} does not exist ({what})")
        return None
    if not path.is_file():
        problems.append(f"{key}: {value} is not a file ({what})")
        return None
    if not os.access(path, os.R_OK):
        problems.append(f"{key}: {value} is not readable by this user (the service user needs read access)")
        return None
    return str(path)


def _load_chain(
    context: ssl.SSLContext, cert_file: str, key_file: str, cert_key: str, key_key: str, problems: list[str]
) -> None:
    cert = _file(cert_file, cert_key, problems, "a PEM certificate")
    key = _file(key_file, key_key, problems, "a PEM private key")
    if cert is not None and not _has_pem(cert, "CERTIFICATE"):
        problems.append(f"{cert_key}: {cert_file} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
        cert = None
    if key is not None and not _has_pem(key, "PRIVATE KEY"):
        problems.append(f"{key_key}: {key_file} holds no PEM private key (-----BEGIN ... PRIVATE KEY-----)")
        key = None
    if cert is None or key is None:
        return
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            problems.append(f"{key_key}: the private key {key_file} does not belong to the certificate {cert_file}")
        else:
            problems.append(f"{cert_key}: cannot load {cert_file} with the key {key_file}: {exc.reason or exc}")
    except _EncryptedKey:
        problems.append(f"{key_key}: {key_file} is encrypted; store the key without a passphrase (mode 0640)")


def _has_pem(path: str, label: str) -> bool:
    try:
        text = Path(path).read_bytes()[:1_000_000]
    except OSError:
        return False
    return b"-----BEGIN " in text and label.encode() + b"-----" in text


class _EncryptedKey(Exception):
    pass


def _no_password() -> str:
    # Called by OpenSSL only for an encrypted key: the service cannot type a passphrase.
    raise _EncryptedKey


def _load_ca(context: ssl.SSLContext, ca_file: str, key: str, problems: list[str]) -> None:
    path = _file(ca_file, key, problems, "PEM CA certificate(s)")
    if path is None:
        return
    try:
        context.load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        problems.append(f"{key}: {ca_file} holds no PEM CA certificate ({exc.reason or exc})")


def server_context(tls: TlsSettings) -> ssl.SSLContext:
    """The context of the DICOM TLS port.

    Parameters
    ----------
    tls
        ``[tls]``: certificate, key, client CA, whether a client certificate is required.

    Returns
    -------
    ssl.SSLContext
        TLS ``min_version`` or newer; ``CERT_REQUIRED`` when ``require_client_cert``, else
        ``CERT_OPTIONAL`` with a CA file (a presented certificate is verified) or ``CERT_NONE``.

    Raises
    ------
    ConfigError
        A file is missing, unreadable, not PEM, an encrypted key, or the key does not match.
    """
    problems: list[str] = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = TLS_VERSIONS[tls.min_version]
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    if not tls.cert_file or not tls.key_file:
        problems.append("tls.cert_file, tls.key_file: both are needed for [node] tls_port")
    else:
        _load_chain(context, tls.cert_file, tls.key_file, "tls.cert_file", "tls.key_file", problems)
    if tls.ca_file:
        _load_ca(context, tls.ca_file, "tls.ca_file", problems)
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    elif tls.require_client_cert:
        problems.append("tls.ca_file: needed when tls.require_client_cert = true (the CA of the senders' certificates)")
    else:
        context.verify_mode = ssl.CERT_NONE
    if problems:
        raise ConfigError(problems)
    return context


def client_context(destination: Destination | Source) -> RecordingContext:
    """The context for an association to a destination or a source with ``tls = true``.

    The peer's certificate is always verified: against ``ca_file`` when given, else the system's
    trusted CAs; with ``check_hostname`` it must also name the peer's ``host``.

    Raises
    ------
    ConfigError
        A file of the peer is missing, unreadable, not PEM, or the key does not match; each
        problem names the key (``destinations.NAME.ca_file``, ``sources.NAME.key_file``).
    """
    problems: list[str] = []
    where = f"{'sources' if isinstance(destination, Source) else 'destinations'}.{destination.name}"
    context = RecordingContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = destination.check_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    if destination.ca_file:
        _load_ca(context, destination.ca_file, f"{where}.ca_file", problems)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if destination.cert_file and destination.key_file:
        _load_chain(
            context,
            destination.cert_file,
            destination.key_file,
            f"{where}.cert_file",
            f"{where}.key_file",
            problems,
        )
    if problems:
        raise ConfigError(problems)
    return context


def certificate_not_after(cert_file: str) -> datetime | None:
    """When the (first) certificate in ``cert_file`` expires, or None when it cannot be read."""
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None:  # not in every Python build; the check is then skipped
        return None
    try:
        info = decode(cert_file)
    except (OSError, ssl.SSLError, ValueError):
        return None
    not_after = info.get("notAfter")
    return datetime.fromtimestamp(ssl.cert_time_to_seconds(not_after), UTC) if not_after else None


def _expiry_problem(cert_file: str, key: str, now: datetime) -> str | None:
    not_after = certificate_not_after(cert_file)
    if not_after is not None and not_after <= now:
        return f"{key}: the certificate {cert_file} expired on {not_after:%Y-%m-%d %H:%M} UTC; peers will refuse it"
    return None


def _key_permission_problem(key_file: str, key: str) -> str | None:
    try:
        mode = Path(key_file).stat().st_mode
    except OSError:
        return None
    if mode & stat.S_IROTH:
        return f"{key}: {key_file} is readable by every user; chmod 0640 (owner root, group pacs-agent) or 0600"
    return None


def tls_problems(settings: Settings, now: datetime | None = None) -> list[str]:
    """Every TLS problem of ``settings``: unusable files, expired certificates, world-readable keys.

    Checks ``[tls]`` when ``[node] tls_port`` is set and every destination and source with ``tls = true``.
    Used by ``pacs-agent config check``.
    """
    now = now or datetime.now(UTC)
    problems: list[str] = []
    checks: list[tuple[str, str, str, str]] = []  # cert file, its key, key file, its key
    if settings.node.tls_port:
        try:
            server_context(settings.tls)
        except ConfigError as exc:
            problems += exc.problems
        checks.append((settings.tls.cert_file, "tls.cert_file", settings.tls.key_file, "tls.key_file"))
    peers: list[tuple[str, Destination | Source]] = [("destinations", d) for d in settings.destinations]
    peers += [("sources", s) for s in settings.sources]
    for section, peer in peers:
        if not peer.tls:
            continue
        try:
            client_context(peer)
        except ConfigError as exc:
            problems += exc.problems
        if peer.cert_file and peer.key_file:
            where = f"{section}.{peer.name}"
            checks.append((peer.cert_file, f"{where}.cert_file", peer.key_file, f"{where}.key_file"))
    for cert_file, cert_key, key_file, key_key in checks:
        if not cert_file or not Path(cert_file).is_file():
            continue
        for problem in (_expiry_problem(cert_file, cert_key, now), _key_permission_problem(key_file, key_key)):
            if problem is not None and problem not in problems:
                problems.append(problem)
    return problems


def warn_about_certificate(tls: TlsSettings, now: datetime | None = None) -> None:
    """Log a warning at start-up when the TLS port's certificate has expired or expires within 30 days."""
    now = now or datetime.now(UTC)
    not_after = certificate_not_after(tls.cert_file)
    if not_after is None:
        return
    days = (not_after - now).total_seconds() / 86400
    if days <= 0:
        logger.error("tls.cert_file: the certificate expired on %s; TLS peers will refuse it", f"{not_after:%Y-%m-%d}")
    elif days < 30:
        logger.warning("tls.cert_file: the certificate expires on %s (in %d day(s))", f"{not_after:%Y-%m-%d}", days)


# X509_V_ERR_*: unable to get issuer certificate (2), unable to get local issuer certificate (20),
# self-signed certificate (18), self-signed certificate in certificate chain (19); host name (62)
# and IP address (64) mismatch.
_UNKNOWN_ISSUER = frozenset({2, 18, 19, 20})
_NAME_MISMATCH = frozenset({62, 64})
_REASONS = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the peer sent no client certificate (tls.require_client_cert = true)",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the peer requires a client certificate and we sent none",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the peer refused our certificate (bad certificate)",
    "TLSV1_ALERT_UNKNOWN_CA": "the peer does not trust the CA of our certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the peer says our certificate has expired",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the peer refused our certificate (certificate unknown)",
    "TLSV1_ALERT_DECRYPT_ERROR": "the peer refused our certificate (signature check failed)",
    "TLSV1_ALERT_PROTOCOL_VERSION": "no common TLS version (this node accepts TLS 1.2 or newer)",
    "UNSUPPORTED_PROTOCOL": "no common TLS version (this node accepts TLS 1.2 or newer)",
    "NO_PROTOCOLS_AVAILABLE": "no common TLS version (this node accepts TLS 1.2 or newer)",
    "WRONG_VERSION_NUMBER": "the peer does not speak TLS here (plain DICOM on a TLS port, or the reverse?)",
    "HTTP_REQUEST": "the peer sent an HTTP request, not TLS",
    "NO_SHARED_CIPHER": "no cipher suite in common with the peer",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "the peer ended the handshake (no common cipher or certificate refused)",
}


def describe_tls_error(exc: BaseException) -> str:
    """A one-line explanation of a failed TLS handshake for events, status and logs."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        message = exc.verify_message or exc.reason or str(exc)
        if exc.verify_code in _UNKNOWN_ISSUER:
            message += " (not signed by a CA in the configured ca_file)"
        elif exc.verify_code in _NAME_MISMATCH:
            message += " (the certificate must name the host we connect to; see check_hostname)"
        return f"certificate not accepted: {message}"
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return "the peer closed the connection during the TLS handshake (does it trust our certificate?)"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        return _REASONS.get(reason, f"TLS error {reason or exc}")
    if isinstance(exc, TimeoutError):
        return "no TLS handshake within the time limit"
    if isinstance(exc, ConnectionError | EOFError):
        return "the peer closed the connection during the TLS handshake (does it trust our certificate?)"
    return f"{type(exc).__name__}: {exc}"
