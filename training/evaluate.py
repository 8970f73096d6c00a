"""Evaluate an exported model version on case folders, exactly as the node would run it.

Images are read by the node's frame reader (:mod:`dicom_node.modelstore.frames`, through
:mod:`training.data`: frame order, Modality LUT, float32) and the version runs in the node's own
:class:`~dicom_node.modelstore.runner.ModelRunner` (ONNX Runtime, CUDA when present, else CPU,
with the manifest's pre- and post-processing), and Dice/IoU are
:mod:`dicom_node.modelstore.scoring`, so the figures describe what the node serves, not a training-
time approximation.

``report.json``::

    {"model": {...}, "data": "...", "n_images": 200,
     "mean": {"thyroid": {"dice", "iou", "hd95_mm", "n"}, "nodule": {...}},
     "detection": {"nodule": {"truth_lesions", "detected", "sensitivity", "false_positives",
                              "fp_per_image", "images_without_lesion_with_fp"}},
     "by_size": {"256": {same keys}, "128": {...}},
     "mean_3d": {"thyroid": {"dice", "iou", "hd95_mm", "n"}, ...},   # per series, 3-D
     "volumes": [{"case", "frames", "thyroid": {...}, ...}, ...],      # training/volumes.py
     "cases": [{"case", "frame", "size", "spacing_mm", "thyroid": {...}, "nodule": {...,
                "truth", "detected", "false_positives"}, "confidence": {...}}, ...],
     "confidence": {"worst": {"n", "flagged", "recall"}, "good": {"n", "flagged", ...},
                    "precision", ...},          # with a manifest confidence: block
     "skipped": [...], "conventions": "..."}

Averages: Dice and IoU over the images whose truth holds the segment (images without a lesion
are judged by false positives instead); HD95 over the images where it is defined (both masks
non-empty). ``detection`` has an entry for every segment the training config declares
lesion-like (``train.segments.KEY.lesion: true``; read from the manifest's provenance, or the
``config`` argument). ``report.md`` shows the figures, overlays of the best, median and worst
images (by mean Dice over segments; truth solid, prediction dashed), windowed per modality
(:data:`DEFAULT_DISPLAY`, overridden by the config's ``display``), and the learning curves.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dicom_node.modelstore import (
    Confidence,
    ConfidentRun,
    Manifest,
    ModelRunner,
    Prediction,
    ResolvedVersion,
    load_manifest,
    sha256_file,
)
from dicom_node.modelstore.processing import slice_spacing
from training import confidence_eval, schema, strata, volumes
from training.data import Case, SegmentRef, load_dataset
from training.export import HISTORY_FILE
from training.metrics import case_metrics, detection

LOGGER = logging.getLogger(__name__)

CONVENTIONS = (
    "Dice/IoU averaged over images whose truth contains the segment; HD95 (mm) over images where "
    "both masks are non-empty; lesion detection (segments declared lesion: true): a truth lesion "
    "(8-connected component) is found when the prediction covers at least 50% of its pixels, a "
    "predicted component overlapping no truth lesion is a false positive; strata: location by the "
    "share of the lesion's outline on the organ's edge (inside 0, touching < 1/3, edge >= 1/3), "
    "size and counts by terciles of this data set. Per series (3-D): Dice/IoU over the voxels of "
    "the whole series, HD95 (mm) between 6-connected surfaces using pixel spacing and slice "
    "positions, averaged over the series whose truth holds the segment."
)

DEFAULT_DISPLAY: dict[str, dict[str, Any]] = {
    "NM": {"window": None, "invert": True},
    "CT": {"window": (40.0, 400.0), "invert": False},
}
"""Overlay display per modality unless the config's ``display`` says otherwise: NM dark on white
over the image's own range (as scintigrams are read), CT a soft-tissue window (centre 40 HU, width
400). Any other modality: its 0.5-99.5 percentile range, not inverted."""

LEGACY_LESIONS = ("nodule",)
"""Segments treated as lesion-like when the recorded config predates ``train.segments`` (models
exported before per-segment settings, such as the shipped thyroid-seg:1)."""


def evaluation_settings(
    manifest: Manifest, config: dict[str, Any] | None = None
) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Lesion-like segment keys and display settings per modality for ``manifest``.

    ``config`` (a training config) wins; else the config recorded in the manifest's provenance.

    Raises
    ------
    ValueError
        ``config`` has an unknown key or a bad ``train.segments``/``display`` value.
    """
    keys = [s.key for s in manifest.segments]
    recorded = manifest.provenance.get("config")
    cfg = config if config is not None else recorded if isinstance(recorded, dict) else {}
    if config is not None:
        schema.check_config(config)
    if (cfg.get("train") or {}).get("segments") is None and config is None:
        lesions = [k for k in keys if k in LEGACY_LESIONS]
    else:
        per_segment = schema.train_segments(cfg, keys)
        lesions = [k for k in keys if per_segment[k]["lesion"]]
    display = {m: dict(v) for m, v in DEFAULT_DISPLAY.items()}
    for modality, value in schema.display_settings(cfg).items():
        display.setdefault(modality, {}).update(value)
    return lesions, display


def display_image(
    image: np.ndarray, modality: str, display: dict[str, dict[str, Any]]
) -> np.ndarray:
    """``image`` scaled to [0, 1] for display: the modality's window, inverted if asked."""
    setting = display.get(modality.upper()) or {"window": None, "invert": False}
    img = np.asarray(image, dtype=np.float64)
    if setting.get("window"):
        centre, width = setting["window"]
        low, high = centre - width / 2.0, centre + width / 2.0
    elif modality.upper() == "NM":
        low, high = float(img.min()), float(img.max())
    else:
        low, high = (float(v) for v in np.percentile(img, [0.5, 99.5]))
    scaled = np.clip((img - low) / max(high - low, 1e-9), 0.0, 1.0)
    return 1.0 - scaled if setting.get("invert") else scaled


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def summarise(
    records: list[dict[str, Any]], keys: list[str], lesions: list[str] | None = None
) -> dict[str, Any]:
    """Means per segment and lesion-level detection (for ``lesions``) over per-image records."""
    mean: dict[str, dict[str, float]] = {}
    for key in keys:
        present = [r[key] for r in records if r[key]["truth_pixels"] > 0]
        mean[key] = {
            "dice": _mean([r["dice"] for r in present]),
            "iou": _mean([r["iou"] for r in present]),
            "hd95_mm": _mean([r["hd95_mm"] for r in present]),
            "n": len(present),
        }
    out: dict[str, Any] = {"n_images": len(records), "mean": mean}
    detections: dict[str, Any] = {}
    for key in lesions or []:
        truth = sum(r[key]["truth"] for r in records)
        found = sum(r[key]["detected"] for r in records)
        fps = sum(r[key]["false_positives"] for r in records)
        detections[key] = {
            "truth_lesions": truth,
            "detected": found,
            "sensitivity": found / truth if truth else float("nan"),
            "false_positives": fps,
            "fp_per_image": fps / len(records) if records else float("nan"),
            "images_without_lesion_with_fp": sum(
                1 for r in records if r[key]["truth"] == 0 and r[key]["false_positives"]
            ),
        }
    if detections:
        out["detection"] = detections
    return out


def version_of(model_dir: Path | str) -> ResolvedVersion:
    """The version folder ``model_dir`` (in a store or not) as the runner takes it.

    Raises
    ------
    dicom_node.modelstore.ManifestError
        The manifest is missing or invalid.
    """
    folder = Path(model_dir)
    manifest = load_manifest(folder / "manifest.yaml")
    return ResolvedVersion(
        name=manifest.name,
        version=manifest.version,
        alias=None,
        path=folder,
        manifest=manifest,
        sha256=manifest.sha256,
    )


def case_geometry(case: Any) -> dict[str, Any]:
    """The geometry the runner's ``postprocess:`` steps get for ``case``, as the worker passes
    it for a series: the frame reader's pixel spacing, the slice spacing from the frames'
    positions, and the case as one volume."""
    positions = getattr(case, "positions", None) or None
    return {"spacing": tuple(case.spacing), "slice_spacing": slice_spacing(positions)}


def predict_case(
    runner: ModelRunner, resolved: ResolvedVersion, case: Case
) -> list[dict[str, np.ndarray]]:
    """Masks per frame of ``case``, by the node's runner: what the worker would return
    (the manifest's ``tta:`` and ``postprocess:`` included)."""
    return runner.run(resolved, list(case.frames), **case_geometry(case))


def predict_case_confident(
    runner: ModelRunner, resolved: ResolvedVersion, case: Case
) -> ConfidentRun:
    """:func:`predict_case` and the manifest's confidence verdict on the case, judged by the
    runner exactly as the worker judges a series (:func:`training.confidence_eval.case_summary`
    is the worker's input summary)."""
    summary = confidence_eval.case_summary(case)
    return runner.run_confident(resolved, list(case.frames), summary, **case_geometry(case))


def predict_case_details(runner: ModelRunner, resolved: ResolvedVersion, case: Case) -> Prediction:
    """:func:`predict_case` with the probabilities and the masks before ``postprocess:``
    (:class:`~dicom_node.modelstore.Prediction`): for choosing thresholds and post-processing
    on validation data without running the model once per setting."""
    return runner.predict(resolved, list(case.frames), **case_geometry(case))


def evaluate(
    model_dir: Path | str,
    data_dir: Path | str,
    out_dir: Path | str,
    *,
    history: Path | str | None = None,
    skip_bad: bool = False,
    nifti_labels: dict[str, list[int]] | None = None,
    figures: bool = True,
    progress: Callable[..., None] | None = None,
    config: dict[str, Any] | None = None,
    folders: list[Path] | None = None,
) -> dict[str, Any]:
    """Run the version in ``model_dir`` on every case of ``data_dir``; write the report.

    Parameters
    ----------
    model_dir : path
        Version folder (``manifest.yaml`` + model file); the sha256 is verified first.
    data_dir : path
        Case folders with masks (see :mod:`training.data`).
    out_dir : path
        Where ``report.json``, ``report.md`` and the PNGs go.
    history : path, optional
        Training ``history.json``; default ``model_dir/training_history.json`` when present.
    skip_bad : bool
        Skip and list bad cases instead of stopping.
    nifti_labels : dict, optional
        Label-map decoding for NIfTI masks; default the config's ``data.nifti_labels``.
    figures : bool
        Write overlay and learning-curve PNGs.
    progress : callable, optional
        ``progress(stage, done, total)``.
    config : dict, optional
        Training config whose ``train.segments`` (lesion flags) and ``display`` apply; default
        the one recorded in the manifest's provenance (:func:`evaluation_settings`).
    folders : list of path, optional
        Only these case folders of ``data_dir`` (a split's: ``evaluate --split``); no other
        folder is opened.

    Returns
    -------
    dict
        The report (also written as ``report.json``).

    Raises
    ------
    ValueError
        The model file's sha256 differs from the manifest's, or no usable case.
    """
    model_dir, out = Path(model_dir), Path(out_dir)
    resolved = version_of(model_dir)
    manifest = resolved.manifest
    model_path = resolved.model_file
    actual = sha256_file(model_path)
    if actual != manifest.sha256:
        raise ValueError(f"sha256 of {model_path} is {actual}, manifest says {manifest.sha256}")
    segments = sorted(manifest.segments, key=lambda s: s.channel)
    refs = [SegmentRef(s.key, s.label, s.type.value) for s in segments]
    keys = [s.key for s in segments]
    lesions, display = evaluation_settings(manifest, config)
    if nifti_labels is None:  # label maps decode as in training: the config's nifti_labels
        recorded = config if config is not None else manifest.provenance.get("config")
        nifti_labels = ((recorded or {}).get("data") or {}).get("nifti_labels")
    cases, skipped = load_dataset(
        data_dir, refs, skip_bad=skip_bad, nifti_labels=nifti_labels, folders=folders
    )
    runner = ModelRunner()
    records: list[dict[str, Any]] = []
    kept: list[tuple[Case, int, dict[str, np.ndarray]]] = []
    verdicts: list[Confidence | None] = []
    series_records: list[dict[str, Any]] = []
    for i, case in enumerate(cases):
        made = predict_case_confident(runner, resolved, case)
        series_records.append(volumes.volume_record(case, made.masks, keys))
        for f, masks in enumerate(made.masks):
            record: dict[str, Any] = {
                "case": case.name,
                "frame": f,
                "size": int(case.frames.shape[1]),
                "spacing_mm": [round(v, 5) for v in case.spacing],
            }
            for k, key in enumerate(keys):
                truth = case.masks[k, f]
                stats = case_metrics(masks[key], truth, case.spacing)
                stats["truth_pixels"] = int(truth.sum())
                stats["pred_pixels"] = int(masks[key].sum())
                if key in lesions:
                    stats.update(detection(masks[key], truth))
                record[key] = stats
            truths = {key: case.masks[k, f] for k, key in enumerate(keys)}
            strata.annotate(record, case.frames[f], truths, masks, lesions, case.spacing)
            if made.confidence is not None:  # one verdict per case, as per series in the node
                record["confidence"] = made.confidence.to_dict()
            verdicts.append(made.confidence)
            records.append(record)
            kept.append((case, f, masks))
        if progress:
            progress("evaluate", i + 1, len(cases))
    report: dict[str, Any] = {
        "model": {"name": manifest.name, "version": manifest.version, "sha256": manifest.sha256},
        "data": str(data_dir),
        **summarise(records, keys, lesions),
    }
    sizes = sorted({r["size"] for r in records}, reverse=True)
    if len(sizes) > 1:
        report["by_size"] = {
            str(size): summarise([r for r in records if r["size"] == size], keys, lesions)
            for size in sizes
        }
    report["mean_3d"] = volumes.summarise_volumes(series_records, keys)
    report["volumes"] = series_records
    report["cases"] = records
    report["skipped"] = [str(e) for e in skipped]
    report["conventions"] = CONVENTIONS
    report["strata"] = strata.summarise(records, keys, lesions)
    report["highlights"] = strata.highlights(records, keys, lesions)
    flags = confidence_eval.flag_evaluation(
        [f"{r['case']}/{r['frame']}" if r["frame"] else r["case"] for r in records],
        [_score(r, keys) for r in records],
        verdicts,
    )
    if flags is not None and manifest.confidence is not None:
        spec = manifest.confidence.model_dump(mode="json", exclude={"ood"})
        ood = manifest.confidence.ood is not None
        report["confidence"] = {**flags, "spec": {**spec, "ood": ood}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(_jsonable(report), indent=1))
    history_path = Path(history) if history else model_dir / HISTORY_FILE
    curves = json.loads(history_path.read_text()) if history_path.is_file() else None
    pictures: dict[str, str] = {}
    if figures:
        pictures = overlays(kept, records, manifest, keys, out, display)
        pictures.update(
            strata.draw(
                kept,
                report,
                {s.key: np.array(s.color) / 255.0 for s in manifest.segments},
                keys,
                out,
                lambda c, fr: display_image(c.frames[fr], getattr(c, "modality", ""), display),
                _pyplot,
            )
        )
        if curves:
            pictures["learning curves"] = learning_curves(curves, out)
    (out / "report.md").write_text(render_markdown(report, pictures, curves))
    LOGGER.info("evaluated %d images of %d cases", len(records), len(cases))
    return report


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    return value


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def render_markdown(
    report: dict[str, Any], pictures: dict[str, str], curves: list[dict[str, Any]] | None
) -> str:
    """The human-readable report."""
    model = report["model"]
    lines = [
        f"# Evaluation of {model['name']}:{model['version']}",
        "",
        f"Data: `{report['data']}`, {report['n_images']} images. "
        f"sha256 `{model['sha256'][:16]}...`",
        "",
        "| segment | images | Dice | IoU | HD95 (mm) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    parts = [("all", report)] + list((report.get("by_size") or {}).items())
    for label, part in parts:
        for key, m in part["mean"].items():
            name = key if label == "all" else f"{key} ({label}x{label})"
            lines.append(
                f"| {name} | {m['n']} | {_fmt(m['dice'])} | {_fmt(m['iou'])} "
                f"| {_fmt(m['hd95_mm'], 2)} |"
            )
    for key, det in (report.get("detection") or {}).items():
        lines += [
            "",
            f"Lesion detection, {key}: "
            f"{det['detected']}/{det['truth_lesions']} found "
            f"(sensitivity {_fmt(det['sensitivity'])}), "
            f"{det['false_positives']} false positives = {_fmt(det['fp_per_image'])} per image.",
        ]
    lines += volumes.markdown(report)
    lines += strata.markdown(report)
    lines += ["", f"Conventions: {report['conventions']}", ""]
    block = report.get("confidence")
    lines += confidence_eval.markdown(block, block.get("spec") if block else None)
    if report.get("skipped"):
        lines += ["Skipped cases:", *[f"- {s}" for s in report["skipped"]], ""]
    for title, path in pictures.items():
        lines += [f"## {title}", "", f"![{title}]({path})", ""]
    if curves:
        best = max(curves, key=lambda r: r.get("val_score", -1))
        lines += [
            f"Training: {len(curves)} epochs, best epoch {best['epoch']} "
            f"(validation score {_fmt(best.get('val_score'))}).",
            "",
        ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- figures
def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
    display: dict[str, dict[str, Any]] | None = None,
) -> dict[str, str]:
    """Write best/median/worst overlays; returns ``{title: relative png path}``.

    Each image is shown through :func:`display_image` with its case's modality (``display``:
    settings per modality, default :data:`DEFAULT_DISPLAY`).
    """
    display = display if display is not None else DEFAULT_DISPLAY
    if not records:
        return {}
    plt = _pyplot()
    order = np.argsort([_score(r, keys) for r in records], kind="stable")
    picks = {"worst": order[0], "median": order[len(order) // 2], "best": order[-1]}
    colours = {s.key: np.array(s.color) / 255.0 for s in manifest.segments}
    result: dict[str, str] = {}
    for title, idx in picks.items():
        case, frame, masks = kept[int(idx)]
        record = records[int(idx)]
        fig, axes = plt.subplots(1, 2, figsize=(8, 4.2))
        image = case.frames[frame]
        shown = display_image(image, getattr(case, "modality", ""), display)
        for ax in axes:
            ax.imshow(shown, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
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
    plt = _pyplot()
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
