"""Segmentation metrics in numpy: Dice, IoU, HD95 (mm), connected components, lesion detection.

Dice and IoU are the model contract's (:mod:`dicom_node.modelstore.scoring`), re-exported here:
the node's gate, shadow agreement and the demo compute the same numbers.

Conventions (documented in the report):

- Dice and IoU of two empty masks are 1.0 (nothing to find, nothing found); of one empty and one
  non-empty mask 0.0.
- HD95 is the 95th percentile of the symmetric surface distances (both directions pooled), in mm
  using the pixel spacing. It is ``nan`` when either mask is empty (undefined) and 0.0 when
  both are.
- Surfaces are the mask pixels with at least one 4-neighbour outside the mask; distances are
  between pixel centres.
- Detection: a truth component counts as detected when a predicted component overlaps it by at
  least one pixel; a predicted component that overlaps no truth component is a false positive.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from dicom_node.modelstore.scoring import dice, iou

LOGGER = logging.getLogger(__name__)

__all__ = [
    "case_metrics",
    "detection",
    "dice",
    "hd95",
    "iou",
    "label_components",
    "surface",
]


def _as_bool(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"masks must have the same shape, got {a.shape} and {b.shape}")
    return a, b


def surface(mask: np.ndarray) -> np.ndarray:
    """Boolean map of the boundary pixels (4-connectivity; the image edge counts as outside)."""
    m = np.asarray(mask, dtype=bool)
    padded = np.pad(m, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:] & m
    return m & ~interior


def _min_distances(src: np.ndarray, dst: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """For each point of ``src`` (N, 2) the distance to the nearest point of ``dst`` (M, 2)."""
    out = np.empty(len(src))
    for i in range(0, len(src), chunk):
        block = src[i : i + chunk]
        d2 = ((block[:, None, :] - dst[None, :, :]) ** 2).sum(-1)
        out[i : i + chunk] = np.sqrt(d2.min(axis=1))
    return out


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] = (1.0, 1.0)) -> float:
    """95th percentile Hausdorff distance in mm (see module doc for empty masks).

    Parameters
    ----------
    pred, truth : numpy.ndarray
        Boolean masks (H, W).
    spacing : (float, float)
        Pixel spacing (row, column) in mm.
    """
    p, t = _as_bool(pred, truth)
    if not p.any() and not t.any():
        return 0.0
    if not p.any() or not t.any():
        return float("nan")
    scale = np.asarray(spacing, dtype=np.float64)
    sp = np.argwhere(surface(p)) * scale
    st = np.argwhere(surface(t)) * scale
    distances = np.concatenate([_min_distances(sp, st), _min_distances(st, sp)])
    return float(np.percentile(distances, 95))


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Label 8-connected components of a 2D mask; returns (labels int32, count).

    Union-find over run-length segments of each row, so it stays fast on large sparse masks.
    """
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {m.shape}")
    labels = np.zeros(m.shape, dtype=np.int32)
    parent: list[int] = [0]

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    prev_runs: list[tuple[int, int, int]] = []
    for r in range(m.shape[0]):
        row = m[r]
        if not row.any():
            prev_runs = []
            continue
        edges = np.flatnonzero(np.diff(np.concatenate([[0], row.view(np.int8), [0]])))
        runs = []
        for start, stop in zip(edges[::2], edges[1::2], strict=True):
            label = 0
            for ps, pe, pl in prev_runs:
                # half-open runs; 8-connectivity also joins diagonal neighbours
                if ps <= stop and pe >= start:
                    if label == 0:
                        label = find(pl)
                    else:
                        a, b = find(label), find(pl)
                        if a != b:
                            parent[max(a, b)] = min(a, b)
                            label = min(a, b)
            if label == 0:
                label = len(parent)
                parent.append(label)
            labels[r, start:stop] = label
            runs.append((start, stop, label))
        prev_runs = runs
    if len(parent) == 1:
        return labels, 0
    roots = np.array([find(i) for i in range(len(parent))])
    _, compact = np.unique(roots, return_inverse=True)
    return compact[labels].astype(np.int32), int(compact.max())


def detection(pred: np.ndarray, truth: np.ndarray) -> dict[str, int]:
    """Component-level detection counts: ``{"truth", "detected", "predicted", "false_positives"}``.

    A truth component is detected when any predicted pixel overlaps it; a predicted component
    that overlaps no truth pixel is a false positive.
    """
    p, t = _as_bool(pred, truth)
    tl, nt = label_components(t)
    pl, npred = label_components(p)
    detected = len(np.unique(tl[p & t])) if nt else 0
    hit = set(np.unique(pl[p & t]).tolist())
    false_pos = sum(1 for k in range(1, npred + 1) if k not in hit)
    return {"truth": nt, "detected": detected, "predicted": npred, "false_positives": false_pos}


def case_metrics(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] = (1.0, 1.0)
) -> dict[str, float]:
    """Dice, IoU and HD95 (mm) of one mask pair."""
    return {
        "dice": dice(pred, truth),
        "iou": iou(pred, truth),
        "hd95_mm": hd95(pred, truth, spacing),
    }
