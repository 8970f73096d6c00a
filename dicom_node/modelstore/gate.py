"""Promotion gate: a candidate must not segment the reference set worse than production.

The reference set is a folder of case folders in training's format
(:mod:`dicom_node.modelstore.cases`)::

    DATA/
      labels.yaml        # only for NIfTI label maps: {KEY: [label values]}
      case0001/
        image.dcm        # one or more DICOM images: a multi-file series is one case
        truth.npz        # masks: truth.npz, a DICOM SEG, KEY.nii.gz per segment or labels.nii.gz

Cases are read by the node's own frame reader
(:func:`dicom_node.modelstore.frames.read_case_folder`: frame order, Modality LUT, colour as the
worker sees them; mask stacks follow that frame order) and run through the same
:class:`ModelRunner` as the worker, so the gate scores exactly what the node would serve. Both
versions run on every case; each case (series) is scored as one volume: 3-D Dice, IoU and
HD95 in mm from the series geometry (pixel spacing and slice positions,
:func:`dicom_node.modelstore.scoring.volume_scores`). Per segment, the mean Dice over cases is
compared (IoU and HD95 are reported beside it). The gate refuses when any segment's mean Dice
of the candidate is lower than production's by more than ``tolerance`` (default 0.01). A case
only counts for the segments its masks hold.

**Floors.** A version must also reach a minimum mean Dice per segment, with or without a
production version to compare with (a first version is otherwise compared with nothing). The
floor of a segment is the highest of:

- ``gate: {min_dice: {KEY: value}}`` in the candidate's manifest;
- ``min_dice: {KEY: value}`` in the model's ``gate.yaml`` (``models/<name>/gate.yaml``: the
  store's floor, which a new version's manifest cannot lower);
- ``min_dice`` passed by the caller (``dicom-node models promote --min-dice KEY=VALUE``);
- for a first version only (no production), :data:`DEFAULT_FIRST_MIN_DICE` for every segment
  that has no declared floor, so that a model that predicts nothing is never promoted unnoticed.

A declared floor for a segment the reference set has no truth for refuses the promotion (the
floor cannot be checked). The result is a plain mapping that ``promote`` writes to the alias
history; :meth:`GateResult.report` gives one line per segment (measured, floor, production).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from dicom_node.modelstore.aliases import PRODUCTION
from dicom_node.modelstore.cases import LABELS_FILE, CaseError, SegmentRef, read_labelled_case
from dicom_node.modelstore.manifest import Segment
from dicom_node.modelstore.processing import slice_spacing
from dicom_node.modelstore.runner import ModelRunner
from dicom_node.modelstore.scoring import dice, volume_scores  # noqa: F401 - dice re-exported
from dicom_node.modelstore.store import ModelStore, ModelStoreError, ResolvedVersion

LOGGER = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 0.01
"""Largest allowed drop of a segment's mean Dice (absolute) before the gate refuses."""

DEFAULT_FIRST_MIN_DICE = 0.1
"""Floor of every segment without a declared floor when there is no production version yet.

Low on purpose (any useful model clears it); it exists so that a model that predicts nothing, or
noise, is refused rather than promoted with "nothing to compare with"."""

STORE_GATE_FILE = "gate.yaml"
"""The store's gate settings of one model: ``models/<name>/gate.yaml`` with ``min_dice``."""


class GateError(ValueError):
    """The gate cannot run: no reference data, unreadable cases; the message says which."""


@dataclass(frozen=True)
class ReferenceCase:
    """One reference case: its frames, the true masks per segment key (F, H, W) and geometry.

    ``spacing`` is the pixel spacing (row, column) in mm, ``positions`` each frame's position
    along the slice normal in mm (3-D HD95).
    """

    name: str
    frames: list[np.ndarray]
    truth: dict[str, np.ndarray]
    spacing: tuple[float, float] = (1.0, 1.0)
    positions: tuple[float, ...] | None = None


@dataclass
class GateResult:
    """Outcome of the gate (``to_dict`` is what the history records)."""

    passed: bool
    candidate_version: str
    production_version: str | None
    data: str
    cases: int
    tolerance: float
    candidate: dict[str, float] = field(default_factory=dict)
    production: dict[str, float] = field(default_factory=dict)
    floors: dict[str, float] = field(default_factory=dict)
    floor_sources: dict[str, str] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    forced: bool = False
    candidate_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per segment: mean 3-D ``dice``, ``iou`` and ``hd95_mm`` over the cases (HD95 over the
    cases where both masks are non-empty), and ``n`` cases."""
    production_metrics: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return the result as plain data (Dice rounded to 4 decimals)."""
        data = asdict(self)
        for key in ("candidate", "production", "floors"):
            data[key] = {k: round(float(v), 4) for k, v in data[key].items()}
        for key in ("candidate_metrics", "production_metrics"):
            data[key] = {
                seg: {m: _rounded(v) for m, v in values.items()}
                for seg, values in data[key].items()
            }
        return data

    def report(self) -> list[str]:
        """One line per segment: measured mean Dice, floor (and its source), production, verdict.

        Example: ``liver: mean Dice 0.0000 over 3 case(s); floor 0.5000 (manifest); 3-D IoU
        0.0000, HD95 n/a -> refused``.
        """
        lines = []
        for key in sorted(set(self.candidate) | set(self.floors)):
            value = self.candidate.get(key)
            extra = self.candidate_metrics.get(key) or {}
            parts = [
                f"{key}: mean Dice {value:.4f} over {extra.get('n', self.cases):g} case(s)"
                if value is not None
                else f"{key}: not measured (no truth in the reference set)"
            ]
            if key in self.floors:
                parts.append(f"floor {self.floors[key]:.4f} ({self.floor_sources[key]})")
            if key in self.production:
                parts.append(f"production {self.production[key]:.4f}")
            if extra:
                hd = extra["hd95_mm"]
                parts.append(
                    f"3-D IoU {extra['iou']:.4f}, HD95 "
                    + ("n/a" if math.isnan(hd) else f"{hd:.2f} mm")
                )
            failed = any(r.startswith(f"{key}:") for r in self.reasons)
            lines.append("; ".join(parts) + (" -> refused" if failed else " -> ok"))
        return lines


def _rounded(value: float) -> float | None:
    return None if math.isnan(value) else round(float(value), 4)


def reference_labels(root: Path) -> dict[str, list[int]] | None:
    """``labels.yaml`` of a reference set (segment key -> NIfTI label values), if present.

    Raises
    ------
    GateError
        The file is not a mapping of key to a list of whole numbers.
    """
    path = root / LABELS_FILE
    if not path.is_file():
        return None
    try:
        data = YAML(typ="safe").load(path.read_text(encoding="utf-8")) or {}
    except YAMLError as exc:
        raise GateError(f"{path}: not valid YAML: {exc}") from exc
    ok = isinstance(data, dict) and all(
        isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)
        for v in data.values()
    )
    if not ok:
        raise GateError(f"{path}: must map segment keys to lists of label values, got {data!r}")
    return {str(k): list(v) for k, v in data.items()}


def load_reference_cases(
    root: str | Path, segments: list[Segment] | None = None
) -> list[ReferenceCase]:
    """Read every case folder under ``root`` (sorted by name).

    Parameters
    ----------
    root:
        The reference set (layout in the module docstring).
    segments:
        The segments to look for (a candidate's manifest segments: SEG masks are matched by
        key, label or type code). Default: whatever keys ``truth.npz`` holds.

    Raises
    ------
    GateError
        ``root`` is not a folder, has no case, or a case has no images or masks, an image
        cannot be decoded, or a mask does not match the image shape (file and shapes named).
    """
    root = Path(root)
    if not root.is_dir():
        raise GateError(f"reference data {root} is not a folder")
    labels = reference_labels(root)
    cases: list[ReferenceCase] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        refs = _refs(folder, segments)
        try:
            read = read_labelled_case(folder, refs, labels)
        except CaseError as exc:
            raise GateError(f"reference case {folder}: {exc.reason}") from exc
        cases.append(
            ReferenceCase(
                folder.name,
                list(read.frames),
                read.masks,
                spacing=read.series.spacing,
                positions=read.positions,
            )
        )
    if not cases:
        raise GateError(f"reference data {root} has no case folders")
    return cases


def _refs(folder: Path, segments: list[Segment] | None) -> list[SegmentRef]:
    if segments is not None:
        return [SegmentRef(s.key, s.label, s.type.value) for s in segments]
    truth = folder / "truth.npz"
    if not truth.is_file():
        return []
    with np.load(truth) as npz:
        return [SegmentRef(k) for k in npz.files]


def evaluate(
    runner: ModelRunner, resolved: ResolvedVersion, cases: list[ReferenceCase]
) -> dict[str, float]:
    """Return the mean 3-D Dice per segment key of ``resolved`` over ``cases``."""
    return {key: m["dice"] for key, m in evaluate_metrics(runner, resolved, cases).items()}


def evaluate_metrics(
    runner: ModelRunner, resolved: ResolvedVersion, cases: list[ReferenceCase]
) -> dict[str, dict[str, float]]:
    """Per segment key: mean 3-D ``dice``, ``iou``, ``hd95_mm`` and ``n`` over ``cases``.

    Only segments present both in the manifest and in a case's truth count for that case;
    HD95 is averaged over the cases where it is defined (both masks non-empty).
    """
    scores: dict[str, list[dict[str, float]]] = {}
    keys = [s.key for s in resolved.manifest.segments]
    for case in cases:
        # the geometry the worker passes for a series (manifest postprocess steps)
        geometry: dict[str, Any] = {
            "spacing": case.spacing,
            "slice_spacing": slice_spacing(case.positions),
        }
        outputs = runner.run(resolved, case.frames, **geometry)
        for key in keys:
            if key not in case.truth:
                continue
            predicted = np.stack([o[key] for o in outputs])
            scores.setdefault(key, []).append(
                volume_scores(predicted, case.truth[key], case.spacing, case.positions)
            )
    out: dict[str, dict[str, float]] = {}
    for key, values in scores.items():
        hd = [v["hd95_mm"] for v in values if not math.isnan(v["hd95_mm"])]
        out[key] = {
            "dice": float(np.mean([v["dice"] for v in values])),
            "iou": float(np.mean([v["iou"] for v in values])),
            "hd95_mm": float(np.mean(hd)) if hd else float("nan"),
            "n": float(len(values)),
        }
    return out


def reference_folder(
    store: ModelStore, candidate: ResolvedVersion, data: str | Path | None
) -> Path:
    """Return the reference folder: ``data`` or the candidate's manifest ``reference_data``.

    Raises
    ------
    GateError
        Neither is given.
    """
    if data is not None:
        return Path(data)
    if candidate.manifest.reference_data:
        return candidate.path / candidate.manifest.reference_data
    raise GateError(
        f"{candidate.ref}: no reference data for the promotion gate: the manifest has no "
        f"reference_data; pass --data DIR (case folders: DICOM images + truth.npz, a SEG or "
        f"NIfTI masks) or --force"
    )


def store_floors(store: ModelStore, name: str) -> dict[str, float]:
    """Return ``min_dice`` of ``models/<name>/gate.yaml`` (empty when the file is absent).

    Raises
    ------
    GateError
        The file is not a mapping ``{min_dice: {KEY: number in [0, 1]}}``.
    """
    path = store.model_dir(name) / STORE_GATE_FILE
    if not path.is_file():
        return {}
    try:
        data = YAML(typ="safe").load(path.read_text(encoding="utf-8")) or {}
    except YAMLError as exc:
        raise GateError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict) or set(data) - {"min_dice"}:
        raise GateError(f"{path}: must be a mapping with the one key 'min_dice', got {data!r}")
    return _check_floors(data.get("min_dice") or {}, str(path))


def _check_floors(floors: Any, source: str) -> dict[str, float]:
    if not isinstance(floors, dict):
        raise GateError(f"{source}: min_dice must be a mapping of segment key to Dice")
    out: dict[str, float] = {}
    for key, value in floors.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise GateError(
                f"{source}: min_dice[{key!r}] must be a number in [0, 1], got {value!r}"
            )
        out[str(key)] = float(value)
    return out


def _floors(
    store: ModelStore,
    candidate: ResolvedVersion,
    min_dice: dict[str, float] | None,
    first_version: bool,
) -> tuple[dict[str, float], dict[str, str]]:
    """Effective floor per segment key and where it came from (the highest declared wins)."""
    floors: dict[str, float] = {}
    sources: dict[str, str] = {}
    declared = [
        ("manifest", dict(candidate.manifest.gate.min_dice) if candidate.manifest.gate else {}),
        (f"{candidate.name}/{STORE_GATE_FILE}", store_floors(store, candidate.name)),
        ("--min-dice", _check_floors(min_dice or {}, "min_dice")),
    ]
    keys = [s.key for s in candidate.manifest.segments]
    for source, values in declared:
        for key, value in values.items():
            if key not in keys:
                raise GateError(f"{source}: min_dice names segment {key!r}; segments are {keys}")
            if key not in floors or value > floors[key]:
                floors[key], sources[key] = value, source
    if first_version:
        for key in keys:
            if key not in floors:
                floors[key] = DEFAULT_FIRST_MIN_DICE
                sources[key] = "default for a first version"
    return floors, sources


def run_gate(
    store: ModelStore,
    name: str,
    version: str,
    data: str | Path | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    runner: ModelRunner | None = None,
    min_dice: dict[str, float] | None = None,
) -> GateResult:
    """Compare ``name:version`` with the current production on the reference set.

    Parameters
    ----------
    store:
        The model store.
    name, version:
        The candidate.
    data:
        Reference folder; default the candidate's manifest ``reference_data``.
    tolerance:
        Largest allowed drop in a segment's mean Dice.
    runner:
        Runner to use (default: a CPU/CUDA runner created here).
    min_dice:
        Extra floors per segment key (the highest of this, the manifest's and the store's wins).

    Returns
    -------
    GateResult
        ``passed`` False with ``reasons`` naming each segment that is below its floor, has a
        declared floor but no truth in the reference set, or dropped more than ``tolerance``
        below production. Without a production version, only the floors apply (every segment
        has one then: :data:`DEFAULT_FIRST_MIN_DICE` where none is declared).

    Raises
    ------
    GateError
        No reference data, unreadable cases, or a floor that is not a number in [0, 1] or
        names an unknown segment.
    ModelStoreError
        Unknown version.
    """
    if tolerance < 0:
        raise GateError(f"tolerance must be >= 0, got {tolerance}")
    candidate = store.resolve(f"{name}:{version}")
    folder = reference_folder(store, candidate, data)
    cases = load_reference_cases(folder, candidate.manifest.segments)
    runner = runner or ModelRunner()
    store.verify(candidate)
    cand_metrics = evaluate_metrics(runner, candidate, cases)
    cand_scores = {key: m["dice"] for key, m in cand_metrics.items()}
    prod_version = store.aliases(name).get(PRODUCTION)
    first = prod_version is None or prod_version == candidate.version
    floors, sources = _floors(store, candidate, min_dice, first_version=prod_version is None)
    result = GateResult(
        passed=True,
        candidate_version=candidate.version,
        production_version=prod_version,
        data=str(folder),
        cases=len(cases),
        tolerance=float(tolerance),
        candidate=cand_scores,
        floors=floors,
        floor_sources=sources,
        candidate_metrics=cand_metrics,
    )
    if not cand_scores:
        raise GateError(
            f"reference data {folder}: no truth for any segment of {candidate.ref} "
            f"({[s.key for s in candidate.manifest.segments]})"
        )
    for key, floor in sorted(floors.items()):
        measured = cand_scores.get(key)
        if measured is None:
            if sources[key] != "default for a first version":
                result.passed = False
                result.reasons.append(
                    f"{key}: floor {floor:.4f} ({sources[key]}) cannot be checked: the "
                    f"reference set has no truth for {key!r}"
                )
        elif measured < floor:
            result.passed = False
            result.reasons.append(
                f"{key}: mean Dice {measured:.4f} < floor {floor:.4f} ({sources[key]})"
            )
    if first:
        LOGGER.info(
            "promotion gate %s: %s", candidate.ref, "passed" if result.passed else "refused"
        )
        return result
    try:
        production = store.resolve(f"{name}:{prod_version}")
    except ModelStoreError as exc:
        raise GateError(f"cannot load production {name}:{prod_version}: {exc}") from exc
    result.production_metrics = evaluate_metrics(runner, production, cases)
    result.production = {key: m["dice"] for key, m in result.production_metrics.items()}
    for key, prod_dice in sorted(result.production.items()):
        cand_dice = cand_scores.get(key)
        if cand_dice is None:
            continue
        if cand_dice < prod_dice - tolerance:
            result.passed = False
            result.reasons.append(
                f"{key}: mean Dice {cand_dice:.4f} < production {prod_dice:.4f} - "
                f"tolerance {tolerance}"
            )
    LOGGER.info("promotion gate %s: %s", candidate.ref, "passed" if result.passed else "refused")
    return result
