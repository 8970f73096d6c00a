"""The node: receiver, assembly, workers, model serving, rules and health, wired by the job store.

apscheduler is the local clock (periodic polls of the job store, gauges); it owns no job state, so
a second process on the same job store would not fight over it. The passes themselves run on one
driver thread, woken by that clock, by every instance the SCP records and by every worker that
frees, so a job starts right after its series completes instead of up to a poll interval later.
Workers are a bounded thread pool fed by atomic claims from the store.

Roles (``role`` / ``serve --role``): a ``receiver`` runs the DICOM listener and the spool, a
``worker`` claims jobs (inference, results, export), ``all`` runs both. Assembly and routing run
in every role: each step is a guarded ``UPDATE`` in the job store (``received -> routed``,
``routed -> queued``), so however many processes try, one wins and the others see zero rows.
Each process registers in the job store and heartbeats there (:mod:`dicom_node.jobs.processes`);
the same heartbeat renews the leases of the jobs it holds and takes back those of dead owners.
"""

from __future__ import annotations

import collections
import gc
import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler

from dicom_node import __version__, metrics
from dicom_node.audit import AuditLog
from dicom_node.config import NodeConfig
from dicom_node.http import HealthServer
from dicom_node.infer.worker import Worker
from dicom_node.jobs import TERMINAL, InstanceRecord, Job, JobState, JobStore
from dicom_node.jobs.processes import HUNG_AFTER
from dicom_node.jobs.reconcile import reconcile_spool
from dicom_node.jobs.retention import Freed, RetentionReport
from dicom_node.liveness import Liveness, install_thread_excepthook
from dicom_node.modelstore import ModelRunner, ModelStore, ServingModels
from dicom_node.ownership import StorageLock
from dicom_node.receive import disk
from dicom_node.receive.scp import StorageSCP
from dicom_node.receive.spool import SPOOL_DIR, Spool
from dicom_node.routing import ActiveRules, RulesWatcher, load_rules
from dicom_node.routing.assembly import Assembler

LOGGER = logging.getLogger(__name__)

METRICS_INTERVAL = 2.0
"""Seconds between refreshes of the job-state gauges."""

PASS_MIN_GAP = 0.02
"""Seconds the driver rests after a pass: wake-ups from a burst of C-STOREs coalesce into at most
one pass per gap instead of one per instance (the receiver keeps the CPU and the job store)."""

SERIES_PASS_GAP = 0.2
"""Seconds within which the driver passes after an instance of a series it has already seen
(the first instance of a series wakes it at once). A series completes by its idle time or by an
instance count, so one pass per gap finds it as well as one per instance would, at most this much
later for a count, while a 600-instance association no longer pays a job-store pass (4-6
statements) every 20 ms: measured, that pass held the GIL 21% of the time the receiver ran."""

SEEN_SERIES = 4096
"""Series UIDs the driver remembers as seen (most recent first); older ones count as new."""

DRIVER_MAX_SILENCE = 30.0
"""Seconds without a successful driver pass (the clock wakes it every ``poll_interval``) after
which ``/healthz`` reports the node as not alive."""

STOP_JOIN_SECONDS = 10.0
"""How long :meth:`Node.stop` waits for the driver thread to finish its current pass."""

RECONCILE_GRACE = 120.0
"""Seconds a spooled file must be old before the start-up reconciliation of a process that
shares ``storage`` (server database) records it: younger ones may be a live receiver's that it
records itself a moment later (see :func:`dicom_node.jobs.reconcile.reconcile_spool`)."""

TESTHOOK_HOLD_JOB = "DICOM_NODE_TESTHOOK_HOLD_JOB"
"""Test hook, inert unless set: seconds a worker holds each job it claimed before working on it
(the multi-process tests kill a worker while it holds one). Not a configuration key; never set it
in production."""

RECEIVER_ROLES = frozenset({"all", "receiver"})
WORKER_ROLES = frozenset({"all", "worker"})


def server_database(config: NodeConfig) -> bool:
    """Whether the job store is a server database (several processes may share ``storage``)
    rather than the embedded SQLite file (one process per ``storage``)."""
    return config.database is not None and not config.database.startswith("sqlite")


def node_name(config: NodeConfig) -> str:
    """The ``node`` label of this process's metrics: ``node_name`` or ``<hostname>-<role>``."""
    return config.node_name or f"{socket.gethostname()}-{config.role}"


class Node:
    """A running dicom-node. ``start()`` returns once it listens; ``stop()`` is graceful.

    Parameters
    ----------
    config:
        The resolved configuration (see :func:`dicom_node.config.load_config`).
    """

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.role = config.role
        self.name = node_name(config)
        config.storage.mkdir(parents=True, exist_ok=True)
        # before anything in storage is read (raises StorageInUse): SQLite, one process per
        # storage (then this process is alone on its job store); server database: shared
        self._shared = server_database(config)
        self._storage_lock = StorageLock(config.storage, shared=self._shared)
        self._storage_lock.acquire()
        try:
            self._wire(config)
        except BaseException:
            self._storage_lock.release()
            raise

    def _wire(self, config: NodeConfig) -> None:
        """Build every stage (after the storage lock is held)."""
        install_thread_excepthook()
        self.liveness = Liveness()
        self.store = JobStore.for_config(config)  # database:, migrate: (StoreError)
        self.audit = AuditLog(config.storage / "audit.log")
        self.process_id: str | None = None
        # shared storage: staged files younger than the grace may be a live receiver's
        self.spool = Spool(config.storage, recover_min_age=RECONCILE_GRACE if self._shared else 0.0)
        self.model_store = ModelStore(config.models)
        self.models = ServingModels(
            self.model_store,
            ModelRunner(threads=config.inference_threads),
            interval=config.reload_interval,
        )
        self.rules = ActiveRules()
        self.rules_watcher = RulesWatcher(
            config.rules,
            self._load_rules,
            on_change=self.rules.set,
            on_error=self.rules.set_error,
            interval=config.reload_interval,
        )
        self.assembler = Assembler(
            self.store,
            config.storage,
            lambda: self.rules.current,
            config.default_idle_seconds,
            self.audit,
        )
        self.worker = Worker(
            config,
            self.store,
            self.models,
            self.audit,
            outputs_for=self._rule_outputs,
            on_low_confidence_for=self._rule_on_low_confidence,
        )
        self.scp = StorageSCP(config, self.spool, self._on_instance)
        self.http = HealthServer(
            config.http_host,
            config.http_port,
            self.readiness,
            liveness=self.health,
            detail_from=config.health_detail,
            node=self.name,
        )
        self._pool = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="worker")
        self._slots = threading.BoundedSemaphore(config.workers)
        self._scheduler = BackgroundScheduler(timezone="UTC")
        self._stopping = threading.Event()
        # the driver sleeps on this: _urgent asks for a pass now, _due for one by a deadline
        self._wake_cond = threading.Condition()
        self._urgent = False
        self._due: float | None = None
        self._seen_series: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._models_signature: tuple[tuple[str, int], ...] = ()
        self._held: dict[int, float] = {}  # job id -> monotonic time of its claim
        self._test_hold = float(os.environ.get(TESTHOOK_HOLD_JOB) or 0.0)
        self._held_lock = threading.Lock()
        self._driver = threading.Thread(target=self._drive, name="pipeline-driver", daemon=True)

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def receives(self) -> bool:
        """Whether this process runs the DICOM listener (role ``all`` or ``receiver``)."""
        return self.role in RECEIVER_ROLES

    @property
    def works(self) -> bool:
        """Whether this process claims jobs (role ``all`` or ``worker``)."""
        return self.role in WORKER_ROLES

    def start(self) -> None:
        """Load rules and models, resume unfinished jobs, then listen for DICOM and HTTP."""
        # files of a retention pass a crash interrupted go first: their rows are already gone,
        # and reconciliation would record them again (jobs/retention.py)
        self._audit_purge(self.store.finish_purges(self.config.storage, self.spool.remove))
        if self.receives:
            grace = RECONCILE_GRACE if self._shared else 0.0
            reconcile_spool(self.store, self.config.storage, SPOOL_DIR, min_age=grace)
        self.process_id = self.store.register_process(
            self.role, __version__, details={"node": self.name, "ae_title": self.config.ae_title}
        )
        self.audit.process = self.process_id
        # alone on the embedded store (exclusive lock): every held job is an interrupted one;
        # on a shared store only those of dead owners, once their lease ran out
        resumed = self.store.take_back(self.config.process_lease, alone=not self._shared)
        if resumed:
            self.audit.write("taken_back", jobs=resumed, at="start")
        if not self._shared:
            counts = self.store.counts()
            waiting = counts[JobState.QUEUED.value] + counts[JobState.EXPORTING.value]
            if waiting:
                LOGGER.info(
                    "resuming %d unfinished job(s), %d of them interrupted", waiting, len(resumed)
                )
        elif resumed:
            LOGGER.info("took back %d job(s) of stopped processes", len(resumed))
        LOGGER.info("process %s registered (role %s)", self.process_id, self.role)
        self.rules_watcher.start()
        if self.works:
            self.models.start()
        self.http.start()
        interval = self.config.poll_interval
        self.liveness.register(
            "driver", max(DRIVER_MAX_SILENCE, 20 * interval), alive=self._driver.is_alive
        )
        # silent for a lease: the other processes count this one as dead and take its jobs
        self.liveness.register("heartbeat", self.config.process_lease)
        self._driver.start()
        self._scheduler.add_job(
            self._wake,
            "interval",
            seconds=interval,
            id="pipeline",
            max_instances=1,
            coalesce=True,
            next_run_time=_now(),
        )
        self._scheduler.add_job(
            self._update_gauges,
            "interval",
            seconds=METRICS_INTERVAL,
            id="gauges",
            max_instances=1,
            coalesce=True,
        )
        self._models_signature = self._model_store_signature()
        self._scheduler.add_job(
            self._retry_rejected_rules,
            "interval",
            seconds=self.config.reload_interval,
            id="rules-retry",
            max_instances=1,
            coalesce=True,
        )
        self._scheduler.add_job(
            self._retention,
            "interval",
            seconds=self.config.retention.interval,
            id="retention",
            max_instances=1,
            coalesce=True,
            next_run_time=_now(),  # one pass at start, then every retention.interval
        )
        self._scheduler.add_job(
            self._heartbeat,
            "interval",
            seconds=self.config.heartbeat_interval,
            id="heartbeat",
            max_instances=1,
            coalesce=True,
        )
        self._scheduler.start()
        if self.receives:
            self.scp.start()
        # what start-up loaded (libraries, models, rules) lives as long as the process: the
        # collector need not walk it again (a full collection took 40-110 ms with it and held
        # every thread; issue 15)
        gc.freeze()
        LOGGER.info(
            "dicom-node %s (%s) %s, HTTP port %d",
            self.config.ae_title,
            self.role,
            f"listening on DICOM port {self.scp.port}" if self.receives else "not listening",
            self.http.port,
        )

    def stop(self, timeout: float = 60.0) -> None:
        """Stop accepting associations, let running jobs finish (or persist), then close.

        The listener closes first (a new association is refused at once), associations in
        progress may finish their C-STOREs, no job is claimed any more, and jobs already in a
        worker run to their next state. Jobs claimed but not started yet go back to
        ``queued``; everything else unfinished stays in the job store for the next start.
        """
        if self._stopping.is_set():
            return
        self._stopping.set()
        LOGGER.info("stopping: no new associations; finishing running jobs")
        self.scp.stop()
        self._wake()
        self._scheduler.shutdown(wait=True)
        if self._driver.is_alive():
            self._driver.join(STOP_JOIN_SECONDS)
        self._pool.shutdown(wait=True)  # claimed-but-unstarted jobs release themselves in _run
        pending = sum(n for state, n in self.store.counts().items() if state not in TERMINAL)
        if pending:
            LOGGER.info("%d unfinished job(s) kept in the job store for the next start", pending)
        try:
            self.store.mark_stopped()
        except Exception:  # noqa: BLE001 (a stop must finish; the heartbeat goes stale anyway)
            LOGGER.exception("could not record this process as stopped")
        self.rules_watcher.stop()
        self.models.stop()
        self.http.stop()
        self.store.close()
        self._storage_lock.release()
        LOGGER.info("stopped")

    @property
    def dicom_port(self) -> int:
        return int(self.scp.port)

    @property
    def http_port(self) -> int:
        return self.http.port

    # -- stages -------------------------------------------------------------------------------
    def _load_rules(self) -> Any:
        return load_rules(
            self.config.rules,
            destinations=set(self.config.destinations),
            model_exists=self.model_store.model_exists,
        )

    def _rule_outputs(self, name: str) -> tuple[str, ...] | None:
        """The ``outputs`` of the rule called ``name`` in the rule set in force (None: unknown)."""
        rules = self.rules.current
        rule = rules.get(name) if rules is not None else None
        return rule.outputs if rule is not None else None

    def _rule_on_low_confidence(self, name: str) -> str | None:
        """The ``on_low_confidence`` of the rule called ``name`` in force (None: unknown)."""
        rules = self.rules.current
        rule = rules.get(name) if rules is not None else None
        return rule.on_low_confidence if rule is not None else None

    def _model_store_signature(self) -> tuple[tuple[str, int], ...]:
        """Names and mtimes of the model store's alias files and version folders."""
        root = self.config.models
        paths = [*root.glob("*/aliases.yaml"), *root.glob("*/*/manifest.yaml")]
        out = []
        for path in paths:
            try:
                out.append((str(path.relative_to(root)), path.stat().st_mtime_ns))
            except OSError:  # removed while we looked
                continue
        return tuple(sorted(out))

    def _retry_rejected_rules(self) -> None:
        """Load a rejected rule set again when the model store changed since.

        The rules are checked against the model store (a rule naming ``model@production`` is
        refused while that alias is not set), but the watcher reloads only when the rule files
        change: without this, promoting the model a rule waits for would leave the node unready
        until someone touched the rules.
        """
        if self.rules.error is None:
            return
        signature = self._model_store_signature()
        if signature == self._models_signature:
            return
        self._models_signature = signature
        LOGGER.info("model store changed: loading the rejected rule set again")
        self.rules_watcher.check_now(initial=True)

    def _on_instance(self, record: InstanceRecord) -> None:
        """SCP callback after fsync: the job row must exist before the SCP answers Success."""
        self.store.record_instance(record)
        if self._first_sight(record.series_uid):
            self._wake()
        else:
            self._wake_soon()

    def _first_sight(self, series_uid: str) -> bool:
        """True the first time (in the last :data:`SEEN_SERIES`) a series' instance arrives."""
        with self._wake_cond:
            seen = self._seen_series
            if series_uid in seen:
                seen.move_to_end(series_uid)
                return False
            seen[series_uid] = None
            if len(seen) > SEEN_SERIES:
                seen.popitem(last=False)
            return True

    def _wake(self) -> None:
        """Ask the driver for a pass now (cheap; wake-ups during a pass coalesce into one)."""
        with self._wake_cond:
            self._urgent = True
            self._wake_cond.notify()

    def _wake_soon(self) -> None:
        """Ask the driver for a pass within :data:`SERIES_PASS_GAP` (one per gap, however many
        instances ask)."""
        with self._wake_cond:
            if self._due is None and not self._urgent:
                self._due = time.monotonic() + SERIES_PASS_GAP
                self._wake_cond.notify()

    def _wait_for_wake(self) -> None:
        """Block until a pass is asked for now, its deadline passed, or the node stops."""
        with self._wake_cond:
            while not (self._urgent or self._stopping.is_set()):
                due = self._due
                if due is None:
                    self._wake_cond.wait()
                    continue
                left = due - time.monotonic()
                if left <= 0:
                    break
                self._wake_cond.wait(left)
            self._urgent = False
            self._due = None

    def _drive(self) -> None:
        """The driver thread: one pass per wake-up until the node stops.

        A bug that escapes a pass is logged, counted and the loop goes on: a dead driver would
        leave the node receiving but never routing or processing anything.
        """
        while True:
            self._wait_for_wake()
            if self._stopping.is_set():
                return
            try:
                self._tick()
            except Exception as exc:  # noqa: BLE001 (the loop must survive its own bugs)
                metrics.LOOP_FAILURES.labels(loop="driver").inc()
                self.liveness.trouble("driver", type(exc).__name__)
                LOGGER.exception("pipeline driver pass crashed; going on")
            self._stopping.wait(PASS_MIN_GAP)

    def _tick(self) -> None:
        """One pass of the pipeline driver: route/queue, then hand due jobs to free workers."""
        if self._stopping.is_set():
            return
        try:
            self.assembler.tick()
            self._dispatch()
        except Exception as exc:  # a bad pass must not kill the driver; /healthz will tell
            metrics.LOOP_FAILURES.labels(loop="driver").inc()
            self.liveness.trouble("driver", f"{type(exc).__name__} in a pass")
            LOGGER.exception("pipeline pass failed")
            return
        self.liveness.beat("driver")

    def _dispatch(self) -> None:
        if not self.works:
            return
        while not self._stopping.is_set() and self._slots.acquire(blocking=False):
            job = self.store.claim(lease=self.config.process_lease)
            if job is None:
                self._slots.release()
                return
            with self._held_lock:
                self._held[job.id] = time.monotonic()
            self.audit.write("claimed", job=job.id, state=job.state.value, attempt=job.attempts)
            self._pool.submit(self._run, job)

    def _run(self, job: Job) -> None:
        try:
            if self._test_hold > 0:
                LOGGER.warning("test hook %s: holding job %s", TESTHOOK_HOLD_JOB, job.id)
                self._stopping.wait(self._test_hold)
            if self._stopping.is_set():  # claimed, but the node stops: leave it for the next start
                self.store.release(job.id)
                return
            self.worker.process(job)
        finally:
            with self._held_lock:
                self._held.pop(job.id, None)
            self._slots.release()
            self._wake()  # a slot is free: the next due job need not wait for the clock

    def _renewable(self) -> list[int]:
        """Jobs this process holds whose leases its heartbeat still renews (not hung)."""
        now = time.monotonic()
        with self._held_lock:
            return [job_id for job_id, t in self._held.items() if now - t < HUNG_AFTER]

    def _heartbeat(self) -> None:
        """Scheduler: renew this process's heartbeat and leases; take back dead owners' jobs."""
        lease = self.config.process_lease
        try:
            if not self.store.heartbeat(lease, self._renewable()):
                # our row was marked stopped or removed: register anew; jobs we hold under the
                # old id can no longer be moved by us (held_by), whoever has them now
                LOGGER.warning(
                    "process %s is no longer registered; registering again", self.process_id
                )
                self.process_id = self.store.register_process(
                    self.role, __version__, details={"node": self.name}
                )
                self.audit.process = self.process_id
            taken = self.store.take_back(lease)
        except Exception as exc:  # noqa: BLE001 (the next beat tries again; /healthz tells)
            metrics.LOOP_FAILURES.labels(loop="heartbeat").inc()
            self.liveness.trouble("heartbeat", type(exc).__name__)
            LOGGER.exception("heartbeat failed")
            return
        self.liveness.beat("heartbeat")
        if taken:
            metrics.JOBS_TAKEN_BACK.inc(len(taken))
            self.audit.write("taken_back", jobs=taken, lease=lease)
            LOGGER.warning(
                "took back %d job(s) of process(es) that stopped heartbeating: %s",
                len(taken),
                ", ".join(map(str, taken)),
            )
            self._wake()

    def _retention(self) -> None:
        """One retention pass (scheduler thread): purge finished series past their age."""
        try:
            report = self.store.purge_expired(
                self.config.storage, self.config.retention, remove_spooled=self.spool.remove
            )
            self.store.prune_processes(self.config.process_lease)  # gone for KEEP_GONE
        except Exception:  # the next pass tries again; nothing is half-done (see retention)
            metrics.LOOP_FAILURES.labels(loop="retention").inc()
            LOGGER.exception("retention pass failed")
            return
        audit_retention(self.audit, report)

    def _audit_purge(self, freed: Freed) -> None:
        if freed.files or freed.kept:
            LOGGER.info("finished an interrupted retention pass: %d file(s)", freed.files)
            self.audit.write(
                "retention", interrupted=True, files=freed.files, bytes=freed.bytes, series=0
            )

    def _update_gauges(self) -> None:
        counts = self.store.counts()
        for state, n in counts.items():
            metrics.JOBS.labels(state=state).set(n)
        metrics.QUEUE_DEPTH.set(counts[JobState.QUEUED.value])
        now = time.time()
        by_role: dict[tuple[str, str], int] = {}
        for proc in self.store.list_processes():
            key = (proc.role, proc.state(now, self.config.process_lease))
            by_role[key] = by_role.get(key, 0) + 1
        for role in ("all", "receiver", "worker"):
            for state in ("alive", "dead", "stopped"):
                metrics.PROCESSES.labels(role=role, state=state).set(by_role.get((role, state), 0))

    def health(self) -> dict[str, tuple[bool, str]]:
        """The checks behind ``/healthz``: every loop made progress, no job outlived its lease.

        A job ``running`` past its lease has a worker that hangs (inference that never returns,
        an export socket stuck): the process is alive but that job has no live owner, so the
        node says so and an orchestrator's restart gives the job back (``release_running``).
        """
        checks = self.liveness.check()
        checks["process"] = (True, f"{self.process_id} (role {self.role}, node {self.name})")
        try:
            overdue = self.store.overdue_running()
        except Exception as exc:  # noqa: BLE001 (a failing job store is itself the answer)
            checks["jobs"] = (False, f"job store unreadable: {type(exc).__name__}")
        else:
            checks["jobs"] = (
                (False, f"{overdue} job(s) running past their lease")
                if overdue
                else (True, "no job past its lease")
            )
        return checks

    def readiness(self) -> dict[str, tuple[bool, str]]:
        """The checks behind ``/readyz``."""
        rules = self.rules.current
        rules_detail = f"rule set {rules.version} active" if rules is not None else "no rules"
        if self.rules.error:
            rules_detail += f"; last reload rejected: {self.rules.error}"
        # every production alias in the store, and every alias the active rules name (a rule
        # may name a model whose production alias is not set: that must not look ready)
        models_ok, models_detail = self.models.ready()
        refs = sorted({r.model for r in rules.rules if r.model}) if rules is not None else []
        if models_ok and refs:
            models_ok, models_detail = self.models.ready(refs)
        if models_ok:
            models_detail = _describe_served(self.models.served()) or "no models in the store"
        checks = {"rules": (rules is not None, rules_detail)}
        if self.works:
            checks["models"] = (models_ok, models_detail)
        if self.receives:
            listening = bool(self.scp.listening) and not self._stopping.is_set()
            checks["scp"] = (listening, f"port {self.scp.port}" if listening else "not listening")
        checks["disk"] = self._disk_check()
        return checks

    def _disk_check(self) -> tuple[bool, str]:
        """Free bytes and inodes under ``storage`` against ``min_free_disk``/``min_free_inodes``
        (the limits below which every C-STORE is refused with 0xA700)."""
        try:
            room = disk.disk_room(self.config.storage)
        except OSError as exc:
            return False, f"cannot examine storage: {exc.strerror or exc}"
        short = disk.shortage(room, 0, self.config.min_free_disk, self.config.min_free_inodes)
        if short is not None:
            return False, f"low disk, C-STOREs are refused: {short}"
        return True, disk.describe(room)

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Block until no job is waiting or running (for the demo and tests)."""
        deadline = time.monotonic() + timeout
        busy = {
            s.value
            for s in (
                JobState.RECEIVED,
                JobState.ROUTED,
                JobState.QUEUED,
                JobState.RUNNING,
                JobState.EXPORTING,
            )
        }
        while time.monotonic() < deadline:
            if not any(n for s, n in self.store.counts().items() if s in busy):
                return True
            time.sleep(0.1)
        return False


def audit_retention(audit: AuditLog, report: RetentionReport, **extra: Any) -> None:
    """Audit lines of a retention pass: one ``purged`` per series, one ``retention`` in all."""
    for purged in report.series:
        audit.write(
            "purged",
            series=purged.series_uid,
            jobs=[job_id for job_id, _ in purged.jobs],
            states=sorted({state for _, state in purged.jobs}),
            files=purged.files,
            bytes=purged.bytes,
        )
    if report.series or report.freed.files:
        audit.write(
            "retention",
            series=len(report.series),
            jobs=report.jobs,
            files=report.freed.files,
            bytes=report.freed.bytes,
            **extra,
        )


def _now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


def _describe_served(served: dict[str, dict[str, Any]]) -> str:
    """``thyroid-seg: production=1, shadow=2`` for every model served."""
    parts = []
    for name, aliases in sorted(served.items()):
        pairs = []
        for alias, version in sorted(aliases.items()):
            if isinstance(version, dict):
                version = f"{version['version']} ({version['percent']}%)"
            pairs.append(f"{alias}={version}")
        parts.append(f"{name}: {', '.join(pairs)}")
    return "; ".join(parts)
