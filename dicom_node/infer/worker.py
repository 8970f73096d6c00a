"""The worker: one claimed job at a time, from pixels to SEGs delivered to every destination.

A job resolves its model version once, when it first runs, and records it in the job store; a
re-run after a crash or a ``retry`` uses the recorded version, so a study is processed end to end
by one version even if an alias moves meanwhile.

What a job's series can end as (every outcome is a sentence a person can act on):

* **skipped**: no instance of the series is an image (a structured report, an RT plan, a
  presentation state that a rule sent to a model); the reason names each instance's SOP class.
  A series with images and non-images uses its images and says how many it left out.
* **one SEG per group**: a series that mixes matrix sizes, orientations or Frames of Reference
  is split (:func:`dicom_node.seg.group_sources`); each group gets its own SEG with UIDs of its
  own, the same again on a re-run. A model whose manifest says ``input.volume: true`` needs one
  consistent volume: such a series fails instead, with the groups named.
* **outputs besides the SEG**: the rule's ``outputs`` (``seg``, ``overlay``, ``gsps``,
  ``report``; default ``[seg]``) decide what is exported. The SEG of every group is always built
  (the others derive from it) and sent when listed; an overlay (one Secondary Capture per
  frame), a presentation state and a report (TID 1500 SR) per group are built with
  :mod:`dicom_node.outputs`, each file a result row of its own under
  ``results/<series>/<kind>-<sop>.dcm`` and exported like the SEGs.
* **failed**: the message names the instance by position ("instance 3 of 12 (InstanceNumber
  7)"), the attribute or condition, and what to do. ``internal error`` is kept for bugs of the
  node (an exception nobody expected); each one is a test case until it is fixed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from dicom_node import metrics
from dicom_node.audit import AuditLog
from dicom_node.config import NodeConfig
from dicom_node.jobs import (
    Job,
    JobState,
    JobStore,
    SegResult,
    TransitionError,
    one_patient_one_study,
)
from dicom_node.modelstore import (
    Confidence,
    InferenceError,
    ModelLoadError,
    SeriesFrames,
    SeriesReadError,
    atomic_write,
    read_instances,
    series_frames,
    summarize_input,
)
from dicom_node.modelstore import agreement as agreement_dice
from dicom_node.modelstore.processing import slice_spacing
from dicom_node.modelstore.scoring import agreement_scores, slice_positions
from dicom_node.outputs import (
    OutputKind,
    build_gsps,
    build_overlays,
    build_report,
    measure,
    parse_outputs,
)
from dicom_node.seg import (
    AlgorithmInfo,
    SegmentSpec,
    SourceGroup,
    build_seg,
    frame_count,
    group_sources,
)
from dicom_node.seg import is_image as seg_is_image
from dicom_node.send import send_files
from dicom_node.send.dimse import client_tls_context

LOGGER = logging.getLogger(__name__)

REQUIRED_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
"""Type 1 attributes a SEG must repeat or reference: an image without one cannot get a SEG."""


class JobError(RuntimeError):
    """A job cannot succeed as it is (bad input, unsuitable model): it fails with this text."""


@dataclass(frozen=True)
class InferenceResult:
    """What one version made of a series: per frame, a bool mask per segment key.

    Frames of a series may differ in size (a series that is split into groups), so masks are
    kept per frame; :meth:`stack` cuts out the frames of one group.
    """

    per_frame: list[dict[str, np.ndarray]]
    keys: tuple[str, ...]
    duration: float
    probabilities: list[dict[str, np.ndarray]] | None = None
    """Per frame, ``{key: float32 (H, W)}`` when the manifest says ``probabilities: true``
    (the FRACTIONAL SEG); the masks stay what every other output is built from."""
    confidence: Confidence | None = None
    """The manifest's verdict on the result (``confidence:``); None without one."""

    def stack_probabilities(self, indices: Sequence[int]) -> dict[str, np.ndarray] | None:
        """Probabilities ``{key: float32 (frames, rows, cols)}`` over ``indices``, or None."""
        if self.probabilities is None:
            return None
        chosen = [self.probabilities[i] for i in indices]
        return {k: np.stack([f[k] for f in chosen]) for k in self.keys}

    def stack(self, indices: Sequence[int] | None = None) -> dict[str, np.ndarray]:
        """Masks ``{key: bool (frames, rows, cols)}`` over ``indices`` (default: every frame).

        Raises
        ------
        ValueError
            The chosen frames differ in size.
        """
        chosen = self.per_frame if indices is None else [self.per_frame[i] for i in indices]
        return {k: np.stack([f[k] for f in chosen]).astype(bool) for k in self.keys}

    @property
    def masks(self) -> dict[str, np.ndarray]:
        """Every frame's masks stacked (frames of one size only, see :meth:`stack`)."""
        return self.stack()

    def flat(self, key: str) -> np.ndarray:
        """Every frame's mask of ``key``, flattened and concatenated (any frame sizes)."""
        return np.concatenate([np.ravel(f[key]) for f in self.per_frame])


def _shadow_scores(
    production: InferenceResult, shadow: InferenceResult, series: SeriesFrames, keys: list[str]
) -> dict[str, dict[str, float | None]]:
    """Per segment 3-D Dice, IoU and HD95 (mm) of the shadow against production, whole series.

    One volume per source group (frames of one size, orientation and Frame of Reference), with
    the series' pixel spacing and the group's slice positions from the headers; None where a
    value is undefined (:func:`dicom_node.modelstore.scoring.agreement_scores`).
    """
    volumes = []
    for group in group_sources(series.sources):
        indices = list(group.frame_indices)
        positions = slice_positions(list(group.sources), len(indices))
        volumes.append((production.stack(indices), shadow.stack(indices), positions))
    return {
        key: agreement_scores([(a[key], b[key], series.spacing, z) for a, b, z in volumes])
        for key in keys
    }


@dataclass(frozen=True)
class _Series:
    """The images of a job's series, named by their position among all its instances."""

    images: list[Dataset]
    names: list[str]
    left_out: list[str]
    """One line per instance that is not an image: position and reason."""


def _fsync_write(path: Path, ds: Dataset) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda fh: ds.save_as(fh, enforce_file_format=True))


def _frame_count(ds: Dataset, name: str) -> int:
    """:func:`dicom_node.seg.frame_count`, its refusal worded as a job error for ``name``."""
    try:
        return frame_count(ds)
    except ValueError as exc:
        raise JobError(
            f"{name}: {exc}; correct the header at the modality and resend the series"
        ) from None


def _check_headers(images: Sequence[Dataset], names: Sequence[str]) -> None:
    """Fail on what no SEG can be built from, naming the instance (never its UIDs)."""
    for ds, name in zip(images, names, strict=True):
        missing = [k for k in REQUIRED_KEYWORDS if ds.get(k) in (None, "")]
        if missing:
            raise JobError(
                f"{name}: {', '.join(missing)} missing (type 1): a SEG must reference the "
                "instance by it; correct the header at the sender and resend the series"
            )
        _frame_count(ds, name)


def _kind_of(result: SegResult) -> str:
    """``seg`` or the output kind of a result row (``results/<series>/<kind>-<sop>.dcm``)."""
    prefix = Path(result.path).name.split("-", 1)[0]
    return prefix if prefix in {k.value for k in OutputKind} else OutputKind.SEG.value


def _what(results: Sequence[SegResult]) -> str:
    """``SEG``, ``2 SEGs (one per group)``, ``SEG, 1 overlay image, report`` for an outcome."""
    counts = {k.value: sum(_kind_of(r) == k.value for r in results) for k in OutputKind}
    parts = []
    if counts["seg"]:
        parts.append("SEG" if counts["seg"] == 1 else f"{counts['seg']} SEGs (one per group)")
    if counts["overlay"]:
        parts.append(f"{counts['overlay']} overlay image(s)")
    if counts["gsps"]:
        parts.append(f"{counts['gsps']} presentation state(s)")
    if counts["report"]:
        parts.append("report" if counts["report"] == 1 else f"{counts['report']} reports")
    return ", ".join(parts) or "nothing"


def _input_summary(series: SeriesFrames) -> Any:
    """What the manifest's ``confidence.ood`` checks look at: modality, matrix, spacing (the
    frame reader's, as training's evaluation uses) and intensity of the frames."""
    modality = series.sources[0].get("Modality") if series.sources else None
    return summarize_input(series.frames, modality, [series.spacing])


def _describe(group: SourceGroup, names: dict[int, str]) -> str:
    members = [names[id(ds)].split(" (", 1)[0] for ds in group.sources]
    shown = ", ".join(members[:3]) + (f" and {len(members) - 3} more" if len(members) > 3 else "")
    return f"group {group.index + 1} ({group.key}: {len(members)} instance(s): {shown})"


class Worker:
    """Runs claimed jobs. Stateless between jobs: everything it needs is in the job store.

    Parameters
    ----------
    config:
        The node configuration (storage, destinations, export retries, ``max_pixels``).
    store:
        The job store.
    models:
        The serving models (:class:`dicom_node.modelstore.ServingModels`).
    audit:
        The audit log.
    outputs_for:
        ``outputs_for(rule_name)``: the rule's ``outputs`` names (the node looks them up in the
        rule set in force when the job runs); ``None`` or an unknown rule: ``[seg]``.
    on_low_confidence_for:
        ``on_low_confidence_for(rule_name)``: the rule's ``on_low_confidence`` (``send``,
        ``hold`` or ``discard``); ``None`` or an unknown rule: ``send``.
    """

    def __init__(
        self,
        config: NodeConfig,
        store: JobStore,
        models: Any,
        audit: AuditLog,
        outputs_for: Callable[[str], Sequence[str] | None] | None = None,
        on_low_confidence_for: Callable[[str], str | None] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.models = models
        self.audit = audit
        self.outputs_for = outputs_for
        self.on_low_confidence_for = on_low_confidence_for
        self._tls = client_tls_context(config.tls) if config.tls else None

    def process(self, job: Job) -> None:
        """Take a claimed job as far as it goes now. Never raises.

        Expected failures (bad input, an unsuitable model, undecodable pixels, a SEG that
        cannot be built) end the job as ``failed`` with a message; anything else is a bug of
        the node and ends it as ``internal error: ...`` with the traceback in the log.
        """
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
            error = f"internal error: {type(exc).__name__}: {exc}"
            try:
                self.store.fail(job.id, error)
            except (KeyError, TransitionError) as gone:  # no longer this worker's to fail
                LOGGER.warning("job %s: not marked failed: %s", job.id, gone)
                return
            self.audit.write("failed", job=job.id, error=error)

    # -- inference and SEG ----------------------------------------------------------------
    def _resolve(self, job: Job) -> Any:
        try:
            if job.model_version:
                return self.models.resolve_version(job.model_name, job.model_version)
            resolved = self.models.resolve_for_job(job.model_ref, job.study_uid)
        except (LookupError, ValueError) as exc:  # ModelStoreError and friends: their text
            raise JobError(f"model {job.model_ref or job.model_name}: {exc}") from exc
        return resolved  # recorded by _read, in the transaction that records what it read

    def _check_input(self, resolved: Any, modality: str | None) -> None:
        accepted = [m.upper() for m in (resolved.manifest.input.modalities or [])]
        if accepted and (modality or "").upper() not in accepted:
            raise JobError(
                f"model {resolved.name}:{resolved.version} accepts modalities {accepted}, "
                f"the series is {modality or 'without Modality'}; route this series to a model "
                "for its modality (rules)"
            )

    def _infer(self, resolved: Any, series: SeriesFrames, judge: bool = False) -> InferenceResult:
        """Run ``resolved`` on the series; ``judge``: also its manifest's ``confidence:`` (the
        production result; a shadow run is only compared)."""
        start = time.perf_counter()
        # the manifest's postprocess steps need the series' geometry: the same values
        # training's evaluate passes (frame reader's spacing, slice positions, one volume per
        # source group), so that both get the same masks
        steps = getattr(resolved.manifest, "postprocess", None) or []
        geometry = {
            "spacing": series.spacing,
            # read from the headers only when a step needs it (a 3-D min_size in mm3)
            "slice_spacing": (
                slice_spacing(slice_positions(series.sources, len(series.frames)))
                if any(getattr(step, "mm3", None) for step in steps)
                else None
            ),
            "volumes": [list(g.frame_indices) for g in group_sources(series.sources)],
        }
        probabilities = confidence = None
        if judge and getattr(resolved.manifest, "confidence", None) is not None:
            made = self.models.run_confident(
                resolved,
                series.frames,
                _input_summary(series),
                probabilities=bool(getattr(resolved.manifest, "probabilities", False)),
                **geometry,
            )
            per_frame, probabilities, confidence = made.masks, made.probabilities, made.confidence
        elif getattr(resolved.manifest, "probabilities", False):
            made = self.models.predict(resolved, series.frames, **geometry)
            per_frame, probabilities = made.masks, made.probabilities
        else:  # counts success/failure/duration
            per_frame = self.models.run(resolved, series.frames, **geometry)
        duration = time.perf_counter() - start
        keys = tuple(s.key for s in resolved.manifest.segments)
        return InferenceResult(
            per_frame=per_frame,
            keys=keys,
            duration=duration,
            probabilities=probabilities,
            confidence=confidence,
        )

    def _read(self, job: Job, fresh: Any = None) -> _Series:
        """Read the job's series; ``fresh``: the model version it just resolved to (recorded
        with the instance count, one transaction: issue 15), None for a pinned version."""
        rows = self.store.series_instances(job.series_uid)
        # what this result is built from: an instance recorded after this read re-opens the job
        if fresh is not None:
            self.store.resolved(
                job.id, fresh.name, fresh.version, fresh.alias, fresh.sha256, len(rows)
            )
        else:
            self.store.used_instances(job.id, len(rows))
        if not rows:
            raise JobError("the series has no instance in the job store; resend it")
        datasets, names = read_instances([self.config.storage / r.path for r in rows])
        mixed = one_patient_one_study(datasets, job.study_uid)
        if mixed is not None:  # never a SEG over two patients or studies (DESIGN.md)
            raise JobError(f"{mixed}; resend the series with consistent UIDs")
        images, image_names, left_out = [], [], []
        for ds, name in zip(datasets, names, strict=True):
            ok, reason = seg_is_image(ds)
            if ok:
                images.append(ds)
                image_names.append(name)
            else:
                left_out.append(f"{name}: {reason}")
        return _Series(images=images, names=image_names, left_out=left_out)

    def _infer_and_build(self, job: Job) -> Job | None:
        try:
            resolved = self._resolve(job)
            found = self._read(job, None if job.model_version else resolved)
            if not found.images:
                outcome = "not an image, nothing to segment: " + "; ".join(found.left_out[:5])
                if len(found.left_out) > 5:
                    outcome += f"; and {len(found.left_out) - 5} more"
                self.store.skip_running(job.id, outcome)
                self.audit.write("skipped", job=job.id, rule=job.rule, reason=outcome)
                LOGGER.info("job %s: skipped: %s", job.id, outcome)
                return None
            self._check_input(resolved, found.images[0].get("Modality"))
            _check_headers(found.images, found.names)
            self._check_volume(resolved, found)
            series = series_frames(found.images, found.names, max_bytes=self.config.max_pixels)
            groups = group_sources(series.sources)
            result = self._infer(resolved, series, judge=True)
            kinds = self._outputs(job)
            segs = self._build(job, resolved, series, result, groups, found, kinds)
        except (JobError, SeriesReadError, ModelLoadError, InferenceError) as exc:
            LOGGER.warning("job %s: failed: %s", job.id, exc)
            self.store.fail(job.id, str(exc))
            self.audit.write("failed", job=job.id, error=str(exc))
            return None
        first = segs[0]
        details = {
            "frames": len(series.frames),
            "inference_seconds": round(result.duration, 4),
            "segs": sum(_kind_of(r) == "seg" for r in segs),
            "outputs": [k.value for k in kinds],
            "not_images": len(found.left_out),
        }
        if result.confidence is not None:
            details["confidence"] = result.confidence.to_dict()
            if result.confidence.low and self._keep_back(job, resolved, result, segs, details):
                self._shadow(job, resolved, series, result)
                return None
        self.store.exporting(job.id, first.path, first.sop_uid, details=details, results=segs)
        self._shadow(job, resolved, series, result)
        return self.store.get(job.id)

    def _keep_back(
        self,
        job: Job,
        resolved: Any,
        result: InferenceResult,
        segs: list[SegResult],
        details: dict[str, Any],
    ) -> bool:
        """Count a low-confidence result and do what the rule says; True when it is not sent
        (``hold``: the job waits in ``held``; ``discard``: it ends ``skipped``)."""
        confidence = result.confidence
        assert confidence is not None
        metrics.LOW_CONFIDENCE.labels(model=resolved.name, version=resolved.version).inc()
        action = self._on_low_confidence(job)
        why = "low confidence (" + "; ".join(confidence.reasons) + ")"
        self.audit.write(
            "low_confidence",
            job=job.id,
            rule=job.rule,
            model=resolved.name,
            version=resolved.version,
            action=action,
            reasons=list(confidence.reasons),
        )
        LOGGER.info("job %s: %s; rule says %s", job.id, why, action)
        if action == "hold":
            outcome = (
                f"held: {why}; release with 'dicom-node release {job.id}' or drop with "
                f"'dicom-node discard {job.id}'"
            )
            self.store.hold(job.id, segs[0].path, segs[0].sop_uid, outcome, details, segs)
            self.audit.write("held", job=job.id, rule=job.rule, reason=why)
            return True
        if action == "discard":
            outcome = f"discarded: {why}"
            self.store.discard_running(job.id, outcome, details)
            self.audit.write("skipped", job=job.id, rule=job.rule, reason=outcome)
            return True
        return False

    def _on_low_confidence(self, job: Job) -> str:
        """The rule's ``on_low_confidence`` (``send`` without a lookup or for an unknown rule)."""
        lookup = self.on_low_confidence_for
        found = lookup(job.rule) if lookup is not None and job.rule else None
        return found if found in ("hold", "discard") else "send"

    def _check_volume(self, resolved: Any, found: _Series) -> None:
        if not getattr(resolved.manifest.input, "volume", False):
            return
        groups = group_sources(found.images)
        if len(groups) > 1:
            names = {id(ds): n for ds, n in zip(found.images, found.names, strict=True)}
            raise JobError(
                f"model {resolved.name}:{resolved.version} needs one volume (manifest "
                f"input.volume), but the series splits into {len(groups)} groups of different "
                f"matrix size, orientation or Frame of Reference: "
                + "; ".join(_describe(g, names) for g in groups)
                + "; resend only the instances of one group (leave out localizers and re-sends"
                " at another size)"
            )

    def _build(
        self,
        job: Job,
        resolved: Any,
        series: SeriesFrames,
        result: InferenceResult,
        groups: list[SourceGroup],
        found: _Series,
        kinds: tuple[OutputKind, ...] = (OutputKind.SEG,),
    ) -> list[SegResult]:
        names = {id(ds): n for ds, n in zip(found.images, found.names, strict=True)}
        declared = sum(_frame_count(ds, names[id(ds)]) for ds in series.sources)
        if declared != len(series.frames):
            raise JobError(
                f"the series declares {declared} frame(s) (NumberOfFrames) but its pixel data "
                f"holds {len(series.frames)}; correct the headers at the sender and resend"
            )
        segments = [SegmentSpec.from_manifest(s) for s in resolved.manifest.segments]
        algorithm = AlgorithmInfo(
            model=resolved.name,
            version=resolved.version,
            alias=resolved.alias,
            sha256=resolved.sha256,
            rule=job.rule or "",  # a running job was routed: it has its rule
        )
        results, extra = [], []
        for group in groups:
            where = _describe(group, names) if len(groups) > 1 else "the series"
            try:
                masks = result.stack(group.frame_indices)
                seg = build_seg(
                    list(group.sources),
                    masks,
                    segments,
                    algorithm,
                    group=group.uid_group,
                    confidence=result.confidence,
                    # manifest probabilities: true: a FRACTIONAL SEG; every other output
                    # still comes from the thresholded, post-processed masks
                    probabilities=result.stack_probabilities(group.frame_indices),
                )
            except ValueError as exc:  # build_seg's own checks: a sentence about the sources
                raise JobError(
                    f"the SEG of {where} cannot be built: {exc}; correct the sources' headers "
                    "and resend the series"
                ) from exc
            relpath = Path("results") / job.series_uid / f"{seg.SOPInstanceUID}.dcm"
            _fsync_write(self.config.storage / relpath, seg)
            results.append(
                SegResult(
                    position=group.index,
                    path=str(relpath),
                    sop_uid=str(seg.SOPInstanceUID),
                    group_key=group.key,
                    n_frames=len(group.frame_indices),
                )
            )
            frames = [series.frames[i] for i in group.frame_indices]
            extra += self._build_outputs(
                job,
                kinds,
                group,
                frames,
                masks,
                segments,
                algorithm,
                seg,
                result.confidence,
                plan=getattr(resolved.manifest, "measurements", None),  # what the report measures
            )
        # SEG rows first (position = group index, as before); the other outputs after them
        results += [
            SegResult(len(groups) + n, path, sop, group_key=key, n_frames=count)
            for n, (path, sop, key, count) in enumerate(extra)
        ]
        if len(groups) > 1:
            LOGGER.info("job %s: series split into %d groups, one SEG each", job.id, len(groups))
        return results

    def _outputs(self, job: Job) -> tuple[OutputKind, ...]:
        """The rule's ``outputs`` (``[seg]`` without a lookup, an unknown rule or a bad list)."""
        names = self.outputs_for(job.rule) if self.outputs_for and job.rule else None
        if not names:
            return (OutputKind.SEG,)
        try:
            return parse_outputs(list(names))
        except (TypeError, ValueError) as exc:  # the loader checked them: a bug if it happens
            LOGGER.warning("job %s: rule outputs %r ignored: %s", job.id, names, exc)
            return (OutputKind.SEG,)

    def _build_outputs(
        self,
        job: Job,
        kinds: tuple[OutputKind, ...],
        group: SourceGroup,
        frames: list[np.ndarray],
        masks: dict[str, np.ndarray],
        segments: list[SegmentSpec],
        algorithm: AlgorithmInfo,
        seg: Dataset,
        confidence: Confidence | None = None,
        plan: dict[str, Any] | None = None,
    ) -> list[tuple[str, str, str, int]]:
        """Write the overlay, GSPS and report of one group's SEG; ``(path, sop_uid, key, n)``.

        ``plan`` is the manifest's ``measurements`` (what the report measures per segment).

        A ``confidence`` is shown in each of them (flagged when low).
        """
        wanted = [k for k in kinds if k is not OutputKind.SEG]
        if not wanted:
            return []
        sources = list(group.sources)
        built: list[tuple[OutputKind, Dataset]] = []
        try:
            measurements = measure(sources, frames, masks, segments, plan)
            for kind in wanted:
                if kind is OutputKind.OVERLAY:
                    overlays = build_overlays(
                        sources,
                        frames,
                        masks,
                        segments,
                        algorithm,
                        seg,
                        group=group.uid_group,
                        measurements=measurements,
                        confidence=confidence,
                    )
                    built += [(kind, ds) for ds in overlays]
                elif kind is OutputKind.GSPS:
                    gsps = build_gsps(
                        sources,
                        frames,
                        masks,
                        segments,
                        algorithm,
                        seg,
                        group=group.uid_group,
                        confidence=confidence,
                    )
                    built.append((kind, gsps))
                else:
                    report = build_report(
                        sources,
                        seg,
                        measurements,
                        algorithm,
                        group=group.uid_group,
                        confidence=confidence,
                    )
                    built.append((kind, report))
        except ValueError as exc:  # the builders' own checks: a sentence about the sources
            raise JobError(
                f"the {'/'.join(k.value for k in wanted)} of group {group.index + 1} cannot be "
                f"built: {exc}; correct the sources' headers and resend the series"
            ) from exc
        rows = []
        for made, ds in built:
            # flat, next to the SEGs: retention removes every results/<series>/*.dcm
            relpath = Path("results") / job.series_uid / f"{made.value}-{ds.SOPInstanceUID}.dcm"
            _fsync_write(self.config.storage / relpath, ds)
            count = 1 if made is OutputKind.OVERLAY else len(frames)
            rows.append((str(relpath), str(ds.SOPInstanceUID), group.key, count))
        return rows

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
        # both versions empty on a segment is no evidence (two useless models "agree"), so that
        # segment gets no value rather than a perfect 1.0 (scoring.agreement returns None)
        keys = [key for key in production.keys if key in result.keys]
        scores: dict[str, dict[str, float | None]] | None
        try:
            scores = _shadow_scores(production, result, series, keys)
            measured = {key: scores[key]["dice"] for key in keys}
        except ValueError as exc:  # geometry the scores cannot use: keep the Dice of old
            LOGGER.warning("job %s: shadow IoU/HD95 not measured: %s", job.id, exc)
            scores = None
            measured = {key: agreement_dice(production.flat(key), result.flat(key)) for key in keys}
        agreement = {key: value for key, value in measured.items() if value is not None}
        for key, value in agreement.items():
            metrics.SHADOW_AGREEMENT.labels(
                model=shadow.name, version=shadow.version, segment=key
            ).observe(value)
        self.store.add_shadow_result(
            job.id,
            shadow.name,
            shadow.version,
            agreement,
            production_version=resolved.version,
            scores=scores,
        )

    # -- export -----------------------------------------------------------------------------
    def _export(self, job: Job) -> None:
        """Send every result of the job (SEGs, then outputs) to every destination without it.

        A SEG the rule's ``outputs`` leave out (``details.outputs`` without ``seg``) stays on
        disk and is not sent.
        """
        if job.seg_path is None:  # the store moves a job to exporting only with its SEG
            raise RuntimeError(f"job {job.id} is exporting without a SEG")
        segs = self.store.results(job.id) or [SegResult(0, job.seg_path, job.seg_sop_uid or "-")]
        requested = (job.details or {}).get("outputs")
        if requested and OutputKind.SEG.value not in requested:
            segs = [r for r in segs if _kind_of(r) != OutputKind.SEG.value] or segs
        delivered = list(job.delivered or ())
        have = {seg.position: list(seg.delivered) for seg in segs}  # per SEG, kept current
        errors = []
        # Deliveries not yet in the job store: written before the next destination is tried or
        # a failure is recorded; those of the last one go into the done transaction (issue 15).
        unsaved: dict[int, list[str]] = {}
        unsaved_delivered = False

        def save() -> None:
            nonlocal unsaved_delivered
            for position, names in unsaved.items():
                self.store.result_delivered(job.id, position, names)
            if unsaved_delivered:
                self.store.delivered(job.id, delivered)
            unsaved.clear()
            unsaved_delivered = False

        for name in job.destinations or ():
            if name in delivered:
                continue
            save()
            dest = self.config.destinations.get(name)
            if dest is None:
                error = f"destination {name!r} is not in the configuration; add it or fix the rule"
                self.store.fail(job.id, error)
                self.audit.write("failed", job=job.id, error=error)
                return
            missing = 0
            pending = [seg for seg in segs if name not in have[seg.position]]
            outcomes = send_files(  # C-STORE per file, or STOW-RS in batches (dest.type)
                [self.config.storage / seg.path for seg in pending],
                dest,
                calling_ae=self.config.ae_title,
                timeout=self.config.export_timeout,
                tls_context=self._tls,
            )
            for seg, result in zip(pending, outcomes, strict=True):
                if result.ok:
                    have[seg.position].append(name)
                    unsaved[seg.position] = list(have[seg.position])
                    metrics.EXPORT_SUCCESS.labels(destination=name).inc()
                else:
                    missing += 1
                    metrics.EXPORT_FAILURE.labels(destination=name).inc()
                    kind = _kind_of(seg)
                    label = "SEG" if kind == OutputKind.SEG.value else kind
                    which = f"{label} {seg.position + 1} of {len(segs)}: " if len(segs) > 1 else ""
                    errors.append(f"{name}: {which}{result.reason}")
            if not missing:
                delivered.append(name)
                unsaved_delivered = True
        if not errors:
            what = _what(segs)
            outcome = f"{what} sent to {', '.join(delivered) or 'no destination'}"
            left_out = (job.details or {}).get("not_images")
            if left_out:
                outcome += f"; {left_out} non-image instance(s) left out"
            state = self.store.done(
                job.id,
                outcome,
                delivered=delivered if unsaved_delivered else None,
                result_delivered=unsaved,
            )
            self.audit.write(
                "done",
                job=job.id,
                rule=job.rule,
                model=job.model_name,
                version=job.model_version,
                destinations=delivered,
                segs=len(segs),
            )
            LOGGER.info("job %s: done, %s", job.id, outcome)
            if state is JobState.ROUTED:
                self.audit.write("reopened", job=job.id, reason="instances arrived meanwhile")
            return
        save()
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
