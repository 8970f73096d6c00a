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
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from ruamel.yaml import YAML

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
    """A DICOM peer the node sends results to (C-STORE SCU)."""

    ae_title: str = Field(min_length=1, max_length=16)
    host: str
    port: int = Field(ge=1, le=65535)
    tls: bool = False
    """Send over TLS using ``tls.ca`` to verify the peer and ``tls.cert``/``tls.key`` if set."""


class TLSConfig(_Strict):
    """DICOM TLS for the listening port (and for destinations with ``tls: true``)."""

    cert: Path
    key: Path
    ca: Path | None = None
    """CA bundle to verify peers; required when ``require_client_cert`` is true."""
    require_client_cert: bool = False


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
    allowed_callers: list[str] = Field(default_factory=list)
    destinations: dict[str, Destination] = Field(default_factory=dict)
    max_associations: int = Field(16, ge=1)
    max_pdu: int = Field(0, ge=0)
    """Maximum PDU size we accept; 0 means unlimited."""
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

    @field_validator("min_free_disk", mode="before")
    @classmethod
    def _size(cls, value: Any) -> int:
        return parse_size(value)

    @field_validator("max_pixels", mode="before")
    @classmethod
    def _pixel_budget(cls, value: Any) -> int:
        return parse_size(value)

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
        paths = {k: (base / getattr(self, k)).resolve() for k in ("storage", "rules", "models")}
        return self.model_copy(update=paths)


def _yaml_text(text: str, source: str) -> dict[str, Any]:
    try:
        data = YAML(typ="safe").load(text)
    except Exception as exc:  # ruamel raises many types; all mean the same to a user
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
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
        value = YAML(typ="safe").load(raw) if raw.strip() else raw
        out[key] = value
    return out


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
            f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"{source}: {problems}") from exc
