"""Typed, immutable records of the job store: what crosses from the store to the other rooms.

:class:`Instance` (``InstanceRecord``, the receiver's name for it) is what the receiver hands the
store after fsync; :class:`Series`, :class:`Job` and :class:`ShadowResult` are what the store hands
back. Each validates its values when it is built, so a bad row fails where it is read, with the
field named, not three stages later.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any

from dicom_node.jobs.states import JobState

JOB_KINDS = ("production",)
"""Kinds of job rows. Shadow runs are :class:`ShadowResult` rows, not jobs; databases written
before that held ``kind = 'shadow'`` jobs, which :mod:`dicom_node.jobs.schema` migrates."""


# -- validators: name the field, say what it must be, show the bad value -----------------------
MODALITY_MAX = 16
"""Characters of ``Modality`` kept (its VR, CS, allows 16; ``instances.modality`` is 16 wide)."""


def _text(name: str, value: object, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value:
        what = "a non-empty str or None" if optional else "a non-empty str"
        raise (TypeError if not isinstance(value, str) else ValueError)(
            f"`{name}` must be {what}, not {value!r}"
        )


def _count(name: str, value: object, *, minimum: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"`{name}` must be an int, not {value!r}")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, not {value!r}")


def _seconds(name: str, value: object, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TypeError(f"`{name}` must be a number, not {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"`{name}` must be a finite number >= 0, not {value!r}")


def _names(name: str, value: object) -> None:
    if value is None:
        return
    if not isinstance(value, tuple) or not all(isinstance(v, str) and v for v in value):
        raise TypeError(f"`{name}` must be a tuple of non-empty str or None, not {value!r}")


# -- identity: UIDs and the patient a study belongs to -------------------------------------------
_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")
_UID_LEADING_ZERO = re.compile(r"(^|\.)0[0-9]")


def validate_uid(value: object) -> tuple[bool, str]:
    """Check a UID whole, as received or as read back from disk (PS3.5 9.1).

    Parameters
    ----------
    value:
        The UID with at most its one trailing pad (NUL or space) already removed; a ``str``.

    Returns
    -------
    tuple of (bool, str)
        ``(True, "")`` when ``value`` is one value of 1-64 characters, digit components
        separated by single dots, none with a leading zero (``0`` itself is fine), nothing
        before or after (no second value, no newline, no padding); else ``(False, reason)``.
    """
    if not isinstance(value, str):
        return False, f"UID must be a str, got {type(value).__name__}"
    if not value:
        return False, "UID is empty"
    if len(value) > 64:
        return False, f"UID must be at most 64 characters, got {len(value)}"
    if "\\" in value:
        return False, "UID must be one value, got several (backslash)"
    if not _UID_RE.fullmatch(value):
        return False, "UID must be digits separated by single dots, nothing before or after"
    if _UID_LEADING_ZERO.search(value):
        return False, "UID components must not have a leading zero (only '0' itself)"
    return True, ""


class IdentityConflict(ValueError):
    """An instance whose UIDs or patient contradict what the store holds; never merged.

    ``what`` names the contradiction without patient data (``series_in_other_study``,
    ``study_of_other_patient``, ``instance_in_other_series``).
    """

    def __init__(self, what: str, detail: str) -> None:
        super().__init__(f"{what}: {detail}")
        self.what = what
        self.detail = detail


PATIENT_FIELDS = ("PatientID", "PatientName", "PatientBirthDate")
"""The attributes whose hashes make a study's :func:`patient_key`, in this order."""


def _normalise(field: str, raw: bytes | str | None) -> bytes:
    if raw is None:
        return b""
    value = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else bytes(raw)
    value = value.strip(b"\x00 ")
    if field == "PatientName":  # DOE^JOHN^^^ and doe^john are one name
        value = value.rstrip(b"^ ").upper()
    return value


def patient_key(
    study_uid: str,
    patient_id: bytes | str | None,
    patient_name: bytes | str | None,
    birth_date: bytes | str | None,
) -> str | None:
    """Return the identity of a study's patient as hashes, never as patient data.

    Each of PatientID, PatientName (upper-cased, trailing ``^`` dropped) and PatientBirthDate
    is hashed on its own (SHA-256 over the study UID, the attribute name and the value as
    encoded in the data set, 16 hex digits), so the job store can tell two patients apart
    without holding who they are; an absent or empty attribute is an empty part.

    Returns
    -------
    str or None
        ``"<id>:<name>:<birth>"``; None when all three are absent.
    """
    parts = []
    for field, raw in zip(PATIENT_FIELDS, (patient_id, patient_name, birth_date), strict=True):
        value = _normalise(field, raw)
        if not value:
            parts.append("")
            continue
        digest = hashlib.sha256(b"\x00".join((study_uid.encode(), field.encode(), value)))
        parts.append(digest.hexdigest()[:16])
    return ":".join(parts) if any(parts) else None


def patient_conflict(held: str | None, incoming: str | None) -> str | None:
    """Return the first patient attribute on which two :func:`patient_key` values differ.

    An attribute absent from either side is no contradiction ("where present").
    """
    if not held or not incoming:
        return None
    for field, a, b in zip(PATIENT_FIELDS, held.split(":"), incoming.split(":"), strict=False):
        if a and b and a != b:
            return field
    return None


def merged_patient_key(held: str | None, incoming: str | None) -> str | None:
    """Fill the parts ``held`` lacks from ``incoming`` (call only when they do not conflict)."""
    if not held:
        return incoming
    if not incoming:
        return held
    return ":".join(a or b for a, b in zip(held.split(":"), incoming.split(":"), strict=False))


_PATIENT_TAGS = (0x00100020, 0x00100010, 0x00100030)  # PatientID, PatientName, PatientBirthDate


def _encoded(ds: Any, tag: int) -> bytes | str | None:
    """An element's value as encoded when pydicom has not converted it yet, else as text."""
    if tag not in ds:
        return None
    value = ds.get_item(tag).value
    if value is None or isinstance(value, bytes | str):
        return value
    original = getattr(value, "original_string", None)  # PersonName read from a file
    return original if isinstance(original, bytes) else str(value)


def dataset_patient_key(ds: Any, study_uid: str) -> str | None:
    """:func:`patient_key` of a pydicom data set (read from the spool), as the receiver computes
    it from the bytes it received."""
    return patient_key(study_uid, *(_encoded(ds, tag) for tag in _PATIENT_TAGS))


def one_patient_one_study(datasets: Sequence[Any], study_uid: str) -> str | None:
    """Return why ``datasets`` are not all of study ``study_uid`` and one patient, or None.

    The message names instances by position and attributes by name, never patient data or UIDs.
    """
    held: str | None = None
    for position, ds in enumerate(datasets, start=1):
        where = f"instance {position} of {len(datasets)}"
        if str(ds.get("StudyInstanceUID", "")) != study_uid:
            return f"{where} belongs to another study than the job's: refusing to mix studies"
        key = dataset_patient_key(ds, study_uid)
        field = patient_conflict(held, key)
        if field is not None:
            return (
                f"{where} has another {field} than the instances before it: "
                "refusing to mix patients"
            )
        held = merged_patient_key(held, key)
    return None


def _frozen(value: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    return None if value is None else MappingProxyType(dict(value))


def _plain(value: Any) -> Any:
    """JSON-ready copy: mappings to dicts, tuples to lists."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True, slots=True)
class Instance:
    """One instance safely in the spool: what the receiver's ``on_instance`` callback receives.

    The callback is also called when the SOP instance was already in the spool (the PACS resent
    it, possibly because the previous attempt got a failure status), so recording it must be
    idempotent on ``sop_instance_uid``.

    Raises
    ------
    TypeError, ValueError
        A field has the wrong type or value (an empty UID, an absolute path, a negative size).
    """

    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    modality: str | None
    path: str
    """Relative to ``storage`` (``spool/<study>/<series>/<sop>.dcm``)."""
    size: int
    calling_ae: str | None
    transfer_syntax: str | None
    received_at: float
    """``time.time()`` when the C-STORE request was handled."""
    patient_key: str | None = None
    """The study's patient as hashes (:func:`patient_key`); checked, not kept per instance."""

    def __post_init__(self) -> None:
        # on the C-STORE path: plain checks only
        for name in ("sop_instance_uid", "sop_class_uid", "study_uid", "series_uid", "path"):
            _text(name, getattr(self, name))
        if self.path.startswith("/"):
            raise ValueError(f"`path` must be relative to storage, not {self.path!r}")
        for name in ("modality", "calling_ae", "transfer_syntax"):
            _text(name, getattr(self, name), optional=True)
        if self.modality is not None and len(self.modality) > MODALITY_MAX:
            # a CS value is at most 16 characters (PS3.5); a longer one from a broken or hostile
            # sender is cut to the column's width, so that SQLite and PostgreSQL (which enforces
            # VARCHAR(16)) store the same and neither refuses the instance
            object.__setattr__(self, "modality", self.modality[:MODALITY_MAX])
        _count("size", self.size, minimum=0)
        _seconds("received_at", self.received_at)

    def as_row(self) -> dict[str, Any]:
        """Column values of the ``instances`` table."""
        return {
            "sop_instance_uid": self.sop_instance_uid,
            "sop_class_uid": self.sop_class_uid,
            "study_uid": self.study_uid,
            "series_uid": self.series_uid,
            "modality": self.modality,
            "path": self.path,
            "size": self.size,
            "calling_ae": self.calling_ae,
            "transfer_syntax": self.transfer_syntax,
            "received_at": self.received_at,
        }

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> Instance:
        return cls(**{f.name: row[f.name] for f in fields(cls) if f.name in row})


InstanceRecord = Instance
"""The receiver's name for :class:`Instance` (``dicom_node.receive.scp`` imports it)."""


@dataclass(frozen=True, slots=True)
class Series:
    """A series as the store has recorded it so far."""

    series_uid: str
    study_uid: str
    modality: str | None
    n_instances: int
    first_received: float
    last_received: float

    def __post_init__(self) -> None:
        _text("series_uid", self.series_uid)
        _text("study_uid", self.study_uid)
        _text("modality", self.modality, optional=True)
        _count("n_instances", self.n_instances, minimum=1)
        _seconds("first_received", self.first_received)
        _seconds("last_received", self.last_received)

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> Series:
        return cls(**{f.name: row[f.name] for f in fields(cls)})


@dataclass(frozen=True, slots=True)
class Job:
    """One job: a (series, rule) on its way from ``received`` to ``done``.

    The fields are the columns of the ``jobs`` table; :meth:`to_json` writes them under those
    names (``dicom-node jobs --json``).

    Raises
    ------
    TypeError, ValueError
        A field has the wrong type or value (``state`` not a :class:`JobState`, ``id`` below 1,
        a negative attempt count, an unknown ``kind``).
    """

    id: int
    series_uid: str
    study_uid: str
    kind: str
    state: JobState
    rule: str | None
    rules_version: str | None
    model_ref: str | None
    model_name: str | None
    model_version: str | None
    model_alias: str | None
    model_sha256: str | None
    destinations: tuple[str, ...] | None
    delivered: tuple[str, ...] | None
    complete_instances: int | None
    complete_idle: float | None
    attempts: int
    export_attempts: int
    next_attempt_at: float
    lease_until: float | None
    created_at: float
    updated_at: float
    queued_at: float | None
    started_at: float | None
    finished_at: float | None
    n_instances: int | None
    """How many instances the result was (or is being) built from."""
    seg_path: str | None
    """The SEG, relative to ``storage``, once built."""
    seg_sop_uid: str | None
    outcome: str | None
    """Human-readable: why it was skipped, what was delivered."""
    error: str | None
    details: Mapping[str, Any] | None
    owner: str | None = None
    """The process holding the job's lease (``processes.id``), while running or exporting."""

    def __post_init__(self) -> None:
        _count("id", self.id, minimum=1)
        _text("series_uid", self.series_uid)
        _text("study_uid", self.study_uid)
        if self.kind not in JOB_KINDS:
            raise ValueError(f"`kind` must be one of {JOB_KINDS}, not {self.kind!r}")
        if not isinstance(self.state, JobState):
            raise TypeError(f"`state` must be a JobState, not {self.state!r}")
        for name in ("rule", "rules_version", "model_ref", "model_name", "model_version"):
            _text(name, getattr(self, name), optional=True)
        for name in ("model_alias", "model_sha256", "seg_path", "seg_sop_uid", "owner"):
            _text(name, getattr(self, name), optional=True)
        _names("destinations", self.destinations)
        _names("delivered", self.delivered)
        _count("complete_instances", self.complete_instances, minimum=1, optional=True)
        _seconds("complete_idle", self.complete_idle, optional=True)
        _count("attempts", self.attempts, minimum=0)
        _count("export_attempts", self.export_attempts, minimum=0)
        _count("n_instances", self.n_instances, minimum=0, optional=True)
        for name in ("next_attempt_at", "created_at", "updated_at"):
            _seconds(name, getattr(self, name))
        for name in ("lease_until", "queued_at", "started_at", "finished_at"):
            _seconds(name, getattr(self, name), optional=True)
        for name in ("outcome", "error"):
            if not isinstance(getattr(self, name), str | None):
                raise TypeError(f"`{name}` must be a str or None, not {getattr(self, name)!r}")
        if self.details is not None and not isinstance(self.details, Mapping):
            raise TypeError(f"`details` must be a mapping or None, not {self.details!r}")

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> Job:
        """Build from a ``jobs`` row (JSON lists become tuples, ``state`` a :class:`JobState`)."""
        values = {f.name: row[f.name] for f in fields(cls)}
        values["state"] = JobState(values["state"])
        for name in ("destinations", "delivered"):
            if values[name] is not None:
                values[name] = tuple(values[name])
        values["details"] = _frozen(values["details"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The job as plain JSON-ready values, keyed by column name."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    def to_json(self) -> str:
        """The job as one JSON line (for ``dicom-node jobs --json`` and the audit log)."""
        return json.dumps(self.to_dict(), default=str, sort_keys=True)


@dataclass(frozen=True, slots=True)
class Route:
    """One matching rule's decision for a series: what :meth:`JobStore.route` records on a job.

    Raises
    ------
    TypeError, ValueError
        A field has the wrong type or value (an empty rule name, ``complete_instances`` below 1).
    """

    rule: str
    model_ref: str
    """``<model>@<alias>`` or ``<model>:<version>``, resolved when the job first runs."""
    destinations: tuple[str, ...] = ()
    complete_instances: int | None = None
    complete_idle: float | None = None

    def __post_init__(self) -> None:
        _text("rule", self.rule)
        _text("model_ref", self.model_ref)
        _names("destinations", self.destinations)
        _count("complete_instances", self.complete_instances, minimum=1, optional=True)
        _seconds("complete_idle", self.complete_idle, optional=True)

    def as_values(self) -> dict[str, Any]:
        """Column values of the ``jobs`` table."""
        return {
            "rule": self.rule,
            "model_ref": self.model_ref,
            "destinations": list(self.destinations),
            "complete_instances": self.complete_instances,
            "complete_idle": self.complete_idle,
        }


@dataclass(frozen=True, slots=True)
class ShadowResult:
    """What a shadow version made of a production job's series: never exported, only compared.

    Raises
    ------
    TypeError, ValueError
        A field has the wrong type or value (an agreement outside 0..1, ``job_id`` below 1).
    """

    id: int
    job_id: int
    """The production job whose frames the shadow version ran on."""
    model: str
    version: str
    production_version: str | None
    agreement: Mapping[str, float]
    """Dice agreement with the production masks, per segment key (3-D: pooled over the
    series); a segment both versions left empty has no entry (no evidence)."""
    created_at: float
    scores: Mapping[str, Mapping[str, float | None]] | None = None
    """Per segment key ``{"dice", "iou", "hd95_mm"}`` over the whole series (HD95 in mm from
    its geometry); a value is None where there is none (both empty: all three; one empty:
    HD95). None for runs recorded before these were kept."""

    def __post_init__(self) -> None:
        _count("id", self.id, minimum=1)
        _count("job_id", self.job_id, minimum=1)
        _text("model", self.model)
        _text("version", self.version)
        _text("production_version", self.production_version, optional=True)
        _agreement(self.agreement)
        _seconds("created_at", self.created_at)
        if self.scores is not None:
            _scores(self.scores)

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> ShadowResult:
        values: dict[str, Any] = {f.name: row.get(f.name) for f in fields(cls)}
        values["agreement"] = _frozen(values["agreement"])
        if values["scores"] is not None:
            values["scores"] = _frozen_scores(values["scores"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}


@dataclass(frozen=True, slots=True)
class SegResult:
    """One SEG a job built (a series split into groups gets one per group) and where it went.

    Raises
    ------
    TypeError, ValueError
        A field has the wrong type or value (an empty path, ``position`` below 0).
    """

    position: int
    """The group's index (0: the largest group, the one ``Job.seg_path`` names)."""
    path: str
    """The SEG file, relative to ``storage``."""
    sop_uid: str
    group_key: str | None = None
    """What the group's sources share (size, orientation, Frame of Reference hash); no UIDs."""
    n_frames: int | None = None
    delivered: tuple[str, ...] = ()
    """Destination names that have this SEG."""

    def __post_init__(self) -> None:
        _count("position", self.position, minimum=0)
        _text("path", self.path)
        _text("sop_uid", self.sop_uid)
        _text("group_key", self.group_key, optional=True)
        _count("n_frames", self.n_frames, minimum=0, optional=True)
        _names("delivered", self.delivered)

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> SegResult:
        """Build from a ``seg_results`` row."""
        return cls(
            position=row["position"],
            path=row["path"],
            sop_uid=row["sop_uid"],
            group_key=row["group_key"],
            n_frames=row["n_frames"],
            delivered=tuple(row["delivered"] or ()),
        )

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}


def _agreement(value: object) -> None:
    if not isinstance(value, Mapping):
        raise TypeError(f"`agreement` must be a mapping of segment to Dice, not {value!r}")
    for key, dice in value.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"`agreement` keys must be segment keys (str), not {key!r}")
        if not isinstance(dice, int | float) or isinstance(dice, bool) or not 0.0 <= dice <= 1.0:
            raise ValueError(f"`agreement[{key!r}]` must be a number in [0, 1], not {dice!r}")


def check_agreement(agreement: Mapping[str, float]) -> dict[str, float]:
    """Validate per-segment agreement before it is written; return it as a plain dict."""
    _agreement(agreement)
    return {k: float(v) for k, v in agreement.items()}


SHADOW_SCORES = ("dice", "iou", "hd95_mm")
"""What :attr:`ShadowResult.scores` holds per segment."""


def _score(name: str, value: object, upper: float | None) -> None:
    if value is None:
        return
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number or None, not {value!r}")
    if value < 0.0 or (upper is not None and value > upper):
        span = f"in [0, {upper:g}]" if upper is not None else ">= 0"
        raise ValueError(f"`{name}` must be a number {span} or None, not {value!r}")


def _scores(value: object) -> None:
    if not isinstance(value, Mapping):
        raise TypeError(f"`scores` must be a mapping of segment to scores, not {value!r}")
    for key, per in value.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"`scores` keys must be segment keys (str), not {key!r}")
        if not isinstance(per, Mapping) or set(per) != set(SHADOW_SCORES):
            raise ValueError(
                f"`scores[{key!r}]` must map exactly {', '.join(SHADOW_SCORES)}, not {per!r}"
            )
        _score(f"scores[{key!r}].dice", per["dice"], 1.0)
        _score(f"scores[{key!r}].iou", per["iou"], 1.0)
        _score(f"scores[{key!r}].hd95_mm", per["hd95_mm"], None)


def _frozen_scores(value: Mapping[str, Any]) -> Mapping[str, Mapping[str, float | None]]:
    return MappingProxyType({k: MappingProxyType(dict(v)) for k, v in value.items()})


def check_scores(
    scores: Mapping[str, Mapping[str, float | None]],
) -> dict[str, dict[str, float | None]]:
    """Validate per-segment shadow scores before they are written; return plain dicts.

    NaN (an undefined HD95) is refused, not stored: PostgreSQL's JSON refuses it; the caller
    says None.
    """
    _scores(scores)
    return {k: {name: _float_or_none(v[name]) for name in SHADOW_SCORES} for k, v in scores.items()}


def _float_or_none(value: float | None) -> float | None:
    return None if value is None else float(value)


__all__ = [
    "JOB_KINDS",
    "PATIENT_FIELDS",
    "IdentityConflict",
    "Instance",
    "InstanceRecord",
    "Job",
    "Route",
    "SegResult",
    "Series",
    "ShadowResult",
    "check_agreement",
    "check_scores",
    "dataset_patient_key",
    "merged_patient_key",
    "one_patient_one_study",
    "patient_conflict",
    "patient_key",
    "validate_uid",
]
