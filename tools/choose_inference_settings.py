"""Choose a segmentation model's thresholds and post-processing on validation data only.

Runs the exported model once per validation image (probabilities, the node's own runner), then
scores every combination of per-segment thresholds and post-processing chains given below with
the figures ``evaluate`` reports: mean Dice per segment, lesion sensitivity at >= 50 % coverage
and false lesions per image. The objective is the mean over the data sets given (one per phantom
family) of ``Dice(organ) + Dice(lesion) + sensitivity - false lesions per image``. Prints one row
per combination, best first, and the manifest lines of the best.

Used for issue 13's thyroid model (``training/README.md``):

    .venv/bin/python tools/choose_inference_settings.py --model DIR \\
        --data var/training/v3/valA --data var/training/v3/valB

Never point it at a test set: what it chooses is then no longer tested on unseen data.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path
from typing import Any

import numpy as np

from dicom_node.modelstore.processing import apply_steps
from dicom_node.modelstore.runner import ModelRunner
from training import metrics
from training.data import SegmentRef, load_dataset
from training.evaluate import case_geometry, predict_case_details, version_of

ORGAN, LESION = "thyroid", "nodule"

CHAINS: dict[str, list[dict[str, Any]]] = {
    "none": [],
    "clean": [
        {"op": "min_size", "segment": LESION, "mm2": 12},
        {"op": "within", "segment": LESION, "of": ORGAN},
    ],
    "clean+fill": [
        {"op": "min_size", "segment": LESION, "mm2": 12},
        {"op": "within", "segment": LESION, "of": ORGAN},
        {"op": "fill_holes", "segment": ORGAN, "where": LESION},
    ],
    "keep2+clean+fill": [
        {"op": "largest_component", "segment": ORGAN, "keep": 2},
        {"op": "min_size", "segment": LESION, "mm2": 12},
        {"op": "within", "segment": LESION, "of": ORGAN},
        {"op": "fill_holes", "segment": ORGAN, "where": LESION},
    ],
    # a wide field's body outline or shoulders taken for the gland touch the frame's edge
    "no-border+keep2+clean+fill": [
        {"op": "keep_in_region", "segment": ORGAN, "border": False},
        {"op": "largest_component", "segment": ORGAN, "keep": 2},
        {"op": "min_size", "segment": LESION, "mm2": 12},
        {"op": "within", "segment": LESION, "of": ORGAN},
        {"op": "fill_holes", "segment": ORGAN, "where": LESION},
    ],
    "no-border+clean+fill": [
        {"op": "keep_in_region", "segment": ORGAN, "border": False},
        {"op": "min_size", "segment": LESION, "mm2": 12},
        {"op": "within", "segment": LESION, "of": ORGAN},
        {"op": "fill_holes", "segment": ORGAN, "where": LESION},
    ],
    "organ-specks+clean+fill": [
        {"op": "min_size", "segment": ORGAN, "mm2": 20},
        {"op": "min_size", "segment": LESION, "mm2": 12},
        {"op": "within", "segment": LESION, "of": ORGAN},
        {"op": "fill_holes", "segment": ORGAN, "where": LESION},
    ],
}
ORGAN_THRESHOLDS = (0.4, 0.5)
LESION_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)


def predictions(
    model: Path, data: Path
) -> list[tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]]:
    """Per frame: probabilities, truth masks and the case's geometry."""
    resolved = version_of(model)
    segments = sorted(resolved.manifest.segments, key=lambda s: s.channel)
    refs = [SegmentRef(s.key, s.label, s.type.value) for s in segments]
    keys = [s.key for s in segments]
    cases, _ = load_dataset(data, refs)
    runner = ModelRunner()
    out = []
    for case in cases:
        made = predict_case_details(runner, resolved, case)
        assert made.probabilities is not None
        geometry = case_geometry(case)
        for f, probs in enumerate(made.probabilities):
            truth = {
                k: np.asarray(case.masks[keys.index(k)][f], dtype=bool) for k in (ORGAN, LESION)
            }
            out.append((probs, truth, geometry))
    return out


def score(
    frames: list[Any], t_organ: float, t_lesion: float, chain: list[dict[str, Any]]
) -> dict[str, float]:
    from pydantic import TypeAdapter

    from dicom_node.modelstore.manifest import PostprocessStep

    steps = [TypeAdapter(PostprocessStep).validate_python(s) for s in chain]
    organ, lesion, found, truths, false_pos = [], [], 0, 0, 0
    for probs, truth, geometry in frames:
        masks = [{ORGAN: probs[ORGAN] >= t_organ, LESION: probs[LESION] >= t_lesion}]
        (done,) = apply_steps(masks, steps, spacing=geometry.get("spacing"))
        organ.append(metrics.dice(done[ORGAN], truth[ORGAN]))
        if truth[LESION].any():
            lesion.append(metrics.dice(done[LESION], truth[LESION]))
        det = metrics.detection(done[LESION], truth[LESION])
        found += det["detected"]
        truths += det["truth"]
        false_pos += det["false_positives"]
    return {
        "organ": float(np.mean(organ)),
        "lesion": float(np.mean(lesion)) if lesion else float("nan"),
        "sensitivity": found / truths if truths else float("nan"),
        "fp": false_pos / len(frames),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, action="append", required=True)
    args = parser.parse_args()
    sets = {d.name: predictions(args.model, d) for d in args.data}
    rows = []
    for (name, chain), t_o, t_l in itertools.product(
        CHAINS.items(), ORGAN_THRESHOLDS, LESION_THRESHOLDS
    ):
        per = {k: score(frames, t_o, t_l, chain) for k, frames in sets.items()}
        objective = float(
            np.mean([s["organ"] + s["lesion"] + s["sensitivity"] - s["fp"] for s in per.values()])
        )
        rows.append((objective, name, t_o, t_l, per))
    rows.sort(key=lambda r: -r[0])
    for objective, name, t_o, t_l, per in rows:
        figures = "  ".join(
            f"{k}: {s['organ']:.3f}/{s['lesion']:.3f} sens {s['sensitivity']:.2f} fp {s['fp']:.2f}"
            for k, s in per.items()
        )
        print(f"{objective:.3f}  {name:24s} t={t_o}/{t_l}  {figures}")
    best = rows[0]
    print("\nbest:", best[1], "thresholds", best[2], best[3])
    print("postprocess:", CHAINS[best[1]])


if __name__ == "__main__":
    main()
