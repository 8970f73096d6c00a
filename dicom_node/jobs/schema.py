"""The job store's tables, and building its engine once (SQLite pragmas, schema version).

SQLAlchemy Core, so the same statements run on SQLite (the embedded default, WAL) and PostgreSQL
(psycopg 3). Only the modules of :mod:`dicom_node.jobs` touch these tables; every other room goes
through :class:`dicom_node.jobs.store.JobStore` and its records.

:data:`metadata` is the schema of this version, the head of the migration chain in
:mod:`dicom_node.jobs.migrations` (a test compares the two on both databases). A change to a
table here needs a new revision there.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import make_url

LOGGER = logging.getLogger(__name__)

READ_ONLY = "dicom_node_read_only"
"""Execution option marking a read-only transaction (a deferred ``BEGIN`` on SQLite)."""

PRODUCTION = "production"
"""``jobs.kind`` of every job. Kept as a column (and in the unique key) for databases written
when shadow runs were stored as ``kind = 'shadow'`` jobs (revision 0002 of
:mod:`dicom_node.jobs.migrations` moves those to ``shadow_results``)."""

FileSize = BigInteger().with_variant(Integer(), "sqlite")
"""Bytes of a file: 64-bit on PostgreSQL (an instance may pass 2 GiB); SQLite's INTEGER is 64-bit
already, and stays INTEGER there so that stores of the first release need no table rebuild."""


def _wider(width: int, first_release: int) -> Any:
    """VARCHAR(``width``), where the first release had ``first_release``: model versions and
    references may be longer than it allowed (:mod:`dicom_node.modelstore.refs`), and PostgreSQL
    enforces the width. SQLite keeps the old declaration (it enforces none: no table rebuild)."""
    return String(width).with_variant(String(first_release), "sqlite")


metadata = MetaData()

instances = Table(
    "instances",
    metadata,
    Column("sop_instance_uid", String(64), primary_key=True),
    Column("series_uid", String(64), nullable=False, index=True),
    Column("study_uid", String(64), nullable=False),
    Column("sop_class_uid", String(64), nullable=False),
    Column("modality", String(16)),
    Column("path", Text, nullable=False),  # relative to storage
    Column("size", FileSize, nullable=False),
    Column("calling_ae", String(16)),
    Column("transfer_syntax", String(64)),
    Column("received_at", Float, nullable=False),
)

series = Table(
    "series",
    metadata,
    Column("series_uid", String(64), primary_key=True),
    Column("study_uid", String(64), nullable=False),
    Column("modality", String(16)),
    Column("n_instances", Integer, nullable=False, default=0),
    Column("first_received", Float, nullable=False),
    Column("last_received", Float, nullable=False),
)

studies = Table(
    "studies",
    metadata,
    Column("study_uid", String(64), primary_key=True),
    # The patient as hashes of PatientID, PatientName and PatientBirthDate
    # (records.patient_key): enough to refuse another patient's instance under this study UID,
    # and no patient data in the job store. Added after the first release: create_all adds the
    # table to an existing store, whose older studies get their row from their next instance.
    Column("patient_key", String(64)),
    Column("first_received", Float, nullable=False),
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("series_uid", String(64), nullable=False, index=True),
    Column("study_uid", String(64), nullable=False),
    Column("kind", String(16), nullable=False, default=PRODUCTION),
    Column("state", String(16), nullable=False, index=True),
    Column("rule", String(128)),
    Column("rules_version", String(32)),
    Column("model_ref", _wider(192, 128)),  # <name>:<version>, 64 + 1 + 64
    Column("model_name", String(64)),
    Column("model_version", _wider(64, 32)),
    Column("model_alias", String(32)),
    Column("model_sha256", String(64)),
    Column("destinations", JSON),
    Column("delivered", JSON),
    Column("complete_instances", Integer),
    Column("complete_idle", Float),
    Column("attempts", Integer, nullable=False, default=0),
    Column("export_attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", Float, nullable=False, default=0.0),
    Column("lease_until", Float),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("queued_at", Float),
    Column("started_at", Float),
    Column("finished_at", Float),
    Column("n_instances", Integer),
    Column("seg_path", Text),
    Column("seg_sop_uid", String(64)),
    Column("outcome", Text),  # human-readable: why skipped, what was delivered
    Column("error", Text),
    Column("details", JSON),
    Column("owner", String(64)),  # id of the process holding the job's lease (processes.id)
    UniqueConstraint("series_uid", "rule", "kind", name="uq_job_series_rule_kind"),
    # take-back of jobs whose lease ran out (jobs/processes.py) and overdue_running
    Index("ix_jobs_state_lease_until", "state", "lease_until"),
)

processes = Table(
    "processes",
    metadata,
    # One row per `dicom-node serve` process (jobs/processes.py): registered at start,
    # heartbeat every heartbeat_interval, stopped_at on a graceful stop.
    Column("id", String(64), primary_key=True),  # <host>:<pid>:<random>
    Column("role", String(16), nullable=False),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("version", String(32)),
    Column("started_at", Float, nullable=False),
    Column("heartbeat_at", Float, nullable=False),
    Column("stopped_at", Float),
    Column("details", JSON),
)

shadow_results = Table(
    "shadow_results",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", Integer, ForeignKey("jobs.id"), nullable=False, index=True),
    Column("model", String(64), nullable=False),
    Column("version", _wider(64, 32), nullable=False),
    Column("production_version", _wider(64, 32)),
    Column("agreement", JSON, nullable=False),  # segment key -> Dice with the production masks
    Column("created_at", Float, nullable=False),
    # segment key -> {dice, iou, hd95_mm} over the series, None where undefined (revision
    # 0004); null on runs recorded before
    Column("scores", JSON),
    UniqueConstraint("job_id", "model", name="uq_shadow_job_model"),
)


seg_results = Table(
    "seg_results",
    metadata,
    # One row per SEG a job built: a series that splits into groups (matrix size, orientation,
    # Frame of Reference) gets one SEG per group. Added after the first release, as its own
    # table so that create_all adds it to an existing store; jobs.seg_path still names the
    # first (group 0) SEG, so code and stores that know one SEG per job keep working.
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", Integer, ForeignKey("jobs.id"), nullable=False, index=True),
    Column("position", Integer, nullable=False),  # the group's index: 0 is the largest group
    Column("path", Text, nullable=False),  # relative to storage
    Column("sop_uid", String(64), nullable=False),
    Column("group_key", Text),  # what the group shares, no patient data (SourceGroup.key)
    Column("n_frames", Integer),
    Column("delivered", JSON),  # destination names that have this SEG
    Column("created_at", Float, nullable=False),
    UniqueConstraint("job_id", "position", name="uq_seg_result_job_position"),
)


class StoreError(Exception):
    """The job store cannot be opened; the message says why and what to do (no password)."""


def safe_url(url: str) -> str:
    """``url`` with its password masked (``***``), for every message, log line and status."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL at all: say nothing of it
        return "(unparsable database URL)"


def sqlite_url(storage: Path) -> str:
    """The URL of the embedded SQLite store ``jobs.db`` under ``storage``."""
    return f"sqlite:///{Path(storage) / 'jobs.db'}"


def _sqlite_pragmas(engine: Engine) -> None:
    """WAL, ``synchronous=NORMAL``, and ``BEGIN IMMEDIATE`` so writers queue instead of failing
    on a lock upgrade."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves
        cur = dbapi_conn.cursor()
        # first: the switch to WAL itself waits for another connection's lock (a process
        # migrating the store at start) instead of failing with "database is locked"
        cur.execute("PRAGMA busy_timeout=60000")
        cur.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL: a commit survives a process crash; after a power cut the start-up
        # reconciliation (jobs/reconcile.py) re-records spooled instances from their fsynced
        # files. FULL would add a third disk flush to every C-STORE.
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # readers take no write lock (WAL: they never block the receiver's writes)
        read_only = conn.get_execution_options().get(READ_ONLY, False)
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by None (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def json_dumps(value: Any) -> str:
    """The JSON columns' serialiser on both databases: a score that is not a number (an
    undefined distance of two empty masks) is stored as null. PostgreSQL refuses ``NaN`` in
    JSON, SQLite would keep it: one rule for both."""
    try:
        return json.dumps(value, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(value), allow_nan=False)


def engine_for(url_or_path: str | Path) -> Engine:
    """The engine of a database URL or an SQLite file path, without touching its schema.

    An SQLite path's folder is created; SQLite gets the pragmas of :func:`_sqlite_pragmas`.
    PostgreSQL runs at its default READ COMMITTED: every state change is one conditional
    ``UPDATE``, claims lock with ``FOR UPDATE SKIP LOCKED``.
    """
    url = str(url_or_path)
    if "://" not in url:
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{url}"
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database:
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")  # the driver dicom-node ships
    options: dict[str, Any] = {}
    if parsed.get_backend_name() == "postgresql":
        # a server restarted under a running node: a dead pooled connection is replaced, not
        # handed to the receiver; the pool matches the threads that write (associations, workers)
        options.update(pool_pre_ping=True, pool_size=10, max_overflow=30)
    engine = create_engine(parsed, future=True, json_serializer=json_dumps, **options)
    if engine.dialect.name == "sqlite":
        _sqlite_pragmas(engine)
    return engine


def create(url_or_path: str | Path, migrate: str = "auto") -> Engine:
    """Build the engine once for a database URL or an SQLite file path; bring its schema to
    this version's (see :func:`dicom_node.jobs.migrations.prepare`).

    Parameters
    ----------
    url_or_path:
        A SQLAlchemy URL (``postgresql+psycopg://...``), or the path of an SQLite file (its
        folder is created).
    migrate:
        ``auto``: upgrade a store of an older version; ``never``: refuse it
        (:class:`StoreError` naming ``dicom-node migrate``).

    Returns
    -------
    Engine
        Shared by every stage of the process.

    Raises
    ------
    StoreError
        The database cannot be reached, or its schema is of a newer version, unknown, or (with
        ``migrate="never"``) older than this version's.
    """
    import dicom_node.jobs.migrations as migrations  # the chain imports these tables

    engine = engine_for(url_or_path)
    try:
        migrations.prepare(engine, migrate=migrate)
    except BaseException:
        engine.dispose()
        raise
    return engine
