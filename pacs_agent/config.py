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

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pacs_agent.errors import ConfigError
from pacs_agent.routing.phase import DEFAULT_EXCLUDE_PATTERNS, DEFAULT_PORTAL_VENOUS_PATTERNS, PhaseRules

ENV_PREFIX = "PACS_AGENT__"
KNOWN_METHODS = ("radiomics",)
"""Methods a job can run (``[jobs] methods``); each has a pipeline in ``inference.pipelines``."""
PAIR_METHODS = ("response",)
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
    max_pdu_bytes: int = Field(default=1_048_576, ge=0)
    network_timeout_seconds: float = Field(default=60.0, gt=0)

    _ae = field_validator("ae_title")(_check_ae_title)


class StorageSettings(_Section):
    """``[storage]``: where received objects and results are kept."""

    state_dir: Path = Path("pacs-agent-state")
    min_free_mb: int = Field(default=1024, ge=0)

    @property
    def spool_dir(self) -> Path:
        """Directory of received instances (``<state_dir>/spool``)."""
        return self.state_dir / "spool"

    @property
    def results_dir(self) -> Path:
        """Directory of result objects waiting for or done with delivery."""
        return self.state_dir / "results"


class DatabaseSettings(_Section):
    """``[database]``: SQLAlchemy URL; empty means a SQLite file in the state directory."""

    url: str = ""


class ReadinessSettings(_Section):
    """``[readiness]``: when a study counts as complete."""

    quiet_seconds: float = Field(default=30.0, ge=0)
    min_ct_instances: int = Field(default=3, ge=1)
    reference_wait_seconds: float = Field(default=300.0, ge=0)
    """How long a study waits for images its segmentation was drawn on but that have not arrived."""


class JobSettings(_Section):
    """``[jobs]``: retries of processing jobs."""

    max_attempts: int = Field(default=3, ge=1)
    retry_delay_seconds: float = Field(default=30.0, ge=0)
    lease_seconds: float = Field(default=120.0, gt=0)
    methods: tuple[str, ...] = ("radiomics",)

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


class DeliverySettings(_Section):
    """``[delivery]``: retries when a destination does not take a result."""

    initial_backoff_seconds: float = Field(default=10.0, gt=0)
    max_backoff_seconds: float = Field(default=600.0, gt=0)
    max_age_hours: float = Field(default=72.0, gt=0)
    timeout_seconds: float = Field(default=30.0, gt=0)


class Destination(_Section):
    """``[[destinations]]``: a DICOM node that receives our results (usually the PACS)."""

    name: str = Field(min_length=1, max_length=64)
    ae_title: str
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)

    _ae = field_validator("ae_title")(_check_ae_title)


class Source(_Section):
    """``[[sources]]``: a PACS the node may query (C-FIND) and retrieve from (C-MOVE / C-GET)."""

    name: str = Field(min_length=1, max_length=64)
    ae_title: str
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    retrieve: Literal["move", "get"] = "move"
    """C-MOVE to this node's own AE title (the PACS must know it), or C-GET on the same association."""

    _ae = field_validator("ae_title")(_check_ae_title)


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
    """``[security]``: who may open an association (empty list = allow all)."""

    allowed_calling_aets: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()

    @field_validator("allowed_calling_aets")
    @classmethod
    def _aets(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_check_ae_title(v) for v in value)

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError as exc:
                raise ValueError(
                    f"{entry!r} is not an IP address or network (use e.g. 10.1.2.3 or 10.1.0.0/16)"
                ) from exc
        return value

    def host_allowed(self, address: str) -> bool:
        """Return True when ``address`` (an IP string) may connect."""
        if not self.allowed_hosts:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in ipaddress.ip_network(net, strict=False) for net in self.allowed_hosts)

    def calling_aet_allowed(self, ae_title: str) -> bool:
        """Return True when ``ae_title`` may open an association."""
        return not self.allowed_calling_aets or ae_title.strip() in self.allowed_calling_aets


class RoutingSettings(_Section):
    """``[routing]``: how the portal-venous CT series is recognised (rules as data)."""

    portal_venous_patterns: tuple[str, ...] = DEFAULT_PORTAL_VENOUS_PATTERNS
    exclude_patterns: tuple[str, ...] = DEFAULT_EXCLUDE_PATTERNS
    require_contrast_agent: bool = True
    delay_window_seconds: tuple[float, float] | tuple[()] = ()
    when_not_portal_venous: Literal["skip", "process"] = "skip"

    @field_validator("portal_venous_patterns", "exclude_patterns")
    @classmethod
    def _regexes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a valid regular expression: {exc}") from None
        return value

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


class Settings(_Section):
    """All settings of a node, validated and frozen."""

    node: NodeSettings = NodeSettings()
    storage: StorageSettings = StorageSettings()
    database: DatabaseSettings = DatabaseSettings()
    readiness: ReadinessSettings = ReadinessSettings()
    jobs: JobSettings = JobSettings()
    delivery: DeliverySettings = DeliverySettings()
    destinations: tuple[Destination, ...] = ()
    sources: tuple[Source, ...] = ()
    response: ResponseSettings = ResponseSettings()
    security: SecuritySettings = SecuritySettings()
    routing: RoutingSettings = RoutingSettings()
    logging: LoggingSettings = LoggingSettings()
    observability: ObservabilitySettings = ObservabilitySettings()

    @model_validator(mode="after")
    def _unique_destinations(self) -> Settings:
        names = [d.name for d in self.destinations]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"destination names must be unique; repeated: {', '.join(duplicates)}")
        return self

    @property
    def database_url(self) -> str:
        """The SQLAlchemy URL, defaulting to ``sqlite:///<state_dir>/pacs-agent.db``."""
        if self.database.url:
            return self.database.url
        return f"sqlite:///{(self.storage.state_dir / 'pacs-agent.db').absolute()}"


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
