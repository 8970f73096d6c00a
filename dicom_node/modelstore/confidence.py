"""Confidence of a result: the uncertainty a manifest declares, and the input against training.

A manifest's ``confidence:`` block (:class:`ConfidenceSpec`) says how sure a version must be of
a result before it goes out unflagged:

* ``method: entropy``: per segment, the mean binary predictive entropy (bits, 0..1) of the
  segment's probabilities over the pixels the model gave it at least
  :data:`CANDIDATE_PROBABILITY` (its mask and the uncertain band around it), at the network's
  resolution, before thresholding. A crisp result scores near 0; a hesitant one towards 1.
* ``method: tta``: per segment, ``1 - Dice`` between the masks of the plain input and of each
  test-time augmentation the manifest declares (``tta: [flip_lr]``, flipped back), at the
  network's resolution: 0 when they agree. With ``tta`` declared, ``entropy`` is that of the
  averaged probabilities (what the runner thresholds).
* ``method: none``: no uncertainty, only the ``ood`` checks.

``threshold`` (or a segment's entry in ``thresholds``) is the highest uncertainty accepted. The
``ood:`` block (:class:`OodSpec`) holds the training data's provenance, recorded by training's
export: modalities, matrix and pixel-spacing ranges and ranges of per-image intensity statistics
(:data:`INTENSITY_STATISTICS`). A result is **low confidence** when a segment's uncertainty
exceeds its threshold or any input check fails; :class:`Confidence` says so with reasons a
person can act on ("pixel spacing 4.8 mm outside training range 1.8-2.4 mm").

Pure numpy and pydantic. The runner
(:meth:`dicom_node.modelstore.runner.ModelRunner.run_confident`) feeds :class:`UncertaintyMeter`
the probabilities it already has and calls :func:`assess` with the caller's
:func:`summarize_input`; the worker and training's evaluation both go through it, so the node and
``evaluate`` compute the same thing.
"""

from __future__ import annotations

import logging
import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

LOGGER = logging.getLogger(__name__)

CANDIDATE_PROBABILITY = 0.1
"""Pixels with at least this probability for a segment count as "inside" it for the entropy:
its mask and the band where the model hesitated. Pixels the model is sure are background
(below 0.1) do not dilute the mean."""

DEFAULT_THRESHOLD = 0.25
"""Highest accepted uncertainty when the manifest gives none."""

INTENSITY_STATISTICS: dict[str, str] = {
    "p99_5": "intensity (99.5th percentile)",
    "mean": "mean intensity",
    "contrast": "contrast (99.5th percentile / mean)",
}
"""Per-image statistics of the pixel values (Modality LUT applied, all frames of the series or
case together) that ``ood.intensity`` may bound, with their wording in reasons. For NM the
values are counts (``intensity`` reads ``counts`` then)."""

_EPS = 1e-12


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _range(value: Any, what: str) -> Any:
    """``[low, high]`` with low <= high, both finite (validator helper)."""
    if value is None:
        return value
    low, high = value
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        raise ValueError(f"{what} must be [low, high] with low <= high, got {list(value)}")
    return value


class OodSpec(_Strict):
    """What the training data looked like (``confidence.ood`` in the manifest).

    Every field is optional: a check without its field is not made. Training's export fills
    them from the training cases (:func:`training.confidence_eval.input_provenance`).
    """

    modalities: list[str] = Field(default_factory=list)
    rows: tuple[int, int] | None = None
    columns: tuple[int, int] | None = None
    pixel_spacing_mm: tuple[float, float] | None = None
    intensity: dict[str, tuple[float, float]] = Field(default_factory=dict)
    n_images: int | None = Field(default=None, ge=0)
    """How many training images the ranges describe (provenance, not checked)."""

    @field_validator("modalities")
    @classmethod
    def _modalities(cls, value: list[str]) -> list[str]:
        return [v.strip().upper() for v in value]

    @field_validator("rows", "columns")
    @classmethod
    def _matrix(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and not 1 <= value[0] <= value[1]:
            raise ValueError(f"must be [min, max] with 1 <= min <= max, got {list(value)}")
        return value

    @field_validator("pixel_spacing_mm")
    @classmethod
    def _spacing(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and value[0] <= 0:
            raise ValueError(f"must be [min, max] in mm with min > 0, got {list(value)}")
        return _range(value, "pixel_spacing_mm")

    @field_validator("intensity")
    @classmethod
    def _intensity(cls, value: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        for name, bounds in value.items():
            if name not in INTENSITY_STATISTICS:
                raise ValueError(
                    f"unknown intensity statistic {name!r}; known: {sorted(INTENSITY_STATISTICS)}"
                )
            _range(bounds, f"intensity.{name}")
        return value


class ConfidenceSpec(_Strict):
    """The manifest's ``confidence:`` block: method, thresholds, input checks."""

    method: Literal["entropy", "tta", "none"] = "entropy"
    threshold: float = Field(DEFAULT_THRESHOLD, gt=0, le=1)
    thresholds: dict[str, float] = Field(default_factory=dict)
    """Per segment key, overriding ``threshold`` (small segments have a relatively wider
    uncertain rim, so they usually need a higher one)."""
    ood: OodSpec | None = None

    @field_validator("thresholds")
    @classmethod
    def _thresholds(cls, value: dict[str, float]) -> dict[str, float]:
        for key, limit in value.items():
            if not 0 < float(limit) <= 1:
                raise ValueError(f"thresholds[{key!r}] must be in (0, 1], got {limit!r}")
        return value

    @model_validator(mode="after")
    def _useful(self) -> ConfidenceSpec:
        if self.method == "none" and self.ood is None:
            raise ValueError("method 'none' checks nothing without 'ood'; add ood or a method")
        return self

    def threshold_for(self, key: str) -> float:
        """The highest accepted uncertainty of segment ``key``."""
        return float(self.thresholds.get(key, self.threshold))


# --------------------------------------------------------------------------- records
@dataclass(frozen=True)
class SegmentUncertainty:
    """One segment's uncertainty over a whole result.

    Attributes
    ----------
    key
        Segment key.
    score
        Uncertainty in [0, 1]; ``None`` when there was nothing to judge (no pixel was a
        candidate for the segment, or both TTA predictions were empty).
    threshold
        The highest accepted score.
    pixels
        Pixels (network resolution) the score was computed over.
    """

    key: str
    score: float | None
    threshold: float
    pixels: int = 0

    def __post_init__(self) -> None:
        if self.score is not None and not 0.0 <= self.score <= 1.0:
            raise ValueError(f"score must be in [0, 1] or None, got {self.score!r}")

    @property
    def low(self) -> bool:
        """Whether the score exceeds the threshold."""
        return self.score is not None and self.score > self.threshold

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "score": None if self.score is None else round(self.score, 4),
            "threshold": self.threshold,
            "pixels": self.pixels,
            "low": self.low,
        }


@dataclass(frozen=True)
class Confidence:
    """How far a result can be trusted: what every output shows and the rule acts on.

    Attributes
    ----------
    method
        ``entropy``, ``tta`` or ``none`` (the manifest's).
    score
        The highest per-segment uncertainty (0 when none was judged); 0 = sure, 1 = guessing.
    low
        Low confidence: a segment above its threshold, or an input check failed.
    reasons
        One sentence per cause, for people (empty when ``low`` is False).
    per_segment
        Per segment, in manifest order.
    """

    method: str
    score: float
    low: bool
    reasons: tuple[str, ...] = ()
    per_segment: tuple[SegmentUncertainty, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.reasons, tuple) or not all(isinstance(r, str) for r in self.reasons):
            raise TypeError(f"reasons must be a tuple of str, got {self.reasons!r}")
        if self.low and not self.reasons:
            raise ValueError("a low-confidence result must say why (reasons is empty)")

    @property
    def label(self) -> str:
        """``LOW CONFIDENCE`` or ``confidence ok``: the short flag the outputs carry."""
        return "LOW CONFIDENCE" if self.low else "confidence ok"

    def summary(self, limit: int = 3) -> str:
        """``low confidence: reason; reason`` or ``confidence ok (uncertainty 0.04, entropy)``."""
        if not self.low:
            return f"confidence ok (uncertainty {self.score:.2f}, {self.method})"
        shown = list(self.reasons[:limit])
        if len(self.reasons) > limit:
            shown.append(f"and {len(self.reasons) - limit} more")
        return "low confidence: " + "; ".join(shown)

    def segment(self, key: str) -> SegmentUncertainty | None:
        """The uncertainty of segment ``key`` (None when it was not judged)."""
        return next((s for s in self.per_segment if s.key == key), None)

    @property
    def input_reasons(self) -> tuple[str, ...]:
        """The reasons that are about the input (out-of-distribution), not a segment."""
        return self.reasons[sum(s.low for s in self.per_segment) :]

    def segment_note(self, key: str, limit: int = 64) -> str:
        """A short note on segment ``key`` for its Segment Description (at most ``limit``).

        ``LOW CONFIDENCE: entropy 0.31 > 0.25``, ``LOW CONFIDENCE: input unlike training data``,
        ``confidence ok (entropy 0.12 <= 0.25)``.
        """
        seg = self.segment(key)
        short = _SHORT_WORDS.get(self.method, self.method)
        if seg is not None and seg.low:
            assert seg.score is not None
            text = f"LOW CONFIDENCE: {short} {seg.score:.2f} > {seg.threshold:g}"
        elif self.low and self.input_reasons:
            text = "LOW CONFIDENCE: input unlike the training data"
        elif self.low:
            text = "LOW CONFIDENCE: another segment is uncertain"
        elif seg is not None and seg.score is not None:
            text = f"confidence ok ({short} {seg.score:.2f} <= {seg.threshold:g})"
        else:
            text = "confidence ok"
        return text[:limit]

    def legend(self, width: int = 44) -> list[str]:
        """Lines of at most ``width`` characters for an image legend or a text annotation.

        ``LOW CONFIDENCE - check this result`` and each reason (wrapped), or one
        ``confidence ok`` line.
        """
        if not self.low:
            return [f"confidence ok (uncertainty {self.score:.2f}, {self.method})"[:width]]
        lines = ["LOW CONFIDENCE - check this result"[:width]]
        for reason in self.reasons:
            lines += textwrap.wrap(reason, width, initial_indent="- ", subsequent_indent="  ") or [
                "-"
            ]
        return lines

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (job details, evaluation reports)."""
        return {
            "method": self.method,
            "score": round(self.score, 4),
            "low": self.low,
            "reasons": list(self.reasons),
            "per_segment": [s.to_dict() for s in self.per_segment],
        }


@dataclass(frozen=True)
class InputSummary:
    """What the out-of-distribution checks look at: one series (node) or one case (training).

    Attributes
    ----------
    modality
        Modality of the images (``""`` when absent).
    matrices
        Distinct ``(rows, columns)`` of the frames.
    spacings_mm
        Distinct ``(row, column)`` pixel spacings; empty when the header has none (then the
        spacing is not checked).
    intensity
        The :data:`INTENSITY_STATISTICS` over all frames together.
    """

    modality: str
    matrices: tuple[tuple[int, int], ...]
    spacings_mm: tuple[tuple[float, float], ...] = ()
    intensity: Mapping[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------- input checks
def intensity_statistics(frames: Sequence[np.ndarray]) -> dict[str, float]:
    """The :data:`INTENSITY_STATISTICS` of ``frames`` (any sizes, all pixels together).

    ``contrast`` is ``p99_5 / mean``, 0 for an image without signal (mean 0).
    """
    if not frames:
        raise ValueError("frames must hold at least one frame")
    values = np.concatenate([np.ravel(np.asarray(f, dtype=np.float64)) for f in frames])
    high = float(np.percentile(values, 99.5))
    mean = float(values.mean())
    contrast = high / mean if abs(mean) > _EPS else 0.0
    return {"p99_5": high, "mean": mean, "contrast": contrast}


def summarize_input(
    frames: Sequence[np.ndarray],
    modality: str | None,
    spacings_mm: Sequence[tuple[float, float] | None] = (),
) -> InputSummary:
    """Build the :class:`InputSummary` of a series' frames and header values.

    Parameters
    ----------
    frames
        The frames the model ran on (Modality LUT applied).
    modality
        The series' Modality.
    spacings_mm
        Pixel Spacing of each instance (``None`` for one without).
    """
    matrices = sorted({(int(np.shape(f)[0]), int(np.shape(f)[1])) for f in frames})
    spacings = sorted({(float(s[0]), float(s[1])) for s in spacings_mm if s is not None})
    return InputSummary(
        modality=(modality or "").strip().upper(),
        matrices=tuple(matrices),
        spacings_mm=tuple(spacings),
        intensity=intensity_statistics(frames),
    )


def _num(value: float) -> str:
    """A number with 3 significant digits, without exponent (``1.8``, ``2400``, ``0.0123``)."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    rounded = float(f"{value:.3g}")
    text = f"{rounded:.{max(0, 2 - math.floor(math.log10(abs(rounded))))}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def _span(bounds: tuple[float, float], unit: str = "") -> str:
    return f"{_num(bounds[0])}-{_num(bounds[1])}{unit}"


def _outside(value: float, bounds: tuple[float, float]) -> bool:
    return not bounds[0] <= value <= bounds[1]


def ood_reasons(ood: OodSpec, summary: InputSummary) -> list[str]:
    """Why the input differs from the training data (empty when every check passes)."""
    reasons: list[str] = []
    if ood.modalities and summary.modality not in ood.modalities:
        shown = summary.modality or "without Modality"
        reasons.append(
            f"modality {shown} is not one the model was trained on ({', '.join(ood.modalities)})"
        )
    for rows, cols in summary.matrices:
        bad = []
        if ood.rows is not None and _outside(rows, ood.rows):
            bad.append(f"rows {ood.rows[0]}-{ood.rows[1]}")
        if ood.columns is not None and _outside(cols, ood.columns):
            bad.append(f"columns {ood.columns[0]}-{ood.columns[1]}")
        if bad:
            reasons.append(f"matrix {rows}x{cols} outside training range ({', '.join(bad)})")
    if ood.pixel_spacing_mm is not None:
        for spacing in summary.spacings_mm:
            bad_axes = [s for s in spacing if _outside(s, ood.pixel_spacing_mm)]
            if bad_axes:
                shown = (
                    _num(spacing[0])
                    if spacing[0] == spacing[1]
                    else (f"{_num(spacing[0])} x {_num(spacing[1])}")
                )
                reasons.append(
                    f"pixel spacing {shown} mm outside training range "
                    f"{_span(ood.pixel_spacing_mm, ' mm')}"
                )
    for name, bounds in ood.intensity.items():
        value = summary.intensity.get(name)
        if value is None or not _outside(value, bounds):
            continue
        what = INTENSITY_STATISTICS[name]
        if summary.modality in ("NM", "PT"):
            what = what.replace("intensity", "counts")
        reasons.append(f"{what} {_num(value)} outside training range {_span(bounds)}")
    return reasons


# --------------------------------------------------------------------------- uncertainty
def binary_entropy(p: np.ndarray) -> np.ndarray:
    """Entropy in bits of a Bernoulli(p) per pixel: 0 at p = 0 or 1, 1 at p = 0.5."""
    q = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1.0 - _EPS)
    return -(q * np.log2(q) + (1.0 - q) * np.log2(1.0 - q))


class UncertaintyMeter:
    """Accumulates per-segment uncertainty over the frames of one result.

    Sums are kept per segment, so frames of any size can be added one at a time and the
    memory stays that of one frame.

    Parameters
    ----------
    spec
        The manifest's confidence block.
    channels
        Segment key -> output channel, in manifest order.
    activation
        The manifest's ``output.activation`` (``softmax`` binarises by argmax).
    thresholds
        Segment key -> binarisation threshold (sigmoid and ``none``; the segment's own or
        ``output.threshold``); keys without one use 0.5.
    """

    def __init__(
        self,
        spec: ConfidenceSpec,
        channels: Mapping[str, int],
        activation: str = "sigmoid",
        thresholds: Mapping[str, float] | None = None,
    ) -> None:
        self.spec = spec
        self.channels = dict(channels)
        self.activation = activation
        self.thresholds = {k: float((thresholds or {}).get(k, 0.5)) for k in self.channels}
        self._sum = dict.fromkeys(self.channels, 0.0)
        self._count = dict.fromkeys(self.channels, 0)
        self.frames = 0

    @property
    def needs_augmented(self) -> bool:
        """Whether :meth:`add` needs test-time augmented predictions (method ``tta``)."""
        return self.spec.method == "tta"

    def _masks(self, probs: np.ndarray) -> dict[str, np.ndarray]:
        if self.activation == "softmax":
            labels = np.argmax(probs, axis=0)
            return {k: labels == c for k, c in self.channels.items()}
        return {k: probs[c] > self.thresholds[k] for k, c in self.channels.items()}

    def add(self, probs: np.ndarray, augmented: Sequence[np.ndarray] = ()) -> None:
        """Add one frame's activated output.

        Parameters
        ----------
        probs
            (K, h, w) probabilities (after the manifest's activation) of the plain input.
        augmented
            (K, h, w) probabilities of each test-time augmented input, already flipped back;
            at least one is required for method ``tta``.

        Raises
        ------
        ValueError
            ``probs`` is not (K, h, w) with the segments' channels, or ``augmented`` is
            missing or misshapen for ``tta``.
        """
        arr = np.asarray(probs, dtype=np.float64)
        if arr.ndim != 3 or arr.shape[0] <= max(self.channels.values(), default=0):
            raise ValueError(f"probs must be (K, h, w) covering the segments, got {arr.shape}")
        others = [np.asarray(a, dtype=np.float64) for a in augmented]
        if any(o.shape != arr.shape for o in others):
            raise ValueError(
                f"augmented probabilities must have the plain shape {arr.shape}, got "
                f"{[o.shape for o in others]}"
            )
        self.frames += 1
        if self.spec.method == "entropy":
            mean = (arr + sum(others)) / (1 + len(others)) if others else arr
            for key, channel in self.channels.items():
                p = mean[channel]
                inside = p >= CANDIDATE_PROBABILITY
                n = int(inside.sum())
                if n:
                    self._sum[key] += float(binary_entropy(p[inside]).sum())
                    self._count[key] += n
        elif self.spec.method == "tta":
            if not others:
                raise ValueError("method 'tta' needs the augmented probabilities; got none")
            plain = self._masks(arr)
            for other in (self._masks(o) for o in others):
                for key in self.channels:
                    # sum = |A| + |B|, count = 2|A & B|: Dice = count / sum over the result
                    self._sum[key] += float(plain[key].sum() + other[key].sum())
                    self._count[key] += int(2 * (plain[key] & other[key]).sum())

    def result(self) -> tuple[SegmentUncertainty, ...]:
        """Per segment, in the order of ``channels``."""
        out = []
        for key in self.channels:
            limit = self.spec.threshold_for(key)
            score: float | None = None
            pixels = 0
            if self.spec.method == "entropy" and self._count[key]:
                pixels = self._count[key]
                score = min(1.0, max(0.0, self._sum[key] / pixels))
            elif self.spec.method == "tta" and self._sum[key] > 0:
                pixels = int(self._sum[key])
                score = min(1.0, max(0.0, 1.0 - self._count[key] / self._sum[key]))
            out.append(SegmentUncertainty(key=key, score=score, threshold=limit, pixels=pixels))
        return tuple(out)


def flag_text(text: str, confidence: Confidence | None, limit: int = 64) -> str:
    """``text`` marked for a low-confidence result (``LOW CONFIDENCE - ...``), cut to ``limit``.

    Used for the Series Description of every output; unchanged when ``confidence`` is None or
    not low.
    """
    if confidence is None or not confidence.low:
        return text[:limit]
    return f"LOW CONFIDENCE - {text}"[:limit]


# --------------------------------------------------------------------------- verdict
_SHORT_WORDS = {"entropy": "entropy", "tta": "TTA disagreement"}
_METHOD_WORDS = {
    "entropy": "mean predictive entropy",
    "tta": "disagreement between plain and flipped predictions",
}


def assess(
    spec: ConfidenceSpec,
    per_segment: Sequence[SegmentUncertainty],
    summary: InputSummary | None,
    labels: Mapping[str, str] | None = None,
) -> Confidence:
    """The confidence of one result: uncertainty against thresholds, input against training.

    Parameters
    ----------
    spec
        The manifest's confidence block.
    per_segment
        :meth:`UncertaintyMeter.result` (empty for method ``none``).
    summary
        The input (:func:`summarize_input`); ``None`` skips the ``ood`` checks.
    labels
        Segment key -> label for the reasons (default: the keys).

    Returns
    -------
    Confidence
    """
    labels = labels or {}
    reasons = []
    for seg in per_segment:
        if seg.low:
            assert seg.score is not None
            reasons.append(
                f"{labels.get(seg.key, seg.key)}: {_METHOD_WORDS.get(spec.method, spec.method)} "
                f"{seg.score:.2f} above threshold {seg.threshold:g}"
            )
    if spec.ood is not None and summary is not None:
        reasons += ood_reasons(spec.ood, summary)
    scores = [s.score for s in per_segment if s.score is not None]
    return Confidence(
        method=spec.method,
        score=max(scores) if scores else 0.0,
        low=bool(reasons),
        reasons=tuple(reasons),
        per_segment=tuple(per_segment),
    )


__all__ = [
    "CANDIDATE_PROBABILITY",
    "DEFAULT_THRESHOLD",
    "INTENSITY_STATISTICS",
    "Confidence",
    "ConfidenceSpec",
    "InputSummary",
    "OodSpec",
    "SegmentUncertainty",
    "UncertaintyMeter",
    "assess",
    "binary_entropy",
    "flag_text",
    "intensity_statistics",
    "ood_reasons",
    "summarize_input",
]
