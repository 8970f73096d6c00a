"""Confidence on the training side: the provenance export records, and whether the flag works.

* :func:`input_provenance` turns training cases into the manifest's ``confidence.ood`` block
  (modalities, matrix and pixel-spacing ranges, ranges of the per-image intensity statistics of
  :data:`dicom_node.modelstore.confidence.INTENSITY_STATISTICS`), so a published version
  carries what its training data looked like; :func:`confidence_block` adds the method and
  thresholds (the training config's ``model.confidence``, else entropy with the default).
* :func:`case_summary` is what ``evaluate`` hands the runner for one case: the same
  :class:`~dicom_node.modelstore.confidence.InputSummary` the worker builds for a series, so
  node and evaluation judge alike.
* :func:`flag_evaluation` answers "does the flag catch the bad results?" on the held-out
  evaluation: of the worst 10% of images by Dice, how many are flagged (recall); of the others,
  how many are flagged for nothing (false alarms); and how many flags are on worst images
  (precision). ``evaluate`` writes it to ``report.json`` (``confidence``), ``report.md`` and,
  through export, the manifest's ``metrics.confidence``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from dicom_node.modelstore import Confidence, InputSummary, summarize_input
from dicom_node.modelstore.confidence import DEFAULT_THRESHOLD, intensity_statistics

LOGGER = logging.getLogger(__name__)

WORST_FRACTION = 0.10
"""The share of evaluated images, ranked by Dice, that the flag should catch."""

SIGNIFICANT = 4
"""Significant digits of the recorded ranges (rounded outwards: every training image stays
inside its own ranges)."""

CONFIG_KEYS = ("method", "threshold", "thresholds", "ood")
"""Keys of the training config's ``model.confidence`` (``ood: false`` leaves the input checks
out; any other ``ood`` is refused: the ranges come from the data)."""


def _outward(value: float, up: bool) -> float:
    """``value`` rounded to :data:`SIGNIFICANT` digits, away from the range's inside."""
    if value == 0 or not math.isfinite(value):
        return float(value)
    scale = 10.0 ** (math.floor(math.log10(abs(value))) - SIGNIFICANT + 1)
    rounded = (math.ceil if up else math.floor)(value / scale) * scale
    return float(f"{rounded:.{SIGNIFICANT}g}")


def _span(values: Iterable[float]) -> list[float]:
    vals = list(values)
    return [_outward(min(vals), up=False), _outward(max(vals), up=True)]


def input_provenance(cases: Sequence[Any]) -> dict[str, Any]:
    """The ``confidence.ood`` block of the manifest, from training cases.

    Parameters
    ----------
    cases
        :class:`training.data.Case` objects (``frames`` (F, H, W), ``spacing``, ``modality``).

    Returns
    -------
    dict
        ``{modalities, rows, columns, pixel_spacing_mm, intensity: {statistic: [min, max]},
        n_images}``: the range over the cases of each quantity (a case's intensity statistics
        are over all its frames, as the node computes them over a series).

    Raises
    ------
    ValueError
        ``cases`` is empty.
    """
    if not cases:
        raise ValueError("input_provenance needs at least one training case")
    modalities = sorted({str(c.modality).upper() for c in cases if c.modality})
    shapes = [tuple(int(v) for v in np.shape(c.frames)[1:3]) for c in cases]
    spacings = [float(v) for c in cases for v in c.spacing]
    stats = [intensity_statistics(list(c.frames)) for c in cases]
    block: dict[str, Any] = {
        "rows": [min(s[0] for s in shapes), max(s[0] for s in shapes)],
        "columns": [min(s[1] for s in shapes), max(s[1] for s in shapes)],
        "pixel_spacing_mm": _span(spacings),
        "intensity": {name: _span(s[name] for s in stats) for name in stats[0]},
        "n_images": int(sum(np.shape(c.frames)[0] for c in cases)),
    }
    if modalities:
        block = {"modalities": modalities, **block}
    return block


def confidence_block(config: Mapping[str, Any] | None, cases: Sequence[Any]) -> dict[str, Any]:
    """The manifest's ``confidence:`` block for a new version.

    Parameters
    ----------
    config
        The training config's ``model.confidence`` (``method``, ``threshold``,
        ``thresholds``; ``ood: false`` to leave the input checks out), or None: method
        ``entropy`` with the default threshold.
    cases
        The training cases the ``ood`` ranges are taken from.

    Raises
    ------
    ValueError
        ``config`` has an unknown key or an ``ood`` other than ``false``.
    """
    cfg = dict(config or {})
    unknown = sorted(set(cfg) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(
            f"model.confidence has unknown key(s) {unknown} (allowed: {list(CONFIG_KEYS)})"
        )
    ood = cfg.pop("ood", True)
    if ood not in (True, False):
        raise ValueError(
            "model.confidence.ood may only be false (the ranges are measured on the training "
            f"data at export), got {ood!r}"
        )
    block: dict[str, Any] = {"method": "entropy", "threshold": DEFAULT_THRESHOLD, **cfg}
    if ood:
        block["ood"] = input_provenance(cases)
    return block


def case_summary(case: Any) -> InputSummary:
    """What the out-of-distribution checks see of one case (as the worker sees a series)."""
    return summarize_input(list(case.frames), getattr(case, "modality", ""), [tuple(case.spacing)])


def flag_evaluation(
    names: Sequence[str],
    scores: Sequence[float],
    confidences: Sequence[Confidence | None],
    worst_fraction: float = WORST_FRACTION,
) -> dict[str, Any] | None:
    """How well the low-confidence flag picks out the worst results of an evaluation.

    Parameters
    ----------
    names
        Per image, its name (``case`` or ``case/frame``).
    scores
        Per image, its quality (mean Dice over the segments present): lower is worse.
    confidences
        Per image, the runner's verdict (None when the manifest has no ``confidence:``).
    worst_fraction
        The share of images counted as "worst" (at least one image).

    Returns
    -------
    dict or None
        None when no image has a verdict; else ``{n_images, n_flagged, worst: {n, flagged,
        recall, max_score}, good: {n, flagged, false_alarm_rate}, precision, flagged_by:
        {uncertainty, input}, worst_cases: [{name, score, flagged, reasons}]}``.
    """
    if not (len(names) == len(scores) == len(confidences)):
        raise ValueError("names, scores and confidences must have one entry per image")
    judged = [i for i, c in enumerate(confidences) if c is not None]
    if not judged:
        return None
    order = sorted(judged, key=lambda i: (scores[i], i))
    n_worst = max(1, math.ceil(worst_fraction * len(judged)))
    worst, good = order[:n_worst], order[n_worst:]

    def low(i: int) -> bool:
        conf = confidences[i]
        return conf is not None and conf.low

    flagged = [c for c in confidences if c is not None and c.low]
    worst_flagged = sum(1 for i in worst if low(i))
    good_flagged = sum(1 for i in good if low(i))
    by_input = sum(1 for c in flagged if c.input_reasons)
    by_uncertainty = sum(1 for c in flagged if any(s.low for s in c.per_segment))
    return {
        "n_images": len(judged),
        "n_flagged": len(flagged),
        "worst_fraction": worst_fraction,
        "worst": {
            "n": len(worst),
            "flagged": worst_flagged,
            "recall": worst_flagged / len(worst),
            "max_score": float(scores[worst[-1]]),
        },
        "good": {
            "n": len(good),
            "flagged": good_flagged,
            "false_alarm_rate": good_flagged / len(good) if good else float("nan"),
        },
        "precision": worst_flagged / len(flagged) if flagged else float("nan"),
        "flagged_by": {"uncertainty": by_uncertainty, "input": by_input},
        "worst_cases": [
            {
                "name": names[i],
                "score": round(float(scores[i]), 4),
                "flagged": low(i),
                "reasons": list(confidences[i].reasons),  # type: ignore[union-attr]
            }
            for i in worst
        ],
    }


def _pct(value: float) -> str:
    return "n/a" if value != value else f"{100 * value:.0f}%"


def markdown(block: Mapping[str, Any] | None, spec: Mapping[str, Any] | None = None) -> list[str]:
    """The ``report.md`` section of :func:`flag_evaluation` (empty without a block)."""
    if not block:
        return []
    worst, good = block["worst"], block["good"]
    lines = ["## Low-confidence flag", ""]
    if spec:
        limits = ", ".join(f"{k} {v:g}" for k, v in (spec.get("thresholds") or {}).items())
        lines += [
            f"Method `{spec.get('method')}`, threshold {spec.get('threshold')}"
            + (f" ({limits})" if limits else "")
            + (", input checks against the training provenance" if spec.get("ood") else "")
            + ".",
            "",
        ]
    lines += [
        f"Worst {_pct(block['worst_fraction'])} of the {block['n_images']} images by Dice "
        f"({worst['n']} images, Dice up to {worst['max_score']:.3f}): **{worst['flagged']} "
        f"flagged** (recall {_pct(worst['recall'])}).",
        "",
        f"Other images: {good['flagged']} of {good['n']} flagged "
        f"(false alarms {_pct(good['false_alarm_rate'])}); of all {block['n_flagged']} flags, "
        f"{_pct(block['precision'])} are on worst images. Flags from uncertainty: "
        f"{block['flagged_by']['uncertainty']}, from the input checks: "
        f"{block['flagged_by']['input']}.",
        "",
        "| worst image | Dice | flagged | reasons |",
        "| --- | ---: | :---: | --- |",
    ]
    for case in block["worst_cases"]:
        reasons = "; ".join(case["reasons"]) or "-"
        mark = "yes" if case["flagged"] else "no"
        lines.append(f"| {case['name']} | {case['score']:.3f} | {mark} | {reasons} |")
    return [*lines, ""]


__all__ = [
    "CONFIG_KEYS",
    "WORST_FRACTION",
    "case_summary",
    "confidence_block",
    "flag_evaluation",
    "input_provenance",
    "markdown",
]
