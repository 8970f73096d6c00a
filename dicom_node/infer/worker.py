"""The worker: one claimed job at a time, from pixels to a SEG delivered to every destination.

A job resolves its model version once, when it first runs, and records it in the job store; a
re-run after a crash or a ``retry`` uses the recorded version, so a study is processed end to end
by one version even if an alias moves meanwhile.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from dicom_node import metrics
from dicom_node.audit import AuditLog
from dicom_node.config import NodeConfig
from dicom_node.jobs import Job, JobState, JobStore, TransitionError, one_patient_one_study
from dicom_node.modelstore import (
    InferenceError,
    ModelLoadError,
    SeriesFrames,
    SeriesReadError,
    atomic_write,
    dice,
    read_series,
)
from dicom_node.seg import AlgorithmInfo, SegmentSpec, build_seg
from dicom_node.send.dimse import client_tls_context, send_file

LOGGER = logging.getLogger(__name__)


class JobError(RuntimeError):
    """A job cannot succeed as it is (bad input, unsuitable model): it fails with this text."""


@dataclass(frozen=True)
class InferenceResult:
    """What one version made of a series: masks per segment key, stacked over frames."""

    masks: dict[str, np.ndarray]
    duration: float


def _fsync_write(path: Path, ds: Dataset) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda fh: ds.save_as(fh, enforce_file_format=True))


class Worker:
    """Runs claimed jobs. Stateless between jobs: everything it needs is in the job store.

    Parameters
    ----------
    config:
        The node configuration (storage, destinations, export retries).
    store:
        The job store.
    models:
        The serving models (:class:`dicom_node.modelstore.ServingModels`).
    audit:
        The audit log.
    """

    def __init__(self, config: NodeConfig, store: JobStore, models: Any, audit: AuditLog) -> None:
        self.config = config
        self.store = store
        self.models = models
        self.audit = audit
        self._tls = client_tls_context(config.tls) if config.tls else None

    def process(self, job: Job) -> None:
        """Take a claimed job as far as it goes now. Never raises."""
        try:
            if job.state is JobState.RUNNING:
                built = self._infer_and_build(job)
                if built is None:
                    return
                job = built
            if job.state is JobState.EXPORTING:
                self._export(job)
        except Exception as exc:  # the job's outcome, not the worker's crash
            LOGGER.exception("job %s: unexpected error", job.id)
            try:
                self.store.fail(job.id, f"internal error: {exc}")
            except (KeyError, TransitionError) as gone:  # no longer this worker's to fail
                LOGGER.warning("job %s: not marked failed: %s", job.id, gone)
                return
            self.audit.write("failed", job=job.id, error=f"internal error: {exc}")

    # -- inference and SEG ----------------------------------------------------------------
    def _resolve(self, job: Job) -> Any:
        if job.model_version:
            return self.models.resolve_version(job.model_name, job.model_version)
        resolved = self.models.resolve_for_job(job.model_ref, job.study_uid)
        self.store.resolved(
            job.id, resolved.name, resolved.version, resolved.alias, resolved.sha256
        )
        return resolved

    def _check_input(self, resolved: Any, modality: str | None) -> None:
        accepted = [m.upper() for m in (resolved.manifest.input.modalities or [])]
        if accepted and (modality or "").upper() not in accepted:
            raise JobError(
                f"model {resolved.name}:{resolved.version} accepts modalities {accepted}, "
                f"the series is {modality or 'without Modality'}"
            )

    def _infer(self, resolved: Any, series: SeriesFrames) -> InferenceResult:
        start = time.perf_counter()
        per_frame = self.models.run(resolved, series.frames)  # counts success/failure/duration
        duration = time.perf_counter() - start
        keys = [s.key for s in resolved.manifest.segments]
        masks = {k: np.stack([f[k] for f in per_frame]).astype(bool) for k in keys}
        return InferenceResult(masks=masks, duration=duration)

    def _infer_and_build(self, job: Job) -> Job | None:
        try:
            resolved = self._resolve(job)
            rows = self.store.series_instances(job.series_uid)
            # what this result is built from: an instance recorded after this read re-opens the job
            self.store.used_instances(job.id, len(rows))
            self._check_input(resolved, rows[0].modality if rows else None)
            series = read_series([self.config.storage / r.path for r in rows])
            mixed = one_patient_one_study(series.sources, job.study_uid)
            if mixed is not None:  # never a SEG over two patients or studies (DESIGN.md)
                raise JobError(f"{mixed}; resend the series with consistent UIDs")
            result = self._infer(resolved, series)
        except (
            JobError,
            SeriesReadError,
            LookupError,
            ValueError,
            ModelLoadError,
            InferenceError,
        ) as exc:
            LOGGER.warning("job %s: failed: %s", job.id, exc)
            self.store.fail(job.id, str(exc))
            self.audit.write("failed", job=job.id, error=str(exc))
            return None
        seg = build_seg(
            series.sources,
            result.masks,
            [SegmentSpec.from_manifest(s) for s in resolved.manifest.segments],
            AlgorithmInfo(
                model=resolved.name,
                version=resolved.version,
                alias=resolved.alias,
                sha256=resolved.sha256,
                rule=job.rule or "",  # a running job was routed: it has its rule
            ),
        )
        relpath = Path("results") / job.series_uid / f"{seg.SOPInstanceUID}.dcm"
        _fsync_write(self.config.storage / relpath, seg)
        self.store.exporting(
            job.id,
            str(relpath),
            str(seg.SOPInstanceUID),
            details={"frames": len(series.frames), "inference_seconds": round(result.duration, 4)},
        )
        self._shadow(job, resolved, series, result)
        return self.store.get(job.id)

    def _shadow(
        self, job: Job, resolved: Any, series: SeriesFrames, production: InferenceResult
    ) -> None:
        """Run the shadow version (if any) on the same frames; record agreement, never export."""
        shadow = self.models.shadow_for(resolved.name)
        if shadow is None or shadow.version == resolved.version:
            return
        try:
            result = self._infer(shadow, series)
        except Exception as exc:
            LOGGER.warning(
                "job %s: shadow %s:%s failed: %s", job.id, shadow.name, shadow.version, exc
            )
            return
        agreement = {
            key: dice(production.masks[key], result.masks[key])
            for key in production.masks
            if key in result.masks
        }
        for key, value in agreement.items():
            metrics.SHADOW_AGREEMENT.labels(
                model=shadow.name, version=shadow.version, segment=key
            ).observe(value)
        self.store.add_shadow_result(
            job.id, shadow.name, shadow.version, agreement, production_version=resolved.version
        )

    # -- export -----------------------------------------------------------------------------
    def _export(self, job: Job) -> None:
        if job.seg_path is None:  # the store moves a job to exporting only with its SEG
            raise RuntimeError(f"job {job.id} is exporting without a SEG")
        seg_path = job.seg_path
        delivered = list(job.delivered or ())
        errors = []
        for name in job.destinations or ():
            if name in delivered:
                continue
            dest = self.config.destinations.get(name)
            if dest is None:
                self.store.fail(job.id, f"destination {name!r} is not in the configuration")
                self.audit.write("failed", job=job.id, error=f"unknown destination {name}")
                return
            result = send_file(
                self.config.storage / seg_path,
                dest,
                calling_ae=self.config.ae_title,
                timeout=self.config.export_timeout,
                tls_context=self._tls if dest.tls else None,
            )
            if result.ok:
                delivered.append(name)
                self.store.delivered(job.id, delivered)
                metrics.EXPORT_SUCCESS.labels(destination=name).inc()
            else:
                metrics.EXPORT_FAILURE.labels(destination=name).inc()
                errors.append(f"{name}: {result.reason}")
        if not errors:
            outcome = f"SEG sent to {', '.join(delivered) or 'no destination'}"
            state = self.store.done(job.id, outcome)
            self.audit.write(
                "done",
                job=job.id,
                rule=job.rule,
                model=job.model_name,
                version=job.model_version,
                destinations=delivered,
            )
            LOGGER.info("job %s: done, %s", job.id, outcome)
            if state is JobState.ROUTED:
                self.audit.write("reopened", job=job.id, reason="instances arrived meanwhile")
            return
        error = "; ".join(errors)
        attempts = job.export_attempts + 1
        if attempts > self.config.export_retries:
            self.store.fail(job.id, f"export failed after {attempts} attempt(s): {error}")
            self.audit.write("failed", job=job.id, error=error, attempts=attempts)
            LOGGER.warning("job %s: export failed for good: %s", job.id, error)
            return
        delay = self.config.export_backoff * 2 ** (attempts - 1)
        self.store.export_retry(job.id, delay, error)
        LOGGER.info(
            "job %s: export attempt %d failed (%s), retry in %.1f s",
            job.id,
            attempts,
            error,
            delay,
        )
