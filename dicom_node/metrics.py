"""Prometheus metrics of the node.

Names follow Triton's where they mean the same thing (``inference_request_success`` ...).
Labels carry model names, versions, destinations and states only: never patient data or UIDs.

Every sample also carries a ``node`` label (config ``node_name``, default
``<hostname>-<role>``), added when ``/metrics`` is served (:func:`node_registry`), so that several
processes exporting the same series (two workers, two receivers) stay apart in Prometheus. The
job-store gauges (``dicom_node_jobs``, ``dicom_node_queue_depth``, ``dicom_node_processes``)
describe the shared store: every process reports the same numbers, so aggregate them with
``max by (state)``, not ``sum``.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric

REGISTRY = CollectorRegistry(auto_describe=True)
"""The node's own registry, so that tests can run several nodes in one process without clashes."""

_NS = "dicom_node"

INSTANCES_RECEIVED = Counter(
    "instances_received", "C-STORE instances accepted and fsynced", namespace=_NS, registry=REGISTRY
)
INSTANCES_DUPLICATE = Counter(
    "instances_duplicate",
    "C-STORE instances already in the spool (stored once)",
    namespace=_NS,
    registry=REGISTRY,
)
INSTANCES_REJECTED = Counter(
    "instances_rejected",
    "C-STORE requests answered with a failure status",
    ["reason"],
    namespace=_NS,
    registry=REGISTRY,
)
SPOOL_QUARANTINED = Counter(
    "spool_quarantined",
    "Spooled files the start-up reconciliation moved to quarantine instead of recording",
    ["reason"],
    namespace=_NS,
    registry=REGISTRY,
)
ASSOCIATIONS = Counter(
    "associations",
    "Associations requested, by outcome",
    ["outcome"],
    namespace=_NS,
    registry=REGISTRY,
)
SERIES_COMPLETED = Counter(
    "series_completed", "Series whose completion condition held", namespace=_NS, registry=REGISTRY
)
JOBS = Gauge("jobs", "Jobs in the job store by state", ["state"], namespace=_NS, registry=REGISTRY)
QUEUE_DEPTH = Gauge(
    "queue_depth", "Jobs queued and waiting for a worker", namespace=_NS, registry=REGISTRY
)
SPOOL_BYTES = Gauge("spool_bytes", "Bytes held in the spool", namespace=_NS, registry=REGISTRY)
RETENTION_FREED_FILES = Counter(
    "retention_freed_files",
    "Files (spooled instances and results) deleted by retention",
    namespace=_NS,
    registry=REGISTRY,
)
RETENTION_FREED_BYTES = Counter(
    "retention_freed_bytes",
    "Bytes of the files deleted by retention",
    namespace=_NS,
    registry=REGISTRY,
)

INFERENCE_SUCCESS = Counter(
    "inference_request_success",
    "Successful inference requests",
    ["model", "version"],
    namespace=_NS,
    registry=REGISTRY,
)
INFERENCE_FAILURE = Counter(
    "inference_request_failure",
    "Failed inference requests",
    ["model", "version"],
    namespace=_NS,
    registry=REGISTRY,
)
INFERENCE_DURATION = Histogram(
    "inference_duration_seconds",
    "Wall time of one inference request (all frames of a series)",
    ["model", "version"],
    namespace=_NS,
    registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
LOW_CONFIDENCE = Counter(
    "low_confidence_results",
    "Results flagged low confidence (uncertainty above the manifest's threshold or an input "
    "outside the training data), whatever the rule then did with them",
    ["model", "version"],
    namespace=_NS,
    registry=REGISTRY,
)
EXPORT_SUCCESS = Counter(
    "export_success",
    "SEGs delivered to a destination",
    ["destination"],
    namespace=_NS,
    registry=REGISTRY,
)
EXPORT_FAILURE = Counter(
    "export_failure", "Failed export attempts", ["destination"], namespace=_NS, registry=REGISTRY
)
ROUTING_DECISIONS = Counter(
    "routing_decisions",
    "Series routed, by rule ('none' when no rule matched)",
    ["rule"],
    namespace=_NS,
    registry=REGISTRY,
)
RULES_RELOAD_FAILURES = Counter(
    "rules_reload_failures",
    "Rule-set reloads rejected as invalid",
    namespace=_NS,
    registry=REGISTRY,
)
RULES_INFO = Gauge(
    "rules_info",
    "The active rule set (value 1), labelled by its content hash",
    ["version"],
    namespace=_NS,
    registry=REGISTRY,
)
MODEL_LOAD_FAILURES = Counter(
    "model_load_failures",
    "Model versions that failed to load or warm up",
    ["model", "version"],
    namespace=_NS,
    registry=REGISTRY,
)
MODEL_INFO = Gauge(
    "model_info",
    "Model versions loaded, by alias (value 1)",
    ["model", "version", "alias"],
    namespace=_NS,
    registry=REGISTRY,
)
SHADOW_AGREEMENT = Histogram(
    "shadow_agreement",
    "Dice agreement of a shadow version with production, per segment",
    ["model", "version", "segment"],
    namespace=_NS,
    registry=REGISTRY,
    buckets=(0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 1.0),
)
THREAD_EXCEPTIONS = Counter(
    "thread_exceptions",
    "Exceptions that escaped a background thread, by thread name (numbers stripped)",
    ["thread"],
    namespace=_NS,
    registry=REGISTRY,
)
LOOP_FAILURES = Counter(
    "loop_failures",
    "Passes of an internal loop that failed (the loop goes on; see /healthz)",
    ["loop"],
    namespace=_NS,
    registry=REGISTRY,
)
PROCESSES = Gauge(
    "processes",
    "Processes registered on the job store, by role and state (alive, dead, stopped)",
    ["role", "state"],
    namespace=_NS,
    registry=REGISTRY,
)
JOBS_TAKEN_BACK = Counter(
    "jobs_taken_back",
    "Claimed jobs this process gave back because their owner stopped heartbeating",
    namespace=_NS,
    registry=REGISTRY,
)

NODE_LABEL = "node"
"""The label every served sample carries (see the module docstring)."""


class _NodeLabelled:
    """A collector serving ``source``'s samples with ``node=<name>`` added to each."""

    def __init__(self, source: CollectorRegistry, node: str) -> None:
        self._source = source
        self._node = node

    def collect(self) -> Iterator[Metric]:
        for family in self._source.collect():
            out = Metric(family.name, family.documentation, family.type, family.unit)
            for s in family.samples:
                out.add_sample(
                    s.name,
                    {**s.labels, NODE_LABEL: self._node},
                    s.value,
                    s.timestamp,
                    s.exemplar,
                    s.native_histogram,
                )
            yield out


def node_registry(node: str, source: CollectorRegistry = REGISTRY) -> CollectorRegistry:
    """A registry to serve: ``source``'s metrics, every sample labelled ``node=<node>``.

    Raises
    ------
    ValueError
        ``node`` is empty.
    """
    if not node:
        raise ValueError("`node` must be a non-empty metric label value")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_NodeLabelled(source, node))
    return registry
