"""The job store's tables, and building its engine once (SQLite pragmas, table creation).

SQLAlchemy Core, so the same statements run on SQLite (the embedded default, WAL) and PostgreSQL.
Only the modules of :mod:`dicom_node.jobs` touch these tables; every other room goes through
:class:`dicom_node.jobs.store.JobStore` and its records.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    Connection,
    Engine,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    insert,
    select,
)

LOGGER = logging.getLogger(__name__)

READ_ONLY = "dicom_node_read_only"
"""Execution option marking a read-only transaction (a deferred ``BEGIN`` on SQLite)."""

PRODUCTION = "production"
"""``jobs.kind`` of every job. Kept as a column (and in the unique key) for databases written
when shadow runs were stored as ``kind = 'shadow'`` jobs; see :func:`_migrate_shadow_jobs`."""

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
    Column("size", Integer, nullable=False),
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
    Column("model_ref", String(128)),
    Column("model_name", String(64)),
    Column("model_version", String(32)),
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
    UniqueConstraint("series_uid", "rule", "kind", name="uq_job_series_rule_kind"),
)

shadow_results = Table(
    "shadow_results",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", Integer, ForeignKey("jobs.id"), nullable=False, index=True),
    Column("model", String(64), nullable=False),
    Column("version", String(32), nullable=False),
    Column("production_version", String(32)),
    Column("agreement", JSON, nullable=False),  # segment key -> Dice with the production masks
    Column("created_at", Float, nullable=False),
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


def _sqlite_pragmas(engine: Engine) -> None:
    """WAL, ``synchronous=NORMAL``, and ``BEGIN IMMEDIATE`` so writers queue instead of failing
    on a lock upgrade."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL: a commit survives a process crash; after a power cut the start-up
        # reconciliation (jobs/reconcile.py) re-records spooled instances from their fsynced
        # files. FULL would add a third disk flush to every C-STORE.
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=60000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # readers take no write lock (WAL: they never block the receiver's writes)
        read_only = conn.get_execution_options().get(READ_ONLY, False)
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def create(url_or_path: str | Path) -> Engine:
    """Build the engine once for a database URL or an SQLite file path; create the tables.

    Parameters
    ----------
    url_or_path:
        A SQLAlchemy URL (``postgresql+psycopg://...``), or the path of an SQLite file (its
        folder is created).

    Returns
    -------
    Engine
        Shared by every stage of the process.
    """
    url = str(url_or_path)
    if "://" not in url:
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{url}"
    engine = create_engine(url, future=True)
    if engine.dialect.name == "sqlite":
        _sqlite_pragmas(engine)
    metadata.create_all(engine)
    with engine.begin() as conn:
        _migrate_shadow_jobs(conn)
    return engine


def _migrate_shadow_jobs(conn: Connection) -> None:
    """Move shadow runs stored as ``kind = 'shadow'`` jobs (before ``shadow_results``) over.

    Each becomes a result of the production job of its series and rule; one without such a job
    stays where it is (no query lists it). Idempotent: a second call finds nothing.
    """
    old = conn.execute(select(jobs).where(jobs.c.kind == "shadow")).mappings().all()
    moved = 0
    for row in old:
        parent = conn.execute(
            select(jobs.c.id).where(
                jobs.c.series_uid == row["series_uid"],
                jobs.c.rule == row["rule"],
                jobs.c.kind == PRODUCTION,
            )
        ).scalar()
        details = row["details"] or {}
        if parent is None or not row["model_name"] or not row["model_version"]:
            continue
        conn.execute(
            delete(shadow_results).where(
                shadow_results.c.job_id == parent, shadow_results.c.model == row["model_name"]
            )
        )
        conn.execute(
            insert(shadow_results).values(
                job_id=parent,
                model=row["model_name"],
                version=row["model_version"],
                production_version=details.get("production_version"),
                agreement=details.get("agreement") or {},
                created_at=row["finished_at"] or row["created_at"],
            )
        )
        conn.execute(delete(jobs).where(jobs.c.id == row["id"]))
        moved += 1
    if moved:
        LOGGER.info("moved %d shadow run(s) from the jobs table to shadow_results", moved)
