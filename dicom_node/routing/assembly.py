"""Assembly: route each new series on its header, then queue it when its rule says it is complete.

The top of the routing package: it joins the engine to the job store (``received -> routed |
skipped`` and ``routed -> queued``) and is what the composition root (``dicom_node.node``) runs.

Completion never depends on association release (pynetdicom #855): a series is complete when its
rule's ``complete`` holds on what the job store has recorded, however the instances arrived.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import pydicom

from dicom_node import metrics
from dicom_node.audit import AuditLog
from dicom_node.jobs import Job, JobState, JobStore, Route, Series
from dicom_node.routing.engine import evaluate
from dicom_node.routing.rules import RuleSet

LOGGER = logging.getLogger(__name__)


class Assembler:
    """Moves jobs ``received -> routed | skipped`` and ``routed -> queued``.

    Parameters
    ----------
    store:
        The job store.
    storage:
        Root that the spool's relative paths start from.
    ruleset:
        Returns the active rule set (hot reload swaps it; a series keeps the decision it got).
    default_idle:
        Seconds of quiet that complete a series whose rule sets no ``complete``.
    audit:
        Where decisions are recorded.
    """

    def __init__(
        self,
        store: JobStore,
        storage: Path,
        ruleset: Callable[[], RuleSet | None],
        default_idle: float,
        audit: AuditLog,
    ) -> None:
        self.store = store
        self.storage = Path(storage)
        self.ruleset = ruleset
        self.default_idle = default_idle
        self.audit = audit

    def tick(self) -> int:
        """Route what arrived and queue what is complete; return the number of jobs queued."""
        rules = self.ruleset()
        if rules is not None:
            for job in self.store.jobs_in(JobState.RECEIVED):
                self._route(job, rules)
        queued = 0
        now = time.time()
        for job, series in self.store.routed_with_series():
            queued += self._maybe_queue(job, series, now)
        return queued

    def _header(self, series_uid: str) -> pydicom.Dataset | None:
        first = self.store.series_instances(series_uid)[:1]
        if not first:
            return None
        return pydicom.dcmread(self.storage / first[0].path, stop_before_pixels=True)

    def _route(self, job: Job, rules: RuleSet) -> None:
        try:
            header = self._header(job.series_uid)
            if header is None:
                return
            decision = evaluate(rules, header)
        except Exception as exc:  # one unreadable series must not stop the others
            LOGGER.exception("job %s: routing failed", job.id)
            # another process may have routed it meanwhile: only the one that skips it says so
            if self.store.skip(job.id, f"routing failed: {exc}", None, rules.version):
                self.audit.write("routing_failed", job=job.id, error=str(exc))
            return
        matched = decision.jobs
        if decision.discarded or not matched:
            # name the rule that discarded the series, not the first one that fired
            fired = [r for r in decision.matched if r.discard]
            fired = fired or list(decision.matched)
            rule: str | None = fired[0].name if fired else None
            outcome = f"discarded by rule {rule}" if decision.discarded else "no rule matched"
            if not self.store.skip(job.id, outcome, rule, rules.version):
                LOGGER.debug("job %s: already routed elsewhere", job.id)
                return  # several processes route: the one whose UPDATE won records it
            metrics.ROUTING_DECISIONS.labels(rule=rule or "none").inc()
            self.audit.write(
                "skipped",
                job=job.id,
                rule=rule,
                outcome=outcome,
                rules_version=rules.version,
                trace=decision.to_dict(),
            )
            LOGGER.info("job %s: %s", job.id, outcome)
            return
        routes = [
            Route(
                rule=r.name,
                model_ref=r.model,
                destinations=tuple(r.send_to),
                complete_instances=r.complete.instances,
                complete_idle=r.complete.idle_seconds,
            )
            for r in matched
            if r.model is not None  # decision.jobs: rules with a model
        ]
        if not self.store.route(job.id, routes, rules.version):
            LOGGER.debug("job %s: already routed elsewhere", job.id)
            return
        for r in matched:
            metrics.ROUTING_DECISIONS.labels(rule=r.name).inc()
        self.audit.write(
            "routed",
            job=job.id,
            rules=[r.name for r in matched],
            models=[r.model for r in matched],
            rules_version=rules.version,
            destinations=sorted({d for r in matched for d in r.send_to}),
        )
        LOGGER.info("job %s: routed by %s to %s", job.id, matched[0].name, matched[0].model)

    def _maybe_queue(self, job: Job, series: Series, now: float) -> int:
        """Queue a job of :meth:`JobStore.routed_with_series` if its series is complete."""
        n_instances = series.n_instances
        need = job.complete_instances
        idle = job.complete_idle
        if need is None and idle is None:
            idle = self.default_idle
        complete = (need is not None and n_instances >= need) or (
            idle is not None and now - series.last_received >= idle
        )
        if complete and self.store.queue(job.id, n_instances):
            metrics.SERIES_COMPLETED.inc()
            LOGGER.info("job %s: series complete with %d instance(s), queued", job.id, n_instances)
            return 1
        return 0
