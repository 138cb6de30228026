"""Settings: one TOML file validated once at start-up into a frozen object.

The documented defaults live in ``config/pacs-agent.toml``; every key there has the same default
here, so a node started without a file runs on these embedded defaults. Environment variables
override file values: ``PACS_AGENT__NODE__PORT=11113`` sets ``[node] port``. A value that parses as
JSON is taken as JSON (``PACS_AGENT__SECURITY__ALLOWED_HOSTS='["10.0.0.0/8"]'``), anything else as a
string that the schema then converts.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from inference.methods import method_names
from inference.structures import StructureRules
from pacs_agent.errors import ConfigError
from pacs_agent.routing.methods import DEFAULT_METHOD_REGIONS, DEFAULT_REGION_PATTERNS
from pacs_agent.routing.phase import DEFAULT_EXCLUDE_PATTERNS, DEFAULT_PORTAL_VENOUS_PATTERNS, PhaseRules

ENV_PREFIX = "PACS_AGENT__"
KNOWN_METHODS = method_names(pair=False)
"""Methods a job can run on one study (``[jobs] methods``): the registry's (:mod:`inference.methods`).
``m1`` .. ``m4`` and the comparator run a model from an installed model package (``[models]``)."""
DEMO_MODELS_DIR = Path(__file__).resolve().parents[1] / "config" / "models"
"""The committed demo model packages (DEMO - NOT FOR CLINICAL USE), used when ``[models] use_demo``."""
PAIR_METHODS = method_names(pair=True)
"""Methods that run on a pair of studies (baseline + follow-up) once the pair is found."""
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII without backslash


def _check_ae_title(value: str) -> str:
    if not value.strip():
        raise ValueError("an AE title must not be empty")
    if not _AE_TITLE.match(value):
        raise ValueError(f"AE title {value!r} is not valid: 1 to 16 printable ASCII characters, no backslash")
    return value.strip()


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class NodeSettings(_Section):
    """``[node]``: how the PACS reaches this node."""

    ae_title: str = "PACS_AGENT"
    host: str = "0.0.0.0"
    port: int = Field(default=11112, ge=1, le=65535)
    tls_port: int = Field(default=0, ge=0, le=65535)
    """DICOM TLS listener (customarily 2762), with the certificate of ``[tls]``; 0 = none."""
    plain_port_enabled: bool = True
    """False: only ``tls_port`` listens (TLS only); ``port`` is not opened."""
    max_pdu_bytes: int = Field(default=1_048_576, ge=0)
    network_timeout_seconds: float = Field(default=60.0, gt=0)
    receive_processes: int | Literal["auto"] = 1
    """Processes that receive on the plain DICOM port: 1 (the scp process alone), a number up to 64,
    or "auto" (one per CPU the node may use). The scp process accepts and hands connections over;
    limits, access rules and the index stay node-wide (:mod:`pacs_agent.receive.processes`)."""
    dicom_stack: Literal["native", "pynetdicom"] = "native"
    """What serves received associations: the node's own upper layer (:mod:`pacs_agent.receive.upper_layer`,
    one thread per association, no polling) or pynetdicom's (the stack before it, for a sender the
    native one does not get on with)."""

    _ae = field_validator("ae_title")(_check_ae_title)

    @field_validator("receive_processes", mode="before")
    @classmethod
    def _processes(cls, value: Any) -> Any:
        if value == "auto":
            return value
        if isinstance(value, str) and value.strip().isdigit():  # from the environment
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
            raise ValueError(
                f'receive_processes = {value!r}: give a whole number from 1 to 64, or "auto" (one per CPU)'
            )
        return value

    @model_validator(mode="after")
    def _listeners(self) -> NodeSettings:
        if not self.plain_port_enabled and not self.tls_port:
            raise ValueError("plain_port_enabled = false needs tls_port (otherwise nothing would listen)")
        if self.tls_port and self.tls_port == self.port:
            raise ValueError(f"tls_port must differ from port ({self.port}): TLS and plain DICOM need a port each")
        return self


class StorageSettings(_Section):
    """``[storage]``: where received objects and results are kept."""

    state_dir: Path = Path("pacs-agent-state")
    min_free_mb: int = Field(default=1024, ge=0)
    shared_dir: Path | None = None
    """Several hosts: a directory on a shared filesystem (NFS, mounted on every host) that holds the
    spool and the results, so that a worker on another host reads the CT the receiver stored; None
    (``""`` in the file): both live in ``state_dir``."""

    @field_validator("shared_dir", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @property
    def data_dir(self) -> Path:
        """Where the spool and the results live: ``shared_dir`` when set, else ``state_dir``."""
        return self.shared_dir if self.shared_dir is not None else self.state_dir

    @property
    def spool_dir(self) -> Path:
        """Directory of received instances (``<shared_dir or state_dir>/spool``)."""
        return self.data_dir / "spool"

    @property
    def results_dir(self) -> Path:
        """Directory of result objects waiting for or done with delivery (``<shared_dir or state_dir>/results``)."""
        return self.data_dir / "results"


class DatabaseSettings(_Section):
    """``[database]``: SQLAlchemy URL; empty means a SQLite file in the state directory."""

    url: str = ""


class ReadinessSettings(_Section):
    """``[readiness]``: when a study counts as complete."""

    quiet_seconds: float = Field(default=30.0, ge=0)
    min_ct_instances: int = Field(default=3, ge=1)
    reference_wait_seconds: float = Field(default=300.0, ge=0)
    """How long a study waits for images its segmentation was drawn on but that have not arrived."""


_QUEUE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
DEFAULT_QUEUE = "default"
"""The queue of a method ``[jobs.queues]`` does not name."""


def _check_queue_name(value: str) -> str:
    if not _QUEUE_NAME.match(value):
        raise ValueError(f"queue name {value!r}: 1 to 32 of a-z, 0-9, _ and -, starting with a letter or digit")
    return value


class JobSettings(_Section):
    """``[jobs]``: retries of processing jobs, and which queue each method's jobs go to."""

    max_attempts: int = Field(default=3, ge=1)
    retry_delay_seconds: float = Field(default=30.0, ge=0)
    lease_seconds: float = Field(default=120.0, gt=0)
    """A worker silent this long is taken as dead and its job runs again elsewhere (SQLite: the job's
    lease; PostgreSQL: procrastinate's stalled-worker timeout, heartbeat every quarter of it)."""
    methods: tuple[str, ...] = ("radiomics",)
    queues: dict[str, str] = Field(default_factory=dict)
    """``[jobs.queues]``: method -> queue (``m2 = "gpu"``); a method not named goes to ``default``."""

    @field_validator("queues")
    @classmethod
    def _queues(cls, value: dict[str, str]) -> dict[str, str]:
        known = (*KNOWN_METHODS, *PAIR_METHODS)
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ValueError(f"[jobs.queues] names unknown method(s) {', '.join(unknown)}; known: {', '.join(known)}")
        for queue in value.values():
            _check_queue_name(queue)
        return value

    def queue_for(self, method: str) -> str:
        """The queue of ``method``'s jobs (``[jobs.queues]``, else ``default``)."""
        return self.queues.get(method, DEFAULT_QUEUE)

    @field_validator("methods")
    @classmethod
    def _known(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        known = (*KNOWN_METHODS, *PAIR_METHODS)
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ValueError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(known)}")
        if not value:
            raise ValueError("at least one method must be enabled")
        return value


_DEVICE = re.compile(r"^(auto|cpu|cuda:\d+)$")


class WorkerSettings(_Section):
    """``[worker]``: what a ``pacs-agent worker`` process takes and where its models run."""

    device: str = "auto"
    """``auto`` (the first GPU when one is usable, else the CPU), ``cpu``, or ``cuda:N``."""
    queues: tuple[str, ...] = ()
    """Queues this worker takes (``pacs-agent worker --queue`` overrides); empty: every queue."""
    concurrency: int = Field(default=1, ge=1, le=64)
    """Jobs one worker process runs at the same time."""

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError(f"device {value!r}: auto, cpu or cuda:N (cuda:0, cuda:1, ...)")
        return value

    @field_validator("queues")
    @classmethod
    def _queue_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_check_queue_name(q) for q in value)


class ModelSettings(_Section):
    """``[models]``: where the worker finds the model packages of the methods m1 .. m4."""

    dir: Path | None = None
    """Installed packages (``pacs-agent models install``); None (``""`` in the file): ``<state_dir>/models``."""
    use_demo: bool = True
    """Also use the committed demo packages (``config/models``; DEMO - NOT FOR CLINICAL USE)."""

    @field_validator("dir", mode="before")
    @classmethod
    def _empty_is_default(cls, value: object) -> object:
        return None if value == "" else value


class DeliverySettings(_Section):
    """``[delivery]``: retries when a destination does not take a result."""

    initial_backoff_seconds: float = Field(default=10.0, gt=0)
    max_backoff_seconds: float = Field(default=600.0, gt=0)
    max_age_hours: float = Field(default=72.0, gt=0)
    timeout_seconds: float = Field(default=30.0, gt=0)


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class Destination(_Section):
    """``[[destinations]]``: where results are sent (usually the PACS).

    ``type = "dimse"`` (the default) sends by C-STORE to ``ae_title`` at ``host:port``;
    ``type = "stowrs"`` POSTs to the DICOMweb base ``url`` (STOW-RS). A STOW-RS server that needs
    credentials gets an ``Authorization`` header whose value is read from the environment variable
    named by ``auth_header_env``: the secret never sits in the file and is never logged.
    """

    name: str = Field(min_length=1, max_length=64)
    type: Literal["dimse", "stowrs"] = "dimse"
    ae_title: str | None = None
    host: str | None = Field(default=None, min_length=1)
    port: int | None = Field(default=None, ge=1, le=65535)
    url: str | None = None
    """DICOMweb base URL of a STOW-RS destination, e.g. ``https://pacs.example.org/dicom-web``."""
    auth_header_env: str | None = None
    """Name of the environment variable holding the ``Authorization`` value, e.g. ``Bearer ...``."""
    timeout_seconds: float | None = Field(default=None, gt=0)
    """Network timeout for this destination; default ``[delivery] timeout_seconds``."""
    tls: bool = False
    """DIMSE over TLS (1.2 or newer); the destination's certificate is always verified."""
    ca_file: str | None = None
    """PEM file of the CA(s) that signed the destination's certificate; default: the system's CAs."""
    cert_file: str | None = None
    """PEM certificate (chain) this node presents when the destination asks for one (mutual TLS)."""
    key_file: str | None = None
    """The private key of ``cert_file`` (PEM, unencrypted)."""
    check_hostname: bool = True
    """The destination's certificate must name ``host``; false accepts any certificate of a trusted CA."""

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str | None) -> str | None:
        return None if value is None else _check_ae_title(value)

    @model_validator(mode="after")
    def _tls_keys(self) -> Destination:
        given = [key for key in ("ca_file", "cert_file", "key_file") if getattr(self, key)]
        if self.type == "stowrs" and (self.tls or given):
            raise ValueError('tls, ca_file, cert_file and key_file are for DIMSE destinations ("https://" gives TLS)')
        if given and not self.tls:
            raise ValueError(f"{', '.join(given)}: only used with tls = true (add it, or remove these keys)")
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert_file and key_file go together (the certificate and its private key)")
        return self

    @field_validator("auth_header_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_NAME.match(value):
            raise ValueError(f"{value!r} is not an environment variable name (letters, digits, underscore)")
        return value

    @model_validator(mode="after")
    def _complete(self) -> Destination:
        if self.type == "dimse":
            missing = [key for key in ("ae_title", "host", "port") if getattr(self, key) is None]
            if missing:
                raise ValueError(f"a DIMSE destination needs ae_title, host and port; missing: {', '.join(missing)}")
            if self.url is not None or self.auth_header_env is not None:
                raise ValueError('url and auth_header_env belong to a destination with type = "stowrs"')
            return self
        given = [key for key in ("ae_title", "host", "port") if getattr(self, key) is not None]
        if given:
            raise ValueError(f'{", ".join(given)}: not used by type = "stowrs" (the url says where to send)')
        if not self.url:
            raise ValueError('a STOW-RS destination needs url, e.g. "https://pacs.example.org/dicom-web"')
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url {self.url!r} is not an http:// or https:// URL")
        if parts.username is not None or parts.password is not None:
            raise ValueError("url must not hold credentials; name an environment variable in auth_header_env")
        return self

    @property
    def peer(self) -> str:
        """``host:port`` of the destination (for STOW-RS taken from the URL), as audit events name it."""
        if self.type == "stowrs":
            parts = urlsplit(self.url or "")
            port = parts.port or (443 if parts.scheme == "https" else 80)
            return f"{parts.hostname}:{port}"
        return f"{self.host}:{self.port}"


class Source(_Section):
    """``[[sources]]``: a PACS the node may query (C-FIND) and retrieve from (C-MOVE / C-GET).

    With ``tls = true`` every association to the source (C-FIND, C-MOVE, C-GET) is DICOM TLS, with
    the same keys as a destination's. A C-MOVE is answered by the source opening an association of
    its own to this node: for that to be TLS too, the source must send to ``[node] tls_port``.
    """

    name: str = Field(min_length=1, max_length=64)
    ae_title: str
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    retrieve: Literal["move", "get"] = "move"
    """C-MOVE to this node's own AE title (the PACS must know it), or C-GET on the same association."""
    tls: bool = False
    """DICOM TLS (1.2 or newer) to the source; its certificate is always verified."""
    ca_file: str | None = None
    """PEM file of the CA(s) that signed the source's certificate; default: the system's CAs."""
    cert_file: str | None = None
    """PEM certificate (chain) this node presents when the source asks for one (mutual TLS)."""
    key_file: str | None = None
    """The private key of ``cert_file`` (PEM, unencrypted)."""
    check_hostname: bool = True
    """The source's certificate must name ``host``; false accepts any certificate of a trusted CA."""

    _ae = field_validator("ae_title")(_check_ae_title)

    @model_validator(mode="after")
    def _tls_keys(self) -> Source:
        given = [key for key in ("ca_file", "cert_file", "key_file") if getattr(self, key)]
        if given and not self.tls:
            raise ValueError(f"{', '.join(given)}: only used with tls = true (add it, or remove these keys)")
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert_file and key_file go together (the certificate and its private key)")
        return self


class ResponseSettings(_Section):
    """``[response]``: pairing a follow-up CT with its baseline for the 8-week response score."""

    window_weeks: tuple[float, float] = (6.0, 10.0)
    """A baseline is acquired this many weeks before the follow-up (inclusive)."""
    target_weeks: float = Field(default=8.0, gt=0)
    """Among several candidates, the one nearest to this interval wins."""
    query_sources: bool = True
    """Ask the ``[[sources]]`` when no baseline is stored locally."""
    retrieve_timeout_minutes: float = Field(default=30.0, gt=0)
    """How long a retrieved baseline may take to arrive and become ready."""

    @field_validator("window_weeks")
    @classmethod
    def _window(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= value[0] <= value[1]:
            raise ValueError("must be [min, max] weeks with 0 <= min <= max")
        return value


def _check_networks(value: tuple[str, ...]) -> tuple[str, ...]:
    for entry in value:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError as exc:
            raise ValueError(f"{entry!r} is not an IP address or network (use e.g. 10.1.2.3 or 10.1.0.0/16)") from exc
    return value


def _in_networks(address: str, networks: tuple[str, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:  # ::ffff:10.1.2.3 from a dual-stack socket
        ip = ip.ipv4_mapped
    return any(ip in ipaddress.ip_network(net, strict=False) for net in networks)


class Peer(_Section):
    """``[[security.peers]]``: a calling AE title that may connect only from its own hosts."""

    ae_title: str
    hosts: tuple[str, ...] = Field(min_length=1)

    _ae = field_validator("ae_title")(_check_ae_title)
    _hosts = field_validator("hosts")(_check_networks)


class SecuritySettings(_Section):
    """``[security]``: who may open an association, how many at once, and how large an instance may be.

    ``allowed_hosts`` applies to every association. A calling AE title is accepted when no AE
    allow-list is configured (``allowed_calling_aets`` and ``peers`` both empty), when it is in
    ``allowed_calling_aets`` (from any allowed host), or when it is the AE title of a ``peers``
    entry and the association comes from one of that entry's hosts.
    """

    allowed_calling_aets: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    peers: tuple[Peer, ...] = ()
    require_called_aet: bool = True
    """Reject an association whose called AE title is not ``[node] ae_title``."""
    max_associations: int = Field(default=32, ge=1)
    """Simultaneous associations; one more is rejected (transient, local limit exceeded)."""
    max_associations_per_aet: int = Field(default=0, ge=0)
    """Simultaneous associations of one calling AE title; 0 = only ``max_associations`` applies."""
    max_instance_mb: int = Field(default=2048, ge=0)
    """A larger instance is refused with 0xA700 before anything is written; 0 = no limit."""
    association_request_timeout_seconds: float = Field(default=5.0, gt=0, le=300)
    """A connection that has not sent its A-ASSOCIATE-RQ this long after connecting (after the TLS
    handshake on the TLS port) is closed and recorded as ``connection_timeout``."""
    max_connections_per_host: int = Field(default=32, ge=1)
    """TCP connections one source address may hold open (associations and connections still waiting
    for their request). A newer connection closes the host's oldest waiting one; when all are
    associations, the newer one is closed at accept (``connection_refused``)."""

    @field_validator("allowed_calling_aets")
    @classmethod
    def _aets(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_check_ae_title(v) for v in value)

    _hosts = field_validator("allowed_hosts")(_check_networks)

    @model_validator(mode="after")
    def _peers_unique(self) -> SecuritySettings:
        titles = [peer.ae_title for peer in self.peers]
        repeated = sorted({t for t in titles if titles.count(t) > 1})
        if repeated:
            raise ValueError(f"peers: AE title(s) listed twice: {', '.join(repeated)} (give one entry all its hosts)")
        both = sorted(set(titles) & set(self.allowed_calling_aets))
        if both:
            raise ValueError(
                f"{', '.join(both)}: in both allowed_calling_aets (any host) and peers (its hosts only); keep one"
            )
        return self

    def host_allowed(self, address: str) -> bool:
        """Return True when ``address`` (an IP string) may connect."""
        return not self.allowed_hosts or _in_networks(address, self.allowed_hosts)

    def calling_aet_allowed(self, ae_title: str) -> bool:
        """Return True when ``ae_title`` may open an association (from some host)."""
        title = ae_title.strip()
        if not self.allowed_calling_aets and not self.peers:
            return True
        return title in self.allowed_calling_aets or any(peer.ae_title == title for peer in self.peers)

    def peer_hosts(self, ae_title: str) -> tuple[str, ...] | None:
        """The hosts a ``peers`` entry allows for ``ae_title``; None when it has no entry."""
        title = ae_title.strip()
        return next((peer.hosts for peer in self.peers if peer.ae_title == title), None)

    def peer_host_allowed(self, ae_title: str, address: str) -> bool:
        """False only when ``ae_title`` has a ``peers`` entry that does not list ``address``."""
        hosts = self.peer_hosts(ae_title)
        return hosts is None or _in_networks(address, hosts)


class TlsSettings(_Section):
    """``[tls]``: the certificate of the DICOM TLS port (``[node] tls_port``).

    Paths are PEM files; relative paths are relative to the working directory of the process.
    """

    cert_file: str = ""
    """This node's certificate, optionally followed by intermediate CA certificates."""
    key_file: str = ""
    """The private key of ``cert_file`` (unencrypted; readable only by the service user)."""
    ca_file: str = ""
    """CA certificate(s) that sign the client certificates of the senders (the PACS)."""
    require_client_cert: bool = True
    """Mutual TLS: a sender without a certificate signed by ``ca_file`` is refused."""
    min_version: Literal["1.2", "1.3"] = "1.2"
    """Oldest TLS version accepted on the TLS port."""


def _check_regexes(patterns: tuple[str, ...]) -> tuple[str, ...]:
    """``patterns`` unchanged, or a ValueError naming the first that is not a regular expression."""
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"{pattern!r} is not a valid regular expression: {exc}") from None
    return patterns


class RoutingSettings(_Section):
    """``[routing]``: how the portal-venous CT series is recognised (rules as data)."""

    portal_venous_patterns: tuple[str, ...] = DEFAULT_PORTAL_VENOUS_PATTERNS
    exclude_patterns: tuple[str, ...] = DEFAULT_EXCLUDE_PATTERNS
    require_contrast_agent: bool = True
    delay_window_seconds: tuple[float, float] | tuple[()] = ()
    when_not_portal_venous: Literal["skip", "process"] = "skip"
    method_regions: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_METHOD_REGIONS))
    """Method -> body region it was trained on; a method not listed runs on every study."""
    region_patterns: dict[str, tuple[str, ...]] = Field(default_factory=lambda: dict(DEFAULT_REGION_PATTERNS))
    """Region -> regular expressions on BodyPartExamined, StudyDescription, SeriesDescription, ProtocolName."""
    tumour: StructureRules = StructureRules()
    """``[routing.tumour]``: which structures of a segmentation are tumours (see
    :class:`inference.structures.StructureRules`: patterns are regular expressions searched
    case-insensitively, codes ``SCHEME:VALUE``; a list given replaces its default)."""

    @model_validator(mode="after")
    def _regions(self) -> RoutingSettings:
        unknown = sorted({region for region in self.method_regions.values() if region not in self.region_patterns})
        if unknown:
            raise ValueError(
                f"method_regions names region(s) {', '.join(unknown)} that region_patterns does not define"
            )
        for region, patterns in self.region_patterns.items():
            for pattern in patterns:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ValueError(
                        f"region_patterns.{region}: {pattern!r} is not a valid regular expression: {exc}"
                    ) from None
        return self

    @field_validator("portal_venous_patterns", "exclude_patterns")
    @classmethod
    def _regexes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _check_regexes(value)

    @field_validator("delay_window_seconds")
    @classmethod
    def _window(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if value and not 0 <= value[0] <= value[1]:
            raise ValueError("must be [min, max] seconds with 0 <= min <= max, or [] for no window")
        return value

    def phase_rules(self) -> PhaseRules:
        """The compiled rules for :func:`pacs_agent.routing.phase.classify`."""
        window = None
        if self.delay_window_seconds:
            window = (float(self.delay_window_seconds[0]), float(self.delay_window_seconds[1]))
        return PhaseRules(
            portal_venous_patterns=self.portal_venous_patterns,
            exclude_patterns=self.exclude_patterns,
            require_contrast_agent=self.require_contrast_agent,
            delay_window_seconds=window,
        )


class LoggingSettings(_Section):
    """``[logging]``."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class ObservabilitySettings(_Section):
    """``[observability]``: the ``/healthz`` and ``/metrics`` HTTP endpoint (port 0 disables it)."""

    http_host: str = Field(default="127.0.0.1", min_length=1)
    http_port: int = Field(default=9110, ge=0, le=65535)


class ConsoleSettings(_Section):
    """``[console]``: the web console for the people who run the node (off by default)."""

    enabled: bool = False
    """Start the console with ``pacs-agent serve`` (``pacs-agent console`` runs it on its own)."""
    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=8080, ge=1, le=65535)
    base_url: str = ""
    """The address people type (``https://node.example.org/console``); its path is the prefix a
    reverse proxy strips. Empty: ``http(s)://host:port``."""
    session_secret_file: Path | None = None
    """Key that signs session cookies; created (mode 0600) when missing. Default ``<state_dir>/console-secret``."""
    viewer_url: str = ""
    """"Open in viewer" link, ``{study_instance_uid}`` replaced, e.g.
    ``https://ohif.example.org/viewer?StudyInstanceUIDs={study_instance_uid}``; empty: no link."""
    cert_file: str = ""
    """PEM certificate (chain) for HTTPS served by the console itself; empty: plain HTTP (use a reverse proxy)."""
    key_file: str = ""
    """The private key of ``cert_file`` (PEM, unencrypted)."""
    session_hours: float = Field(default=12.0, gt=0, le=24 * 30)
    """A login lasts this long."""
    trusted_proxy_header: str = ""
    """Single sign-on behind a reverse proxy: the request header that names the logged-in user
    (e.g. ``X-Remote-User``), believed only from :attr:`trusted_proxies`. Empty: local logins only."""
    trusted_proxies: tuple[str, ...] = ()
    """Addresses / networks of the reverse proxies whose ``trusted_proxy_header`` and
    ``X-Forwarded-For`` are believed (e.g. ``["127.0.0.1"]``). Default: X-Forwarded-For from 127.0.0.1 only."""
    proxy_default_role: Literal["", "viewer", "operator", "admin"] = ""
    """Role of a user named by the proxy header who is not a local console user; empty: such a user
    is refused (add them with ``pacs-agent console user add NAME --role ...``)."""

    @field_validator("session_secret_file", mode="before")
    @classmethod
    def _empty_is_default(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        if not value:
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"{value!r} is not an http:// or https:// address (e.g. https://node.example.org/console)")
        if parts.query or parts.fragment:
            raise ValueError(f"{value!r}: base_url takes no query or fragment")
        return value.rstrip("/")

    @field_validator("viewer_url")
    @classmethod
    def _viewer_url(cls, value: str) -> str:
        if not value:
            return value
        if "{study_instance_uid}" not in value:
            raise ValueError("viewer_url needs the placeholder {study_instance_uid} (where the study's UID goes)")
        if urlsplit(value).scheme not in ("http", "https") and not value.startswith("/"):
            raise ValueError(f"{value!r}: viewer_url is an http(s):// address or a path starting with /")
        try:
            value.format(study_instance_uid="1.2.3")
        except (KeyError, IndexError, ValueError):
            raise ValueError("viewer_url may hold only the placeholder {study_instance_uid}") from None
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _check_networks(value)

    @field_validator("trusted_proxy_header")
    @classmethod
    def _header(cls, value: str) -> str:
        if value and not re.fullmatch(r"[A-Za-z0-9-]+", value):
            raise ValueError(f"{value!r} is not an HTTP header name (letters, digits and -, e.g. X-Remote-User)")
        return value.lower()

    @model_validator(mode="after")
    def _proxy_needs_addresses(self) -> ConsoleSettings:
        if self.trusted_proxy_header and not self.trusted_proxies:
            raise ValueError(
                "trusted_proxy_header needs trusted_proxies: the addresses of the reverse proxies that set it "
                "(a header from any other address is ignored)"
            )
        return self

    def proxy_trusted(self, address: str) -> bool:
        """True when ``address`` (the TCP peer) is one of :attr:`trusted_proxies`."""
        return _in_networks(address, self.trusted_proxies)

    @model_validator(mode="after")
    def _tls_pair(self) -> ConsoleSettings:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert_file and key_file go together (the certificate and its private key)")
        return self

    @property
    def root_path(self) -> str:
        """The path prefix of :attr:`base_url` (``/console``), empty when served at the root."""
        return urlsplit(self.base_url).path.rstrip("/") if self.base_url else ""

    @property
    def secure_cookies(self) -> bool:
        """Cookies only over HTTPS: when the console serves TLS itself or its base_url is https."""
        return bool(self.cert_file) or self.base_url.startswith("https://")


class Settings(_Section):
    """All settings of a node, validated and frozen."""

    node: NodeSettings = NodeSettings()
    storage: StorageSettings = StorageSettings()
    database: DatabaseSettings = DatabaseSettings()
    readiness: ReadinessSettings = ReadinessSettings()
    jobs: JobSettings = JobSettings()
    worker: WorkerSettings = WorkerSettings()
    models: ModelSettings = ModelSettings()
    delivery: DeliverySettings = DeliverySettings()
    destinations: tuple[Destination, ...] = ()
    sources: tuple[Source, ...] = ()
    response: ResponseSettings = ResponseSettings()
    security: SecuritySettings = SecuritySettings()
    tls: TlsSettings = TlsSettings()
    routing: RoutingSettings = RoutingSettings()
    logging: LoggingSettings = LoggingSettings()
    observability: ObservabilitySettings = ObservabilitySettings()
    console: ConsoleSettings = ConsoleSettings()

    @model_validator(mode="after")
    def _unique_destinations(self) -> Settings:
        names = [d.name for d in self.destinations]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"destination names must be unique; repeated: {', '.join(duplicates)}")
        return self

    @model_validator(mode="after")
    def _tls_port_has_certificate(self) -> Settings:
        if not self.node.tls_port:
            return self
        missing = [f"tls.{key}" for key in ("cert_file", "key_file") if not getattr(self.tls, key)]
        if self.tls.require_client_cert and not self.tls.ca_file:
            missing.append("tls.ca_file (tls.require_client_cert = true)")
        if missing:
            raise ValueError(f"node.tls_port = {self.node.tls_port} needs {', '.join(missing)}")
        return self

    @property
    def database_url(self) -> str:
        """The SQLAlchemy URL, defaulting to ``sqlite:///<state_dir>/pacs-agent.db``."""
        if self.database.url:
            return self.database.url
        return f"sqlite:///{(self.storage.state_dir / 'pacs-agent.db').absolute()}"

    @property
    def console_secret_file(self) -> Path:
        """The console's session key: ``[console] session_secret_file``, default ``<state_dir>/console-secret``."""
        configured = self.console.session_secret_file
        return configured if configured is not None else self.storage.state_dir / "console-secret"

    @property
    def models_dir(self) -> Path:
        """Directory of installed model packages: ``[models] dir``, default ``<state_dir>/models``."""
        return self.models.dir if self.models.dir is not None else self.storage.state_dir / "models"

    @property
    def model_dirs(self) -> tuple[Path, ...]:
        """Where the worker looks for packages, in order: :attr:`models_dir`, then the demo packages."""
        return (self.models_dir, DEMO_MODELS_DIR) if self.models.use_demo else (self.models_dir,)


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in key[len(ENV_PREFIX) :].split("__") if p]
        if not path:
            continue
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError([f"{key}: conflicts with another PACS_AGENT__ variable"])
        node[path[-1]] = value
    return tree


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _format_errors(exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown setting (check the spelling against config/pacs-agent.toml)"
        message = message.removeprefix("Value error, ")
        problems.append(f"{where}: {message}")
    return problems


def settings_from_mapping(data: Mapping[str, Any]) -> Settings:
    """Validate a mapping (parsed TOML plus overrides) into :class:`Settings`.

    Raises
    ------
    ConfigError
        With every problem found, not only the first.
    """
    try:
        return Settings.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None


def load_settings(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read ``path`` (optional), apply ``PACS_AGENT__*`` overrides and validate.

    Raises
    ------
    ConfigError
        The file is missing, is not valid TOML, or holds invalid values.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError([f"{path}: cannot read the configuration file ({exc.strerror})"]) from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"{path}: not valid TOML ({exc})"]) from None
    env = os.environ if environ is None else environ
    return settings_from_mapping(_merge(data, _env_overrides(env)))
