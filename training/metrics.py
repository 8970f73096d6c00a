"""Segmentation metrics in numpy: Dice, IoU, HD95 (mm), connected components, lesion detection.

Dice, IoU, HD95 and the surface are the model contract's (:mod:`dicom_node.modelstore.scoring`),
re-exported here: the node's gate, shadow agreement and the demo compute the same numbers, per
frame and per volume (3-D, with the series' slice positions).

Conventions (documented in the report):

- Dice and IoU of two empty masks are 1.0 (nothing to find, nothing found); of one empty and one
  non-empty mask 0.0.
- HD95 is the 95th percentile of the symmetric surface distances (both directions pooled), in mm
  using the pixel spacing. It is ``nan`` when either mask is empty (undefined) and 0.0 when
  both are.
- Surfaces are the mask pixels with at least one 4-neighbour outside the mask; distances are
  between pixel centres.
- Detection: a truth component (8-connected) counts as detected when the prediction covers at
  least half of its pixels (:data:`MIN_COVERAGE`; a one-pixel touch hid near-complete misses); a
  predicted component that overlaps no truth component is a false positive. :func:`lesions`
  gives the per-lesion records (size, coverage, share of the outline on the gland's edge) that
  the report's strata are made of.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from dicom_node.modelstore.scoring import dice, hd95, iou, surface, volume_scores

LOGGER = logging.getLogger(__name__)

__all__ = [
    "case_metrics",
    "MIN_COVERAGE",
    "detection",
    "lesions",
    "dice",
    "hd95",
    "iou",
    "label_components",
    "surface",
    "volume_scores",
]


def _as_bool(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"masks must have the same shape, got {a.shape} and {b.shape}")
    return a, b


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


MIN_COVERAGE = 0.5
"""Share of a truth lesion's pixels the prediction must cover for the lesion to count as found."""


def detection(
    pred: np.ndarray, truth: np.ndarray, min_coverage: float = MIN_COVERAGE
) -> dict[str, int]:
    """Component-level detection counts: ``{"truth", "detected", "predicted", "false_positives"}``.

    A truth component is detected when the prediction covers at least ``min_coverage`` of its
    pixels; a predicted component that overlaps no truth pixel is a false positive.
    """
    p, t = _as_bool(pred, truth)
    tl, nt = label_components(t)
    pl, npred = label_components(p)
    detected = 0
    if nt:
        sizes = np.bincount(tl.ravel(), minlength=nt + 1)
        covered = np.bincount(tl[p & t], minlength=nt + 1)
        detected = int((covered[1:] >= min_coverage * sizes[1:]).sum())
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


def lesions(
    pred: np.ndarray,
    truth: np.ndarray,
    gland: np.ndarray | None = None,
    spacing: Sequence[float] = (1.0, 1.0),
    min_coverage: float = MIN_COVERAGE,
) -> list[dict[str, float | int | bool | None]]:
    """One record per truth lesion (8-connected component of ``truth``).

    Parameters
    ----------
    pred, truth : numpy.ndarray
        2-D masks of the lesion segment.
    gland : numpy.ndarray, optional
        The organ the lesions lie in (thyroid); gives ``edge_fraction``.
    spacing : (float, float)
        Pixel spacing in mm (row, column).
    min_coverage : float
        Coverage from which a lesion counts as ``found``.

    Returns
    -------
    list of dict
        ``pixels``, ``diameter_mm`` (of the circle of equal area), ``coverage`` (share of the
        lesion's pixels predicted), ``found``, and ``edge_fraction``: the share of the lesion's
        outline pixels that touch the outside of ``gland`` (0 = well inside, 1 = all on the edge;
        ``None`` without ``gland``).
    """
    p, t = _as_bool(pred, truth)
    tl, nt = label_components(t)
    outside = None if gland is None else ~np.pad(np.asarray(gland, bool), 1)
    area = float(spacing[0]) * float(spacing[1])
    out: list[dict[str, float | int | bool | None]] = []
    for k in range(1, nt + 1):
        comp = tl == k
        n = int(comp.sum())
        coverage = float((comp & p).sum()) / n
        edge: float | None = None
        if outside is not None:
            rim = surface(comp)
            rr, cc = np.nonzero(rim)
            rr, cc = rr + 1, cc + 1  # into the padded frame
            touches = outside[rr - 1, cc] | outside[rr + 1, cc]
            touches |= outside[rr, cc - 1] | outside[rr, cc + 1]
            edge = float(touches.mean()) if len(rr) else 0.0
        out.append(
            {
                "pixels": n,
                "diameter_mm": float(2.0 * np.sqrt(n * area / np.pi)),
                "coverage": coverage,
                "found": coverage >= min_coverage,
                "edge_fraction": edge,
            }
        )
    return out
