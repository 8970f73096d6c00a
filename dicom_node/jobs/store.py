"""The job store: the only hand-off between the node's stages, and its source of truth.

:class:`JobStore` is the facade every other room uses; the work is done by the modules of
:mod:`dicom_node.jobs` (``schema`` tables and engine, ``ingest`` the C-STORE path,
``transitions`` every state change, ``queries`` the reads, ``shadow`` shadow results). Every
stage reads its work from here and writes its outcome back here; nothing is handed over in
memory only, so a restart after ``kill -9`` resumes from these tables.

A series' job moves through (the full table: :data:`dicom_node.jobs.states.TRANSITIONS`)::

    received -> routed -> queued -> running -> exporting -> done
                   \\-> skipped (no rule matched / discarded)      \\-> failed (retry re-queues)

Workers claim jobs with one atomic ``UPDATE ... RETURNING`` (never read-then-write).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from dicom_node.config import RetentionConfig
from dicom_node.jobs import ingest, queries, retention, shadow, transitions
from dicom_node.jobs import results as seg_results
from dicom_node.jobs.records import Instance, Job, Route, SegResult, Series, ShadowResult
from dicom_node.jobs.schema import create
from dicom_node.jobs.states import JobState
from dicom_node.jobs.transitions import LEASE_SECONDS


class JobStore:
    """All reads and writes of job state. Thread-safe: every call is its own transaction.

    Parameters
    ----------
    engine:
        From :func:`dicom_node.jobs.schema.create`; shared by every stage of this process.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @classmethod
    def open(cls, storage: Path) -> JobStore:
        """Open (creating if needed) the embedded SQLite store ``jobs.db`` under ``storage``."""
        return cls(create(Path(storage) / "jobs.db"))

    def close(self) -> None:
        self.engine.dispose()

    # -- receiving (jobs.ingest) ------------------------------------------------------------
    def record_instance(self, inst: Instance) -> bool:
        """Record a spooled instance; False if it was known (see :func:`ingest.record_instance`)."""
        return ingest.record_instance(self.engine, inst)

    def known_instance_uids(self) -> frozenset[str]:
        """SOP Instance UIDs of every recorded instance, and of every spooled file retention is
        deleting (for the spool reconciliation: neither may be recorded again)."""
        return queries.known_instance_uids(self.engine) | retention.pending_uids(self.engine)

    # -- routing and completion (jobs.transitions) ------------------------------------------
    def route(self, job_id: int, routes: Sequence[Route], rules_version: str) -> bool:
        """Route a ``received`` job; False if it was not received (see
        :func:`transitions.route`)."""
        return transitions.route(self.engine, job_id, routes, rules_version)

    def skip(self, job_id: int, outcome: str, rule: str | None, rules_version: str) -> bool:
        """End a ``received`` job without action; False if it was not received."""
        return transitions.skip(self.engine, job_id, outcome, rule, rules_version)

    def queue(self, job_id: int, n_instances: int) -> bool:
        """Mark a ``routed`` job's series complete; return True if this call queued it."""
        return transitions.queue(self.engine, job_id, n_instances)

    # -- workers (jobs.transitions) ---------------------------------------------------------
    def claim(self, lease: float = LEASE_SECONDS) -> Job | None:
        """Atomically take the next due job (see :func:`transitions.claim`)."""
        return transitions.claim(self.engine, lease)

    def resolved(
        self, job_id: int, name: str, version: str, alias: str | None, sha256: str
    ) -> None:
        """Record the model version a job resolved to; it finishes on this version."""
        transitions.set_fields(
            self.engine,
            job_id,
            model_name=name,
            model_version=version,
            model_alias=alias,
            model_sha256=sha256,
        )

    def used_instances(self, job_id: int, n_instances: int) -> None:
        """Record how many instances the worker read for the result it is building."""
        transitions.set_fields(self.engine, job_id, n_instances=n_instances)

    def exporting(
        self,
        job_id: int,
        seg_path: str,
        seg_sop_uid: str,
        details: Mapping[str, Any] | None = None,
        results: Sequence[SegResult] | None = None,
    ) -> None:
        """The SEG(s) of a ``running`` job are on disk (see :func:`transitions.exporting`)."""
        transitions.exporting(self.engine, job_id, seg_path, seg_sop_uid, details, results)

    def skip_running(self, job_id: int, outcome: str) -> None:
        """End a ``running`` job whose series has nothing to segment (see
        :func:`transitions.skip_running`)."""
        transitions.skip_running(self.engine, job_id, outcome)

    def results(self, job_id: int) -> list[SegResult]:
        """The SEGs of a job, by position (see :mod:`dicom_node.jobs.results`)."""
        return seg_results.for_job(self.engine, job_id)

    def result_delivered(self, job_id: int, position: int, destinations: Sequence[str]) -> None:
        """Record the destinations that have the job's SEG at ``position`` so far."""
        seg_results.delivered(self.engine, job_id, position, destinations)

    def delivered(self, job_id: int, destinations: Sequence[str]) -> None:
        """Record the destinations that have the SEG so far."""
        transitions.set_fields(self.engine, job_id, delivered=list(destinations))

    def export_retry(self, job_id: int, delay: float, error: str) -> None:
        """An export attempt failed; try again after ``delay`` seconds."""
        transitions.export_retry(self.engine, job_id, delay, error)

    def done(self, job_id: int, outcome: str) -> JobState:
        """End an ``exporting`` job as delivered (see :func:`transitions.done`)."""
        return transitions.done(self.engine, job_id, outcome)

    def fail(self, job_id: int, error: str) -> JobState:
        """End a ``running`` or ``exporting`` job as failed (see :func:`transitions.fail`)."""
        return transitions.fail(self.engine, job_id, error)

    def release(self, job_id: int) -> bool:
        """Give back a job this process claimed but did not start (the node is stopping)."""
        return transitions.release(self.engine, job_id)

    def overdue_running(self, now: float | None = None) -> int:
        """Number of jobs ``running`` past their lease (a hung worker)."""
        return queries.overdue_running(self.engine, time.time() if now is None else now)

    def release_running(self) -> int:
        """After a restart of the only node: give every interrupted job back to the queue."""
        return transitions.release_running(self.engine)

    def retry(self, job_id: int) -> Job:
        """Re-export or re-run a failed job (see :func:`transitions.retry`).

        Raises
        ------
        KeyError
            No job with this id.
        ValueError
            The job is not failed.
        """
        return transitions.retry(self.engine, job_id)

    # -- shadow runs (jobs.shadow) ----------------------------------------------------------
    def add_shadow_result(
        self,
        job_id: int,
        model: str,
        version: str,
        agreement: Mapping[str, float],
        production_version: str | None = None,
    ) -> None:
        """Record a shadow run on a production job's frames (never exported, not a job)."""
        shadow.add_shadow_result(self.engine, job_id, model, version, agreement, production_version)

    def shadow_results(self, model: str | None = None, limit: int = 1000) -> list[ShadowResult]:
        """The latest shadow results first, optionally only those of ``model``."""
        return shadow.shadow_results_for(self.engine, model, limit)

    # -- reading (jobs.queries) -------------------------------------------------------------
    def get(self, job_id: int) -> Job | None:
        """The job with ``job_id``, or None."""
        return queries.get(self.engine, job_id)

    def list_jobs(
        self, states: Sequence[JobState | str] | None = None, limit: int = 50
    ) -> list[Job]:
        """Newest jobs first, optionally only in ``states``."""
        return queries.list_jobs(self.engine, states, limit)

    def jobs_in(self, state: JobState, limit: int = 500) -> list[Job]:
        """Jobs in ``state``, oldest first."""
        return queries.jobs_in(self.engine, state, limit)

    def routed_with_series(self, limit: int = 500) -> list[tuple[Job, Series]]:
        """``routed`` jobs, oldest first, each with its series as recorded now."""
        return queries.routed_with_series(self.engine, limit)

    def counts(self) -> dict[str, int]:
        """Number of jobs in each state (every state present, zero included)."""
        return queries.counts(self.engine)

    def series_info(self, series_uid: str) -> Series | None:
        """The series as recorded so far, or None."""
        return queries.series_info(self.engine, series_uid)

    def series_instances(self, series_uid: str) -> list[Instance]:
        """Instances of a series in arrival order."""
        return queries.series_instances(self.engine, series_uid)

    # -- retention (jobs.retention) ---------------------------------------------------------
    def purge_expired(
        self,
        storage: Path,
        ages: RetentionConfig,
        *,
        dry_run: bool = False,
        now: float | None = None,
        remove_spooled: retention.Remove | None = None,
    ) -> retention.RetentionReport:
        """Delete the files and rows of finished series past their age (see
        :func:`retention.run`); ``dry_run`` only reports them."""
        return retention.run(
            self.engine, storage, ages, dry_run=dry_run, now=now, remove_spooled=remove_spooled
        )

    def finish_purges(
        self, storage: Path, remove_spooled: retention.Remove | None = None
    ) -> retention.Freed:
        """Delete the files of a retention pass a crash interrupted (before reconciliation)."""
        return retention.finish_pending(self.engine, storage, remove_spooled)
