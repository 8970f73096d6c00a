"""In-process ONNX Runtime runner: one session per model version, verified, warmed, reused.

The runner is the node's only contact with ONNX Runtime, behind one small interface
(``run(version, frames) -> masks``) so that a remote inference server could take its place.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dicom_node import metrics
from dicom_node.modelstore.confidence import Confidence, InputSummary, UncertaintyMeter, assess
from dicom_node.modelstore.files import sha256_bytes
from dicom_node.modelstore.processing import (
    Postprocess,
    Preprocess,
    activate,
    apply_steps,
    tta_inputs,
    undo_tta,
)
from dicom_node.modelstore.store import ResolvedVersion

LOGGER = logging.getLogger(__name__)

BATCH_SIZE = 8
"""Frames per ``session.run`` call; larger series are run in several batches."""

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class ModelLoadError(RuntimeError):
    """A version cannot be served: sha256 mismatch, not loadable, wrong I/O or failed warm-up."""


class InferenceError(RuntimeError):
    """Running a loaded version on a series failed; the message names the version and step."""


@dataclass(frozen=True)
class ConfidentRun:
    """What :meth:`ModelRunner.run_confident` returns: the masks and how sure they are.

    Attributes
    ----------
    masks
        Per frame, ``{segment key: bool (H, W)}`` (what :meth:`ModelRunner.run` returns).
    confidence
        The manifest's confidence verdict; ``None`` when the manifest declares no
        ``confidence:`` block.
    """

    masks: list[dict[str, np.ndarray]]
    confidence: Confidence | None = None
    probabilities: list[dict[str, np.ndarray]] | None = None
    """Per frame, ``{segment key: float32 (H, W)}`` when asked for (see :class:`Prediction`)."""


@dataclass(frozen=True)
class Prediction:
    """What :meth:`ModelRunner.predict` returns: the masks and what they were made from.

    Attributes
    ----------
    masks
        Per frame, ``{segment key: bool (H, W)}``: thresholded, then the manifest's
        ``postprocess:`` steps applied (what :meth:`ModelRunner.run` returns, what the SEG,
        overlays, measurements and ``evaluate`` use).
    thresholded
        Per frame, the masks before the ``postprocess:`` steps (the same objects as ``masks``
        when the manifest declares none): for choosing the steps on validation data.
    probabilities
        Per frame, ``{segment key: float32 (H, W) in [0, 1]}``: the model's probability at the
        frame's size, averaged over the manifest's ``tta:`` runs, before thresholding; ``None``
        unless asked for (they take 4 bytes per pixel and segment).
    tta
        The runs averaged: ``("plain", "flip_lr", ...)``.
    """

    masks: list[dict[str, np.ndarray]]
    thresholded: list[dict[str, np.ndarray]]
    probabilities: list[dict[str, np.ndarray]] | None = None
    tta: tuple[str, ...] = ("plain",)


def choose_providers(available: Sequence[str], preferred: Sequence[str] | None = None) -> list[str]:
    """Return the execution providers to use, best first.

    Parameters
    ----------
    available:
        ``onnxruntime.get_available_providers()``.
    preferred:
        Explicit choice; entries not in ``available`` are dropped (with a warning).

    Returns
    -------
    list[str]
        ``[CUDAExecutionProvider, CPUExecutionProvider]`` when CUDA is available, else
        ``[CPUExecutionProvider]``; CPU is always last as the fallback.
    """
    if preferred:
        chosen = [p for p in preferred if p in available]
        dropped = [p for p in preferred if p not in available]
        if dropped:
            LOGGER.warning("execution providers %s are not available; using %s", dropped, chosen)
    else:
        chosen = [CUDA] if CUDA in available else []
    if CPU not in chosen:
        chosen.append(CPU)
    return chosen


@dataclass
class LoadedModel:
    """A verified, warmed ONNX Runtime session and the processing its manifest declares."""

    resolved: ResolvedVersion
    session: Any
    preprocess: Preprocess
    postprocess: Postprocess
    input_name: str
    output_name: str
    providers: list[str]
    warmup_seconds: float = 0.0
    uses: int = field(default=0)


def _probe(shape: tuple[int, int]) -> np.ndarray:
    """A deterministic, non-constant probe frame (a bright disc on a gradient)."""
    rows, cols = shape
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    disc = ((yy - rows / 2) ** 2 + (xx - cols / 2) ** 2) < (min(rows, cols) / 4) ** 2
    return (xx / max(cols, 1) * 50 + disc * 500).astype(np.float32)


class ModelRunner:
    """Runs model versions on frames with ONNX Runtime, one cached session per version.

    Parameters
    ----------
    threads:
        Intra-op threads per session (config ``inference_threads``); 0 lets ONNX Runtime choose.
    providers:
        Execution providers to prefer; default CUDA when available, else CPU.

    Notes
    -----
    Thread-safe. Sessions are keyed by ``(name, version, sha256)``; ``run`` on a version that is
    not loaded loads it first.
    """

    def __init__(self, threads: int = 0, providers: Sequence[str] | None = None) -> None:
        import onnxruntime

        self._ort = onnxruntime
        self.threads = int(threads)
        self.providers = choose_providers(onnxruntime.get_available_providers(), providers)
        self._models: dict[tuple[str, str, str], LoadedModel] = {}
        self._lock = threading.Lock()
        self._load_locks: dict[tuple[str, str, str], threading.Lock] = {}

    # ----------------------------------------------------------------- sessions
    def loaded(self) -> list[tuple[str, str, str]]:
        """Return the keys ``(name, version, sha256)`` of the loaded sessions."""
        with self._lock:
            return list(self._models)

    def is_loaded(self, resolved: ResolvedVersion) -> bool:
        """Return whether ``resolved`` has a loaded session."""
        with self._lock:
            return resolved.key in self._models

    def load(self, resolved: ResolvedVersion) -> LoadedModel:
        """Return the session of ``resolved``, loading, checking and warming it up if needed.

        Raises
        ------
        ModelLoadError
            The weights' sha256 differs from the manifest, ONNX Runtime cannot load them, the
            input/output names or shapes do not match the manifest, the output has fewer channels
            than the segments need, or the warm-up run fails.
        """
        key = resolved.key
        with self._lock:
            model = self._models.get(key)
            if model is not None:
                return model
            load_lock = self._load_locks.setdefault(key, threading.Lock())
        with load_lock:
            with self._lock:
                model = self._models.get(key)
            if model is None:
                model = self._load(resolved)
                with self._lock:
                    self._models[key] = model
        return model

    def _load(self, resolved: ResolvedVersion) -> LoadedModel:
        label = resolved.ref
        manifest = resolved.manifest
        try:
            data = resolved.model_file.read_bytes()
        except OSError as exc:
            raise ModelLoadError(f"{label}: cannot read {resolved.model_file}: {exc}") from exc
        actual = sha256_bytes(data)  # the bytes that are loaded, not a second read
        if actual != resolved.sha256:
            raise ModelLoadError(
                f"{label}: sha256 of {resolved.model_file.name} is {actual}, manifest says "
                f"{resolved.sha256}: refusing to load changed weights"
            )
        options = self._ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        # no busy-waiting between runs: with several workers on few cores the spinning threads
        # burned as much CPU as the inference itself (2 workers x 2 threads on 2 cores: 40 ms
        # of CPU per 256x256 inference spinning, 22 ms not; bench/RESULTS.md, issue 15)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        try:
            session = self._ort.InferenceSession(data, options, providers=self.providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelLoadError(
                f"{label}: ONNX Runtime cannot load {resolved.model_file.name}: {exc}"
            ) from exc
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name: o for o in session.get_outputs()}
        if manifest.input.name not in inputs:
            raise ModelLoadError(
                f"{label}: manifest input.name {manifest.input.name!r} is not an input of the "
                f"model (inputs: {sorted(inputs)})"
            )
        if manifest.output.name not in outputs:
            raise ModelLoadError(
                f"{label}: manifest output.name {manifest.output.name!r} is not an output of the "
                f"model (outputs: {sorted(outputs)})"
            )
        in_shape = list(inputs[manifest.input.name].shape)
        expected = [None, manifest.input.channels, *manifest.input.size]
        if len(in_shape) != 4 or any(
            isinstance(got, int) and want is not None and got != want
            for got, want in zip(in_shape, expected, strict=False)
        ):
            raise ModelLoadError(
                f"{label}: model input shape {in_shape} does not take N x "
                f"{manifest.input.channels} x {manifest.input.size[0]} x {manifest.input.size[1]}"
            )
        model = LoadedModel(
            resolved=resolved,
            session=session,
            preprocess=Preprocess(manifest.input),
            postprocess=Postprocess(manifest.output, manifest.segments),
            input_name=manifest.input.name,
            output_name=manifest.output.name,
            providers=list(session.get_providers()),
        )
        start = time.perf_counter()
        try:
            probe = model.preprocess(_probe(manifest.input.size))[None]
            (out,) = session.run([model.output_name], {model.input_name: probe})
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelLoadError(f"{label}: warm-up inference failed: {exc}") from exc
        out = np.asarray(out)
        needed = manifest.max_channel + 1
        if out.ndim != 4 or out.shape[0] != 1 or out.shape[1] < needed:
            raise ModelLoadError(
                f"{label}: warm-up output has shape {list(out.shape)}, expected 1 x K x h x w "
                f"with K >= {needed} (segment channels {[s.channel for s in manifest.segments]})"
            )
        if not np.all(np.isfinite(out)):
            raise ModelLoadError(f"{label}: warm-up output is not finite (NaN or inf)")
        model.warmup_seconds = time.perf_counter() - start
        LOGGER.info(
            "loaded model %s on %s (warm-up %.3f s)",
            label,
            model.providers[0],
            model.warmup_seconds,
        )
        return model

    def release(self, resolved: ResolvedVersion | tuple[str, str, str]) -> bool:
        """Drop the session of a version (a run already under way finishes on it).

        Returns
        -------
        bool
            Whether a session was loaded.
        """
        key = resolved if isinstance(resolved, tuple) else resolved.key
        with self._lock:
            model = self._models.pop(key, None)
            self._load_locks.pop(key, None)
        if model is not None:
            LOGGER.info("released model %s:%s", key[0], key[1])
        return model is not None

    # ----------------------------------------------------------------- inference
    def run(
        self,
        resolved: ResolvedVersion,
        frames: list[np.ndarray],
        *,
        spacing: Sequence[float] | None = None,
        slice_spacing: float | None = None,
        volumes: Sequence[Sequence[int]] | None = None,
    ) -> list[dict[str, np.ndarray]]:
        """Segment frames with one version.

        Parameters
        ----------
        resolved:
            The version (a job's resolved version; loaded on first use).
        frames:
            Frames (H, W) (or (H, W, S) multi-sample) of any real dtype; sizes may differ.
        spacing, slice_spacing, volumes:
            The series' pixel spacing (row, column) and slice spacing in mm and its volumes
            (frame indices), for the manifest's ``postprocess:`` steps
            (:func:`~dicom_node.modelstore.processing.apply_steps`); ``None``: unknown / the
            default. The worker, the gate and ``evaluate`` pass the frame reader's values.

        Returns
        -------
        list[dict[str, numpy.ndarray]]
            Per frame, ``{segment key: bool (H, W)}`` at the frame's own size: thresholded
            (after the manifest's ``tta:``) and post-processed (``postprocess:``).

        Raises
        ------
        ModelLoadError
            The version cannot be loaded (see :meth:`load`).
        InferenceError
            Preprocessing, the session or postprocessing failed.

        Notes
        -----
        Records ``dicom_node_inference_request_success_total`` / ``..._failure_total`` and
        ``dicom_node_inference_duration_seconds`` labelled by model and version.
        """
        geometry: dict[str, Any] = {
            "spacing": spacing,
            "slice_spacing": slice_spacing,
            "volumes": volumes,
        }
        return self._timed(resolved, frames, None, **geometry).masks

    def predict(
        self,
        resolved: ResolvedVersion,
        frames: list[np.ndarray],
        *,
        spacing: Sequence[float] | None = None,
        slice_spacing: float | None = None,
        volumes: Sequence[Sequence[int]] | None = None,
        probabilities: bool = True,
    ) -> Prediction:
        """Segment frames like :meth:`run`; also return the probabilities and raw masks.

        Parameters
        ----------
        probabilities:
            Keep the per-frame probability maps (:attr:`Prediction.probabilities`).

        Other parameters, errors and metrics as :meth:`run`.
        """
        geometry: dict[str, Any] = {
            "spacing": spacing,
            "slice_spacing": slice_spacing,
            "volumes": volumes,
        }
        return self._timed(resolved, frames, None, keep=probabilities, **geometry)

    def run_confident(
        self,
        resolved: ResolvedVersion,
        frames: list[np.ndarray],
        summary: InputSummary | None = None,
        *,
        spacing: Sequence[float] | None = None,
        slice_spacing: float | None = None,
        volumes: Sequence[Sequence[int]] | None = None,
        probabilities: bool = False,
    ) -> ConfidentRun:
        """Segment frames like :meth:`run` and judge the result as the manifest's
        ``confidence:`` declares (:mod:`dicom_node.modelstore.confidence`).

        The uncertainty comes from the probabilities of this same run, before thresholding
        (method ``tta`` compares the plain run with the manifest's ``tta:`` runs).

        Parameters
        ----------
        summary:
            The input's modality, matrix, spacing and intensity
            (:func:`~dicom_node.modelstore.confidence.summarize_input`) for the ``ood``
            checks; ``None`` skips them.

        Returns
        -------
        ConfidentRun
            The masks, and the verdict (``None`` without a ``confidence:`` block).

        Raises
        ------
        ModelLoadError, InferenceError
            As :meth:`run`.
        """
        manifest = resolved.manifest
        spec = manifest.confidence
        meter = None
        if spec is not None and spec.method != "none":
            meter = UncertaintyMeter(
                spec,
                {s.key: s.channel for s in manifest.segments},
                manifest.output.activation,
                {s.key: manifest.threshold(s.key) for s in manifest.segments},
            )
        geometry: dict[str, Any] = {
            "spacing": spacing,
            "slice_spacing": slice_spacing,
            "volumes": volumes,
        }
        made = self._timed(resolved, frames, meter, keep=probabilities, **geometry)
        masks, probs = made.masks, made.probabilities
        if spec is None:
            return ConfidentRun(masks, probabilities=probs)
        labels = {s.key: s.label for s in manifest.segments}
        measured = meter.result() if meter is not None else ()
        return ConfidentRun(masks, assess(spec, measured, summary, labels), probabilities=probs)

    def _timed(
        self,
        resolved: ResolvedVersion,
        frames: list[np.ndarray],
        meter: UncertaintyMeter | None,
        *,
        keep: bool = False,
        **geometry: Any,
    ) -> Prediction:
        """:meth:`predict` with an optional uncertainty meter fed from the same outputs."""
        labels = {"model": resolved.name, "version": resolved.version}
        start = time.perf_counter()
        try:
            model = self.load(resolved)
            results = self._run(model, frames, meter, keep=keep, **geometry)
        except (ModelLoadError, InferenceError):
            metrics.INFERENCE_FAILURE.labels(**labels).inc()
            raise
        except Exception as exc:
            metrics.INFERENCE_FAILURE.labels(**labels).inc()
            raise InferenceError(f"{resolved.ref}: inference failed: {exc}") from exc
        metrics.INFERENCE_DURATION.labels(**labels).observe(time.perf_counter() - start)
        metrics.INFERENCE_SUCCESS.labels(**labels).inc()
        return results

    def _run(
        self,
        model: LoadedModel,
        frames: list[np.ndarray],
        meter: UncertaintyMeter | None = None,
        *,
        keep: bool = False,
        spacing: Sequence[float] | None = None,
        slice_spacing: float | None = None,
        volumes: Sequence[Sequence[int]] | None = None,
    ) -> Prediction:
        label = model.resolved.ref
        manifest = model.resolved.manifest
        tta = tuple(manifest.tta)
        masks: list[dict[str, np.ndarray]] = []
        probabilities: list[dict[str, np.ndarray]] = []
        for begin in range(0, len(frames), BATCH_SIZE):
            chunk = frames[begin : begin + BATCH_SIZE]
            try:
                batch = np.stack([model.preprocess(f) for f in chunk])
            except ValueError as exc:
                raise InferenceError(f"{label}: preprocessing failed: {exc}") from exc
            outs: list[np.ndarray] = []
            for name, inputs in zip((None, *tta), tta_inputs(batch, tta), strict=True):
                out = self._session_run(model, inputs, len(chunk), name)
                if outs and out.shape != outs[0].shape:
                    raise InferenceError(
                        f"{label}: {name} output shape {list(out.shape)} differs from the plain "
                        f"one {list(outs[0].shape)}"
                    )
                outs.append(undo_tta(out, name))
            if meter is not None:
                self._measure(model, outs, meter)
            for n, frame in enumerate(chunk):
                shape = np.asarray(frame).shape[:2]
                try:
                    frame_masks, frame_probs = model.postprocess.decode([o[n] for o in outs], shape)
                except ValueError as exc:
                    raise InferenceError(f"{label}: postprocessing failed: {exc}") from exc
                masks.append(frame_masks)
                if keep:
                    probabilities.append(frame_probs)
        final = masks
        if manifest.postprocess:
            try:
                final = apply_steps(
                    masks,
                    manifest.postprocess,
                    spacing=spacing,
                    slice_spacing=slice_spacing,
                    volumes=volumes,
                )
            except ValueError as exc:
                raise InferenceError(f"{label}: postprocess failed: {exc}") from exc
        model.uses += 1
        return Prediction(
            masks=final,
            thresholded=masks,
            probabilities=probabilities if keep else None,
            tta=("plain", *tta),
        )

    def _session_run(
        self, model: LoadedModel, batch: np.ndarray, n: int, name: str | None
    ) -> np.ndarray:
        """One ``session.run`` on a batch of ``n`` frames (``name``: its augmentation)."""
        label = model.resolved.ref
        what = "" if name is None else f" ({name} test-time augmentation)"
        try:
            (out,) = model.session.run([model.output_name], {model.input_name: batch})
        except Exception as exc:  # onnxruntime raises its own exception types
            raise InferenceError(f"{label}: ONNX Runtime run failed{what}: {exc}") from exc
        out = np.asarray(out)
        if out.ndim != 4 or out.shape[0] != n:
            raise InferenceError(
                f"{label}: output shape {list(out.shape)} does not match a batch of "
                f"{n} (N x K x h x w){what}"
            )
        return out

    def _measure(
        self, model: LoadedModel, outs: Sequence[np.ndarray], meter: UncertaintyMeter
    ) -> None:
        """Feed one batch's activated outputs to ``meter``: the plain run's and those of the
        manifest's ``tta:`` runs (already flipped back), before any thresholding."""
        activation = model.resolved.manifest.output.activation
        plain, *augmented = outs
        if meter.needs_augmented and not augmented:  # the manifest refuses this; a safeguard
            raise InferenceError(
                f"{model.resolved.ref}: confidence method 'tta' needs the manifest's tta: runs"
            )
        try:
            for n, logits in enumerate(plain):
                others = [activate(a[n], activation) for a in augmented]
                meter.add(activate(logits, activation), others)
        except ValueError as exc:
            raise InferenceError(f"{model.resolved.ref}: confidence failed: {exc}") from exc
