"""Node configuration: one YAML file over embedded defaults, every key overridable by environment.

Precedence (lowest first): ``dicom_node/defaults/node.yaml``, the ``--config`` file, then
``DICOM_NODE_<KEY>`` variables (``DICOM_NODE_PORT=11113``; nested values as YAML/JSON text,
``DICOM_NODE_DESTINATIONS='{pacs: {ae_title: X, host: h, port: 104}}'``).
"""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from ruamel.yaml import YAML
from ruamel.yaml.composer import Composer, MaxDepthExceededError
from ruamel.yaml.error import MarkedYAMLError
from ruamel.yaml.events import AliasEvent, ScalarEvent

ENV_PREFIX = "DICOM_NODE_"
"""Prefix of environment variables that override configuration keys."""

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1e3,
    "kb": 1e3,
    "m": 1e6,
    "mb": 1e6,
    "g": 1e9,
    "gb": 1e9,
    "t": 1e12,
    "tb": 1e12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


class ConfigError(ValueError):
    """The configuration is invalid; the message names the source and the key."""


def parse_size(value: int | float | str) -> int:
    """Return a byte count from ``5GB``, ``512 MiB`` or a plain number."""
    if isinstance(value, int | float):
        return int(value)
    match = _SIZE_RE.match(str(value))
    unit = (match.group(2) or "").lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(f"size must look like '5GB' or '512MiB', got {value!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# -- retention and disk (issue 9 items 5 and 6) ----------------------------------------------------
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$", re.IGNORECASE)
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(value: int | float | str) -> float:
    """Return seconds from ``30m``, ``24h``, ``14d``, ``2w``, ``45s`` or a plain number of seconds.

    Raises
    ------
    ValueError
        Not a non-negative number with an optional unit s, m, h, d or w.
    """
    if isinstance(value, bool):
        raise ValueError(f"duration must look like '24h', '14d' or 30 (seconds), got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION_RE.match(str(value))
        if match is None:
            raise ValueError(
                f"duration must look like '30m', '24h', '14d' or 30 (seconds), got {value!r}"
            )
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()]
    if not seconds >= 0 or seconds == float("inf"):
        raise ValueError(f"duration must be a finite number of seconds >= 0, got {value!r}")
    return seconds


class RetentionConfig(_Strict):
    """How long the files of a finished series are kept (``retention:`` in the configuration).

    A series' spooled instances and results are deleted once *every* job of the series is
    finished and the age of its state has passed since it finished (and since the series' last
    instance arrived). Durations are ``30m``, ``24h``, ``14d`` or seconds as a number.
    """

    done_after: float = 86400.0
    """Keep a delivered series this long (default ``24h``)."""
    failed_after: float = 14 * 86400.0
    """Keep a failed series this long, so that it can still be retried (default ``14d``)."""
    skipped_after: float = 3600.0
    """Keep a series no rule took this long (default ``1h``)."""
    interval: float = Field(default=300.0, gt=0)
    """Seconds between retention passes of a running node (default ``5m``; also one at start)."""

    @field_validator("done_after", "failed_after", "skipped_after", "interval", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float:
        return parse_duration(value)


class Destination(_Strict):
    """A DICOM peer the node sends results to (C-STORE SCU); ``type: dimse``, the default."""

    type: Literal["dimse"] = "dimse"
    ae_title: str = Field(min_length=1, max_length=16)
    host: str
    port: int = Field(ge=1, le=65535)
    tls: bool = False
    """Send over TLS using ``tls.ca`` to verify the peer and ``tls.cert``/``tls.key`` if set."""


_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


class DicomwebAuth(_Strict):
    """How the node authenticates to a DICOMweb service (``auth:`` of a ``dicomweb`` destination).

    The secret itself is never in the configuration: it is read, at each send, from an
    environment variable (``password_env`` / ``token_env``) or a file (``password_file`` /
    ``token_file``, first line), so that the configuration can be shown and logged.
    """

    type: Literal["basic", "bearer"]
    """``basic``: HTTP Basic with ``username`` and a password; ``bearer``: an OAuth token."""
    username: str | None = Field(default=None, min_length=1, max_length=256)
    password_env: str | None = None
    password_file: Path | None = None
    token_env: str | None = None
    token_file: Path | None = None

    @field_validator("password_env", "token_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_NAME_RE.match(value):
            raise ValueError(
                f"must name an environment variable (letters, digits, '_'), got {value[:80]!r}"
            )
        return value

    @model_validator(mode="after")
    def _one_secret(self) -> DicomwebAuth:
        if self.type == "basic":
            given, wrong = ("password_env", "password_file"), ("token_env", "token_file")
            if self.username is None:
                raise ValueError("auth type basic needs 'username'")
        else:
            given, wrong = ("token_env", "token_file"), ("password_env", "password_file")
            if self.username is not None:
                raise ValueError("auth type bearer takes no 'username'")
        misplaced = [k for k in wrong if getattr(self, k) is not None]
        if misplaced:
            raise ValueError(f"auth type {self.type} takes {' or '.join(given)}, not {misplaced}")
        if sum(getattr(self, k) is not None for k in given) != 1:
            raise ValueError(f"auth type {self.type} needs exactly one of {' or '.join(given)}")
        return self


class DicomwebDestination(_Strict):
    """A DICOMweb service the node sends results to with STOW-RS (``type: dicomweb``).

    ``url`` is the service's base, the part before ``/studies``
    (``http://pacs:8042/dicom-web`` for Orthanc's DICOMweb plugin).
    """

    type: Literal["dicomweb"]
    url: str = Field(min_length=1, max_length=2048)
    auth: DicomwebAuth | None = None
    timeout: float | None = Field(default=None, gt=0)
    """Seconds allowed to connect and between bytes of the answer; ``None``: ``export_timeout``."""
    verify: bool = True
    """Verify the server's TLS certificate (``https``); false only for a test service."""
    ca: Path | None = None
    """CA bundle (PEM) to verify the server with instead of the system's CAs."""
    max_instances_per_request: int = Field(default=32, ge=1, le=1000)
    """Instances sent in one STOW-RS request at most (the overlay of a long series is many)."""

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"url must be http(s)://host[:port]/path of the DICOMweb service "
                f"(e.g. http://pacs:8042/dicom-web), got {value[:120]!r}"
            )
        if parts.username is not None or parts.password is not None:
            raise ValueError("url must not hold credentials; put them in 'auth:' (env or file)")
        if parts.query or parts.fragment:
            raise ValueError(f"url must have no query or fragment, got {value[:120]!r}")
        return value.strip().rstrip("/")

    def anchored(self, base: Path) -> DicomwebDestination:
        """A copy whose relative file paths (``ca``, secret files) are anchored at ``base``."""
        update: dict[str, Any] = {}
        if self.ca is not None:
            update["ca"] = (base / self.ca).resolve()
        if self.auth is not None:
            files = {
                k: (base / v).resolve()
                for k in ("password_file", "token_file")
                if (v := getattr(self.auth, k)) is not None
            }
            if files:
                update["auth"] = self.auth.model_copy(update=files)
        return self.model_copy(update=update) if update else self


def _destination_type(value: Any) -> str:
    """The tag of a destination: its ``type``, ``dimse`` when it has none."""
    found = value.get("type", "dimse") if isinstance(value, dict) else getattr(value, "type", None)
    return str(found)


AnyDestination = Annotated[
    Annotated[Destination, Tag("dimse")] | Annotated[DicomwebDestination, Tag("dicomweb")],
    Discriminator(_destination_type),
]
"""A destination of either type (``type: dimse``, the default, or ``type: dicomweb``)."""


class TLSConfig(_Strict):
    """DICOM TLS for the listening port (and for destinations with ``tls: true``)."""

    cert: Path
    key: Path
    ca: Path | None = None
    """CA bundle to verify peers; required when ``require_client_cert`` is true."""
    require_client_cert: bool = False


# -- who may call (receive/scp.py CallerPolicy) ----------------------------------------------------
CERT_SUBJECT_ATTRIBUTES: dict[str, str] = {
    "CN": "commonName",
    "O": "organizationName",
    "OU": "organizationalUnitName",
    "C": "countryName",
    "ST": "stateOrProvinceName",
    "L": "localityName",
    "DC": "domainComponent",
    "emailAddress": "emailAddress",
    "serialNumber": "serialNumber",
}
"""Attributes a ``cert_subject`` may name, as written (``CN=...``) and as Python's ``ssl``
reports them in a peer certificate's subject."""


def parse_cert_subject(text: str) -> tuple[tuple[str, str], ...]:
    """Return ``(("commonName", "ct1"), ("organizationName", "Hospital"))`` from
    ``"CN=ct1, O=Hospital"``.

    Raises
    ------
    ValueError
        Empty, a part without ``=``, an empty value or an attribute not in
        :data:`CERT_SUBJECT_ATTRIBUTES`; the message shows the part.
    """
    pairs = []
    for part in str(text).split(","):
        name, sep, value = part.strip().partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not value or name not in CERT_SUBJECT_ATTRIBUTES:
            known = ", ".join(CERT_SUBJECT_ATTRIBUTES)
            raise ValueError(
                f"cert_subject must be comma-separated NAME=value parts with NAME one of {known} "
                f"(e.g. 'CN=modality1, O=Hospital'), got {part.strip()[:80]!r}"
            )
        pairs.append((CERT_SUBJECT_ATTRIBUTES[name], value))
    return tuple(pairs)


def _check_ae(value: str, what: str) -> str:
    if not 1 <= len(value) <= 16 or value.strip() != value or "\\" in value:
        raise ValueError(f"{what} must be 1-16 characters without spaces around, got {value!r}")
    return value


def _check_host(value: str) -> str:
    if not value or any(c.isspace() or c in "@#/" for c in value) or len(value) > 253:
        raise ValueError(f"host must be an IP address or a host name, got {value[:80]!r}")
    return value


class CallerEntry(_Strict):
    """One ``allowed_callers`` entry in its mapping form: a calling AE title, pinned to a host
    and/or (with TLS client certificates) to a certificate subject.

    ``{ae_title: CT1, host: 10.0.0.5, cert_subject: "CN=ct1"}`` admits CT1 only from
    10.0.0.5 and only with a client certificate (verified against ``tls.ca``) whose subject has
    ``CN=ct1``. The strings ``CT1`` and ``CT1@10.0.0.5`` are the short forms without a subject.
    """

    ae_title: str
    host: str | None = None
    """IP address or host name (resolved once, at start); ``None``: any host."""
    cert_subject: str | None = None
    """``CN=...`` parts that must all be in the client certificate's subject, values exact;
    needs ``tls.require_client_cert: true``."""

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        return _check_ae(value, "ae_title")

    @field_validator("host")
    @classmethod
    def _host(cls, value: str | None) -> str | None:
        return None if value is None else _check_host(value)

    @field_validator("cert_subject")
    @classmethod
    def _subject(cls, value: str | None) -> str | None:
        if value is not None:
            parse_cert_subject(value)
        return value

    @property
    def subject(self) -> tuple[tuple[str, str], ...] | None:
        """The parsed ``cert_subject`` (see :func:`parse_cert_subject`)."""
        return None if self.cert_subject is None else parse_cert_subject(self.cert_subject)

    @classmethod
    def from_text(cls, text: str) -> CallerEntry:
        """Parse the short forms ``AE`` and ``AE@host``.

        Raises
        ------
        ValueError
            A bad AE title or host; the message names it.
        """
        ae, sep, host = text.partition("@")
        return cls(ae_title=ae.strip(), host=host.strip() if sep else None)


DATABASE_DIALECTS = ("sqlite", "postgresql")
"""Databases the job store runs on (``database:``)."""


def check_database_url(value: str) -> str:
    """Validate a ``database:`` URL; return it with PostgreSQL's driver made explicit.

    ``postgresql://`` means ``postgresql+psycopg://`` (psycopg 3, the driver dicom-node ships).
    The messages never repeat the URL: it may hold a password.

    Raises
    ------
    ValueError
        Not a URL SQLAlchemy can parse, another database, or another PostgreSQL driver.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(value.strip())
    except (ArgumentError, ValueError):
        raise ValueError(
            "must be a database URL such as postgresql+psycopg://user:password@host:5432/dbname "
            "or sqlite:///path/jobs.db"
        ) from None
    dialect, _, driver = url.drivername.partition("+")
    if dialect not in DATABASE_DIALECTS:
        raise ValueError(
            f"database {dialect!r} is not supported: use postgresql+psycopg:// or sqlite:///"
        )
    if dialect == "postgresql":
        if driver not in ("", "psycopg"):
            raise ValueError(
                f"PostgreSQL driver {driver!r} is not shipped: use postgresql+psycopg://"
            )
        url = url.set(drivername="postgresql+psycopg")
    elif driver not in ("", "pysqlite"):
        raise ValueError(f"SQLite driver {driver!r} is not shipped: use sqlite:///path")
    elif not url.database or url.database == ":memory:":
        raise ValueError("an SQLite job store needs a file: sqlite:///path/jobs.db")
    return url.render_as_string(hide_password=False)


class NodeConfig(_Strict):
    """Every setting of a node. See ``dicom_node/defaults/node.yaml`` for the defaults."""

    ae_title: str = Field("DICOMNODE", min_length=1, max_length=16)
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=0, le=65535)
    http_port: int = Field(9100, ge=0, le=65535)
    http_host: str = "0.0.0.0"
    health_detail: Literal["loopback", "any"] = "loopback"
    """Who sees the checks behind ``/healthz`` and ``/readyz`` (model versions, rule errors):
    ``loopback`` callers only (others get the status code and ``ready``/``alive``), or ``any``."""
    storage: Path = Path("./var")
    rules: Path = Path("./rules")
    models: Path = Path("./models")
    database: str | None = Field(None, min_length=1, max_length=2048)
    """The job store: a SQLAlchemy URL (``postgresql+psycopg://user:password@host/db``, or
    ``sqlite:///path``); None: the embedded SQLite ``jobs.db`` under ``storage``. Several
    processes on one store need PostgreSQL. Its password is never logged or shown."""
    migrate: Literal["auto", "never"] = "auto"
    """``auto``: a job store written by an older dicom-node is upgraded to this version's schema
    at start; ``never``: such a store is refused (run ``dicom-node migrate``)."""
    allowed_callers: list[str | CallerEntry] = Field(default_factory=list)
    """``[]``: any caller. Else entries ``AE``, ``AE@host`` or
    ``{ae_title: AE, host: h, cert_subject: "CN=..."}`` (see :class:`CallerEntry`)."""
    destinations: dict[str, AnyDestination] = Field(default_factory=dict)
    """Where results go, by name: C-STORE peers (``{ae_title, host, port}``) or DICOMweb
    services (``{type: dicomweb, url: ...}``, see :class:`DicomwebDestination`)."""
    max_associations: int = Field(16, ge=1)
    max_associations_per_host: int = Field(8, ge=1)
    """Connections one host (IP address) may hold at once, capped at ``max_associations``;
    more are refused with A-ASSOCIATE-RJ (transient, local limit exceeded)."""
    max_pdu: int = Field(0, ge=0)
    """Maximum P-DATA PDU size we advertise and accept; 0: the node's hard cap (64 MiB)."""
    acse_timeout: float = Field(30.0, gt=0)
    """Seconds a new connection has to finish its TLS handshake and to send its whole
    A-ASSOCIATE-RQ; a peer that is silent or stops half-way is dropped."""
    dimse_timeout: float = Field(60.0, gt=0)
    """Seconds of silence allowed once a peer has started a PDU or a DIMSE message."""
    network_timeout: float = Field(60.0, gt=0)
    """Seconds an established association may stay idle between messages (also the longest
    wait for a peer that does not read what the node sends)."""
    # -- what the receiver accepts (receive/handler.py, receive/scp.py) --
    accept_unknown_sop_classes: bool = True
    """Accept C-STOREs of private or unknown SOP classes (as Orthanc does); ``false`` rejects
    their presentation contexts at association. Every standard storage SOP class, retired ones
    included, is accepted either way."""
    max_pixels: int = Field(2**31, ge=1)
    """Budget per instance for the decoded pixel data its header declares, in bytes
    (Rows x Columns x NumberOfFrames x SamplesPerPixel x BitsAllocated/8; sizes like ``2GiB``
    allowed); above it the C-STORE is refused with 0xA905. A deflated data set may inflate to
    this plus 64 MiB."""
    min_free_disk: int = 5_000_000_000
    """Refuse C-STOREs with 0xA700 when free space under ``storage``, less the incoming data set,
    falls below this; ``/readyz`` reports ``disk`` not ready below it."""
    min_free_inodes: int = Field(10_000, ge=0)
    """Likewise for free inodes (each instance is a file); file systems without an inode limit
    (btrfs) are not checked."""
    retention: RetentionConfig = RetentionConfig()
    """When the files of finished series are deleted (see :class:`RetentionConfig`)."""
    tls: TLSConfig | None = None
    workers: int = Field(2, ge=1)
    """Jobs processed at once (inference + SEG + export)."""
    inference_threads: int = Field(0, ge=0)
    """ONNX Runtime intra-op threads per session; 0 lets ONNX Runtime choose."""
    default_idle_seconds: float = Field(10.0, gt=0)
    """Completion when a rule says nothing: the series is ready after this much quiet."""
    poll_interval: float = Field(0.2, gt=0)
    """Seconds between job-store polls (completion checks, queued jobs)."""
    export_retries: int = Field(5, ge=0)
    export_backoff: float = Field(2.0, gt=0)
    """First retry delay in seconds; doubles with each attempt."""
    export_timeout: float = Field(30.0, gt=0)
    reload_interval: float = Field(1.0, gt=0)
    """Seconds between checks for edited rule files and alias changes."""
    log_level: str = "INFO"
    # -- several processes on one job store (README "Scaling out") --
    role: Literal["all", "receiver", "worker"] = "all"
    """What this process runs: ``receiver`` (DICOM listener, spool, routing), ``worker`` (claims
    jobs: inference, results, export) or ``all`` (both); ``dicom-node serve --role`` overrides."""
    node_name: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    """The ``node`` label of this process's metrics; default ``<hostname>-<role>``."""
    heartbeat_interval: float = Field(5.0, gt=0)
    """Seconds between this process's heartbeats in the job store (renewing its jobs' leases)."""
    process_lease: float = Field(30.0, gt=0)
    """Seconds without a heartbeat after which a process counts as dead and the jobs it claimed
    are taken back by another process; at least 3 heartbeats."""

    @model_validator(mode="after")
    def _lease_spans_heartbeats(self) -> NodeConfig:
        if self.process_lease < 3 * self.heartbeat_interval:
            raise ValueError(
                f"process_lease ({self.process_lease:g} s) must be at least 3 heartbeat_interval "
                f"({3 * self.heartbeat_interval:g} s): one late heartbeat must not make a live "
                "process look dead"
            )
        return self

    @field_validator("database")
    @classmethod
    def _database(cls, value: str | None) -> str | None:
        return None if value is None else check_database_url(value)

    @field_validator("min_free_disk", mode="before")
    @classmethod
    def _size(cls, value: Any) -> int:
        return parse_size(value)

    @field_validator("max_pixels", mode="before")
    @classmethod
    def _pixel_budget(cls, value: Any) -> int:
        return parse_size(value)

    @field_validator("allowed_callers", mode="before")
    @classmethod
    def _callers(cls, value: Any) -> Any:
        if not isinstance(value, list):
            raise ValueError(
                f"allowed_callers must be a list of 'AE', 'AE@host' or {{ae_title: AE, host: h, "
                f"cert_subject: 'CN=...'}} entries, got {type(value).__name__}"
            )
        out: list[str | CallerEntry] = []
        for i, entry in enumerate(value):
            name = entry.get("ae_title") if isinstance(entry, dict) else entry
            label = f"entry {i + 1} ({str(name)[:40]})"
            try:
                if isinstance(entry, str):
                    CallerEntry.from_text(entry)
                    out.append(entry)
                elif isinstance(entry, dict | CallerEntry):
                    out.append(CallerEntry.model_validate(entry))
                else:
                    raise ValueError(f"must be text or a mapping, got {type(entry).__name__}")
            except ValidationError as exc:
                reasons = "; ".join(
                    f"{'.'.join(map(str, e['loc']))}: {_plain(e['msg'])}" for e in exc.errors()
                )
                raise ValueError(f"{label}: {reasons}") from None
            except ValueError as exc:
                raise ValueError(f"{label}: {exc}") from None
        return out

    @model_validator(mode="after")
    def _subjects_need_client_certs(self) -> NodeConfig:
        pinned = [
            e.ae_title
            for e in self.allowed_callers
            if isinstance(e, CallerEntry) and e.cert_subject is not None
        ]
        if pinned and (self.tls is None or not self.tls.require_client_cert):
            raise ValueError(
                f"allowed_callers: cert_subject (for {', '.join(pinned)}) needs TLS with "
                f"client certificates: set tls.cert, tls.key, tls.ca and "
                f"tls.require_client_cert: true"
            )
        return self

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        if value.strip() != value or "\\" in value:
            raise ValueError(
                f"ae_title must be 1-16 characters without spaces around, got {value!r}"
            )
        return value

    def resolve(self, base: Path) -> NodeConfig:
        """Return a copy whose relative paths are anchored at ``base``."""
        paths: dict[str, Any] = {
            k: (base / getattr(self, k)).resolve() for k in ("storage", "rules", "models")
        }
        paths["destinations"] = {
            name: dest.anchored(base) if isinstance(dest, DicomwebDestination) else dest
            for name, dest in self.destinations.items()
        }
        if self.database is not None:
            paths["database"] = _anchored_sqlite(self.database, base)
        return self.model_copy(update=paths)


def _anchored_sqlite(database: str, base: Path) -> str:
    """An ``sqlite:///relative/path`` URL anchored at ``base``; other URLs unchanged."""
    from sqlalchemy.engine import make_url

    url = make_url(database)
    if url.get_backend_name() != "sqlite" or not url.database:
        return database
    path = Path(url.database)
    if path.is_absolute():
        return database
    return url.set(database=str((base / path).resolve())).render_as_string(hide_password=False)


# -- bounded YAML (node.yaml here; rule and rule-test files in dicom_node/routing) ----------------
YAML_MAX_VALUES = 10_000
"""Most values (scalars, lists, mappings, keys included) one YAML document may expand to, every
use of an alias counted in full. A shipped rule file has about 60; the shipped node.yaml 30."""
YAML_MAX_CHARS = 1_000_000
"""Most characters of scalar text one document may expand to, aliases counted per use (a file
without aliases cannot exceed its own size)."""
YAML_MAX_DEPTH = 64
"""Deepest nesting of lists and mappings in one document."""
CONFIG_MAX_BYTES = 262_144
"""A configuration file larger than this is refused before it is parsed."""


class YAMLLimitError(ValueError):
    """A YAML document expands beyond :data:`YAML_MAX_VALUES` / ``YAML_MAX_CHARS`` or nests
    deeper than :data:`YAML_MAX_DEPTH`, or an alias refers to its own anchor.

    ``line`` is the 1-based line where the limit was reached (for an alias, where it is used).
    """

    def __init__(self, message: str, line: int | None) -> None:
        super().__init__(message)
        self.line = line


class _BoundedComposer(Composer):
    """ruamel's composer, counting while it composes so that a "billion laughs" stops early.

    Anchored nodes are composed once and shared, so loading is cheap; the danger is everything
    that walks the result later (validation, messages). Each node counts once where it is
    written, and an alias counts the full size of what it names, at the alias, every time.
    """

    max_values = YAML_MAX_VALUES
    max_chars = YAML_MAX_CHARS

    def __init__(self, loader: Any = None) -> None:
        super().__init__(loader=loader)
        self._values = 0
        self._chars = 0
        self._sizes: dict[int, tuple[int, int]] = {}  # id(anchored node) -> expanded size

    def _spend(self, values: int, chars: int, mark: Any, alias: str | None) -> None:
        self._values += values
        self._chars += chars
        if self._values <= self.max_values and self._chars <= self.max_chars:
            return
        what = (
            f"more than {self.max_values} values"
            if self._values > self.max_values
            else f"more than {self.max_chars} characters of text"
        )
        if alias:
            message = (
                f"YAML alias '*{alias}' expands the document to {what} (each use of an alias "
                f"counts in full); use fewer aliases or simplify"
            )
        else:
            message = f"YAML document has {what}; simplify it or split it into several files"
        raise YAMLLimitError(message, mark.line + 1 if mark is not None else None)

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.parser.peek_event()
        if isinstance(event, AliasEvent):
            target = self.anchors.get(event.anchor)
            if target is not None:  # an undefined alias is ruamel's own error
                size = self._sizes.get(id(target))
                if size is None:
                    raise YAMLLimitError(
                        f"alias '*{event.anchor}' is used inside its own anchor "
                        f"'&{event.anchor}' (a structure that contains itself); remove it",
                        event.start_mark.line + 1,
                    )
                self._spend(*size, event.start_mark, str(event.anchor))
            return super().compose_node(parent, index)
        values, chars = self._values, self._chars
        text = event.value if isinstance(event, ScalarEvent) else None
        self._spend(1, len(text) if isinstance(text, str) else 0, event.start_mark, None)
        node = super().compose_node(parent, index)
        if getattr(event, "anchor", None) is not None:
            self._sizes[id(node)] = (self._values - values, self._chars - chars)
        return node


def bounded_yaml(
    typ: str = "safe",
    *,
    max_values: int = YAML_MAX_VALUES,
    max_chars: int = YAML_MAX_CHARS,
) -> YAML:
    """Return a ruamel ``YAML`` loader whose ``load`` refuses documents beyond the limits.

    Parameters
    ----------
    typ:
        ``safe`` (plain dicts and lists) or ``rt`` (round trip: values carry their lines).
    max_values, max_chars:
        The expansion budget, aliases counted per use (see :data:`YAML_MAX_VALUES`).

    Returns
    -------
    YAML
        Its ``load`` raises :class:`YAMLLimitError` (with ``.line``) once a limit is passed,
        before the rest of the document is read, and ruamel's ``YAMLError`` for bad syntax.
        Always the pure-Python parser: a C parser would bypass the counting composer.
    """
    yaml = YAML(typ=typ, pure=True)

    class _Limited(_BoundedComposer):
        pass

    _Limited.max_values, _Limited.max_chars = max_values, max_chars
    yaml.Composer = _Limited
    yaml.max_depth = YAML_MAX_DEPTH
    return yaml


def yaml_problem(exc: BaseException, syntax: str = "YAML syntax error") -> tuple[int | None, str]:
    """Return ``(line, message)`` for an exception from a :func:`bounded_yaml` load.

    The message is one line: the limit that was passed, or ``syntax`` and ruamel's short reason
    for a syntax error (never the offending text, which can be arbitrarily long).
    """
    if isinstance(exc, YAMLLimitError):
        return exc.line, str(exc)
    mark = exc.problem_mark or exc.context_mark if isinstance(exc, MarkedYAMLError) else None
    line = mark.line + 1 if mark is not None else None
    if isinstance(exc, MaxDepthExceededError | RecursionError):
        return line, f"YAML nested deeper than {YAML_MAX_DEPTH} levels; simplify"
    reason = ""
    if isinstance(exc, MarkedYAMLError):
        reason = exc.problem or exc.context or ""
    reason = reason or (str(exc).splitlines() or [""])[0] or type(exc).__name__
    if len(reason) > 200:
        reason = reason[:197] + "..."
    return line, f"{syntax}: {reason}"


def _untagged(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """An error location without the destination type pydantic puts in it
    (``destinations.pacs.dimse.port`` is ``destinations.pacs.port`` to a user)."""
    if len(loc) > 2 and loc[0] == "destinations" and loc[2] in ("dimse", "dicomweb"):
        return loc[:2] + loc[3:]
    return loc


def _plain(message: str) -> str:
    """A pydantic message without its ``Value error, `` prefix."""
    return message.removeprefix("Value error, ")


def _yaml_text(text: str, source: str) -> dict[str, Any]:
    try:
        data = bounded_yaml("safe").load(text)
    except Exception as exc:  # ruamel raises many types; all mean the same to a user
        line, message = yaml_problem(exc, syntax="not valid YAML")
        where = f"{source}:{line}" if line is not None else source
        raise ConfigError(f"{where}: {message}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: must be a mapping of keys, got {type(data).__name__}")
    return data


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    keys = set(NodeConfig.model_fields)
    out: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key not in keys:
            continue  # DICOM_NODE_CONFIG and friends are not keys
        out[key] = _yaml_value(raw, name) if raw.strip() else raw
    return out


def _yaml_value(text: str, source: str) -> Any:
    try:
        return bounded_yaml("safe").load(text)
    except Exception as exc:  # noqa: BLE001 - as in _yaml_text
        line, message = yaml_problem(exc, syntax="not valid YAML")
        raise ConfigError(f"{source}: {message}") from exc


def load_config(
    path: str | Path | None = None, environ: dict[str, str] | None = None
) -> NodeConfig:
    """Load the configuration.

    Parameters
    ----------
    path:
        A YAML file whose keys override the embedded defaults; relative paths in it are taken
        relative to the file's folder. ``None`` uses the defaults, relative to the working folder.
    environ:
        Environment to read ``DICOM_NODE_<KEY>`` overrides from (default ``os.environ``).

    Raises
    ------
    ConfigError
        Unreadable file, invalid YAML, unknown key or bad value; the message names them.
    """
    environ = dict(os.environ if environ is None else environ)
    default_text = resources.files("dicom_node").joinpath("defaults/node.yaml").read_text()
    data = _yaml_text(default_text, "embedded defaults")
    base = Path.cwd()
    source = "embedded defaults"
    if path is None and environ.get("DICOM_NODE_CONFIG"):
        path = environ["DICOM_NODE_CONFIG"]
    if path is not None:
        path = Path(path)
        try:
            size = path.stat().st_size
            if size > CONFIG_MAX_BYTES:
                raise ConfigError(
                    f"{path}: configuration file is {size} bytes; the limit is {CONFIG_MAX_BYTES}"
                )
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read configuration: {exc.strerror}") from exc
        data.update(_yaml_text(text, str(path)))
        base = path.resolve().parent
        source = str(path)
    data.update(_env_overrides(environ))
    try:
        return NodeConfig(**data).resolve(base)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in _untagged(err['loc'])) or '(top)'}: {_plain(err['msg'])}"
            for err in exc.errors()
        )
        raise ConfigError(f"{source}: {problems}") from exc
