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
from collections.abc import Callable, Iterable, Mapping, Sequence
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
"""Default lease of :func:`claim` when the caller names none (the node passes its
``process_lease`` and renews it with its heartbeat: :mod:`dicom_node.jobs.processes`)."""


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
    held_by: str | None = None,
    **values: Any,
) -> None:
    """Move one job to ``target`` inside the caller's transaction.

    Parameters
    ----------
    sources:
        The states this move starts from: by default every state the table lets reach
        ``target``; a caller may narrow them (``exporting`` only from ``running``).
    held_by:
        The id of the process that claimed the job: the move happens only while the job is
        still that process's (``jobs.owner``), so a worker whose job was taken back (it froze
        past its lease) cannot finish it a second time.
    values:
        Other columns to set; ``updated_at`` defaults to now.

    Raises
    ------
    KeyError
        No job with ``job_id``.
    TransitionError
        The job is in a state this move does not start from (names that state), or it is no
        longer held by ``held_by``.
    """
    allowed = sources_of(target) if sources is None else frozenset(sources)
    if not allowed:
        raise TransitionError(f"no state may go to {target.value!r}")
    values.setdefault("updated_at", time.time())
    guard = [jobs.c.owner == held_by] if held_by is not None else []
    stmt = move({s: target for s in allowed}, jobs.c.id == job_id, production(), *guard, **values)
    if conn.execute(stmt).rowcount:
        return
    row = conn.execute(
        select(jobs.c.state, jobs.c.owner).where(jobs.c.id == job_id, production())
    ).first()
    if row is None:
        raise KeyError(f"no job with id {job_id}")
    if held_by is not None and row.owner != held_by and JobState(row.state) in allowed:
        raise TransitionError(
            f"job {job_id} is no longer held by this process ({held_by}): it was taken back "
            f"after its lease ran out and is now {row.state!r}"
            + (f" with {row.owner}" if row.owner else "")
        )
    names = ", ".join(sorted(s.value for s in allowed))
    raise TransitionError(
        f"job {job_id} is {row.state!r}: it cannot go to {target.value!r} (only from: {names})"
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
        "owner": None,
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


def skip_running(engine: Engine, job_id: int, outcome: str, held_by: str | None = None) -> None:
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
            held_by=held_by,
            outcome=outcome,
            error=None,
            lease_until=None,
            owner=None,
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
def claim(engine: Engine, lease: float = LEASE_SECONDS, owner: str | None = None) -> Job | None:
    """Atomically take the next job to work on: a queued job, or an export due for a retry.

    Parameters
    ----------
    lease:
        Seconds the claim holds unless its owner renews it (its heartbeat does).
    owner:
        The claiming process's id (:func:`dicom_node.jobs.processes.new_process_id`), written
        to ``jobs.owner``: only that process may move the job on (``held_by``), and the job
        is taken back only once that process stopped heartbeating.

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
        owner=owner,
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
    held_by: str | None = None,
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
    _built(
        engine,
        job_id,
        JobState.EXPORTING,
        seg_path,
        seg_sop_uid,
        details,
        results,
        held_by,
        next_attempt_at=0.0,
    )


def _built(
    engine: Engine,
    job_id: int,
    target: JobState,
    seg_path: str,
    seg_sop_uid: str,
    details: Mapping[str, Any] | None,
    results: Sequence[SegResult] | None,
    held_by: str | None,
    **values: Any,
) -> None:
    """Record a ``running`` job's built results and move it to ``target`` in one transaction:
    ``exporting`` (send them) or ``held`` (keep them back), the only two ends of a build."""
    with engine.begin() as conn:
        seg_results.replace(
            conn, job_id, list(results) if results else [SegResult(0, seg_path, seg_sop_uid)]
        )
        apply(
            conn,
            job_id,
            target,
            sources=[JobState.RUNNING],
            held_by=held_by,
            seg_path=seg_path,
            seg_sop_uid=seg_sop_uid,
            details=dict(details) if details is not None else None,
            **values,
        )


def export_retry(
    engine: Engine, job_id: int, delay: float, error: str, held_by: str | None = None
) -> None:
    """An export attempt failed; the job stays ``exporting`` and is due again after ``delay``
    (for any process: it loses its owner). Nothing changes if ``held_by`` no longer holds it."""
    now = time.time()
    guard = [jobs.c.owner == held_by] if held_by is not None else []
    with engine.begin() as conn:
        conn.execute(
            update(jobs)
            .where(jobs.c.id == job_id, *guard)
            .values(
                next_attempt_at=now + delay,
                lease_until=None,
                owner=None,
                error=error,
                export_attempts=jobs.c.export_attempts + 1,
                updated_at=now,
            )
        )


def done(
    engine: Engine,
    job_id: int,
    outcome: str,
    held_by: str | None = None,
    *,
    delivered: Sequence[str] | None = None,
    result_delivered: Mapping[int, Sequence[str]] | None = None,
) -> JobState:
    """End an ``exporting`` job as delivered; return its new state.

    ``ROUTED`` instead of ``DONE`` when instances arrived after the worker read the series
    (``n_instances`` of the job is below the series'): the result is rebuilt with them.

    ``delivered`` (the job's destinations) and ``result_delivered`` (SEG position -> its
    destinations) are recorded in the same transaction, before the state changes, and are kept
    even when the job is no longer ``held_by``'s: one transaction instead of up to three for
    the last export step (issue 15), with what the separate writes recorded.

    Raises
    ------
    TransitionError
        The job is not ``exporting``.
    """

    def record(conn: Connection) -> None:
        for position, destinations in (result_delivered or {}).items():
            seg_results.record_delivered(conn, job_id, position, destinations)
        if delivered is not None:
            conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id)
                .values(delivered=list(delivered), updated_at=time.time())
            )

    return _finish(
        engine,
        job_id,
        JobState.DONE,
        before=record if delivered is not None or result_delivered else None,
        held_by=held_by,
        outcome=outcome,
        error=None,
        lease_until=None,
        owner=None,
        finished_at=time.time(),
    )


def fail(engine: Engine, job_id: int, error: str, held_by: str | None = None) -> JobState:
    """End a ``running`` or ``exporting`` job as failed with ``error``; return its new state
    (see :func:`done`).

    Raises
    ------
    TransitionError
        The job is in neither state.
    """
    return _finish(
        engine,
        job_id,
        JobState.FAILED,
        held_by=held_by,
        error=error,
        lease_until=None,
        owner=None,
        finished_at=time.time(),
    )


def _finish(
    engine: Engine,
    job_id: int,
    state: JobState,
    held_by: str | None,
    before: Callable[[Connection], None] | None = None,
    **values: Any,
) -> JobState:
    now = time.time()
    refused: TransitionError | None = None
    with engine.begin() as conn:
        if before is not None:
            before(conn)
        try:
            apply(conn, job_id, state, held_by=held_by, updated_at=now, **values)
        except TransitionError as exc:
            if before is None:
                raise
            refused = exc  # commit what `before` recorded, then refuse
        else:
            state = _reopen_if_grown(conn, job_id, state, now)
    if refused is not None:
        raise refused
    return state


def _reopen_if_grown(conn: Connection, job_id: int, state: JobState, now: float) -> JobState:
    """Send a just-finished job back to ``routed`` if its series grew while it ran."""
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


def release(engine: Engine, job_id: int, held_by: str | None = None) -> bool:
    """Give back a job this process claimed but did not start (the node is stopping).

    A ``running`` job goes back to ``queued``; an ``exporting`` one only loses its owner and
    lease. Returns False if the job was in neither state (or no longer ``held_by``'s).
    """
    guard = [jobs.c.owner == held_by] if held_by is not None else []
    stmt = move(
        {JobState.RUNNING: JobState.QUEUED, JobState.EXPORTING: JobState.EXPORTING},
        jobs.c.id == job_id,
        *guard,
        lease_until=None,
        owner=None,
        updated_at=time.time(),
    )
    with engine.begin() as conn:
        return bool(conn.execute(stmt).rowcount)


def release_running(engine: Engine) -> int:
    """Give every held job back, whoever holds it; return how many.

    Only for a process that knows it is alone on the job store (the embedded SQLite store
    under its exclusive storage lock). Several processes use
    :func:`dicom_node.jobs.processes.take_back`, which spares the jobs of live owners.
    """
    stmt = move(
        {JobState.RUNNING: JobState.QUEUED, JobState.EXPORTING: JobState.EXPORTING},
        production(),
        lease_until=None,
        owner=None,
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


# -- low confidence: hold, release, discard (the rule's ``on_low_confidence``) -----------------
def hold(
    engine: Engine,
    job_id: int,
    seg_path: str,
    seg_sop_uid: str,
    outcome: str,
    details: Mapping[str, Any] | None = None,
    results: Sequence[SegResult] | None = None,
    held_by: str | None = None,
) -> None:
    """Keep a ``running`` job's built results back: the rule holds low-confidence results.

    The job waits in ``held`` (results on disk and in ``seg_results``, as :func:`exporting`
    records them) until :func:`release_held` or :func:`discard_held`.

    Raises
    ------
    TransitionError
        The job is not ``running`` (or no longer ``held_by``'s).
    """
    _built(
        engine,
        job_id,
        JobState.HELD,
        seg_path,
        seg_sop_uid,
        details,
        results,
        held_by,
        outcome=outcome,
        error=None,
        lease_until=None,
        owner=None,  # a held or ended job belongs to no process
    )


def discard_running(
    engine: Engine,
    job_id: int,
    outcome: str,
    details: Mapping[str, Any] | None = None,
    held_by: str | None = None,
) -> None:
    """End a ``running`` job as ``skipped`` without exporting: the rule discards low-confidence
    results (``outcome`` says why).

    Raises
    ------
    TransitionError
        The job is not ``running`` (or no longer ``held_by``'s).
    """
    with engine.begin() as conn:
        apply(
            conn,
            job_id,
            JobState.SKIPPED,
            sources=[JobState.RUNNING],
            held_by=held_by,
            outcome=outcome,
            error=None,
            lease_until=None,
            details=dict(details) if details is not None else None,
            finished_at=time.time(),
            owner=None,  # a held or ended job belongs to no process
        )


def _held(conn: Connection, job_id: int, verb: str) -> Job:
    job = get_in(conn, job_id)
    if job is None:
        raise KeyError(f"no job with id {job_id}")
    if job.state is not JobState.HELD:
        raise TransitionError(
            f"job {job_id} is {job.state.value}, only held jobs can be {verb} "
            "(list them with: dicom-node jobs --state held)"
        )
    return job


def release_held(engine: Engine, job_id: int) -> Job:
    """Export a ``held`` job's results after all (a person looked and accepts them).

    Returns
    -------
    Job
        The job after the release (``exporting``: a running node's worker sends it).

    Raises
    ------
    KeyError
        No job with this id.
    TransitionError
        The job is not held.
    """
    with engine.begin() as conn:
        job = _held(conn, job_id, "released")
        apply(
            conn,
            job_id,
            JobState.EXPORTING,
            sources=[JobState.HELD],
            next_attempt_at=0.0,
            lease_until=None,
            export_attempts=0,
            outcome=f"released from hold ({job.outcome})" if job.outcome else "released from hold",
        )
    return get(engine, job_id) or job


def discard_held(engine: Engine, job_id: int) -> Job:
    """End a ``held`` job as ``skipped``: its results are never exported.

    Returns
    -------
    Job
        The job after the discard; its outcome starts with ``discarded:`` and keeps the reasons
        it was held for.

    Raises
    ------
    KeyError
        No job with this id.
    TransitionError
        The job is not held.
    """
    with engine.begin() as conn:
        job = _held(conn, job_id, "discarded")
        why = (job.outcome or "held").removeprefix("held: ").split("; release with", 1)[0]
        apply(
            conn,
            job_id,
            JobState.SKIPPED,
            sources=[JobState.HELD],
            outcome=f"discarded: {why} (dicom-node discard)",
            lease_until=None,
            finished_at=time.time(),
        )
    return get(engine, job_id) or job


# -- re-run on demand (``dicom-node rerun``) -----------------------------------------------------
RERUN_FROM = (JobState.DONE, JobState.FAILED)
"""States a job may be re-run from: finished with a result or given up (never in flight)."""


def rerun(engine: Engine, job_id: int, model_name: str, version: str | None) -> Job:
    """Queue a finished job again to process its stored instances anew.

    Parameters
    ----------
    model_name:
        The model to run (the job's).
    version:
        A version to pin (``name:version``), or None to resolve the job's model reference again
        when a worker claims it (the rule's alias: the current production).

    Returns
    -------
    Job
        The job, ``queued``, its outcome saying what it was re-run with.

    Raises
    ------
    KeyError
        No job with this id.
    TransitionError
        The job is not ``done`` or ``failed`` (names its state).
    """
    with engine.begin() as conn:
        job = get_in(conn, job_id)
        if job is None:
            raise KeyError(f"no job with id {job_id}")
        if job.state not in RERUN_FROM:
            raise TransitionError(
                f"job {job_id} is {job.state.value}: only done or failed jobs can be re-run "
                f"(wait until it finishes; a held job is released or discarded first)"
            )
        was = f"{job.model_name}:{job.model_version}" if job.model_version else job.model_ref
        target = f"{model_name}:{version}" if version else f"{job.model_ref} (re-resolved)"
        now = time.time()
        apply(
            conn,
            job_id,
            JobState.QUEUED,
            sources=RERUN_FROM,
            model_name=model_name,
            model_version=version,
            model_alias=None,
            model_sha256=None,
            outcome=f"re-run with {target} (was {was})",
            error=None,
            delivered=None,
            seg_path=None,
            seg_sop_uid=None,
            lease_until=None,
            owner=None,
            queued_at=now,
            next_attempt_at=0.0,
            started_at=None,
            finished_at=None,
            attempts=0,
            export_attempts=0,
            updated_at=now,
        )
    return get(engine, job_id) or job
