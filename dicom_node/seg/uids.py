"""Deterministic identifiers and labels of a SEG result.

One SEG exists per (source series, rule, resolved model version). Its Series and SOP Instance UIDs
are hashes of exactly that tuple, so re-exporting after a crash or a ``dicom-node retry`` sends the
same instance again and the PACS replaces it instead of storing a duplicate. A new model version or
another rule gives new UIDs: a different result is a different object.

A series that has to be split into several SEGs (:mod:`dicom_node.seg.grouping`) adds the group's
key to the tuple for every group but the first; the first group's SEG keeps the UIDs of the
unsplit series, so results built before splitting existed are replaced, not duplicated.
"""

from __future__ import annotations

import logging

from pydicom.uid import UID, generate_uid

LOGGER = logging.getLogger(__name__)

UID_NAMESPACE = "dicom-node/seg/v1"
"""Mixed into every hash; bump only if the meaning of the derived UIDs ever has to change."""

UID_PREFIX = "1.2.826.0.1.3680043.8.498."
"""pydicom's UID root, under which ``generate_uid`` derives UIDs from a SHA-512 of the inputs."""

SERIES_DESCRIPTION_MAX = 64
"""SeriesDescription is LO: at most 64 characters."""


def seg_uids(
    source_series_uid: str, rule: str, model: str, version: str, group: str | None = None
) -> tuple[UID, UID]:
    """Return ``(series_instance_uid, sop_instance_uid)`` of the SEG for one result.

    Parameters
    ----------
    source_series_uid
        SeriesInstanceUID of the segmented series.
    rule
        Name of the routing rule that asked for the segmentation.
    model, version
        Model name and *resolved* version (never an alias: an alias moves, a version does not).
    group
        ``None`` for an unsplit series or its first group (today's UIDs); else the group key
        (:attr:`dicom_node.seg.grouping.SourceGroup.uid_group`), which gives the group's own UIDs.

    Returns
    -------
    tuple of pydicom.uid.UID
        Two distinct valid UIDs; equal inputs always give equal outputs.

    Raises
    ------
    ValueError
        If an argument is empty (``group`` may be None, not "").
    """
    parts = {
        "source_series_uid": source_series_uid,
        "rule": rule,
        "model": model,
        "version": version,
    }
    for name, value in parts.items():
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    if group is not None and (not isinstance(group, str) or not group):
        raise ValueError(f"group must be None or a non-empty string, got {group!r}")
    sources = [UID_NAMESPACE, source_series_uid, rule, model, version]
    if group is not None:
        sources += ["group", group]
    series = generate_uid(prefix=UID_PREFIX, entropy_srcs=[*sources, "series"])
    instance = generate_uid(prefix=UID_PREFIX, entropy_srcs=[*sources, "instance"])
    return series, instance


def ai_series_description(model: str, version: str) -> str:
    """Return a SeriesDescription (at most 64 characters) that marks the series as AI-generated.

    ``"AI segmentation (thyroid-seg v1) - not for diagnosis alone"``; shorter forms are used when
    the model name is long, and the model name is cut last.
    """
    candidates = [
        f"AI segmentation ({model} v{version}) - not for diagnosis alone",
        f"AI segmentation ({model} v{version}) - not for diagnosis",
        f"AI segmentation ({model} v{version})",
        f"AI seg ({model} v{version})",
    ]
    for text in candidates:
        if len(text) <= SERIES_DESCRIPTION_MAX:
            return text
    return f"AI seg ({model} v{version})"[: SERIES_DESCRIPTION_MAX - 1] + ")"


OUTPUT_KINDS = ("overlay", "gsps", "report")
"""Results besides the SEG that :func:`output_uids` derives UIDs for (the rule's ``outputs``)."""


def output_uids(
    kind: str,
    source_series_uid: str,
    rule: str,
    model: str,
    version: str,
    group: str | None = None,
    index: int = 0,
) -> tuple[UID, UID]:
    """Return ``(series_instance_uid, sop_instance_uid)`` of a non-SEG result of one SEG.

    The same tuple as :func:`seg_uids` plus the output ``kind``, so each kind is its own series
    (same study) and a re-run replaces its objects exactly as it replaces the SEG. ``index``
    numbers the instances of one output series (an overlay has one per source frame); the
    series UID does not depend on it.

    Parameters
    ----------
    kind
        One of :data:`OUTPUT_KINDS`.
    source_series_uid, rule, model, version, group
        As for :func:`seg_uids`.
    index
        0-based instance within the output series.

    Returns
    -------
    tuple of pydicom.uid.UID
        Valid UIDs, distinct from the SEG's and from every other kind's; equal inputs always
        give equal outputs.

    Raises
    ------
    ValueError
        If ``kind`` is not an output kind, ``index`` is negative or an argument is empty.
    """
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"kind must be one of {OUTPUT_KINDS}, got {kind!r}")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"index must be a whole number >= 0, got {index!r}")
    seg_uids(source_series_uid, rule, model, version, group)  # the same argument checks
    sources = [UID_NAMESPACE, source_series_uid, rule, model, version, "kind", kind]
    if group is not None:
        sources += ["group", group]
    series = generate_uid(prefix=UID_PREFIX, entropy_srcs=[*sources, "series"])
    instance = generate_uid(prefix=UID_PREFIX, entropy_srcs=[*sources, "instance", str(index)])
    return series, instance
