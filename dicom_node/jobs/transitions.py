"""Every change of a job's state: route, skip, queue, claim, lease, export, done, fail, retry,
release, and the one function all of them go through.

:func:`move` builds each state-changing ``UPDATE``: it checks its edges against
:data:`dicom_node.jobs.states.TRANSITIONS` and puts the source states in the ``WHERE`` clause,
so the check and the change are one atomic statement (no read-then-write). :func:`apply` runs it
for one job and turns "no row changed" into a :class:`TransitionError` that names the job's
actual state. Updates that leave the state alone (:func:`set_fields`) may not set ``state``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, Engine, Update, case, func, insert, select, update
from sqlalchemy.sql.elements import ColumnElement

from dicom_node.jobs import results as seg_results
from dicom_node.jobs.queries import anything_due, get, get_in, production
from dicom_node.jobs.records import Job, Route, SegResult
from dicom_node.jobs.schema import PRODUCTION, jobs, series
from dicom_node.jobs.states import JobState, TransitionError, check, sources_of

LOGGER = logging.getLogger(__name__)

LEASE_SECONDS = 300.0
"""How long a claimed job belongs to its worker before another process may take it over."""


# -- the one place a state changes -----------------------------------------------------------
def move(moves: Mapping[JobState, JobState], *where: ColumnElement[bool], **values: Any) -> Update:
    """The ``UPDATE`` that moves jobs from each source state in ``moves`` to its target.

    Parameters
    ----------
    moves:
        Source state -> target state. A source mapped to itself keeps its state (an export
        whose lease a claim renews); every other pair must be an edge of ``TRANSITIONS``.
    where:
        Further conditions (which job, which series, ...).
    values:
        Other columns to set (plain values or bind parameters).

    Returns
    -------
    Update
        ``UPDATE jobs SET state = ..., <values> WHERE state IN (<sources>) AND <where>``.

    Raises
    ------
    TransitionError
        A pair is not in the table, or ``moves`` is empty.
    """
    if not moves:
        raise TransitionError("a move needs at least one source state")
    for source, target in moves.items():
        if source is not target:
            check(source, target)
    if "state" in values:
        raise TypeError("`values` must not set 'state': pass it in `moves`")
    changes = {s.value: t.value for s, t in moves.items() if s is not t}
    state: Any
    if len(set(changes.values())) == 1 and len(changes) == len(moves):
        state = next(iter(changes.values()))  # one target for every source
    elif changes:
        state = case(changes, value=jobs.c.state, else_=jobs.c.state)
    else:
        state = jobs.c.state
    return (
        update(jobs)
        .where(jobs.c.state.in_([s.value for s in moves]), *where)
        .values(state=state, **values)
    )


def apply(
    conn: Connection,
    job_id: int,
    target: JobState,
    sources: Iterable[JobState] | None = None,
    **values: Any,
) -> None:
    """Move one job to ``target`` inside the caller's transaction.

    Parameters
    ----------
    sources:
        The states this move starts from: by default every state the table lets reach
        ``target``; a caller may narrow them (``exporting`` only from ``running``).
    values:
        Other columns to set; ``updated_at`` defaults to now.

    Raises
    ------
    KeyError
        No job with ``job_id``.
    TransitionError
        The job is in a state this move does not start from (names that state).
    """
    allowed = sources_of(target) if sources is None else frozenset(sources)
    if not allowed:
        raise TransitionError(f"no state may go to {target.value!r}")
    values.setdefault("updated_at", time.time())
    stmt = move({s: target for s in allowed}, jobs.c.id == job_id, production(), **values)
    if conn.execute(stmt).rowcount:
        return
    current = conn.execute(select(jobs.c.state).where(jobs.c.id == job_id, production())).scalar()
    if current is None:
        raise KeyError(f"no job with id {job_id}")
    names = ", ".join(sorted(s.value for s in allowed))
    raise TransitionError(
        f"job {job_id} is {current!r}: it cannot go to {target.value!r} (only from: {names})"
    )


def transition(engine: Engine, job_id: int, target: JobState, **values: Any) -> None:
    """:func:`apply` in a transaction of its own (the table's sources for ``target``)."""
    with engine.begin() as conn:
        apply(conn, job_id, target, **values)


def set_fields(engine: Engine, job_id: int, **values: Any) -> None:
    """Update columns of a job that leave its state alone.

    Raises
    ------
    TypeError
        ``values`` sets ``state`` (a state changes only through :func:`move`).
    """
    if "state" in values:
        raise TypeError("`state` changes only through jobs.transitions.move")
    values["updated_at"] = time.time()
    with engine.begin() as conn:
        conn.execute(update(jobs).where(jobs.c.id == job_id).values(**values))


def reopened_values(now: float) -> dict[str, Any]:
    """Columns (besides ``state``) that send a finished job back to ``routed`` to be rebuilt."""
    return {
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


# -- routing and completion ---------------------------------------------------------------------
def route(engine: Engine, job_id: int, routes: Sequence[Route], rules_version: str) -> bool:
    """Record the routing decision of a ``received`` job; return False if it was not received.

    The first route reuses the job, each further one gets a new ``routed`` job for the series.

    Raises
    ------
    ValueError
        ``routes`` is empty (that decision is :func:`skip`).
    """
    if not routes:
        raise ValueError("`routes` must hold at least one Route; a series no rule takes is skipped")
    now = time.time()
    with engine.begin() as conn:
        first, *others = routes
        try:
            apply(
                conn,
                job_id,
                JobState.ROUTED,
                sources=[JobState.RECEIVED],
                rules_version=rules_version,
                updated_at=now,
                **first.as_values(),
            )
        except (KeyError, TransitionError) as exc:
            LOGGER.debug("job %s: not routed: %s", job_id, exc)
            return False
        job = conn.execute(
            select(jobs.c.series_uid, jobs.c.study_uid).where(jobs.c.id == job_id)
        ).one()
        for extra in others:
            conn.execute(
                insert(jobs).values(
                    series_uid=job.series_uid,
                    study_uid=job.study_uid,
                    kind=PRODUCTION,
                    state=JobState.ROUTED.value,  # a new job: created routed, not moved
                    rules_version=rules_version,
                    created_at=now,
                    updated_at=now,
                    next_attempt_at=0.0,
                    attempts=0,
                    export_attempts=0,
                    **extra.as_values(),
                )
            )
    return True


def skip(engine: Engine, job_id: int, outcome: str, rule: str | None, rules_version: str) -> bool:
    """End a ``received`` job without action (no rule matched, a discard rule, or routing
    failed); return False if it was not received."""
    try:
        transition(
            engine,
            job_id,
            JobState.SKIPPED,
            outcome=outcome,
            rule=rule,
            rules_version=rules_version,
            finished_at=time.time(),
        )
    except (KeyError, TransitionError) as exc:
        LOGGER.debug("job %s: not skipped: %s", job_id, exc)
        return False
    return True


def skip_running(engine: Engine, job_id: int, outcome: str) -> None:
    """End a ``running`` job without a result: its series holds nothing the model can use
    (no image at all: structured reports, RT plans, presentation states).

    Raises
    ------
    TransitionError
        The job is not ``running``.
    """
    with engine.begin() as conn:
        apply(
            conn,
            job_id,
            JobState.SKIPPED,
            sources=[JobState.RUNNING],
            outcome=outcome,
            error=None,
            lease_until=None,
            finished_at=time.time(),
        )


def queue(engine: Engine, job_id: int, n_instances: int) -> bool:
    """Mark a ``routed`` job's series complete; return True if this call queued it."""
    try:
        with engine.begin() as conn:
            apply(
                conn,
                job_id,
                JobState.QUEUED,
                sources=[JobState.ROUTED],
                n_instances=n_instances,
                queued_at=time.time(),
                next_attempt_at=0.0,
            )
    except (KeyError, TransitionError) as exc:
        LOGGER.debug("job %s: not queued: %s", job_id, exc)
        return False
    return True


# -- workers ------------------------------------------------------------------------------------
def claim(engine: Engine, lease: float = LEASE_SECONDS) -> Job | None:
    """Atomically take the next job to work on: a queued job, or an export due for a retry.

    Returns
    -------
    Job or None
        The job as it is after the claim (``running`` for a queued job, still ``exporting``
        for an export retry, with a fresh lease either way), or None when nothing is due.
    """
    now = time.time()
    if not anything_due(engine, now):  # a cheap read first: most polls find nothing
        return None
    due = (
        select(jobs.c.id)
        .where(
            production(),
            ((jobs.c.state == JobState.QUEUED.value) & (jobs.c.next_attempt_at <= now))
            | (
                (jobs.c.state == JobState.EXPORTING.value)
                & (jobs.c.next_attempt_at <= now)
                & ((jobs.c.lease_until.is_(None)) | (jobs.c.lease_until < now))
            ),
        )
        .order_by(jobs.c.next_attempt_at, jobs.c.id)
        .limit(1)
        .with_for_update(skip_locked=True)  # PostgreSQL; SQLite's BEGIN IMMEDIATE serialises
        .scalar_subquery()
    )
    stmt = move(
        {JobState.QUEUED: JobState.RUNNING, JobState.EXPORTING: JobState.EXPORTING},
        jobs.c.id == due,
        lease_until=now + lease,
        updated_at=now,
        started_at=func.coalesce(jobs.c.started_at, now),
        attempts=jobs.c.attempts + 1,
    ).returning(*jobs.c)
    with engine.begin() as conn:
        row = conn.execute(stmt).mappings().first()
    return Job.from_row(row) if row else None


def exporting(
    engine: Engine,
    job_id: int,
    seg_path: str,
    seg_sop_uid: str,
    details: Mapping[str, Any] | None = None,
    results: Sequence[SegResult] | None = None,
) -> None:
    """A ``running`` job's SEG(s) are built and on disk; now they only have to be delivered.

    ``results`` lists every SEG of the job (one per group of its series, see
    :mod:`dicom_node.jobs.results`); ``seg_path``/``seg_sop_uid`` name the first. Without
    ``results`` the job has the one SEG ``seg_path``.

    Raises
    ------
    TransitionError
        The job is not ``running``.
    """
    with engine.begin() as conn:
        seg_results.replace(
            conn, job_id, list(results) if results else [SegResult(0, seg_path, seg_sop_uid)]
        )
        apply(
            conn,
            job_id,
            JobState.EXPORTING,
            sources=[JobState.RUNNING],
            seg_path=seg_path,
            seg_sop_uid=seg_sop_uid,
            next_attempt_at=0.0,
            details=dict(details) if details is not None else None,
        )


def export_retry(engine: Engine, job_id: int, delay: float, error: str) -> None:
    """An export attempt failed; the job stays ``exporting`` and is due again after ``delay``."""
    now = time.time()
    with engine.begin() as conn:
        conn.execute(
            update(jobs)
            .where(jobs.c.id == job_id)
            .values(
                next_attempt_at=now + delay,
                lease_until=None,
                error=error,
                export_attempts=jobs.c.export_attempts + 1,
                updated_at=now,
            )
        )


def done(engine: Engine, job_id: int, outcome: str) -> JobState:
    """End an ``exporting`` job as delivered; return its new state.

    ``ROUTED`` instead of ``DONE`` when instances arrived after the worker read the series
    (``n_instances`` of the job is below the series'): the result is rebuilt with them.

    Raises
    ------
    TransitionError
        The job is not ``exporting``.
    """
    return _finish(
        engine,
        job_id,
        JobState.DONE,
        outcome=outcome,
        error=None,
        lease_until=None,
        finished_at=time.time(),
    )


def fail(engine: Engine, job_id: int, error: str) -> JobState:
    """End a ``running`` or ``exporting`` job as failed with ``error``; return its new state
    (see :func:`done`).

    Raises
    ------
    TransitionError
        The job is in neither state.
    """
    return _finish(
        engine, job_id, JobState.FAILED, error=error, lease_until=None, finished_at=time.time()
    )


def _finish(engine: Engine, job_id: int, state: JobState, **values: Any) -> JobState:
    now = time.time()
    with engine.begin() as conn:
        apply(conn, job_id, state, updated_at=now, **values)
        row = conn.execute(
            select(
                jobs.c.rule,
                jobs.c.n_instances.label("built_from"),
                series.c.n_instances.label("recorded"),
            )
            .select_from(jobs.join(series, series.c.series_uid == jobs.c.series_uid))
            .where(jobs.c.id == job_id)
        ).first()
        if (
            row is not None
            and row.rule is not None
            and row.built_from is not None
            and row.recorded > row.built_from
        ):
            LOGGER.info(
                "job %s: %d instance(s) arrived while it ran: rebuilding",
                job_id,
                row.recorded - row.built_from,
            )
            apply(conn, job_id, JobState.ROUTED, sources=[state], **reopened_values(now))
            return JobState.ROUTED
    return state


def release(engine: Engine, job_id: int) -> bool:
    """Give back a job this process claimed but did not start (the node is stopping).

    A ``running`` job goes back to ``queued``; an ``exporting`` one only loses its lease.
    Returns False if the job was in neither state.
    """
    stmt = move(
        {JobState.RUNNING: JobState.QUEUED, JobState.EXPORTING: JobState.EXPORTING},
        jobs.c.id == job_id,
        lease_until=None,
        updated_at=time.time(),
    )
    with engine.begin() as conn:
        return bool(conn.execute(stmt).rowcount)


def release_running(engine: Engine) -> int:
    """After a restart of the only node: give every interrupted job back; return how many."""
    stmt = move(
        {JobState.RUNNING: JobState.QUEUED, JobState.EXPORTING: JobState.EXPORTING},
        production(),
        lease_until=None,
        updated_at=time.time(),
    )
    with engine.begin() as conn:
        return int(conn.execute(stmt).rowcount)


def retry(engine: Engine, job_id: int) -> Job:
    """Give a failed job another chance: re-export if its SEG exists, else run it again.

    Returns
    -------
    Job
        The job after the retry (``exporting`` or ``queued``).

    Raises
    ------
    KeyError
        No job with this id.
    ValueError
        The job is not failed (a :class:`TransitionError`).
    """
    with engine.begin() as conn:
        job = get_in(conn, job_id)
        if job is None:
            raise KeyError(f"no job with id {job_id}")
        if job.state is not JobState.FAILED:
            raise TransitionError(
                f"job {job_id} is {job.state.value}, only failed jobs can be retried"
            )
        apply(
            conn,
            job_id,
            JobState.EXPORTING if job.seg_path else JobState.QUEUED,
            sources=[JobState.FAILED],
            error=None,
            next_attempt_at=0.0,
            lease_until=None,
            export_attempts=0,
            attempts=0,
            finished_at=None,
            outcome=f"retried from failed ({job.error})",
        )
    return get(engine, job_id) or job
