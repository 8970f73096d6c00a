"""Split one series into groups that one SEG each can describe.

A SEG has one Rows x Columns, and its frames share one Frame of Reference; highdicom also wants
one image orientation for a spatial SEG. Real series break that: a localizer series with three
orientations, a series whose last instance was reconstructed at another matrix size, a series
re-acquired after the patient moved. :func:`group_sources` partitions the sources into groups
that are each consistent; the worker builds one SEG per group.

Identity of a group's SEG: group 0 (the largest group) keeps the UIDs the series would have had
with one group (:func:`dicom_node.seg.uids.seg_uids` without ``group``), so a series that always
was one group keeps its UIDs and a PACS replaces its copy. Every other group mixes its
:attr:`SourceGroup.key` into the UIDs, so its SEG differs from group 0's and is the same again on
a re-run over the same instances.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom import Dataset

from dicom_node.seg.sources import frame_count

LOGGER = logging.getLogger(__name__)

ORIENTATION_TOLERANCE = 1e-3
"""Largest difference of any direction cosine for two instances to count as one orientation."""


@dataclass(frozen=True)
class SourceGroup:
    """Sources of one series that one SEG can describe.

    Attributes
    ----------
    index
        0 for the largest group (most frames; ties: the group seen first), then 1, 2, ...
    key
        Stable description of what the group shares, with no patient data and no UID:
        ``"512x512 ori=1,0,0,0,1,0 for=3f2a9c1e"`` (``ori=none`` / ``for=none`` when absent).
    sources
        The group's instances, in the order they were given.
    frame_indices
        For each frame of ``sources`` in order, its index in the frames of all the sources given
        to :func:`group_sources` (what the worker uses to cut the group's masks out).
    """

    index: int
    key: str
    sources: tuple[Dataset, ...]
    frame_indices: tuple[int, ...]

    @property
    def uid_group(self) -> str | None:
        """What to pass as ``group`` to :func:`seg_uids` / :func:`build_seg`: None for group 0."""
        return None if self.index == 0 else self.key


def _orientation(ds: Dataset) -> tuple[float, ...] | None:
    """ImageOrientationPatient of the instance (root, or the functional groups' first item)."""
    value = ds.get("ImageOrientationPatient")
    if value is None:
        for keyword in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
            groups = ds.get(keyword)
            if groups:
                item = groups[0].get("PlaneOrientationSequence")
                if item:
                    value = item[0].get("ImageOrientationPatient")
                    if value is not None:
                        break
    try:
        cosines = tuple(float(v) for v in value) if value is not None else ()
    except (TypeError, ValueError):
        return None
    return cosines if len(cosines) == 6 else None


def _key(rows: int, cols: int, orientation: tuple[float, ...] | None, frame_of_ref: str) -> str:
    # + 0.0 turns -0.0 into 0.0, so that both spell "0"
    ori = (
        "none"
        if orientation is None
        else ",".join(f"{v + 0.0:.4g}" for v in np.round(orientation, 3))
    )
    ref = hashlib.sha256(frame_of_ref.encode()).hexdigest()[:8] if frame_of_ref else "none"
    return f"{rows}x{cols} ori={ori} for={ref}"


def group_sources(
    sources: Sequence[Dataset], *, tolerance: float = ORIENTATION_TOLERANCE
) -> list[SourceGroup]:
    """Partition a series into groups of equal size, orientation and Frame of Reference.

    Parameters
    ----------
    sources
        The series' instances in the order their frames are stacked (the worker's order).
    tolerance
        Two orientations are one if no direction cosine differs by more than this.

    Returns
    -------
    list of SourceGroup
        Largest group first (``index`` 0); a consistent series gives one group holding every
        source. Deterministic: the same sources in the same order give the same groups and keys.

    Raises
    ------
    TypeError
        If ``sources`` is not a sequence of Datasets.
    ValueError
        If it is empty, or an instance lacks Rows/Columns or has a bad NumberOfFrames.
    """
    if isinstance(sources, Dataset) or not isinstance(sources, Sequence):
        raise TypeError("sources must be a sequence of pydicom Datasets")
    if not sources:
        raise ValueError("sources must not be empty")

    # (rows, cols, frame of reference, reference orientation) -> [(position, source), ...]
    found: list[tuple[tuple[int, int, str, tuple[float, ...] | None], list[int]]] = []
    offsets: list[range] = []
    start = 0
    for position, ds in enumerate(sources):
        if not isinstance(ds, Dataset):
            raise TypeError(f"sources must contain pydicom Datasets, got {type(ds).__name__}")
        if "Rows" not in ds or "Columns" not in ds:
            raise ValueError(f"source {position + 1} of {len(sources)} lacks Rows or Columns")
        count = frame_count(ds)
        offsets.append(range(start, start + count))
        start += count
        rows, cols = int(ds.Rows), int(ds.Columns)
        frame_of_ref = str(ds.get("FrameOfReferenceUID", "") or "")
        orientation = _orientation(ds)
        for (g_rows, g_cols, g_ref, g_ori), members in found:
            if (g_rows, g_cols, g_ref) != (rows, cols, frame_of_ref):
                continue
            if g_ori is None and orientation is None:
                members.append(position)
                break
            if (
                g_ori is not None
                and orientation is not None
                and max(abs(a - b) for a, b in zip(g_ori, orientation, strict=True)) <= tolerance
            ):
                members.append(position)
                break
        else:
            found.append(((rows, cols, frame_of_ref, orientation), [position]))

    def size(entry: tuple[object, list[int]]) -> int:
        return sum(len(offsets[p]) for p in entry[1])

    ranked = sorted(enumerate(found), key=lambda pair: (-size(pair[1]), pair[0]))
    groups = []
    for index, (_, ((rows, cols, frame_of_ref, orientation), members)) in enumerate(ranked):
        groups.append(
            SourceGroup(
                index=index,
                key=_key(rows, cols, orientation, frame_of_ref),
                sources=tuple(sources[p] for p in members),
                frame_indices=tuple(i for p in members for i in offsets[p]),
            )
        )
    keys = [g.key for g in groups]
    if len(set(keys)) != len(keys):  # orientations within tolerance of rounding, kept apart
        groups = [
            SourceGroup(g.index, f"{g.key} #{g.index}", g.sources, g.frame_indices)
            if keys.count(g.key) > 1
            else g
            for g in groups
        ]
    if len(groups) > 1:
        LOGGER.info(
            "series splits into %d groups: %s",
            len(groups),
            "; ".join(f"{g.key} ({len(g.sources)} instances)" for g in groups),
        )
    return groups
