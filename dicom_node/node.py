"""The node: receiver, assembly, workers, model serving, rules and health, wired by the job store.

apscheduler is the local clock (periodic polls of the job store, gauges); it owns no job state, so
a second process on the same job store would not fight over it. The passes themselves run on one
driver thread, woken by that clock, by every instance the SCP records and by every worker that
frees, so a job starts right after its series completes instead of up to a poll interval later.
Workers are a bounded thread pool fed by atomic claims from the store.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler

from dicom_node import metrics
from dicom_node.audit import AuditLog
from dicom_node.config import NodeConfig
from dicom_node.http import HealthServer
from dicom_node.infer.worker import Worker
from dicom_node.jobs import TERMINAL, InstanceRecord, Job, JobState, JobStore
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

DRIVER_MAX_SILENCE = 30.0
"""Seconds without a successful driver pass (the clock wakes it every ``poll_interval``) after
which ``/healthz`` reports the node as not alive."""

STOP_JOIN_SECONDS = 10.0
"""How long :meth:`Node.stop` waits for the driver thread to finish its current pass."""


class Node:
    """A running dicom-node. ``start()`` returns once it listens; ``stop()`` is graceful.

    Parameters
    ----------
    config:
        The resolved configuration (see :func:`dicom_node.config.load_config`).
    """

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        config.storage.mkdir(parents=True, exist_ok=True)
        # one owner per storage, before anything in it is read (raises StorageInUse)
        self._storage_lock = StorageLock(config.storage)
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
        self.store = JobStore.open(config.storage)
        self.audit = AuditLog(config.storage / "audit.log")
        self.spool = Spool(config.storage)
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
            config, self.store, self.models, self.audit, outputs_for=self._rule_outputs
        )
        self.scp = StorageSCP(config, self.spool, self._on_instance)
        self.http = HealthServer(
            config.http_host,
            config.http_port,
            self.readiness,
            liveness=self.health,
            detail_from=config.health_detail,
        )
        self._pool = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="worker")
        self._slots = threading.BoundedSemaphore(config.workers)
        self._scheduler = BackgroundScheduler(timezone="UTC")
        self._stopping = threading.Event()
        self._wake_event = threading.Event()
        self._models_signature: tuple[tuple[str, int], ...] = ()
        self._driver = threading.Thread(target=self._drive, name="pipeline-driver", daemon=True)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Load rules and models, resume unfinished jobs, then listen for DICOM and HTTP."""
        # files of a retention pass a crash interrupted go first: their rows are already gone,
        # and reconciliation would record them again (jobs/retention.py)
        self._audit_purge(self.store.finish_purges(self.config.storage, self.spool.remove))
        reconcile_spool(self.store, self.config.storage, SPOOL_DIR)
        resumed = self.store.release_running()
        if resumed:
            LOGGER.info("resuming %d interrupted job(s)", resumed)
        self.rules_watcher.start()
        self.models.start()
        self.http.start()
        interval = self.config.poll_interval
        self.liveness.register(
            "driver", max(DRIVER_MAX_SILENCE, 20 * interval), alive=self._driver.is_alive
        )
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
        self._scheduler.start()
        self.scp.start()
        LOGGER.info(
            "dicom-node %s listening on DICOM port %d, HTTP port %d",
            self.config.ae_title,
            self.scp.port,
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
        self._wake()

    def _wake(self) -> None:
        """Ask the driver for a pass now (cheap; wake-ups during a pass coalesce into one)."""
        self._wake_event.set()

    def _drive(self) -> None:
        """The driver thread: one pass per wake-up until the node stops.

        A bug that escapes a pass is logged, counted and the loop goes on: a dead driver would
        leave the node receiving but never routing or processing anything.
        """
        while True:
            self._wake_event.wait()
            if self._stopping.is_set():
                return
            self._wake_event.clear()
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
        while not self._stopping.is_set() and self._slots.acquire(blocking=False):
            job = self.store.claim()
            if job is None:
                self._slots.release()
                return
            self._pool.submit(self._run, job)

    def _run(self, job: Job) -> None:
        try:
            if self._stopping.is_set():  # claimed, but the node stops: leave it for the next start
                self.store.release(job.id)
                return
            self.worker.process(job)
        finally:
            self._slots.release()
            self._wake()  # a slot is free: the next due job need not wait for the clock

    def _retention(self) -> None:
        """One retention pass (scheduler thread): purge finished series past their age."""
        try:
            report = self.store.purge_expired(
                self.config.storage, self.config.retention, remove_spooled=self.spool.remove
            )
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

    def health(self) -> dict[str, tuple[bool, str]]:
        """The checks behind ``/healthz``: every loop made progress, no job outlived its lease.

        A job ``running`` past its lease has a worker that hangs (inference that never returns,
        an export socket stuck): the process is alive but that job has no live owner, so the
        node says so and an orchestrator's restart gives the job back (``release_running``).
        """
        checks = self.liveness.check()
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
        listening = bool(self.scp.listening) and not self._stopping.is_set()
        return {
            "rules": (rules is not None, rules_detail),
            "models": (models_ok, models_detail),
            "scp": (listening, f"port {self.scp.port}" if listening else "not listening"),
            "disk": self._disk_check(),
        }

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
