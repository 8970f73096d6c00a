"""Report figures (matplotlib, Agg backend): overlays of chosen cases and learning curves."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dicom_node.modelstore.manifest import Manifest  # noqa: E402

LOGGER = logging.getLogger(__name__)


def _score(record: dict[str, Any], keys: list[str]) -> float:
    """Mean Dice over the segments present in truth or prediction (case ranking)."""
    values = [
        record[k]["dice"] for k in keys if record[k]["truth_pixels"] or record[k]["pred_pixels"]
    ]
    return float(np.mean(values)) if values else 1.0


def overlays(
    kept: list[tuple[Any, int, dict[str, np.ndarray]]],
    records: list[dict[str, Any]],
    manifest: Manifest,
    keys: list[str],
    out: Path,
) -> dict[str, str]:
    """Write best/median/worst overlays; returns ``{title: relative png path}``."""
    if not records:
        return {}
    order = np.argsort([_score(r, keys) for r in records], kind="stable")
    picks = {"worst": order[0], "median": order[len(order) // 2], "best": order[-1]}
    colours = {s.key: np.array(s.color) / 255.0 for s in manifest.segments}
    result: dict[str, str] = {}
    for title, idx in picks.items():
        case, frame, masks = kept[int(idx)]
        record = records[int(idx)]
        fig, axes = plt.subplots(1, 2, figsize=(8, 4.2))
        image = case.frames[frame]
        for ax in axes:
            ax.imshow(image, cmap="gray_r", interpolation="nearest")
            ax.axis("off")
        for k, key in enumerate(keys):
            truth = case.masks[k, frame]
            if truth.any():
                axes[1].contour(truth, [0.5], colors=[colours[key]], linewidths=1.2)
            if masks[key].any():
                axes[1].contour(
                    masks[key], [0.5], colors=[colours[key]], linewidths=1.2, linestyles="dashed"
                )
        dices = ", ".join(f"{k} {record[k]['dice']:.3f}" for k in keys)
        axes[0].set_title(f"{case.name} ({image.shape[0]}x{image.shape[1]})", fontsize=9)
        axes[1].set_title(f"truth solid, model dashed: {dices}", fontsize=9)
        fig.tight_layout()
        name = f"{title}.png"
        fig.savefig(out / name, dpi=90)
        plt.close(fig)
        result[f"{title} case ({record['case']})"] = name
    return result


def learning_curves(history: list[dict[str, Any]], out: Path) -> str:
    """Loss and validation Dice per epoch; returns the PNG's file name."""
    epochs = [row["epoch"] for row in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    ax1.plot(epochs, [r["train_loss"] for r in history], label="train loss")
    ax1.plot(epochs, [r["val_loss"] for r in history], label="validation loss")
    ax1.set_xlabel("epoch")
    ax1.legend()
    for key in [k for k in history[0] if k.startswith("val_dice_")]:
        ax2.plot(epochs, [r[key] for r in history], label=key.removeprefix("val_dice_"))
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation Dice")
    ax2.set_ylim(0, 1)
    ax2.legend()
    fig.tight_layout()
    fig.savefig(out / "learning_curves.png", dpi=90)
    plt.close(fig)
    return "learning_curves.png"
