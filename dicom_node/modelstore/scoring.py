"""Scores of the model contract: Dice, IoU and HD95 (mm), written once.

Used by the promotion gate, the worker's shadow agreement, training's evaluation and validation
reports, and the demo, so that "Dice" is the same number everywhere.

Conventions: both masks empty -> 1.0 (nothing to find, nothing found); exactly one empty -> 0.0.
The masks may have any shape (a frame (H, W) or a stack (F, H, W)); pixels are pooled, so the
Dice of a stack is the volume's 3-D Dice.

:func:`hd95` is the 95th percentile of the symmetric surface distances in mm, on a frame (pixel
spacing) or on a volume (pixel spacing plus the position of each slice along the slice normal,
from the series geometry: :func:`slice_positions`); :func:`volume_scores` gives all three for
one volume. The promotion gate and training's evaluation report them per case.

:func:`agreement` is the exception: two *versions* that both predict nothing have not agreed on
anything, so it returns None (no evidence) where :func:`dice` says 1.0. The worker's shadow
comparison uses it and records no value for such a segment; :func:`agreement_scores` gives
the shadow comparison's Dice, IoU and HD95 of a whole series, all None when both are empty.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

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


# -- surface distances ------------------------------------------------------------------------
def surface(mask: np.ndarray) -> np.ndarray:
    """Boolean map of the boundary pixels/voxels of a 2-D or 3-D mask.

    A pixel is on the surface when one of its 4 (2-D) or 6 (3-D) face neighbours is outside
    the mask; outside the array counts as outside.
    """
    m = np.asarray(mask, dtype=bool)
    padded = np.pad(m, 1, constant_values=False)
    interior = m.copy()
    centre = tuple(slice(1, -1) for _ in range(m.ndim))
    for axis in range(m.ndim):
        for shift in (0, 2):
            index = list(centre)
            index[axis] = slice(shift, shift + m.shape[axis])
            interior &= padded[tuple(index)]
    return m & ~interior


def _nearest_in_plane(src: np.ndarray, dst: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Squared in-plane distance from each point of ``src`` (N, 2) to the nearest of ``dst``.

    |a - b|^2 = |a|^2 + |b|^2 - 2 a.b: one (chunk, M) array per block instead of (chunk, M, 2).
    """
    out = np.empty(len(src))
    dst_sq = (dst**2).sum(1)
    for i in range(0, len(src), chunk):
        block = src[i : i + chunk]
        d2 = (block**2).sum(1)[:, None] + dst_sq[None, :] - 2.0 * (block @ dst.T)
        out[i : i + chunk] = np.maximum(d2.min(axis=1), 0.0)
    return out


def _directed(
    src: dict[int, np.ndarray], dst: dict[int, np.ndarray], positions: np.ndarray
) -> np.ndarray:
    """Distance (mm) from every surface point of ``src`` to the nearest of ``dst``.

    ``src``/``dst``: slice index -> in-plane points (N, 2) in mm. Exact; target slices are
    visited nearest first and the search stops once the slice gap alone exceeds every current
    distance, so a volume costs about (points per slice)^2 per nearby slice pair, not all pairs.
    """
    targets = sorted(dst)
    out = []
    for z, points in sorted(src.items()):
        best = np.full(len(points), np.inf)
        if z in dst:  # a point on both surfaces is 0 away: exact, and most of them when two
            # versions mostly agree (shadow agreement), so only the rest search other points
            best[np.isin(_keys(points), _keys(dst[z]))] = 0.0
        for t in sorted(targets, key=lambda t: abs(positions[t] - positions[z])):
            gap = float(positions[t] - positions[z]) ** 2
            # only the points this slice could still bring closer (a far stray blob must not
            # make every point of its slice search the whole volume)
            active = np.flatnonzero(best > gap)
            if not len(active):
                break
            best[active] = np.minimum(best[active], gap + _nearest_in_plane(points[active], dst[t]))
        out.append(np.sqrt(best))
    return np.concatenate(out)


def _keys(points: np.ndarray) -> np.ndarray:
    """One comparable value per (row, column) point (both scaled by the same spacing)."""
    return points[:, 0] + 1j * points[:, 1]


def _points(
    mask: np.ndarray, spacing: tuple[float, float], planar: bool = False
) -> dict[int, np.ndarray]:
    # a frame's surface is its 2-D outline: as a one-slice volume every pixel would be "surface"
    # (both z faces are outside), which turns HD95 into an area-to-area distance and costs
    # (pixels)^2 instead of (outline)^2
    found = np.argwhere(surface(mask[0])[None] if planar else surface(mask))
    scale = np.asarray(spacing, dtype=np.float64)
    return {int(z): found[found[:, 0] == z][:, 1:] * scale for z in np.unique(found[:, 0])}


def hd95(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0),
    positions: Sequence[float] | None = None,
) -> float:
    """95th percentile Hausdorff distance in mm of a frame (H, W) or a volume (F, H, W).

    Surfaces are the 4- (frame, or volume of one slice) or 6-connected (volume) boundary
    pixels; distances between pixel centres, both directions pooled. Both masks empty: 0.0;
    exactly one empty: ``nan`` (undefined).

    Parameters
    ----------
    pred, truth
        Boolean masks of one shape.
    spacing
        Pixel spacing (row, column) in mm.
    positions
        For a volume: each slice's position along the slice normal in mm
        (:func:`slice_positions`); default 1 mm apart.

    Raises
    ------
    ValueError
        The masks differ in shape, are not 2-D or 3-D, or ``positions`` has the wrong length.
    """
    p, t = _as_bool(pred, truth)
    if p.ndim not in (2, 3):
        raise ValueError(f"masks must be 2-D or 3-D, got shape {p.shape}")
    # a frame, or a volume of one slice (a planar NM series, a single CT slice): its outline.
    # Every caller (evaluate, the gate, shadow agreement) gets the same rule from here.
    planar = p.ndim == 2 or p.shape[0] == 1
    if p.ndim == 2:
        p, t = p[None], t[None]
    if planar:
        positions = [0.0]
    if positions is None:
        positions = [float(i) for i in range(p.shape[0])]
    z = np.asarray(positions, dtype=np.float64)
    if z.shape != (p.shape[0],):
        raise ValueError(f"need one slice position per slice ({p.shape[0]}), got {z.shape}")
    if not p.any() and not t.any():
        return 0.0
    if not p.any() or not t.any():
        return float("nan")
    rows_cols = (float(spacing[0]), float(spacing[1]))
    sp, st = _points(p, rows_cols, planar), _points(t, rows_cols, planar)
    distances = np.concatenate([_directed(sp, st, z), _directed(st, sp, z)])
    return float(np.percentile(distances, 95))


def volume_scores(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0),
    positions: Sequence[float] | None = None,
) -> dict[str, float]:
    """``{"dice", "iou", "hd95_mm"}`` of one volume (F, H, W) or frame (see :func:`hd95`)."""
    return {
        "dice": dice(pred, truth),
        "iou": iou(pred, truth),
        "hd95_mm": hd95(pred, truth, spacing, positions),
    }


def slice_positions(sources: Sequence[Any], n_frames: int) -> list[float]:
    """Position (mm) of each frame along the slice normal, from the series geometry.

    ``sources`` are the instances in frame order (one frame each, or one multi-frame
    instance). Uses ImagePositionPatient/ImageOrientationPatient of single-frame instances, or
    PlanePositionSequence per frame of an enhanced multi-frame instance; without geometry,
    SpacingBetweenSlices or SliceThickness apart, else 1 mm apart. Positions that are not
    strictly increasing (geometry missing on some slices) fall back to equal spacing too.
    """
    first = sources[0] if sources else None
    step = 1.0
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = _number(getattr(first, keyword, None)) if first is not None else None
        if value is not None and value > 0:
            step = value
            break
    even = [i * step for i in range(n_frames)]
    found: list[float] = []
    for ds in sources:
        found.extend(_instance_positions(ds))
    if len(found) != n_frames or n_frames < 2:
        return even
    if any(b - a <= 1e-6 for a, b in zip(found, found[1:], strict=False)):
        return even
    return [p - found[0] for p in found]


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _normal(iop: Any) -> np.ndarray | None:
    try:
        values = [float(v) for v in iop]
    except (TypeError, ValueError):
        return None
    if len(values) != 6:
        return None
    normal = np.cross(values[:3], values[3:])
    length = float(np.linalg.norm(normal))
    return normal / length if length > 0 else None


def _along(normal: np.ndarray | None, ipp: Any) -> float | None:
    if normal is None or ipp is None:
        return None
    try:
        point = np.asarray([float(v) for v in ipp], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return float(np.dot(normal, point)) if point.shape == (3,) else None


def _instance_positions(ds: Any) -> list[float]:
    """Positions along the normal of ``ds``'s frames ([] when it has no usable geometry)."""
    per_frame = getattr(ds, "PerFrameFunctionalGroupsSequence", None)
    if per_frame:
        shared = getattr(ds, "SharedFunctionalGroupsSequence", None)
        shared_item = shared[0] if shared else None
        out = []
        for item in per_frame:
            orient = _first(item, "PlaneOrientationSequence") or _first(
                shared_item, "PlaneOrientationSequence"
            )
            plane = _first(item, "PlanePositionSequence")
            value = _along(
                _normal(getattr(orient, "ImageOrientationPatient", None)),
                getattr(plane, "ImagePositionPatient", None),
            )
            if value is None:
                return []
            out.append(value)
        return out
    value = _along(
        _normal(getattr(ds, "ImageOrientationPatient", None)),
        getattr(ds, "ImagePositionPatient", None),
    )
    return [] if value is None else [value]


def _first(item: Any, keyword: str) -> Any:
    seq = getattr(item, keyword, None) if item is not None else None
    return seq[0] if seq else None


def agreement_scores(
    volumes: Sequence[tuple[np.ndarray, np.ndarray, Sequence[float], Sequence[float] | None]],
) -> dict[str, float | None]:
    """``{"dice", "iou", "hd95_mm"}`` between two versions' masks of one series, None = no value.

    ``volumes`` holds one ``(a, b, spacing, positions)`` per part of the series with its own
    geometry (a series split into groups; usually one): masks (F, H, W) of the two versions,
    pixel spacing (row, column) in mm and slice positions in mm (:func:`slice_positions`).
    Dice and IoU pool every voxel of the series (the series' 3-D Dice, as :func:`agreement`);
    HD95 is that of the worst part (parts in different geometry have no common distance).

    Both versions empty everywhere: every value None (no evidence, see :func:`agreement`).
    Exactly one empty: Dice and IoU 0.0, ``hd95_mm`` None (undefined); never NaN, which JSON
    columns on PostgreSQL refuse.

    Raises
    ------
    ValueError
        The masks of a part differ in shape, or its positions do not match its slices.
    """
    pairs = [_as_bool(a, b) for a, b, _, _ in volumes]
    a_sum = sum(int(a.sum()) for a, _ in pairs)
    b_sum = sum(int(b.sum()) for _, b in pairs)
    if a_sum + b_sum == 0:
        return {"dice": None, "iou": None, "hd95_mm": None}
    both = sum(int(np.logical_and(a, b).sum()) for a, b in pairs)
    distances = [
        hd95(a, b, spacing, positions)
        for (a, b), (_, _, spacing, positions) in zip(pairs, volumes, strict=True)
        if a.any() or b.any()
    ]
    defined = [d for d in distances if math.isfinite(d)]
    return {
        "dice": 2.0 * both / (a_sum + b_sum),
        "iou": both / (a_sum + b_sum - both),
        "hd95_mm": max(defined) if defined and len(defined) == len(distances) else None,
    }
