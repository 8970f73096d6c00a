"""Liveness and ownership across processes: who is running, and whose claimed jobs are whose.

Every ``dicom-node serve`` process registers a row in ``processes`` (id ``<host>:<pid>:<random>``,
role, host, pid, version) and heartbeats it every ``heartbeat_interval`` seconds from its
apscheduler clock. A job a worker claims carries the worker's id in ``jobs.owner`` and a lease
(``jobs.lease_until``) that the same heartbeat renews while the worker holds the job.

A job is **taken back** (``running -> queued``; an ``exporting`` job only loses its owner and
lease) by whichever process notices first, in one guarded ``UPDATE``, only when both hold:

* its owner is not alive: no ``processes`` row with a heartbeat within the last
  ``process_lease`` seconds and no ``stopped_at`` (a gracefully stopped process released its
  jobs already; one that could not is as good as dead);
* its lease ran out (``lease_until < now``).

The second condition is what makes the statement safe against a claim that commits while it
runs: a job claimed a moment ago has a fresh lease, whoever claimed it. A live owner keeps its
leases fresh, so its jobs are never taken back; a hung worker (a job held longer than
:data:`HUNG_AFTER`) stops being renewed, ``/healthz`` of its process says so, and the jobs come
back once the orchestrator has restarted that process and its heartbeat has gone stale.

All times are ``time.time()`` of the process that writes them: hosts that share a job store
must keep their clocks in step (NTP), well within a lease.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, delete, insert, or_, select, update

from dicom_node.jobs.queries import production, reading
from dicom_node.jobs.schema import jobs, processes
from dicom_node.jobs.states import JobState
from dicom_node.jobs.transitions import move

HUNG_AFTER = 300.0
"""Seconds a process may hold one job before its heartbeat stops renewing that job's lease (the
job then shows as running past its lease in ``/healthz``; see the module docstring)."""

KEEP_GONE = 7 * 86400.0
"""Seconds the row of a stopped or dead process is kept (``dicom-node status`` shows it)."""

ALIVE = "alive"
DEAD = "dead"
STOPPED = "stopped"

_HELD = (JobState.RUNNING, JobState.EXPORTING)


def new_process_id(pid: int | None = None) -> str:
    """``<host>:<pid>:<8 hex>``: unique even when a container reuses a host name and pid."""
    host = socket.gethostname()[:40] or "host"
    return f"{host}:{os.getpid() if pid is None else pid}:{secrets.token_hex(4)}"


@dataclass(frozen=True, slots=True)
class ProcessRecord:
    """One row of ``processes``: a ``dicom-node serve`` process, live or gone."""

    id: str
    role: str
    host: str
    pid: int
    version: str | None
    started_at: float
    heartbeat_at: float
    stopped_at: float | None
    details: Mapping[str, Any] | None

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> ProcessRecord:
        return cls(
            id=row["id"],
            role=row["role"],
            host=row["host"],
            pid=int(row["pid"]),
            version=row["version"],
            started_at=float(row["started_at"]),
            heartbeat_at=float(row["heartbeat_at"]),
            stopped_at=row["stopped_at"],
            details=row["details"],
        )

    def state(self, now: float, lease: float) -> str:
        """``stopped`` (stopped gracefully), ``alive`` (heartbeat within ``lease``) or ``dead``."""
        if self.stopped_at is not None:
            return STOPPED
        return ALIVE if now - self.heartbeat_at <= lease else DEAD

    def to_dict(self, now: float, lease: float) -> dict[str, Any]:
        """JSON-ready, with the heartbeat's age and the state at ``now``."""
        return {
            "id": self.id,
            "role": self.role,
            "host": self.host,
            "pid": self.pid,
            "version": self.version,
            "started_at": self.started_at,
            "heartbeat_at": self.heartbeat_at,
            "heartbeat_age": round(max(0.0, now - self.heartbeat_at), 1),
            "stopped_at": self.stopped_at,
            "state": self.state(now, lease),
            "details": dict(self.details) if self.details else None,
        }


def register(
    engine: Engine,
    process_id: str,
    role: str,
    version: str | None,
    details: Mapping[str, Any] | None = None,
    now: float | None = None,
) -> None:
    """Insert this process's row (its first heartbeat)."""
    now = time.time() if now is None else now
    with engine.begin() as conn:
        conn.execute(
            insert(processes).values(
                id=process_id,
                role=role,
                host=socket.gethostname()[:255] or "host",
                pid=os.getpid(),
                version=version,
                started_at=now,
                heartbeat_at=now,
                stopped_at=None,
                details=dict(details) if details else None,
            )
        )


def heartbeat(
    engine: Engine,
    process_id: str,
    lease: float,
    holding: Iterable[int] = (),
    now: float | None = None,
) -> bool:
    """Renew this process's heartbeat and the leases of the jobs in ``holding``.

    Parameters
    ----------
    lease:
        The new leases run until ``now + lease``.
    holding:
        Ids of the jobs this process is working on and still renews (see :data:`HUNG_AFTER`).
        Only those still owned by this process are renewed: a job taken back while this
        process was frozen stays with whoever has it now.

    Returns
    -------
    bool
        False when this process's row is gone or marked stopped (nothing renewed): the caller
        should register again and log it; its jobs may have been taken back.
    """
    now = time.time() if now is None else now
    ids = list(holding)
    with engine.begin() as conn:
        beat = conn.execute(
            update(processes)
            .where(processes.c.id == process_id, processes.c.stopped_at.is_(None))
            .values(heartbeat_at=now)
        ).rowcount
        if not beat:
            return False
        if ids:
            conn.execute(
                update(jobs)
                .where(
                    jobs.c.id.in_(ids),
                    jobs.c.owner == process_id,
                    jobs.c.state.in_([s.value for s in _HELD]),
                )
                .values(lease_until=now + lease)
            )
    return True


def mark_stopped(engine: Engine, process_id: str, now: float | None = None) -> None:
    """Record a graceful stop (after the process released its jobs)."""
    now = time.time() if now is None else now
    with engine.begin() as conn:
        conn.execute(
            update(processes)
            .where(processes.c.id == process_id)
            .values(stopped_at=now, heartbeat_at=now)
        )


def take_back(
    engine: Engine,
    lease: float,
    *,
    alone_as: str | None = None,
    now: float | None = None,
) -> list[int]:
    """Give the jobs of dead owners back (see the module docstring); return their ids.

    Parameters
    ----------
    lease:
        ``process_lease``: a process whose heartbeat is older than this is not alive.
    alone_as:
        The id of the calling process when it knows it is the only one on this job store (it
        holds the exclusive storage lock of the embedded SQLite store): every job held by
        another owner is then taken back at once, leases or not (a restart after ``kill -9``
        resumes without waiting for the old lease).
    """
    now = time.time() if now is None else now
    held = or_(jobs.c.owner.is_not(None), jobs.c.lease_until.is_not(None))  # not a retry wait
    where: list[Any] = [production(), held]
    if alone_as is not None:
        where.append(or_(jobs.c.owner.is_(None), jobs.c.owner != alone_as))
    else:
        alive = select(processes.c.id).where(
            processes.c.stopped_at.is_(None), processes.c.heartbeat_at >= now - lease
        )
        where += [
            or_(jobs.c.owner.is_(None), jobs.c.owner.not_in(alive)),
            or_(jobs.c.lease_until.is_(None), jobs.c.lease_until < now),
        ]
    stmt = move(
        {JobState.RUNNING: JobState.QUEUED, JobState.EXPORTING: JobState.EXPORTING},
        *where,
        owner=None,
        lease_until=None,
        updated_at=now,
    ).returning(jobs.c.id)
    with engine.begin() as conn:
        return sorted(int(i) for i in conn.execute(stmt).scalars())


def prune(engine: Engine, lease: float, keep: float = KEEP_GONE, now: float | None = None) -> int:
    """Delete the rows of processes stopped or dead for longer than ``keep``; return how many."""
    now = time.time() if now is None else now
    with engine.begin() as conn:
        return int(
            conn.execute(
                delete(processes).where(processes.c.heartbeat_at < now - max(keep, lease))
            ).rowcount
        )


def list_processes(engine: Engine) -> list[ProcessRecord]:
    """Every registered process, the most recently started first."""
    stmt = select(processes).order_by(processes.c.started_at.desc(), processes.c.id)
    with reading(engine) as conn:
        return [ProcessRecord.from_row(r) for r in conn.execute(stmt).mappings()]


__all__ = [
    "ALIVE",
    "DEAD",
    "HUNG_AFTER",
    "KEEP_GONE",
    "STOPPED",
    "ProcessRecord",
    "heartbeat",
    "list_processes",
    "mark_stopped",
    "new_process_id",
    "prune",
    "register",
    "take_back",
]
