"""The job store: the only hand-off between the node's stages, and its source of truth.

Written with SQLAlchemy Core so the same statements run on SQLite (the embedded default, WAL) and
PostgreSQL. Every stage reads its work from here and writes its outcome back here; nothing is handed
over in memory only, so a restart after ``kill -9`` resumes from these tables.

A series' job moves through::

    received -> routed -> queued -> running -> exporting -> done
                   \\-> skipped (no rule matched / discarded)      \\-> failed (retry re-queues)

Workers claim jobs with one atomic ``UPDATE ... RETURNING`` (never read-then-write).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    Engine,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    bindparam,
    case,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    update,
)

from dicom_node.jobs.records import InstanceRecord

LOGGER = logging.getLogger(__name__)

LEASE_SECONDS = 300.0
"""How long a claimed job belongs to its worker before another process may take it over."""

READ_ONLY = "dicom_node_read_only"
"""Execution option marking a read-only transaction (a deferred ``BEGIN`` on SQLite)."""


class JobState(StrEnum):
    """States of a job; the order of the members is the order of the pipeline."""

    RECEIVED = "received"
    ROUTED = "routed"
    QUEUED = "queued"
    RUNNING = "running"
    EXPORTING = "exporting"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"


TERMINAL = (JobState.DONE.value, JobState.FAILED.value, JobState.SKIPPED.value)

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

jobs = Table(
    "jobs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("series_uid", String(64), nullable=False, index=True),
    Column("study_uid", String(64), nullable=False),
    Column("kind", String(16), nullable=False, default="production"),
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


def _sqlite_pragmas(engine: Engine) -> None:
    """WAL, full fsync, and ``BEGIN IMMEDIATE`` so writers queue instead of failing on upgrade."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL: a commit survives a process crash; after a power cut the start-up
        # reconciliation (pipeline/reconcile.py) re-records spooled instances from their fsynced
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
    """Build the engine once for a database URL or an SQLite file path and create the tables."""
    url = str(url_or_path)
    if "://" not in url:
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{url}"
    engine = create_engine(url, future=True)
    if engine.dialect.name == "sqlite":
        _sqlite_pragmas(engine)
    metadata.create_all(engine)
    return engine


class JobStore:
    """All reads and writes of job state. Thread-safe: every call is its own transaction.

    Parameters
    ----------
    engine:
        From :func:`create`; shared by every stage of this process.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @classmethod
    def open(cls, storage: Path) -> JobStore:
        """Open (creating if needed) the embedded SQLite store under ``storage``."""
        return cls(create(Path(storage) / "jobs.db"))

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _read(self) -> Iterator[Any]:
        """A read-only transaction: one consistent snapshot, no write lock."""
        with self.engine.connect() as conn:
            conn.execution_options(**{READ_ONLY: True})
            with conn.begin():
                yield conn

    # -- receiving --------------------------------------------------------------------------
    def record_instance(self, inst: InstanceRecord) -> bool:
        """Record a spooled instance; return False if its SOP Instance UID was already known.

        Creates the series and its ``received`` job on the first instance, and re-opens a series
        whose jobs had finished (a late instance means the result must be rebuilt). This runs on
        the C-STORE path, so its statements are built once (:data:`_HOT`) and only bound here.
        On SQLite the usual case (a known series, nothing to re-open) runs as plain SQL on a
        pooled DB-API connection (:meth:`_record_instance_sqlite`): SQLAlchemy's execution
        machinery cost ~0.3 ms of the ~0.45 ms per instance (cProfile of
        ``bench/bench_ingest.py --jobstore``).
        """
        if self.engine.dialect.name == "sqlite":
            recorded = self._record_instance_sqlite(inst)
            if recorded is not None:
                return recorded
        now = time.time()
        with self.engine.begin() as conn:
            if conn.execute(_HOT.known, {"uid": inst.sop_instance_uid}).first():
                return False
            conn.execute(_HOT.insert_instance, inst.__dict__)
            bumped = conn.execute(
                _HOT.bump_series, {"s_uid": inst.series_uid, "s_last": inst.received_at}
            ).rowcount
            if not bumped:
                conn.execute(
                    _HOT.insert_series,
                    {
                        "series_uid": inst.series_uid,
                        "study_uid": inst.study_uid,
                        "modality": inst.modality,
                        "n_instances": 1,
                        "first_received": inst.received_at,
                        "last_received": inst.received_at,
                    },
                )
                conn.execute(
                    _HOT.insert_job,
                    {
                        "series_uid": inst.series_uid,
                        "study_uid": inst.study_uid,
                        "kind": "production",
                        "state": JobState.RECEIVED.value,
                        "created_at": now,
                        "updated_at": now,
                        "next_attempt_at": 0.0,
                        "attempts": 0,
                        "export_attempts": 0,
                    },
                )
            else:
                self._reopen(conn, inst.series_uid, now)
        return True

    def _record_instance_sqlite(self, inst: InstanceRecord) -> bool | None:
        """:meth:`record_instance` for an instance of a known series with no job to re-open.

        The same statements in one ``BEGIN IMMEDIATE`` transaction (as the engine's ``begin``
        hook issues), committed here. Returns None, with nothing written, when the instance
        needs the general path (first instance of its series, or a job to re-open).
        """
        pooled = self.engine.raw_connection()  # with the connect-time PRAGMAs (WAL, NORMAL)
        try:
            db = pooled.driver_connection
            db.execute("BEGIN IMMEDIATE")
            try:
                if db.execute(_RAW.known, (inst.sop_instance_uid,)).fetchone():
                    db.execute("ROLLBACK")
                    return False
                db.execute(_RAW.insert_instance, inst.__dict__)
                bumped = db.execute(_RAW.bump_series, (inst.received_at, inst.series_uid))
                if (
                    not bumped.rowcount
                    or db.execute(_RAW.reopenable, (inst.series_uid,)).fetchone()
                ):
                    db.execute("ROLLBACK")
                    return None
                db.execute("COMMIT")
                return True
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        finally:
            pooled.close()

    def _reopen(self, conn: Any, series_uid: str, now: float) -> None:
        """A late instance: finished or queued production jobs go back to ``routed``.

        A finished job is rebuilt (its SEG gets the same UIDs, so the PACS replaces it); a
        queued job waits for its completion rule again. A job in a worker (``running`` or
        ``exporting``) is left alone here: :meth:`done` and :meth:`fail` send it back to
        ``routed`` when the series has grown past the instances it was built from.
        """
        conn.execute(_HOT.reopen_finished, {"s_uid": series_uid, "r_now": now})
        conn.execute(_HOT.requeue_queued, {"s_uid": series_uid, "r_now": now})

    # -- routing and completion ---------------------------------------------------------------
    def jobs_in(self, state: JobState, limit: int = 500) -> list[dict[str, Any]]:
        """Jobs in ``state``, oldest first."""
        with self._read() as conn:
            rows = conn.execute(
                select(jobs).where(jobs.c.state == state.value).order_by(jobs.c.id).limit(limit)
            ).mappings()
            return [dict(r) for r in rows]

    def routed_with_series(self, limit: int = 500) -> list[dict[str, Any]]:
        """``routed`` jobs, oldest first, each with its series' ``series_n_instances`` and
        ``last_received`` (one query for the whole completion check)."""
        stmt = (
            select(
                jobs,
                series.c.n_instances.label("series_n_instances"),
                series.c.last_received,
            )
            .select_from(jobs.join(series, series.c.series_uid == jobs.c.series_uid))
            .where(jobs.c.state == JobState.ROUTED.value)
            .order_by(jobs.c.id)
            .limit(limit)
        )
        with self._read() as conn:
            return [dict(r) for r in conn.execute(stmt).mappings()]

    def series_info(self, series_uid: str) -> dict[str, Any] | None:
        with self._read() as conn:
            row = conn.execute(select(series).where(series.c.series_uid == series_uid)).mappings()
            first = row.first()
            return dict(first) if first else None

    def series_instances(self, series_uid: str) -> list[dict[str, Any]]:
        """Instances of a series in arrival order."""
        with self._read() as conn:
            rows = conn.execute(
                select(instances)
                .where(instances.c.series_uid == series_uid)
                .order_by(instances.c.received_at, instances.c.sop_instance_uid)
            ).mappings()
            return [dict(r) for r in rows]

    def route(self, job_id: int, routes: Sequence[dict[str, Any]], rules_version: str) -> None:
        """Record the routing decision of a ``received`` job.

        ``routes`` holds one mapping per matching rule (keys: rule, model_ref, destinations,
        complete_instances, complete_idle); the first reuses the job, the others get new jobs.
        An empty list is never passed here: see :meth:`skip`.
        """
        now = time.time()
        with self.engine.begin() as conn:
            job = conn.execute(select(jobs).where(jobs.c.id == job_id)).mappings().first()
            if job is None or job["state"] != JobState.RECEIVED.value:
                return
            for i, route in enumerate(routes):
                values = dict(
                    route, state=JobState.ROUTED.value, rules_version=rules_version, updated_at=now
                )
                if i == 0:
                    conn.execute(update(jobs).where(jobs.c.id == job_id).values(**values))
                else:
                    conn.execute(
                        insert(jobs).values(
                            series_uid=job["series_uid"],
                            study_uid=job["study_uid"],
                            kind="production",
                            created_at=now,
                            next_attempt_at=0.0,
                            attempts=0,
                            export_attempts=0,
                            **values,
                        )
                    )

    def skip(self, job_id: int, outcome: str, rule: str | None, rules_version: str) -> None:
        """End a ``received`` job without action (no rule matched, or a discard rule)."""
        self._set(
            job_id,
            JobState.SKIPPED,
            only_from=JobState.RECEIVED,
            outcome=outcome,
            rule=rule,
            rules_version=rules_version,
            finished_at=time.time(),
        )

    def queue(self, job_id: int, n_instances: int) -> bool:
        """Mark a ``routed`` job's series complete; return True if this call queued it."""
        return self._set(
            job_id,
            JobState.QUEUED,
            only_from=JobState.ROUTED,
            n_instances=n_instances,
            queued_at=time.time(),
            next_attempt_at=0.0,
        )

    # -- workers --------------------------------------------------------------------------------
    def claim(self, lease: float = LEASE_SECONDS) -> dict[str, Any] | None:
        """Atomically take the next job to work on: a queued job, or an export due for a retry.

        Returns the job as it is after the claim (state ``running`` for a queued job, unchanged
        ``exporting`` for an export retry), or None when nothing is due.
        """
        now = time.time()
        if not self._anything_due(now):  # a cheap read first: most polls find nothing
            return None
        due = (
            select(jobs.c.id)
            .where(
                ((jobs.c.state == JobState.QUEUED.value) & (jobs.c.next_attempt_at <= now))
                | (
                    (jobs.c.state == JobState.EXPORTING.value)
                    & (jobs.c.next_attempt_at <= now)
                    & ((jobs.c.lease_until.is_(None)) | (jobs.c.lease_until < now))
                )
            )
            .order_by(jobs.c.next_attempt_at, jobs.c.id)
            .limit(1)
            .scalar_subquery()
        )
        stmt = (
            update(jobs)
            .where(jobs.c.id == due)
            .values(
                state=case(
                    (jobs.c.state == JobState.QUEUED.value, JobState.RUNNING.value),
                    else_=jobs.c.state,
                ),
                lease_until=now + lease,
                updated_at=now,
                started_at=func.coalesce(jobs.c.started_at, now),
                attempts=jobs.c.attempts + 1,
            )
            .returning(*jobs.c)
        )
        with self.engine.begin() as conn:
            row = conn.execute(stmt).mappings().first()
            return dict(row) if row else None

    def _anything_due(self, now: float) -> bool:
        stmt = (
            select(jobs.c.id)
            .where(
                jobs.c.state.in_([JobState.QUEUED.value, JobState.EXPORTING.value]),
                jobs.c.next_attempt_at <= now,
            )
            .limit(1)
        )
        with self._read() as conn:
            return conn.execute(stmt).first() is not None

    def resolved(
        self, job_id: int, name: str, version: str, alias: str | None, sha256: str
    ) -> None:
        """Record the model version a job resolved to; it finishes on this version."""
        self._update(
            job_id, model_name=name, model_version=version, model_alias=alias, model_sha256=sha256
        )

    def exporting(
        self, job_id: int, seg_path: str, seg_sop_uid: str, details: dict[str, Any] | None = None
    ) -> None:
        """The SEG is built and on disk; the job now only has to be delivered."""
        self._set(
            job_id,
            JobState.EXPORTING,
            seg_path=seg_path,
            seg_sop_uid=seg_sop_uid,
            next_attempt_at=0.0,
            details=details,
        )

    def delivered(self, job_id: int, destinations: list[str]) -> None:
        self._update(job_id, delivered=destinations)

    def export_retry(self, job_id: int, delay: float, error: str) -> None:
        """An export attempt failed; try again after ``delay`` seconds."""
        with self.engine.begin() as conn:
            conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id)
                .values(
                    next_attempt_at=time.time() + delay,
                    lease_until=None,
                    error=error,
                    export_attempts=jobs.c.export_attempts + 1,
                    updated_at=time.time(),
                )
            )

    def used_instances(self, job_id: int, n_instances: int) -> None:
        """Record how many instances the worker read for the result it is building."""
        self._update(job_id, n_instances=n_instances)

    def done(self, job_id: int, outcome: str) -> JobState:
        """End a job as delivered; return its new state.

        ``ROUTED`` instead of ``DONE`` when instances arrived after the worker read the series
        (``n_instances`` of the job is below the series'): the result is rebuilt with them.
        """
        return self._finish(
            job_id,
            JobState.DONE,
            outcome=outcome,
            error=None,
            lease_until=None,
            finished_at=time.time(),
        )

    def fail(self, job_id: int, error: str) -> JobState:
        """End a job as failed with ``error``; return its new state (see :meth:`done`)."""
        return self._finish(
            job_id, JobState.FAILED, error=error, lease_until=None, finished_at=time.time()
        )

    def _finish(self, job_id: int, state: JobState, **values: Any) -> JobState:
        now = time.time()
        with self.engine.begin() as conn:
            row = conn.execute(
                select(jobs.c.kind, jobs.c.n_instances, jobs.c.rule, series.c.n_instances)
                .select_from(jobs.join(series, series.c.series_uid == jobs.c.series_uid))
                .where(jobs.c.id == job_id)
            ).first()
            conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id)
                .values(state=state.value, updated_at=now, **values)
            )
            if (
                row is not None
                and row[0] == "production"
                and row[2] is not None
                and row[1] is not None
                and row[3] > row[1]
            ):
                LOGGER.info(
                    "job %s: %d instance(s) arrived while it ran: rebuilding",
                    job_id,
                    row[3] - row[1],
                )
                conn.execute(update(jobs).where(jobs.c.id == job_id).values(**_reopened(now)))
                return JobState.ROUTED
        return state

    def release(self, job_id: int) -> None:
        """Give back a job this process claimed but did not start (the node is stopping)."""
        now = time.time()
        with self.engine.begin() as conn:
            conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.state == JobState.RUNNING.value)
                .values(state=JobState.QUEUED.value, lease_until=None, updated_at=now)
            )
            conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.state == JobState.EXPORTING.value)
                .values(lease_until=None, updated_at=now)
            )

    def release_running(self) -> int:
        """After a restart of the only node: give every interrupted job back to the queue."""
        now = time.time()
        with self.engine.begin() as conn:
            n = conn.execute(
                update(jobs)
                .where(jobs.c.state == JobState.RUNNING.value)
                .values(state=JobState.QUEUED.value, lease_until=None, updated_at=now)
            ).rowcount
            n += conn.execute(
                update(jobs)
                .where(jobs.c.state == JobState.EXPORTING.value)
                .values(lease_until=None, updated_at=now)
            ).rowcount
        return n

    def retry(self, job_id: int) -> dict[str, Any]:
        """Give a failed job another chance: re-export if its SEG exists, else re-run it.

        Raises
        ------
        KeyError
            No job with this id.
        ValueError
            The job is not failed.
        """
        job = self.get(job_id)
        if job is None:
            raise KeyError(f"no job with id {job_id}")
        if job["state"] != JobState.FAILED.value:
            raise ValueError(f"job {job_id} is {job['state']}, only failed jobs can be retried")
        target = JobState.EXPORTING if job["seg_path"] else JobState.QUEUED
        self._set(
            job_id,
            target,
            only_from=JobState.FAILED,
            error=None,
            next_attempt_at=0.0,
            lease_until=None,
            export_attempts=0,
            attempts=0,
            finished_at=None,
            outcome=f"retried from failed ({job['error']})",
        )
        return self.get(job_id) or job

    # -- reading ----------------------------------------------------------------
    def get(self, job_id: int) -> dict[str, Any] | None:
        with self._read() as conn:
            row = conn.execute(select(jobs).where(jobs.c.id == job_id)).mappings().first()
            return dict(row) if row else None

    def list_jobs(
        self, states: Sequence[str] | None = None, limit: int = 50, kind: str | None = None
    ) -> list[dict[str, Any]]:
        """Newest jobs first, optionally only in ``states``."""
        stmt = select(jobs).order_by(jobs.c.id.desc()).limit(limit)
        if states:
            stmt = stmt.where(jobs.c.state.in_(list(states)))
        if kind:
            stmt = stmt.where(jobs.c.kind == kind)
        with self._read() as conn:
            return [dict(r) for r in conn.execute(stmt).mappings()]

    def counts(self) -> dict[str, int]:
        """Number of jobs in each state (every state present, zero included)."""
        out = {s.value: 0 for s in JobState}
        with self._read() as conn:
            for state, n in conn.execute(select(jobs.c.state, func.count()).group_by(jobs.c.state)):
                out[state] = n
        return out

    def iter_all(self) -> Iterator[dict[str, Any]]:
        with self._read() as conn:
            rows = [dict(r) for r in conn.execute(select(jobs).order_by(jobs.c.id)).mappings()]
        yield from rows

    def add_shadow_result(
        self, parent: dict[str, Any], name: str, version: str, agreement: dict[str, float]
    ) -> None:
        """Record a shadow run (never exported) with its per-segment Dice agreement."""
        now = time.time()
        with self.engine.begin() as conn:
            conn.execute(
                delete(jobs).where(
                    jobs.c.series_uid == parent["series_uid"],
                    jobs.c.rule == parent["rule"],
                    jobs.c.kind == "shadow",
                )
            )
            conn.execute(
                insert(jobs).values(
                    series_uid=parent["series_uid"],
                    study_uid=parent["study_uid"],
                    kind="shadow",
                    state=JobState.DONE.value,
                    rule=parent["rule"],
                    model_ref=parent["model_ref"],
                    model_name=name,
                    model_version=version,
                    created_at=now,
                    updated_at=now,
                    finished_at=now,
                    next_attempt_at=0.0,
                    attempts=1,
                    export_attempts=0,
                    outcome="shadow: not exported",
                    details={"agreement": agreement, "production_version": parent["model_version"]},
                )
            )

    # -- internals --------------------------------------------------------------
    def _update(self, job_id: int, **values: Any) -> None:
        values["updated_at"] = time.time()
        with self.engine.begin() as conn:
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(**values))

    def _set(
        self, job_id: int, state: JobState, only_from: JobState | None = None, **values: Any
    ) -> bool:
        values.update(state=state.value, updated_at=time.time())
        stmt = update(jobs).where(jobs.c.id == job_id)
        if only_from is not None:
            stmt = stmt.where(jobs.c.state == only_from.value)
        with self.engine.begin() as conn:
            return bool(conn.execute(stmt.values(**values)).rowcount)


def _reopened(now: float) -> dict[str, Any]:
    """Column values that send a finished job back to ``routed`` to be rebuilt."""
    return {
        "state": JobState.ROUTED.value,
        "updated_at": now,
        "outcome": "re-opened: new instance",
        "error": None,
        "delivered": None,
        "seg_path": None,
        "lease_until": None,
        "queued_at": None,
        "finished_at": None,
        "attempts": 0,
        "export_attempts": 0,
    }


def to_json(job: dict[str, Any]) -> str:
    """A job as one JSON line (for ``dicom-node jobs --json`` and the audit log)."""
    return json.dumps(job, default=str, sort_keys=True)


class _HotStatements:
    """The C-STORE path's statements, built once: building a statement costs SQLAlchemy far
    more than executing it (measured: ~2 ms of the ~2.4 ms per instance before)."""

    def __init__(self) -> None:
        series_is = jobs.c.series_uid == bindparam("s_uid")
        production = jobs.c.kind == "production"
        self.known = select(instances.c.sop_instance_uid).where(
            instances.c.sop_instance_uid == bindparam("uid")
        )
        self.insert_instance = insert(instances)
        self.insert_series = insert(series)
        self.insert_job = insert(jobs)
        self.bump_series = (
            update(series)
            .where(series.c.series_uid == bindparam("s_uid"))
            .values(n_instances=series.c.n_instances + 1, last_received=bindparam("s_last"))
        )
        reopened = {k: v for k, v in _reopened(0.0).items() if k != "updated_at"}
        self.reopen_finished = (
            update(jobs)
            .where(
                series_is,
                production,
                jobs.c.state.in_([JobState.DONE.value, JobState.FAILED.value]),
                jobs.c.rule.is_not(None),
            )
            .values(updated_at=bindparam("r_now"), **reopened)
        )
        self.requeue_queued = (
            update(jobs)
            .where(series_is, production, jobs.c.state == JobState.QUEUED.value)
            .values(state=JobState.ROUTED.value, updated_at=bindparam("r_now"), queued_at=None)
        )


_HOT = _HotStatements()


class _RawSQLite:
    """SQLite text of :meth:`JobStore.record_instance`'s per-instance statements.

    Same meaning as :data:`_HOT`'s ``known``, ``insert_instance`` and ``bump_series``; plus
    ``reopenable``, true when :meth:`JobStore._reopen` would change a row (its two updates' WHERE
    clauses, OR-ed). Used by :meth:`JobStore._record_instance_sqlite`.
    """

    def __init__(self) -> None:
        cols = [c.name for c in instances.columns]
        self.known = "SELECT 1 FROM instances WHERE sop_instance_uid = ?"
        self.insert_instance = (
            f"INSERT INTO instances ({', '.join(cols)}) VALUES ({', '.join(':' + c for c in cols)})"
        )
        self.bump_series = (
            "UPDATE series SET n_instances = n_instances + 1, last_received = ? "
            "WHERE series_uid = ?"
        )
        self.reopenable = (
            "SELECT 1 FROM jobs WHERE series_uid = ? AND kind = 'production' AND ("
            f"(state IN ('{JobState.DONE.value}', '{JobState.FAILED.value}') "
            f"AND rule IS NOT NULL) OR state = '{JobState.QUEUED.value}') LIMIT 1"
        )


_RAW = _RawSQLite()
