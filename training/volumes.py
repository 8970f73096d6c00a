"""Per-series (3-D) figures of an evaluation: a multi-slice series is one case.

Each case's predicted frames are stacked into a volume and scored against its true volume with
the model contract's :func:`~dicom_node.modelstore.scoring.volume_scores`: Dice and IoU over the
voxels (pooled across slices), HD95 in mm from the series geometry (pixel spacing in-plane, the
slices' positions along the slice normal between slices). The promotion gate scores reference
cases the same way, so ``evaluate``'s per-series Dice and the gate's are one number.

In ``report.json``::

    "volumes": [{"case", "patient", "frames", "spacing_mm", "slice_positions_mm",
                 KEY: {"dice", "iou", "hd95_mm", "truth_voxels", "pred_voxels"}}, ...],
    "mean_3d": {KEY: {"dice", "iou", "hd95_mm", "n"}}

``mean_3d`` averages over the series whose truth holds the segment (HD95 over those where it is
defined); ``patient`` is a short hash of the PatientID (a report is shared; IDs stay out).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from dicom_node.modelstore.scoring import volume_scores


def volume_record(
    case: Any, masks: Sequence[dict[str, np.ndarray]], keys: Sequence[str]
) -> dict[str, Any]:
    """3-D scores of one case from its per-frame predicted masks (runner output order)."""
    positions = list(getattr(case, "positions", ()) or range(case.frames.shape[0]))
    record: dict[str, Any] = {
        "case": case.name,
        "patient": hashlib.sha256(str(case.patient_id).encode()).hexdigest()[:10],
        "frames": int(case.frames.shape[0]),
        "spacing_mm": [round(float(v), 5) for v in case.spacing],
        "slice_positions_mm": [round(float(p), 4) for p in positions],
    }
    for k, key in enumerate(keys):
        predicted = np.stack([m[key] for m in masks])
        truth = case.masks[k]
        # a one-frame series is scored on its outline (scoring.hd95)
        stats = volume_scores(predicted, truth, case.spacing, positions)
        stats["truth_voxels"] = int(truth.sum())
        stats["pred_voxels"] = int(predicted.sum())
        record[key] = stats
    return record


def summarise_volumes(volumes: list[dict[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
    """Mean 3-D Dice, IoU and HD95 per segment over the series whose truth holds it."""
    out: dict[str, Any] = {}
    for key in keys:
        present = [v[key] for v in volumes if v[key]["truth_voxels"] > 0]
        hd = [r["hd95_mm"] for r in present if not math.isnan(r["hd95_mm"])]
        out[key] = {
            "dice": float(np.mean([r["dice"] for r in present])) if present else float("nan"),
            "iou": float(np.mean([r["iou"] for r in present])) if present else float("nan"),
            "hd95_mm": float(np.mean(hd)) if hd else float("nan"),
            "n": len(present),
        }
    return out


def markdown(report: dict[str, Any]) -> list[str]:
    """The per-series table of ``report.md`` (empty when the report has no volumes)."""
    volumes = report.get("volumes") or []
    if not volumes or not report.get("mean_3d"):
        return []

    def fmt(value: Any, digits: int = 3) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "n/a"
        return f"{value:.{digits}f}"

    keys = list(report["mean_3d"])
    lines = [
        "",
        f"Per series (3-D, {len(volumes)} series; HD95 in mm from pixel spacing and slice "
        "positions):",
        "",
        "| segment | series | Dice | IoU | HD95 (mm) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for key, m in report["mean_3d"].items():
        lines.append(
            f"| {key} | {m['n']} | {fmt(m['dice'])} | {fmt(m['iou'])} | {fmt(m['hd95_mm'], 2)} |"
        )
    lines += [
        "",
        "| series | frames | " + " | ".join(f"{k} Dice | {k} HD95" for k in keys) + " |",
        "| --- | ---: | " + " | ".join("---: | ---:" for _ in keys) + " |",
    ]
    for v in sorted(volumes, key=lambda r: min(r[k]["dice"] for k in keys)):
        cells = " | ".join(f"{fmt(v[k]['dice'])} | {fmt(v[k]['hd95_mm'], 2)}" for k in keys)
        lines.append(f"| {v['case']} | {v['frames']} | {cells} |")
    return [*lines, ""]
