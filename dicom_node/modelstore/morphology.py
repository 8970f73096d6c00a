"""Connected components and hole filling on boolean masks, in numpy (the node has no scipy).

Used by the post-processing steps a manifest declares (:mod:`dicom_node.modelstore.processing`).
Works on 2-D masks (one frame) and 3-D masks (a volume: frames, rows, cols) alike.

Connectivity
    Foreground components use *full* connectivity: 8 neighbours in 2-D, 26 in 3-D (pixels that
    touch by a corner belong together, as in training's lesion counting). The background, when
    holes are looked for, uses *face* connectivity (4 in 2-D, 6 in 3-D), the complement that
    makes "a hole" mean what it looks like: a gap closed by a diagonal chain of pixels is a hole.

Algorithm
    Runs of foreground along the last axis get one id each; runs that touch across rows (and
    slices) are joined by a vectorised union-find (hook the larger root onto the smaller, then
    pointer jumping until no edge joins two roots). Cost and memory grow with the number of
    foreground pixels: a 256 x 256 frame takes about a millisecond, a 512 x 512 x 100 CT mask
    with 16 % foreground (plus 1 % noise) about 1.5 s of CPU.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import numpy as np

DIRECT_LOOKUP_LIMIT = 1 << 26
"""Arrays up to this many pixels (a 256-slice 512 x 512 volume) get a run-id lookup table
(4 bytes per pixel, as much as the series' float32 frames); larger ones search the foreground."""


@functools.lru_cache(maxsize=8)
def _offsets(ndim: int, full: bool) -> tuple[tuple[int, ...], ...]:
    """Neighbour offsets in the forward half-space that leave the current row.

    Neighbours along the last axis are joined by the runs themselves, so only offsets with a
    non-zero step on a leading axis are needed; of each pair ``+d`` / ``-d`` only the one whose
    first non-zero step is positive.
    """
    steps = (-1, 0, 1)
    out = []
    for delta in itertools.product(steps, repeat=ndim):
        if not any(delta[:-1]):
            continue
        first = next(d for d in delta if d != 0)
        if first < 0:
            continue
        if not full and sum(abs(d) for d in delta) != 1:
            continue
        out.append(delta)
    return tuple(out)


def _shifted(labels: np.ndarray, delta: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Views ``(a, b)`` of ``labels``: ``b[i]`` is the neighbour at ``+delta`` of ``a[i]``."""
    a_index, b_index = [], []
    for d, n in zip(delta, labels.shape, strict=True):
        if d > 0:
            a_index.append(slice(0, n - d))
            b_index.append(slice(d, n))
        elif d < 0:
            a_index.append(slice(-d, n))
            b_index.append(slice(0, n + d))
        else:
            a_index.append(slice(0, n))
            b_index.append(slice(0, n))
    return labels[tuple(a_index)], labels[tuple(b_index)]


def label(mask: np.ndarray, full: bool = True) -> tuple[np.ndarray, int]:
    """Label the connected components of a 2-D or 3-D boolean mask.

    Parameters
    ----------
    mask:
        Boolean (or 0/1) array, 2-D (rows, cols) or 3-D (frames, rows, cols).
    full:
        Full connectivity (8 / 26 neighbours) when true, face connectivity (4 / 6) otherwise.

    Returns
    -------
    (numpy.ndarray, int)
        int32 labels of ``mask``'s shape (0 = background, components 1..n numbered in raster
        order of their first pixel) and n.

    Raises
    ------
    ValueError
        ``mask`` is not 2-D or 3-D.
    """
    m = np.asarray(mask, dtype=bool)
    if m.ndim not in (2, 3):
        raise ValueError(f"mask must be 2-D or 3-D, got shape {m.shape}")
    if not m.any():
        return np.zeros(m.shape, dtype=np.int32), 0
    # one pixel of background around the array: every neighbour of a foreground pixel exists
    padded = np.pad(m, 1)
    flat = padded.ravel()
    pixels = np.flatnonzero(flat)
    # a run starts at a foreground pixel whose left neighbour is background (the padding ends
    # every row with background, so runs never continue into the next row)
    run_of = np.cumsum(~flat[pixels - 1], dtype=np.int64)  # 1..n_runs per foreground pixel
    n_runs = int(run_of[-1])
    strides = np.array(padded.strides) // padded.itemsize
    # run id by pixel: a lookup table the size of the array is fastest; for large volumes the
    # neighbours are searched among the (sorted) foreground pixels, so memory follows the
    # foreground instead of the volume
    lookup = None
    if flat.size <= DIRECT_LOOKUP_LIMIT:
        lookup = np.zeros(flat.shape, dtype=np.int32)
        lookup[pixels] = run_of
    edges = []
    for delta in _offsets(m.ndim, full):
        target = pixels + int(np.dot(delta, strides))
        if lookup is not None:
            neighbour = lookup[target]
            hit = neighbour > 0
            neighbour = neighbour[hit]
        else:
            position = np.minimum(np.searchsorted(pixels, target), pixels.size - 1)
            hit = pixels[position] == target
            neighbour = run_of[position[hit]]
        pair = run_of[hit] * (n_runs + 1) + neighbour
        if pair.size:
            # pixels of one run meet the same neighbour run many times in a row: drop repeats
            keep = np.ones(pair.size, dtype=bool)
            keep[1:] = pair[1:] != pair[:-1]
            edges.append(pair[keep])
    parent = np.arange(n_runs + 1, dtype=np.int64)
    if edges:
        left, right = np.divmod(np.concatenate(edges), n_runs + 1)
        while True:
            ra, rb = parent[left], parent[right]
            differ = ra != rb
            if not differ.any():
                break
            lo = np.minimum(ra, rb)[differ]
            hi = np.maximum(ra, rb)[differ]
            np.minimum.at(parent, hi, lo)  # hook each root onto the smallest root it touches
            while True:  # pointer jumping: every entry points at its root again
                jumped = parent[parent]
                if np.array_equal(jumped, parent):
                    break
                parent = jumped
    # number components 1..n in the order of their smallest run (= raster order)
    unique_roots, compact = np.unique(parent[1:], return_inverse=True)
    table = np.concatenate([[0], compact + 1]).astype(np.int32)
    labels = np.zeros(padded.shape, dtype=np.int32)
    labels.ravel()[pixels] = table[run_of]
    inner = tuple(slice(1, -1) for _ in range(m.ndim))
    return np.ascontiguousarray(labels[inner]), int(unique_roots.size)


def sizes(labels: np.ndarray, count: int) -> np.ndarray:
    """Pixel count of each component 1..count (index 0 is the background)."""
    return np.bincount(labels.ravel(), minlength=count + 1)


def fill_holes(mask: np.ndarray, where: np.ndarray | None = None) -> np.ndarray:
    """Fill the holes of ``mask``: background regions that do not reach the array's border.

    Parameters
    ----------
    mask:
        Boolean mask, 2-D or 3-D (in 3-D, a hole must be closed in every direction, the first
        and last frame count as border).
    where:
        Fill only the holes that share at least one pixel with ``where`` (same shape).

    Returns
    -------
    numpy.ndarray
        A new boolean mask.
    """
    m = np.asarray(mask, dtype=bool)
    labels, count = label(~m, full=False)
    if count == 0:
        return m.copy()
    border = np.zeros(count + 1, dtype=bool)
    for axis in range(m.ndim):
        for end in (0, -1):
            border[np.take(labels, end, axis=axis)] = True
    hole = ~border
    hole[0] = False
    if where is not None:
        touched = np.zeros(count + 1, dtype=bool)
        touched[labels[np.asarray(where, dtype=bool)]] = True
        hole &= touched
    return m | hole[labels]


def dilate(mask: np.ndarray) -> np.ndarray:
    """``mask`` grown by one pixel in every direction (full connectivity: 8 / 26 neighbours)."""
    m = np.asarray(mask, dtype=bool)
    out = m.copy()
    for delta in itertools.product((-1, 0, 1), repeat=m.ndim):
        if not any(delta):
            continue
        target, _ = _shifted(out, delta)
        _, source = _shifted(m, delta)
        target |= source  # a pixel is set when its neighbour at +delta is
    return out
