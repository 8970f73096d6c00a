"""The C-STORE hot path: record one spooled instance, its series and the series' first job.

Runs on the association thread for every instance, so its statements are built once at import
(:data:`_HOT`, :data:`_RAW`) and only bound per call; re-opening a finished job is a state change
like any other and its statements come from :func:`dicom_node.jobs.transitions.move`.

Identity is checked here, in the same transaction that records the instance (so two
associations racing cannot both win): a series belongs to one study, a study to one patient
(:func:`~dicom_node.jobs.records.patient_key`, hashes only), an instance to one series and
study. An instance that contradicts the store raises
:class:`~dicom_node.jobs.records.IdentityConflict` and nothing is written.
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, insert, select, text, update

from dicom_node.jobs.records import (
    IdentityConflict,
    Instance,
    merged_patient_key,
    patient_conflict,
)
from dicom_node.jobs.schema import PRODUCTION, instances, jobs, series, studies
from dicom_node.jobs.states import JobState
from dicom_node.jobs.transitions import move, reopened_values

REOPEN_FINISHED = {
    JobState.DONE: JobState.ROUTED,
    JobState.FAILED: JobState.ROUTED,
    JobState.HELD: JobState.ROUTED,
}
"""A late instance rebuilds a finished result (its SEG gets the same UIDs: the PACS replaces it),
and a held one (built from fewer instances than the series has now: judged again)."""

REOPEN_QUEUED = {JobState.QUEUED: JobState.ROUTED}
"""A late instance sends a queued job back to wait for its completion rule again."""


def record_instance(engine: Engine, inst: Instance) -> bool:
    """Record a spooled instance; return False if its SOP Instance UID was already known.

    Creates the study's patient identity, the series and its ``received`` job on the first
    instance, and re-opens a series whose jobs had finished (a late instance means the result
    must be rebuilt). This runs on the C-STORE path, so its statements are built once
    (:data:`_HOT`) and only bound here. On SQLite the usual case (a known study and series,
    nothing to re-open) runs as plain SQL on a pooled DB-API connection
    (:func:`_record_instance_sqlite`): SQLAlchemy's execution machinery cost ~0.3 ms of the
    ~0.45 ms per instance (cProfile of ``bench/bench_ingest.py --jobstore``).

    Raises
    ------
    IdentityConflict
        The instance's series belongs to another study, its study to another patient, or its
        SOP Instance UID to another series or study; nothing was written.
    """
    if engine.dialect.name == "sqlite":
        recorded = _record_instance_sqlite(engine, inst)
        if recorded is not None:
            return recorded
    now = time.time()
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # the reads below decide the writes: serialise per study, series and instance
            # across processes, as SQLite's BEGIN IMMEDIATE does for everything
            conn.execute(
                _HOT.lock_identity,
                {"st_uid": inst.study_uid, "s_uid": inst.series_uid, "uid": inst.sop_instance_uid},
            )
        known = conn.execute(_HOT.known, {"uid": inst.sop_instance_uid}).first()
        if known is not None:
            _check_instance(inst, known.series_uid, known.study_uid)
        _check_study(conn, inst)
        if known is not None:
            return False
        conn.execute(_HOT.insert_instance, inst.as_row())
        bumped = conn.execute(
            _HOT.bump_series,
            {"s_uid": inst.series_uid, "st_uid": inst.study_uid, "s_last": inst.received_at},
        ).rowcount
        if not bumped:
            held = conn.execute(_HOT.series_study, {"s_uid": inst.series_uid}).scalar()
            if held is not None:
                raise _series_conflict()
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
                    "kind": PRODUCTION,
                    "state": JobState.RECEIVED.value,  # a new job: created received
                    "created_at": now,
                    "updated_at": now,
                    "next_attempt_at": 0.0,
                    "attempts": 0,
                    "export_attempts": 0,
                },
            )
        else:
            _reopen(conn, inst.series_uid, now)
    return True


def _series_conflict() -> IdentityConflict:
    return IdentityConflict(
        "series_in_other_study", "the SeriesInstanceUID is already held under another study"
    )


def _check_instance(inst: Instance, series_uid: str, study_uid: str) -> None:
    """A known SOP Instance UID must come back in the series and study it was recorded in."""
    if (series_uid, study_uid) != (inst.series_uid, inst.study_uid):
        raise IdentityConflict(
            "instance_in_other_series",
            "the SOPInstanceUID is already held under another series or study",
        )


def _check_patient(inst: Instance, held: str | None) -> None:
    field = patient_conflict(held, inst.patient_key)
    if field is not None:
        raise IdentityConflict(
            "study_of_other_patient",
            f"the StudyInstanceUID is already held for another patient ({field} differs)",
        )


def _check_study(conn: Connection, inst: Instance) -> None:
    """Refuse another patient's instance under a known study; record or complete the study's
    patient identity otherwise."""
    row = conn.execute(_HOT.study, {"st_uid": inst.study_uid}).first()
    if row is None:
        conn.execute(
            _HOT.insert_study,
            {
                "study_uid": inst.study_uid,
                "patient_key": inst.patient_key,
                "first_received": inst.received_at,
            },
        )
        return
    _check_patient(inst, row.patient_key)
    merged = merged_patient_key(row.patient_key, inst.patient_key)
    if merged != row.patient_key:
        conn.execute(_HOT.set_study_patient, {"st_uid": inst.study_uid, "p_key": merged})


def _record_instance_sqlite(engine: Engine, inst: Instance) -> bool | None:
    """:func:`record_instance` for an instance of a known study and series with no job to
    re-open (or a duplicate).

    The same statements and checks in one ``BEGIN IMMEDIATE`` transaction (as the engine's
    ``begin`` hook issues), committed here; the identity checks cost one indexed look-up more
    than before (the instance's and the study's rows are read by one statement). Returns None,
    with nothing written, when the instance needs the general path (first instance of its
    study or series, a patient identity to complete, or a job to re-open).

    Raises
    ------
    IdentityConflict
        As :func:`record_instance`; nothing was written.
    """
    hot = _hot_connection(engine)
    pooled = hot.take()
    if pooled is None:  # another association has the hot connection: a pooled one
        pooled = engine.raw_connection()  # with the connect-time PRAGMAs (WAL, NORMAL)
    try:
        db: Any = pooled.driver_connection
        db.execute("BEGIN IMMEDIATE")
        try:
            known_series, known_study, has_study, held = db.execute(
                _RAW.identity, (inst.sop_instance_uid, inst.study_uid)
            ).fetchone()
            if known_series is not None:
                _check_instance(inst, known_series, known_study)
            if has_study is None or merged_patient_key(held, inst.patient_key) != held:
                _check_patient(inst, held)
                db.execute("ROLLBACK")
                return None
            _check_patient(inst, held)
            if known_series is not None:
                db.execute("ROLLBACK")
                return False
            db.execute(_RAW.insert_instance, inst.as_row())
            bumped = db.execute(
                _RAW.bump_series, (inst.received_at, inst.series_uid, inst.study_uid)
            )
            if not bumped.rowcount or db.execute(_RAW.reopenable, (inst.series_uid,)).fetchone():
                db.execute("ROLLBACK")
                return None
            db.execute("COMMIT")
            return True
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
    finally:
        if hot.owns(pooled):
            hot.give_back()
        else:
            pooled.close()


class _HotConnection:
    """One DB-API connection kept out of the pool for :func:`_record_instance_sqlite`.

    The pool's check-out and check-in (with its reset, a ROLLBACK) cost about half of the
    instance's row on the C-STORE path (py-spy, ``bench/bench_ingest.py``, issue 15). The fast
    path ends every transaction it begins, so the connection needs no reset between instances.
    One association at a time uses it; the others take pooled connections as before.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._conn: Any = None
        self._closed = False

    def take(self) -> Any:
        """The connection, or None when another thread has it (or the store closed)."""
        if not self._lock.acquire(blocking=False):
            return None
        if self._closed:
            self._lock.release()
            return None
        if self._conn is None:
            try:
                self._conn = self._engine.raw_connection()
            except BaseException:
                self._lock.release()
                raise
        return self._conn

    def owns(self, conn: Any) -> bool:
        return conn is self._conn and self._conn is not None

    def give_back(self) -> None:
        self._lock.release()

    def close(self) -> None:
        """Return the connection to its pool (before the engine is disposed)."""
        with self._lock:
            self._closed = True
            if self._conn is not None:
                self._conn.close()
                self._conn = None


_HOT_CONNECTIONS: weakref.WeakKeyDictionary[Engine, _HotConnection] = weakref.WeakKeyDictionary()
_HOT_LOCK = threading.Lock()


def _hot_connection(engine: Engine) -> _HotConnection:
    with _HOT_LOCK:
        hot = _HOT_CONNECTIONS.get(engine)
        if hot is None:
            hot = _HOT_CONNECTIONS[engine] = _HotConnection(engine)
        return hot


def release_hot_connection(engine: Engine) -> None:
    """Give back the hot path's own connection (:class:`_HotConnection`); call before
    ``engine.dispose()``, which closes only the connections in the pool."""
    with _HOT_LOCK:
        hot = _HOT_CONNECTIONS.pop(engine, None)
    if hot is not None:
        hot.close()


def _reopen(conn: Connection, series_uid: str, now: float) -> None:
    """A late instance: finished or queued production jobs go back to ``routed``.

    A job in a worker (``running`` or ``exporting``) is left alone here:
    :func:`dicom_node.jobs.transitions.done` and ``fail`` send it back to ``routed`` when the
    series has grown past the instances it was built from.
    """
    conn.execute(_HOT.reopen_finished, {"s_uid": series_uid, "r_now": now})
    conn.execute(_HOT.reopen_queued, {"s_uid": series_uid, "r_now": now})


_LOCK_SPACE = 0x44434E00
"""First of the three advisory-lock key spaces (``pg_advisory_xact_lock(space, key)``) of
:func:`record_instance` on PostgreSQL."""


class _HotStatements:
    """The C-STORE path's statements, built once: building a statement costs SQLAlchemy far
    more than executing it (measured: ~2 ms of the ~2.4 ms per instance before)."""

    def __init__(self) -> None:
        series_is = jobs.c.series_uid == bindparam("s_uid")
        production = jobs.c.kind == PRODUCTION
        self.known = select(instances.c.series_uid, instances.c.study_uid).where(
            instances.c.sop_instance_uid == bindparam("uid")
        )
        # PostgreSQL: transaction advisory locks, always in this order (study, series, instance:
        # one key space each), so two transactions never wait on each other in a cycle
        self.lock_identity = text(
            f"SELECT pg_advisory_xact_lock({_LOCK_SPACE}, hashtext(:st_uid)), "
            f"pg_advisory_xact_lock({_LOCK_SPACE + 1}, hashtext(:s_uid)), "
            f"pg_advisory_xact_lock({_LOCK_SPACE + 2}, hashtext(:uid))"
        )
        study_is = studies.c.study_uid == bindparam("st_uid")
        self.study = select(studies.c.patient_key).where(study_is)
        self.insert_study = insert(studies)
        self.set_study_patient = (
            update(studies).where(study_is).values(patient_key=bindparam("p_key"))
        )
        self.series_study = select(series.c.study_uid).where(
            series.c.series_uid == bindparam("s_uid")
        )
        self.insert_instance = insert(instances)
        self.insert_series = insert(series)
        self.insert_job = insert(jobs)
        self.bump_series = (
            update(series)
            .where(
                series.c.series_uid == bindparam("s_uid"),
                series.c.study_uid == bindparam("st_uid"),
            )
            .values(n_instances=series.c.n_instances + 1, last_received=bindparam("s_last"))
        )
        reopened = reopened_values(0.0)
        reopened["updated_at"] = bindparam("r_now")
        self.reopen_finished = move(
            REOPEN_FINISHED, series_is, production, jobs.c.rule.is_not(None), **reopened
        )
        self.reopen_queued = move(
            REOPEN_QUEUED, series_is, production, updated_at=bindparam("r_now"), queued_at=None
        )


_HOT = _HotStatements()


class _RawSQLite:
    """SQLite text of :func:`record_instance`'s per-instance statements.

    Same meaning as :data:`_HOT`'s ``known`` and ``study`` (together in ``identity``: the
    known instance's series and study, whether the study is recorded, and its patient key),
    ``insert_instance`` and ``bump_series``; plus ``reopenable``, true when :func:`_reopen`
    would change a row (its two updates' WHERE clauses, OR-ed). Used by
    :func:`_record_instance_sqlite`.
    """

    def __init__(self) -> None:
        cols = [c.name for c in instances.columns]
        finished = ", ".join(f"'{s.value}'" for s in REOPEN_FINISHED)
        queued = ", ".join(f"'{s.value}'" for s in REOPEN_QUEUED)
        self.identity = (
            "SELECT i.series_uid, i.study_uid, s.study_uid, s.patient_key FROM (SELECT 1) "
            "LEFT JOIN instances i ON i.sop_instance_uid = ? "
            "LEFT JOIN studies s ON s.study_uid = ?"
        )
        self.insert_instance = (
            f"INSERT INTO instances ({', '.join(cols)}) VALUES ({', '.join(':' + c for c in cols)})"
        )
        self.bump_series = (
            "UPDATE series SET n_instances = n_instances + 1, last_received = ? "
            "WHERE series_uid = ? AND study_uid = ?"
        )
        self.reopenable = (
            f"SELECT 1 FROM jobs WHERE series_uid = ? AND kind = '{PRODUCTION}' AND ("
            f"(state IN ({finished}) AND rule IS NOT NULL) OR state IN ({queued})) LIMIT 1"
        )


_RAW = _RawSQLite()
