"""The training config's keys, checked everywhere: an unknown key fails with "did you mean".

A misspelt key that is silently ignored trains a different model than the one the user asked for
(``patiance: 3`` trains with the default patience), so every section is checked against the keys
below, and the model sections against the manifest's own field list (what ``export`` will write).

:func:`check_config` is what :func:`training.train.load_config` runs; the helpers are used for
the parts other modules read (``train.segments``, ``display``).
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from dicom_node.modelstore.manifest import (
    POSTPROCESS_STEPS,
    TTA_OPS,
    InputSpec,
    OutputSpec,
    PostprocessStep,
    Segment,
    format_validation_error,
)
from dicom_node.modelstore.measureplan import SegmentMeasurements
from training.confidence_eval import CONFIG_KEYS as CONFIDENCE_KEYS

LOGGER = logging.getLogger(__name__)

TOP_KEYS = ("seed", "model", "network", "data", "augment", "train", "display")
"""Top-level sections (``model``, ``network``, ``data`` and ``train`` are required)."""

MODEL_KEYS = ("name", "description", "input", "output", "segments", "confidence") + (
    "postprocess",
    "tta",
    "probabilities",
    "measurements",
)
"""``model:`` keys: what export writes into the manifest."""

INFERENCE_KEYS = ("postprocess", "tta", "probabilities")
"""``model:`` keys export copies into the manifest as they are (how the node and ``evaluate``
run the model: :func:`inference_settings`)."""

SECTION_KEYS: dict[str, tuple[str, ...]] = {
    "network": ("depth", "base_channels"),
    "data": ("train", "val_fraction", "nifti_labels", "split"),
    "augment": ("counts", "blur", "flip_lr", "affine"),
    "train": (
        "epochs",
        "batch_size",
        "lr",
        "weight_decay",
        "warmup_epochs",
        "patience",
        "bce_weight",
        "dice_weight",
        "segments",
        "crop",
        "crop_foreground",
        "max_minutes",
        "num_workers",
        "threads",
        "init",
    ),
}
"""Keys of the plain sections."""

AUGMENT_KEYS: dict[str, tuple[str, ...]] = {
    "counts": ("prob", "low", "high"),
    "blur": ("prob", "sigma_px"),
    "affine": ("prob", "rotate_deg", "scale", "translate"),
}
"""Keys of each augmentation's mapping (``flip_lr`` is a probability)."""

SEGMENT_TRAIN_KEYS = ("weight", "lesion")
"""``train.segments.KEY`` keys: Dice-term weight, and whether the segment is lesion-like (small,
countable objects: evaluation adds lesion-level detection figures for it)."""

DISPLAY_KEYS = ("window", "invert")
"""``display.MODALITY`` keys: ``window: [centre, width]`` and ``invert: true|false``."""

RENAMED = {
    "train.nodule_weight": "train.segments.nodule.weight (per-segment weights: "
    "train: {segments: {KEY: {weight: 2.0}}})",
}
"""Keys that existed once, with what replaced them."""


def check_keys(data: Any, allowed: Iterable[str], where: str) -> dict[str, Any]:
    """Return ``data`` as a mapping; ValueError on a non-mapping or an unknown key."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{where} must be a mapping, got {type(data).__name__}: {data!r}")
    allowed = list(allowed)
    for key in data:
        if key in allowed:
            continue
        path = f"{where}.{key}"
        dotted = path.split(": ", 1)[-1]  # without the file name
        if dotted in RENAMED:
            raise ValueError(f"{path} is no longer read; use {RENAMED[dotted]}")
        close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{where} has unknown key {key!r}{hint} (allowed: {sorted(allowed)})")
    return dict(data)


def _fields(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def check_config(data: Mapping[str, Any], source: str = "config") -> None:
    """Check every key of a training config (values are checked where they are used).

    Raises
    ------
    ValueError
        A section is not a mapping, or a key is unknown (the message names the path, the closest
        allowed key and the allowed set), or ``train.segments`` names a segment the model does
        not have.
    """
    check_keys(data, TOP_KEYS, source)
    model = check_keys(data["model"], MODEL_KEYS, f"{source}: model")
    if "input" in model:
        check_keys(model["input"], _fields(InputSpec), f"{source}: model.input")
    if "output" in model:
        check_keys(model["output"], _fields(OutputSpec), f"{source}: model.output")
    for i, seg in enumerate(model.get("segments") or []):
        check_keys(seg, _fields(Segment), f"{source}: model.segments[{i}]")
    if model.get("confidence") is not None:  # export measures its ood ranges on the data
        check_keys(model["confidence"], CONFIDENCE_KEYS, f"{source}: model.confidence")
    for section, keys in SECTION_KEYS.items():
        if data.get(section) is not None:
            check_keys(data[section], keys, f"{source}: {section}")
    for name, value in (data.get("augment") or {}).items():
        if name in AUGMENT_KEYS and value:
            check_keys(value, AUGMENT_KEYS[name], f"{source}: augment.{name}")
    seg_keys = [str(s.get("key")) for s in model.get("segments") or []]
    inference_settings(model, seg_keys, source)
    measurement_settings(model, seg_keys, source)
    train_segments(data, seg_keys, source)
    display_settings(data, source)


def inference_settings(
    model: Mapping[str, Any], seg_keys: list[str], source: str = "config"
) -> dict[str, Any]:
    """``model.postprocess`` / ``tta`` / ``probabilities`` checked as the manifest checks them.

    Returns
    -------
    dict
        The keys that are set, as export writes them into the manifest.

    Raises
    ------
    ValueError
        An unknown op or step key ("did you mean"), a bad value, a step naming a segment the
        model does not have, an unknown augmentation, or ``probabilities`` not true/false.
    """
    out: dict[str, Any] = {}
    steps = model.get("postprocess")
    if steps is not None:
        if not isinstance(steps, list):
            raise ValueError(
                f"{source}: model.postprocess must be a list of steps such as "
                f"{{op: min_size, segment: KEY, pixels: 10}}, got {steps!r}"
            )
        for n, step in enumerate(steps):
            where = f"{source}: model.postprocess[{n}]"
            if not isinstance(step, Mapping):
                raise ValueError(
                    f"{where} must be a mapping such as {{op: min_size, segment: KEY, pixels: "
                    f"10}}, got {step!r}"
                )
            op = step.get("op")
            if op not in POSTPROCESS_STEPS:
                close = difflib.get_close_matches(str(op), list(POSTPROCESS_STEPS), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(
                    f"{where}: unknown op {op!r}{hint} (ops: {', '.join(POSTPROCESS_STEPS)})"
                )
            check_keys(step, _fields(POSTPROCESS_STEPS[op]), f"{where} ({op})")
            for field in ("segment", "where", "of"):
                name = step.get(field)
                if name is not None and name not in seg_keys:
                    close = difflib.get_close_matches(str(name), seg_keys, n=1)
                    hint = f"; did you mean {close[0]!r}?" if close else ""
                    raise ValueError(
                        f"{where}.{field}: unknown segment {name!r}{hint}; segments are {seg_keys}"
                    )
        try:
            TypeAdapter(list[PostprocessStep]).validate_python(steps)
        except ValidationError as exc:
            raise ValueError(format_validation_error(f"{source}: model.postprocess", exc)) from None
        out["postprocess"] = [dict(step) for step in steps]
    tta = model.get("tta")
    if tta is not None:
        if (
            not isinstance(tta, list)
            or any(t not in TTA_OPS for t in tta)
            or len(set(tta)) < len(tta)
        ):
            raise ValueError(
                f"{source}: model.tta must be a list of distinct augmentations from "
                f"{list(TTA_OPS)}, got {tta!r}"
            )
        out["tta"] = list(tta)
    probabilities = model.get("probabilities")
    if probabilities is not None:
        if not isinstance(probabilities, bool):
            raise ValueError(
                f"{source}: model.probabilities must be true or false, got {probabilities!r}"
            )
        out["probabilities"] = probabilities
    return out


def measurement_settings(
    model: Mapping[str, Any], seg_keys: list[str], source: str = "config"
) -> dict[str, Any]:
    """``model.measurements`` checked as the manifest checks it (what the node's report measures).

    ``{segment key: {size, counts, components, min_component_pixels, laterality}}``, see
    :mod:`dicom_node.modelstore.measureplan`; export copies it into the manifest.

    Returns
    -------
    dict
        ``{"measurements": {...}}`` when set, else ``{}``.

    Raises
    ------
    ValueError
        Not a mapping, an unknown segment or key ("did you mean"), or a value the manifest
        would refuse (the message names the path and the value).
    """
    raw = model.get("measurements")
    if raw is None:
        return {}
    where = f"{source}: model.measurements"
    if not isinstance(raw, Mapping):
        raise ValueError(
            f"{where} must be a mapping of segment key to measurements such as "
            f"{{thyroid: {{laterality: split}}}}, got {raw!r}"
        )
    for key, value in raw.items():
        if key not in seg_keys:
            close = difflib.get_close_matches(str(key), seg_keys, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{where}: unknown segment {key!r}{hint}; segments are {seg_keys}")
        check_keys(value or {}, _fields(SegmentMeasurements), f"{where}.{key}")
    try:
        TypeAdapter(dict[str, SegmentMeasurements]).validate_python(
            {key: value or {} for key, value in raw.items()}
        )
    except ValidationError as exc:
        raise ValueError(format_validation_error(where, exc)) from None
    return {"measurements": {str(key): dict(value or {}) for key, value in raw.items()}}


def train_segments(
    data: Mapping[str, Any], seg_keys: list[str], source: str = "config"
) -> dict[str, dict[str, Any]]:
    """``train.segments`` checked: ``{key: {"weight": float, "lesion": bool}}`` for every key.

    Raises
    ------
    ValueError
        An unknown segment key or setting, a weight that is not a positive number, or a
        ``lesion`` that is not true/false.
    """
    raw = (data.get("train") or {}).get("segments") or {}
    raw = check_keys(raw, seg_keys, f"{source}: train.segments")
    out: dict[str, dict[str, Any]] = {}
    for key in seg_keys:
        item = check_keys(raw.get(key) or {}, SEGMENT_TRAIN_KEYS, f"{source}: train.segments.{key}")
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or weight <= 0:
            raise ValueError(
                f"{source}: train.segments.{key}.weight must be a number > 0, got {weight!r}"
            )
        lesion = item.get("lesion", False)
        if not isinstance(lesion, bool):
            raise ValueError(
                f"{source}: train.segments.{key}.lesion must be true or false, got {lesion!r}"
            )
        out[key] = {"weight": float(weight), "lesion": lesion}
    return out


def display_settings(data: Mapping[str, Any], source: str = "config") -> dict[str, dict[str, Any]]:
    """``display`` checked: ``{MODALITY: {"window": (centre, width) | None, "invert": bool}}``.

    Only the modalities the config names are returned; :mod:`training.evaluate` adds its
    defaults for the others.

    Raises
    ------
    ValueError
        A setting is unknown, a window is not ``[centre, width]`` with width > 0, or ``invert``
        is not true/false.
    """
    raw = data.get("display") or {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"{source}: display must be a mapping of modality to settings")
    out: dict[str, dict[str, Any]] = {}
    for modality, value in raw.items():
        where = f"{source}: display.{modality}"
        item = check_keys(value or {}, DISPLAY_KEYS, where)
        window = item.get("window")
        if window is not None:
            ok = (
                isinstance(window, list | tuple)
                and len(window) == 2
                and all(isinstance(v, int | float) and not isinstance(v, bool) for v in window)
                and window[1] > 0
            )
            if not ok:
                raise ValueError(
                    f"{where}.window must be [centre, width] with width > 0, got {window!r}"
                )
            window = (float(window[0]), float(window[1]))
        invert = item.get("invert", False)
        if not isinstance(invert, bool):
            raise ValueError(f"{where}.invert must be true or false, got {invert!r}")
        out[str(modality).upper()] = {"window": window, "invert": invert}
    return out
