"""Reads of the job store: one job, listings for the CLI and the stages, counts, series.

Every read is one read-only transaction (a deferred ``BEGIN`` on SQLite: WAL readers never block
the receiver's writes) and returns records from :mod:`dicom_node.jobs.records`, never rows.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from sqlalchemy import Connection, Engine, func, select
from sqlalchemy.sql.elements import ColumnElement

from dicom_node.jobs.records import Instance, Job, Series
from dicom_node.jobs.schema import PRODUCTION, READ_ONLY, instances, jobs, series
from dicom_node.jobs.states import JobState


@contextmanager
def reading(engine: Engine) -> Iterator[Connection]:
    """A read-only transaction: one consistent snapshot, no write lock."""
    with engine.connect() as conn:
        conn.execution_options(**{READ_ONLY: True})
        with conn.begin():
            yield conn


def production() -> ColumnElement[bool]:
    """The jobs a query may see (not the pre-``shadow_results`` shadow rows)."""
    return jobs.c.kind == PRODUCTION


def get_in(conn: Connection, job_id: int) -> Job | None:
    """:func:`get` inside a transaction the caller holds."""
    row = conn.execute(select(jobs).where(jobs.c.id == job_id, production())).mappings().first()
    return Job.from_row(row) if row else None


def get(engine: Engine, job_id: int) -> Job | None:
    """The job with ``job_id``, or None if there is none."""
    with reading(engine) as conn:
        return get_in(conn, job_id)


def list_jobs(
    engine: Engine, states: Sequence[JobState | str] | None = None, limit: int = 50
) -> list[Job]:
    """Newest jobs first, optionally only those in ``states``.

    Raises
    ------
    ValueError
        A state in ``states`` is not a :class:`JobState` value.
    """
    stmt = select(jobs).where(production()).order_by(jobs.c.id.desc()).limit(limit)
    if states:
        stmt = stmt.where(jobs.c.state.in_([JobState(s).value for s in states]))
    with reading(engine) as conn:
        return [Job.from_row(r) for r in conn.execute(stmt).mappings()]


def jobs_in(engine: Engine, state: JobState, limit: int = 500) -> list[Job]:
    """Jobs in ``state``, oldest first."""
    stmt = (
        select(jobs)
        .where(jobs.c.state == JobState(state).value, production())
        .order_by(jobs.c.id)
        .limit(limit)
    )
    with reading(engine) as conn:
        return [Job.from_row(r) for r in conn.execute(stmt).mappings()]


def routed_with_series(engine: Engine, limit: int = 500) -> list[tuple[Job, Series]]:
    """``routed`` jobs, oldest first, each with its series as recorded now (one query for the
    whole completion check)."""
    labelled = [c.label(f"series_{c.name}") for c in series.c]
    stmt = (
        select(jobs, *labelled)
        .select_from(jobs.join(series, series.c.series_uid == jobs.c.series_uid))
        .where(jobs.c.state == JobState.ROUTED.value, production())
        .order_by(jobs.c.id)
        .limit(limit)
    )
    with reading(engine) as conn:
        rows = conn.execute(stmt).mappings().all()
    return [
        (Job.from_row(r), Series.from_row({c.name: r[f"series_{c.name}"] for c in series.c}))
        for r in rows
    ]


def counts(engine: Engine) -> dict[str, int]:
    """Number of jobs in each state, keyed by state value (every state present, zero too)."""
    out = {s.value: 0 for s in JobState}
    stmt = select(jobs.c.state, func.count().label("n")).where(production()).group_by(jobs.c.state)
    with reading(engine) as conn:
        for row in conn.execute(stmt).mappings():
            out[row["state"]] = row["n"]
    return out


def anything_due(engine: Engine, now: float) -> bool:
    """Whether a claim at ``now`` could find work (a cheap read before the claim's write)."""
    stmt = (
        select(jobs.c.id)
        .where(
            jobs.c.state.in_([JobState.QUEUED.value, JobState.EXPORTING.value]),
            jobs.c.next_attempt_at <= now,
        )
        .limit(1)
    )
    with reading(engine) as conn:
        return conn.execute(stmt).first() is not None


def overdue_running(engine: Engine, now: float, owner: str | None = None) -> int:
    """Jobs ``running`` past their lease: claimed by a worker that has not finished in time
    (only those of process ``owner`` when given: the others are their own processes' concern)."""
    stmt = select(func.count()).where(
        jobs.c.state == JobState.RUNNING.value,
        jobs.c.lease_until.is_not(None),
        jobs.c.lease_until < now,
    )
    if owner is not None:
        stmt = stmt.where(jobs.c.owner == owner)
    with reading(engine) as conn:
        return int(conn.execute(stmt).scalar_one())


def series_info(engine: Engine, series_uid: str) -> Series | None:
    """The series as recorded so far, or None if no instance of it was recorded."""
    with reading(engine) as conn:
        row = conn.execute(select(series).where(series.c.series_uid == series_uid)).mappings()
        first = row.first()
    return Series.from_row(first) if first else None


def series_instances(engine: Engine, series_uid: str) -> list[Instance]:
    """Instances of a series in arrival order."""
    stmt = (
        select(instances)
        .where(instances.c.series_uid == series_uid)
        .order_by(instances.c.received_at, instances.c.sop_instance_uid)
    )
    with reading(engine) as conn:
        return [Instance.from_row(r) for r in conn.execute(stmt).mappings()]


def known_instance_uids(engine: Engine) -> frozenset[str]:
    """SOP Instance UIDs of every recorded instance (start-up reconciliation of the spool)."""
    with reading(engine) as conn:
        return frozenset(conn.execute(select(instances.c.sop_instance_uid)).scalars())


def jobs_for_series(engine: Engine, series_uid: str) -> list[Job]:
    """Every job of a series (one per rule that took it), oldest first."""
    stmt = select(jobs).where(jobs.c.series_uid == series_uid, production()).order_by(jobs.c.id)
    with reading(engine) as conn:
        return [Job.from_row(r) for r in conn.execute(stmt).mappings()]
