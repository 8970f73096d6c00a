"""Alias files, alias history and canary selection of the model store.

``models/<name>/aliases.yaml`` maps alias names to versions::

    production: "1"
    candidate: "2"
    shadow: "2"
    canary: {version: "2", percent: 10}

It is only ever replaced atomically (write a temporary file in the same folder, fsync, rename,
fsync the folder), so a node never reads a half-written file. ``models/<name>/history.yaml`` is an
append-only YAML sequence of changes (time, alias, from, to, reason, gate result), which
``rollback`` reads to find the previous production version.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from dicom_node.modelstore.files import atomic_write, fsync_dir
from dicom_node.modelstore.refs import ALIAS_PATTERN

LOGGER = logging.getLogger(__name__)

ALIASES_FILE = "aliases.yaml"
"""Alias file name inside a model folder."""

HISTORY_FILE = "history.yaml"
"""Append-only alias history inside a model folder."""

LOCK_FILE = ".lock"
"""Lock file serialising alias changes of one model across processes."""

PRODUCTION = "production"
CANARY = "canary"
SHADOW = "shadow"

_ALIAS_RE = re.compile(rf"^{ALIAS_PATTERN}$")


class AliasError(ValueError):
    """An alias file or alias value is invalid; the message names the file or the value."""


def validate_alias_name(alias: str) -> str:
    """Return ``alias`` if it is a valid alias name, else raise :class:`AliasError`."""
    if not isinstance(alias, str) or not _ALIAS_RE.match(alias):
        raise AliasError(
            f"alias must be lower-case letters, digits, '_' or '-' starting with a letter, "
            f"got {alias!r}"
        )
    return alias


def _dump_yaml(data: Any) -> str:
    yaml = YAML(typ="safe")
    yaml.default_flow_style = False
    stream = io.StringIO()
    yaml.dump(data, stream)
    return stream.getvalue()


def _load_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise AliasError(f"{path}: cannot read: {exc}") from exc
    try:
        return YAML(typ="safe").load(text)
    except Exception as exc:  # ruamel raises many error types
        raise AliasError(f"{path}: not valid YAML: {exc}") from exc


def _version_text(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise AliasError(f'{where}: version must be a string like "2", got {value!r}')
    return str(value)


def parse_aliases(data: Any, source: str) -> dict[str, Any]:
    """Validate alias data: ``{alias: "version", canary: {version, percent}}``.

    Returns
    -------
    dict
        Alias name -> version string; ``canary`` -> ``{"version": str, "percent": int}``.

    Raises
    ------
    AliasError
        Not a mapping, a bad alias name, a bad version, or a bad canary entry.
    """
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise AliasError(f"{source}: must be a mapping alias -> version, got {type(data).__name__}")
    out: dict[str, Any] = {}
    for alias, value in data.items():
        try:
            validate_alias_name(str(alias))
        except AliasError as exc:
            raise AliasError(f"{source}: {exc}") from exc
        if alias == CANARY:
            if not isinstance(value, dict) or set(value) != {"version", "percent"}:
                raise AliasError(
                    f'{source}: canary must be {{version: "2", percent: 10}}, got {value!r}'
                )
            percent = value["percent"]
            if isinstance(percent, bool) or not isinstance(percent, int) or not 0 <= percent <= 100:
                raise AliasError(
                    f"{source}: canary.percent must be an integer 0-100, got {percent!r}"
                )
            out[CANARY] = {
                "version": _version_text(value["version"], f"{source}: canary.version"),
                "percent": percent,
            }
        else:
            out[str(alias)] = _version_text(value, f"{source}: {alias}")
    return out


def read_aliases(model_dir: Path) -> dict[str, Any]:
    """Read ``model_dir/aliases.yaml`` (empty when absent); :class:`AliasError` when invalid."""
    path = Path(model_dir) / ALIASES_FILE
    return parse_aliases(_load_yaml(path), str(path))


def write_aliases(model_dir: Path, aliases: dict[str, Any]) -> None:
    """Atomically replace ``model_dir/aliases.yaml`` with validated ``aliases``."""
    path = Path(model_dir) / ALIASES_FILE
    clean = parse_aliases(aliases, str(path))
    ordered = {k: clean[k] for k in sorted(clean, key=lambda a: (a != PRODUCTION, a))}
    atomic_write(path, _dump_yaml(ordered))


def utc_now() -> str:
    """Return the current UTC time as ISO 8601 with a ``Z`` suffix (seconds)."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def append_history(model_dir: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """Append one entry to ``model_dir/history.yaml`` (fsynced) and return it with its time.

    The file is a YAML sequence; each append adds one single-line ``- {...}`` item, so a partially
    written last line is the only possible damage from a crash, and :func:`read_history` skips it.
    """
    record = {"time": utc_now(), **entry}
    # JSON is YAML flow syntax and never spans lines: one history entry is one line.
    text = "- " + json.dumps(record, default=str, sort_keys=False) + "\n"
    path = Path(model_dir) / HISTORY_FILE
    created = not path.exists()
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    if created:
        fsync_dir(path.parent)
    return record


def read_history(model_dir: Path) -> list[dict[str, Any]]:
    """Return the history entries of a model, oldest first (empty when none)."""
    path = Path(model_dir) / HISTORY_FILE
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    entries: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = YAML(typ="safe").load(line)
        except Exception:  # a torn last line after a crash
            LOGGER.warning("%s:%d: skipping unreadable history line", path, number)
            continue
        if isinstance(item, list) and item and isinstance(item[0], dict):
            entries.append(item[0])
    return entries


@contextlib.contextmanager
def model_lock(model_dir: Path) -> Iterator[None]:
    """Hold an exclusive inter-process lock on one model's alias state."""
    path = Path(model_dir) / LOCK_FILE
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def canary_bucket(study_uid: str) -> int:
    """Return the study's canary bucket 0-99: ``int(sha256(study_uid)) % 100``.

    Deterministic across processes and restarts, so a study always gets the same version.
    """
    digest = hashlib.sha256(study_uid.strip().encode("ascii", "replace")).digest()
    return int.from_bytes(digest[:8], "big") % 100


def in_canary(study_uid: str | None, percent: int) -> bool:
    """Return whether ``study_uid`` falls in a canary of ``percent`` (never without a UID)."""
    if not study_uid or percent <= 0:
        return False
    return canary_bucket(study_uid) < percent
