"""Retention: delete the spooled instances and results of finished series once they are old.

What goes
---------
A *series* is the unit: its instances are shared by all its jobs (one per rule). A series is
expired when every production job of it is finished (``done``, ``failed``, ``skipped``) and, for
each job, the age its state is given in ``retention:`` (:class:`~dicom_node.config.RetentionConfig`)
has passed since the job finished *and* since the series' last instance arrived. Then its spooled
files (the paths its instance rows name), its results (each job's ``seg_path`` and every file in
``results/<series>/``, where the worker writes SEGs) and its rows (instances, series, jobs and
their shadow results) are deleted. A series with any job in ``received``, ``routed``, ``queued``,
``running`` or ``exporting`` is never touched. The audit log (written by the caller) keeps what
was deleted; ``dicom-node jobs`` no longer lists purged jobs.

Two steps, and why this order is crash-safe
-------------------------------------------
1. **Rows, in one write transaction** (:func:`expire`): select the expired series *inside* the
   transaction (``BEGIN IMMEDIATE`` on SQLite; the jobs' rows locked ``FOR UPDATE`` and checked
   again on PostgreSQL), write one *tombstone* row per file into ``retention_pending`` (path,
   size), and delete the series' rows. The receiver records an instance and re-opens a finished
   job in one transaction of its own, so the two are serialised: either the late instance came
   first (its job is ``routed`` again, the series is not expired, nothing is deleted), or the
   purge came first (the late instance starts a new series and job; its file is not in the
   tombstones, which name only the paths of rows that were deleted, so it stays).
2. **Files** (:func:`finish_pending`): unlink each tombstoned file, then delete its tombstone.
   A file whose path a row names again (the PACS re-sent that very instance, or a new job wrote
   the same SEG) is kept and only its tombstone goes.

A crash (``kill -9``, power cut) leaves one of three states, none of which loses or resurrects
anything:

* before step 1 commits: nothing changed (files and rows intact);
* between the steps: rows gone, files still there, tombstones committed. Start-up reconciliation
  re-records spooled files that have no row (``jobs/reconcile.py``), which would resurrect the
  series and send its SEG to the PACS again; so :meth:`dicom_node.node.Node.start` (and
  ``dicom-node cleanup``) run :func:`finish_pending` *before* ``reconcile_spool``, and the
  tombstoned UIDs count as known to reconciliation either way (:func:`pending_uids`);
* during step 2: some files gone, their tombstones not yet; unlinking a missing file is fine.

Deleting the files first and the rows after (no tombstones) would leave a window in which a
late instance re-opens a job whose earlier files are already gone. The tombstones' commit is
flushed with ``synchronous=FULL`` on SQLite (the store otherwise runs ``NORMAL``, see
``schema.py``): after a power cut the tombstones are there whenever the rows are gone.

Residual window: the receiver finds an instance's file already in the spool *before* it records
the instance. If the PACS re-sends exactly a tombstoned instance in the milliseconds between
that check and its row (while step 2 unlinks), the new row names a deleted file and the job
fails naming the missing instance. Closing it needs the receiver to check the file again after
recording (a receiver change).

May import: ``dicom_node.config``, ``dicom_node.metrics``. Paths are relative to ``storage``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    Engine,
    Float,
    Integer,
    String,
    Table,
    Text,
    and_,
    delete,
    exists,
    func,
    insert,
    not_,
    or_,
    select,
)
from sqlalchemy.sql import Select
from sqlalchemy.sql.elements import ColumnElement

from dicom_node import metrics
from dicom_node.config import RetentionConfig
from dicom_node.jobs import results as seg_results
from dicom_node.jobs.queries import reading
from dicom_node.jobs.schema import (
    PRODUCTION,
    FileSize,
    instances,
    jobs,
    metadata,
    series,
    shadow_results,
)
from dicom_node.jobs.states import JobState

LOGGER = logging.getLogger(__name__)

RESULTS_DIR = "results"
"""Folder under ``storage`` where the worker writes results (``results/<series>/<sop>.dcm``)."""

SERIES_PER_TRANSACTION = 50
"""Series purged per write transaction: keeps each hold of SQLite's write lock (which the
receiver waits for) to tens of milliseconds."""

FILES_PER_BATCH = 1000
"""Tombstones read and deleted per step of :func:`finish_pending`."""

KIND_INSTANCE = "instance"
KIND_RESULT = "result"

pending = Table(
    "retention_pending",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("path", Text, nullable=False),  # relative to storage
    Column("size", FileSize, nullable=False),
    Column("kind", String(16), nullable=False),  # KIND_INSTANCE or KIND_RESULT
    Column("sop_instance_uid", String(64)),  # instances only: known to reconciliation
    Column("series_uid", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
)
"""Tombstones: files whose rows are deleted and which are being unlinked (see the module
docstring). Defined on the store's ``metadata`` (revision 0002 of ``jobs/migrations`` adds it)."""


@dataclass(frozen=True)
class ExpiredSeries:
    """One series retention deletes (or, in a dry run, would delete)."""

    series_uid: str
    jobs: tuple[tuple[int, str], ...]
    """``(job id, state)`` of each of its jobs."""
    files: int
    bytes: int


@dataclass
class Freed:
    """Files and bytes actually deleted by :func:`finish_pending`."""

    files: int = 0
    bytes: int = 0
    kept: int = 0
    """Tombstoned files kept because a row names them again."""


@dataclass
class RetentionReport:
    """Outcome of one :func:`run` (what ``dicom-node cleanup`` prints and the audit log keeps)."""

    dry_run: bool
    series: list[ExpiredSeries] = field(default_factory=list)
    freed: Freed = field(default_factory=Freed)
    leftover: Freed = field(default_factory=Freed)
    """Of ``freed``: files of an earlier, interrupted pass."""

    @property
    def files(self) -> int:
        """Files deleted (dry run: that would be)."""
        if self.dry_run:
            return sum(s.files for s in self.series)
        return self.freed.files

    @property
    def bytes(self) -> int:
        """Bytes deleted (dry run: that would be, from the rows' sizes)."""
        if self.dry_run:
            return sum(s.bytes for s in self.series)
        return self.freed.bytes

    @property
    def jobs(self) -> int:
        return sum(len(s.jobs) for s in self.series)


# -- selection ---------------------------------------------------------------------------------
def _ages(ages: RetentionConfig) -> dict[JobState, float]:
    return {
        JobState.DONE: ages.done_after,
        JobState.FAILED: ages.failed_after,
        JobState.SKIPPED: ages.skipped_after,
    }


def _job_expired(ages: RetentionConfig, now: float) -> ColumnElement[bool]:
    """True for a job whose state's age has passed (since it finished and since the series'
    last instance); correlates with ``series``."""
    finished = func.coalesce(jobs.c.finished_at, jobs.c.updated_at)
    return or_(
        *(
            and_(
                jobs.c.state == state.value,
                finished <= now - age,
                series.c.last_received <= now - age,
            )
            for state, age in _ages(ages).items()
        )
    )


def _expired_series(ages: RetentionConfig, now: float, limit: int | None) -> Select[Any]:
    """Expired series, least recently received first (see the module docstring)."""
    production = jobs.c.kind == PRODUCTION
    of_series = jobs.c.series_uid == series.c.series_uid
    any_job = select(jobs.c.id).where(of_series, production)
    blocking = select(jobs.c.id).where(of_series, production, not_(_job_expired(ages, now)))
    return (
        select(series.c.series_uid)
        .where(exists(any_job), ~exists(blocking))
        .order_by(series.c.last_received, series.c.series_uid)
        .limit(limit)
    )


def _describe(conn: Connection, storage: Path, uids: Sequence[str]) -> list[_Planned]:
    """Files and jobs of each series in ``uids`` (inside the caller's transaction)."""
    rows = conn.execute(
        select(
            instances.c.series_uid, instances.c.sop_instance_uid, instances.c.path, instances.c.size
        ).where(instances.c.series_uid.in_(uids))
    ).mappings()
    plans = {uid: _Planned(uid) for uid in uids}
    for row in rows:
        plans[row["series_uid"]].files.append(
            (row["path"], int(row["size"]), KIND_INSTANCE, row["sop_instance_uid"])
        )
    job_rows = conn.execute(
        select(jobs.c.id, jobs.c.state, jobs.c.series_uid, jobs.c.seg_path, jobs.c.kind)
        .where(jobs.c.series_uid.in_(uids))
        .order_by(jobs.c.id)
    ).mappings()
    for row in job_rows:
        plan = plans[row["series_uid"]]
        if row["kind"] == PRODUCTION:
            plan.jobs.append((int(row["id"]), str(row["state"])))
        plan.all_job_ids.append(int(row["id"]))
        if row["seg_path"]:
            plan.add_result(storage, row["seg_path"])
    for plan in plans.values():
        folder = storage / RESULTS_DIR / plan.series_uid
        try:
            names = sorted(os.listdir(folder))
        except OSError:  # no results for this series (skipped, failed before the SEG)
            continue
        for name in names:
            if name.endswith(".dcm"):
                plan.add_result(storage, f"{RESULTS_DIR}/{plan.series_uid}/{name}")
    return list(plans.values())


@dataclass
class _Planned:
    series_uid: str
    files: list[tuple[str, int, str, str | None]] = field(default_factory=list)
    jobs: list[tuple[int, str]] = field(default_factory=list)
    all_job_ids: list[int] = field(default_factory=list)

    def add_result(self, storage: Path, path: str) -> None:
        path = Path(path).as_posix()
        if any(f[0] == path for f in self.files):
            return
        try:
            size = os.stat(storage / path).st_size
        except OSError:
            size = 0  # already gone: the tombstone costs nothing and the row still goes
        self.files.append((path, size, KIND_RESULT, None))

    def expired(self) -> ExpiredSeries:
        return ExpiredSeries(
            self.series_uid, tuple(self.jobs), len(self.files), sum(f[1] for f in self.files)
        )


def expired(
    engine: Engine, storage: Path, ages: RetentionConfig, now: float | None = None
) -> list[ExpiredSeries]:
    """The series a pass at ``now`` would delete, with their files and bytes; changes nothing."""
    now = time.time() if now is None else now
    out: list[ExpiredSeries] = []
    with reading(engine) as conn:
        uids = list(conn.execute(_expired_series(ages, now, None)).scalars())
        for k in range(0, len(uids), SERIES_PER_TRANSACTION):
            out += [
                p.expired() for p in _describe(conn, storage, uids[k : k + SERIES_PER_TRANSACTION])
            ]
    return out


# -- step 1: rows ------------------------------------------------------------------------------
@contextmanager
def _durable_write(engine: Engine) -> Iterator[Connection]:
    """A write transaction whose commit is flushed to disk on SQLite (``synchronous=FULL`` for
    this one commit; the store runs ``NORMAL``)."""
    with engine.connect() as conn:
        sqlite = engine.dialect.name == "sqlite"
        raw = conn.connection.driver_connection if sqlite else None
        if raw is not None:
            raw.execute("PRAGMA synchronous=FULL")
        try:
            with conn.begin():
                yield conn
        finally:
            if raw is not None:
                raw.execute("PRAGMA synchronous=NORMAL")


def expire(
    engine: Engine,
    storage: Path,
    ages: RetentionConfig,
    now: float | None = None,
    limit: int = SERIES_PER_TRANSACTION,
) -> list[ExpiredSeries]:
    """Step 1 for up to ``limit`` expired series: tombstone their files, delete their rows.

    One write transaction: the selection, the state guard and the deletion are atomic with
    respect to the receiver's ``record_instance`` (see the module docstring). Returns the
    series purged (empty: nothing is expired any more).
    """
    now = time.time() if now is None else now
    with _durable_write(engine) as conn:
        uids = list(conn.execute(_expired_series(ages, now, limit)).scalars())
        if not uids:
            return []
        if engine.dialect.name != "sqlite":  # lock the jobs, then make sure they still qualify
            # the series rows first, as the receiver's record_instance does (bump the series,
            # then re-open its jobs): the same order both ways, so the two never deadlock
            conn.execute(
                select(series.c.series_uid)
                .where(series.c.series_uid.in_(uids))
                .order_by(series.c.series_uid)
                .with_for_update()
            )
            conn.execute(
                select(jobs.c.id)
                .where(jobs.c.series_uid.in_(uids))
                .order_by(jobs.c.id)
                .with_for_update()
            )
            still = set(
                conn.execute(
                    _expired_series(ages, now, limit).where(series.c.series_uid.in_(uids))
                ).scalars()
            )
            uids = [u for u in uids if u in still]
            if not uids:
                return []
        plans = _describe(conn, storage, uids)
        tombstones = [
            {
                "path": path,
                "size": size,
                "kind": kind,
                "sop_instance_uid": sop,
                "series_uid": plan.series_uid,
                "created_at": now,
            }
            for plan in plans
            for path, size, kind, sop in plan.files
        ]
        if tombstones:
            conn.execute(insert(pending), tombstones)
        job_ids = [i for plan in plans for i in plan.all_job_ids]
        for k in range(0, len(job_ids), 500):
            conn.execute(
                delete(shadow_results).where(shadow_results.c.job_id.in_(job_ids[k : k + 500]))
            )
        seg_results.delete_for(conn, job_ids)
        conn.execute(delete(jobs).where(jobs.c.series_uid.in_(uids)))
        conn.execute(delete(instances).where(instances.c.series_uid.in_(uids)))
        conn.execute(delete(series).where(series.c.series_uid.in_(uids)))
    return [plan.expired() for plan in plans]


# -- step 2: files -----------------------------------------------------------------------------
def pending_uids(engine: Engine) -> frozenset[str]:
    """SOP Instance UIDs of tombstoned spool files (not to be re-recorded by reconciliation)."""
    with reading(engine) as conn:
        stmt = select(pending.c.sop_instance_uid).where(pending.c.sop_instance_uid.is_not(None))
        return frozenset(conn.execute(stmt).scalars())


def _in_use(conn: Connection, paths: Sequence[str]) -> set[str]:
    used = set(conn.execute(select(instances.c.path).where(instances.c.path.in_(paths))).scalars())
    used |= set(conn.execute(select(jobs.c.seg_path).where(jobs.c.seg_path.in_(paths))).scalars())
    return used


Remove = Callable[[str], None]
"""Deletes one spooled file by its path relative to storage (the node passes ``Spool.remove``,
which keeps ``dicom_node_spool_bytes`` right); missing files are fine."""


def finish_pending(engine: Engine, storage: Path, remove_spooled: Remove | None = None) -> Freed:
    """Step 2: unlink every tombstoned file, then drop its tombstone; return what was freed.

    Also finishes the files of a pass a crash interrupted (call it before start-up
    reconciliation). Counts ``dicom_node_retention_freed_files_total`` and ``..._bytes_total``.
    """
    freed = Freed()
    while True:
        with reading(engine) as conn:
            batch = (
                conn.execute(select(pending).order_by(pending.c.id).limit(FILES_PER_BATCH))
                .mappings()
                .all()
            )
            if not batch:
                return freed
            used = _in_use(conn, [row["path"] for row in batch])
        folders: set[Path] = set()
        for row in batch:
            rel = row["path"]
            if rel in used:
                freed.kept += 1
                continue
            size = _unlink(storage, rel, row["kind"], remove_spooled)
            if size is not None:
                freed.files += 1
                freed.bytes += size
                metrics.RETENTION_FREED_FILES.inc()
                metrics.RETENTION_FREED_BYTES.inc(size)
            folders.add((storage / rel).parent)
        with engine.begin() as conn:
            conn.execute(delete(pending).where(pending.c.id.in_([row["id"] for row in batch])))
        _remove_empty(storage, folders)


def _unlink(storage: Path, rel: str, kind: str, remove_spooled: Remove | None) -> int | None:
    """Delete one file; its size, or None if it was not there."""
    full = storage / rel
    try:
        size = os.stat(full).st_size
    except FileNotFoundError:
        return None
    try:
        if kind == KIND_INSTANCE and remove_spooled is not None:
            remove_spooled(rel)
        else:
            os.unlink(full)
    except FileNotFoundError:
        return None
    return size


def _remove_empty(storage: Path, folders: Iterable[Path]) -> None:
    """Remove now-empty series and study folders (never the top folders under storage).

    ``rmdir`` fails on a folder that is not empty, so a file the receiver just put there keeps
    its folder; the spool re-creates a folder that vanished under it.
    """
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        current = folder
        while len(current.relative_to(storage).parts) > 1:
            try:
                os.rmdir(current)
            except OSError:
                break
            current = current.parent


# -- a whole pass ------------------------------------------------------------------------------
def run(
    engine: Engine,
    storage: Path,
    ages: RetentionConfig,
    *,
    dry_run: bool = False,
    now: float | None = None,
    remove_spooled: Remove | None = None,
) -> RetentionReport:
    """One retention pass: finish an interrupted pass, then purge every expired series.

    Parameters
    ----------
    engine:
        The job store's engine.
    storage:
        The root every recorded path is relative to.
    ages:
        The ``retention:`` configuration.
    dry_run:
        Only report what would be deleted (:func:`expired`); nothing changes.
    now:
        The time the ages are measured to (default: now).
    remove_spooled:
        Deletes a spooled file (see :data:`Remove`); default ``os.unlink``.

    Returns
    -------
    RetentionReport
        The series purged and the files and bytes freed.
    """
    storage = Path(storage)
    now = time.time() if now is None else now
    report = RetentionReport(dry_run=dry_run)
    if dry_run:
        report.series = expired(engine, storage, ages, now)
        return report
    report.leftover = finish_pending(engine, storage, remove_spooled)
    report.freed = Freed(report.leftover.files, report.leftover.bytes, report.leftover.kept)
    while True:
        batch = expire(engine, storage, ages, now)
        if not batch:
            break
        report.series += batch
        freed = finish_pending(engine, storage, remove_spooled)
        report.freed.files += freed.files
        report.freed.bytes += freed.bytes
        report.freed.kept += freed.kept
    if report.series or report.freed.files:
        LOGGER.info(
            "retention: %d series (%d jobs) purged, %d files, %d bytes freed",
            len(report.series),
            report.jobs,
            report.freed.files,
            report.freed.bytes,
        )
    return report
