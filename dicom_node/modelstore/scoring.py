"""Overlap scores of the model contract: Dice and IoU, written once.

Used by the promotion gate, the worker's shadow agreement, training's evaluation and validation
reports, and the demo, so that "Dice" is the same number everywhere.

Conventions: both masks empty -> 1.0 (nothing to find, nothing found); exactly one empty -> 0.0.
The masks may have any shape (a frame (H, W) or a stack (F, H, W)); pixels are pooled.

:func:`agreement` is the exception: two *versions* that both predict nothing have not agreed on
anything, so it returns None (no evidence) where :func:`dice` says 1.0. The worker's shadow
comparison uses it and records no value for such a segment.
"""

from __future__ import annotations

import logging

import numpy as np

LOGGER = logging.getLogger(__name__)


def _as_bool(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"masks must have the same shape, got {a.shape} and {b.shape}")
    return a, b


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient ``2|A∩B| / (|A|+|B|)``; 1.0 when both are empty.

    Raises
    ------
    ValueError
        The masks differ in shape.
    """
    p, t = _as_bool(pred, truth)
    total = int(p.sum()) + int(t.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, t).sum()) / total


def agreement(a: np.ndarray, b: np.ndarray) -> float | None:
    """Dice between two predictions, or None when both are empty (no evidence either way).

    Used for shadow agreement: "both versions found nothing" is not a perfect agreement (it is
    what two useless models produce), so it must not pull the agreement mean towards 1.0.

    Raises
    ------
    ValueError
        The masks differ in shape.
    """
    p, q = _as_bool(a, b)
    if not p.any() and not q.any():
        return None
    return dice(p, q)


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union ``|A∩B| / |A∪B|``; 1.0 when both are empty.

    Raises
    ------
    ValueError
        The masks differ in shape.
    """
    p, t = _as_bool(pred, truth)
    union = int(np.logical_or(p, t).sum())
    if union == 0:
        return 1.0
    return int(np.logical_and(p, t).sum()) / union
