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

from dicom_node.config import NodeConfig, RetentionConfig
from dicom_node.jobs import ingest, processes, queries, retention, shadow, transitions
from dicom_node.jobs import results as seg_results
from dicom_node.jobs.records import Instance, Job, Route, SegResult, Series, ShadowResult
from dicom_node.jobs.schema import create, safe_url
from dicom_node.jobs.states import JobState
from dicom_node.jobs.transitions import LEASE_SECONDS


class JobStore:
    """All reads and writes of job state. Thread-safe: every call is its own transaction.

    Parameters
    ----------
    engine:
        From :func:`dicom_node.jobs.schema.create`; shared by every stage of this process.
    owner:
        This process's id in ``processes`` (:mod:`dicom_node.jobs.processes`), or None (a CLI,
        a test): claims write it to ``jobs.owner``, and the worker's moves of a claimed job
        happen only while the job is still this owner's.
    """

    def __init__(self, engine: Engine, owner: str | None = None) -> None:
        self.engine = engine
        self.owner = owner

    @classmethod
    def open(
        cls, storage: Path, database: str | None = None, migrate: str = "auto"
    ) -> JobStore:
        """Open (creating if needed) the job store and bring its schema to this version's.

        Parameters
        ----------
        storage:
            Where the embedded SQLite store ``jobs.db`` lives when ``database`` is None.
        database:
            A SQLAlchemy URL (the ``database:`` config key), e.g. PostgreSQL.
        migrate:
            ``auto`` upgrades a store of an older version; ``never`` refuses it (see
            :func:`dicom_node.jobs.migrations.prepare`).

        Raises
        ------
        StoreError
            The database cannot be reached, or its schema is refused (the message says what to
            do and never shows a password).
        """
        return cls(create(database or Path(storage) / "jobs.db", migrate=migrate))

    @classmethod
    def for_config(cls, config: NodeConfig) -> JobStore:
        """:meth:`open` with the ``storage``, ``database`` and ``migrate`` of ``config``."""
        return cls.open(config.storage, config.database, config.migrate)

    @property
    def where(self) -> str:
        """The store's URL with its password masked (for messages and ``status``)."""
        return safe_url(str(self.engine.url))

    def close(self) -> None:
        ingest.release_hot_connection(self.engine)
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
        return transitions.claim(self.engine, lease, owner=self.owner)

    def resolved(
        self,
        job_id: int,
        name: str,
        version: str,
        alias: str | None,
        sha256: str,
        n_instances: int | None = None,
    ) -> None:
        """Record the model version a job resolved to; it finishes on this version.

        ``n_instances``: also :meth:`used_instances`, in the same transaction."""
        used = {} if n_instances is None else {"n_instances": n_instances}
        transitions.set_fields(
            self.engine,
            job_id,
            model_name=name,
            model_version=version,
            model_alias=alias,
            model_sha256=sha256,
            **used,
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
        transitions.exporting(
            self.engine, job_id, seg_path, seg_sop_uid, details, results, held_by=self.owner
        )

    def skip_running(self, job_id: int, outcome: str) -> None:
        """End a ``running`` job whose series has nothing to segment (see
        :func:`transitions.skip_running`)."""
        transitions.skip_running(self.engine, job_id, outcome, held_by=self.owner)

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
        transitions.export_retry(self.engine, job_id, delay, error, held_by=self.owner)

    def done(
        self,
        job_id: int,
        outcome: str,
        *,
        delivered: Sequence[str] | None = None,
        result_delivered: Mapping[int, Sequence[str]] | None = None,
    ) -> JobState:
        """End an ``exporting`` job as delivered (see :func:`transitions.done`); the last
        deliveries (``delivered``, ``result_delivered``) go into the same transaction."""
        return transitions.done(
            self.engine,
            job_id,
            outcome,
            held_by=self.owner,
            delivered=delivered,
            result_delivered=result_delivered,
        )

    def fail(self, job_id: int, error: str) -> JobState:
        """End a ``running`` or ``exporting`` job as failed (see :func:`transitions.fail`)."""
        return transitions.fail(self.engine, job_id, error, held_by=self.owner)

    def release(self, job_id: int) -> bool:
        """Give back a job this process claimed but did not start (the node is stopping)."""
        return transitions.release(self.engine, job_id, held_by=self.owner)

    def overdue_running(self, now: float | None = None) -> int:
        """Number of jobs ``running`` past their lease (a hung worker)."""
        return queries.overdue_running(
            self.engine, time.time() if now is None else now, owner=self.owner
        )

    def release_running(self) -> int:
        """Give every held job back, whoever holds it: only for a process alone on the store
        (see :func:`transitions.release_running`; several processes: :mod:`.processes`)."""
        return transitions.release_running(self.engine)

    # -- processes: liveness and ownership across processes (jobs.processes) ----------------
    def register_process(
        self, role: str, version: str | None, details: Mapping[str, Any] | None = None
    ) -> str:
        """Register this process (its id becomes :attr:`owner`); return the id."""
        ident = processes.new_process_id()
        processes.register(self.engine, ident, role, version, details)
        self.owner = ident
        return ident

    def heartbeat(self, lease: float, holding: Sequence[int] = ()) -> bool:
        """Renew this process's heartbeat and its jobs' leases (see :func:`processes.heartbeat`)."""
        if self.owner is None:
            raise RuntimeError("heartbeat before register_process")
        return processes.heartbeat(self.engine, self.owner, lease, holding)

    def mark_stopped(self) -> None:
        """Record a graceful stop of this process."""
        if self.owner is not None:
            processes.mark_stopped(self.engine, self.owner)

    def take_back(self, lease: float, *, alone: bool = False) -> list[int]:
        """Give back the jobs of dead owners; ``alone``: of every other owner (see
        :func:`processes.take_back`)."""
        alone_as = (self.owner or "") if alone else None
        return processes.take_back(self.engine, lease, alone_as=alone_as)

    def prune_processes(self, lease: float) -> int:
        """Forget processes gone for longer than :data:`processes.KEEP_GONE`."""
        return processes.prune(self.engine, lease)

    def list_processes(self) -> list[processes.ProcessRecord]:
        """Every registered process, newest first."""
        return processes.list_processes(self.engine)

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

    def rerun(self, job_id: int, model_name: str, version: str | None) -> Job:
        """Queue a done or failed job again on its stored instances (``dicom-node rerun``;
        see :func:`transitions.rerun`).

        Raises
        ------
        KeyError
            No job with this id.
        ValueError
            The job is not done or failed.
        """
        return transitions.rerun(self.engine, job_id, model_name, version)

    def jobs_for_series(self, series_uid: str) -> list[Job]:
        """Every job of a series, oldest first."""
        return queries.jobs_for_series(self.engine, series_uid)

    # -- low confidence (jobs.transitions): the rule's on_low_confidence ---------------------
    def hold(
        self,
        job_id: int,
        seg_path: str,
        seg_sop_uid: str,
        outcome: str,
        details: Mapping[str, Any] | None = None,
        results: Sequence[SegResult] | None = None,
    ) -> None:
        """Keep a ``running`` job's built results back (see :func:`transitions.hold`)."""
        transitions.hold(
            self.engine,
            job_id,
            seg_path,
            seg_sop_uid,
            outcome,
            details,
            results,
            held_by=self.owner,
        )

    def discard_running(
        self, job_id: int, outcome: str, details: Mapping[str, Any] | None = None
    ) -> None:
        """End a ``running`` job as skipped without export (see
        :func:`transitions.discard_running`)."""
        transitions.discard_running(self.engine, job_id, outcome, details, held_by=self.owner)

    def release_held(self, job_id: int) -> Job:
        """Export a held job's results (see :func:`transitions.release_held`).

        Raises
        ------
        KeyError
            No job with this id.
        ValueError
            The job is not held.
        """
        return transitions.release_held(self.engine, job_id)

    def discard_held(self, job_id: int) -> Job:
        """Drop a held job's results, ending it skipped (see :func:`transitions.discard_held`).

        Raises
        ------
        KeyError
            No job with this id.
        ValueError
            The job is not held.
        """
        return transitions.discard_held(self.engine, job_id)

    # -- shadow runs (jobs.shadow) ----------------------------------------------------------
    def add_shadow_result(
        self,
        job_id: int,
        model: str,
        version: str,
        agreement: Mapping[str, float],
        production_version: str | None = None,
        scores: Mapping[str, Mapping[str, float | None]] | None = None,
    ) -> None:
        """Record a shadow run on a production job's frames (never exported, not a job);
        ``scores``: per segment 3-D ``dice``, ``iou``, ``hd95_mm`` (None where undefined)."""
        shadow.add_shadow_result(
            self.engine, job_id, model, version, agreement, production_version, scores
        )

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
