"""Promotion gate: a candidate must not segment the reference set worse than production.

The reference set is a folder of case folders in the training evaluation format::

    DATA/
      case0001/
        image.dcm        # one or more DICOM images (SEG files are ignored)
        truth.npz        # bool arrays named by segment key, (H, W) or (F, H, W)

Cases are read by the node's own frame reader
(:func:`dicom_node.modelstore.frames.read_case_folder`: frame order, Modality LUT, colour as the
worker sees them; ``truth.npz`` stacks follow that frame order) and run through the same
:class:`ModelRunner` as the worker, so the gate scores exactly what the node would serve. Both
versions run on every case; per segment, the mean Dice over cases is compared. The gate
refuses when any segment's mean Dice of the candidate is lower than production's by more than
``tolerance`` (default 0.01). The result is a plain mapping that ``promote`` writes to the alias
history.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dicom_node.modelstore.aliases import PRODUCTION
from dicom_node.modelstore.frames import SeriesReadError, read_case_folder
from dicom_node.modelstore.runner import ModelRunner
from dicom_node.modelstore.scoring import dice
from dicom_node.modelstore.store import ModelStore, ModelStoreError, ResolvedVersion

LOGGER = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 0.01
"""Largest allowed drop of a segment's mean Dice (absolute) before the gate refuses."""


class GateError(ValueError):
    """The gate cannot run: no reference data, unreadable cases; the message says which."""


@dataclass(frozen=True)
class ReferenceCase:
    """One reference case: its frames and the true masks per segment key (F, H, W)."""

    name: str
    frames: list[np.ndarray]
    truth: dict[str, np.ndarray]


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
    reasons: list[str] = field(default_factory=list)
    forced: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Return the result as plain data (Dice rounded to 4 decimals)."""
        data = asdict(self)
        for key in ("candidate", "production"):
            data[key] = {k: round(float(v), 4) for k, v in data[key].items()}
        return data


def load_reference_cases(root: str | Path) -> list[ReferenceCase]:
    """Read every case folder under ``root`` (sorted by name).

    Raises
    ------
    GateError
        ``root`` is not a folder, has no case, or a case lacks images or ``truth.npz``, an image
        cannot be decoded, or its masks do not match the image shape.
    """
    root = Path(root)
    if not root.is_dir():
        raise GateError(f"reference data {root} is not a folder")
    cases: list[ReferenceCase] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            frames = read_case_folder(folder).series.frames
        except SeriesReadError as exc:
            raise GateError(f"reference case {folder}: {exc}") from exc
        truth_path = folder / "truth.npz"
        if not truth_path.is_file():
            raise GateError(f"reference case {folder}: no truth.npz (bool arrays per segment key)")
        truth: dict[str, np.ndarray] = {}
        with np.load(truth_path) as npz:
            for key in npz.files:
                mask = np.asarray(npz[key]).astype(bool)
                if mask.ndim == 2:
                    mask = mask[None]
                expected = (len(frames), *frames[0].shape[:2])
                if mask.shape != expected:
                    raise GateError(
                        f"reference case {folder}: truth {key!r} has shape {mask.shape}, "
                        f"images are {expected}"
                    )
                truth[key] = mask
        cases.append(ReferenceCase(folder.name, frames, truth))
    if not cases:
        raise GateError(f"reference data {root} has no case folders")
    return cases


def evaluate(
    runner: ModelRunner, resolved: ResolvedVersion, cases: list[ReferenceCase]
) -> dict[str, float]:
    """Return the mean Dice per segment key of ``resolved`` over ``cases``.

    Only segments present both in the manifest and in a case's truth count for that case.
    """
    scores: dict[str, list[float]] = {}
    keys = [s.key for s in resolved.manifest.segments]
    for case in cases:
        outputs = runner.run(resolved, case.frames)
        for key in keys:
            if key not in case.truth:
                continue
            predicted = np.stack([o[key] for o in outputs])
            scores.setdefault(key, []).append(dice(predicted, case.truth[key]))
    return {key: float(np.mean(values)) for key, values in scores.items()}


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
        f"reference_data; pass --data DIR (case folders with image.dcm + truth.npz) or --force"
    )


def run_gate(
    store: ModelStore,
    name: str,
    version: str,
    data: str | Path | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    runner: ModelRunner | None = None,
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

    Returns
    -------
    GateResult
        ``passed`` False with ``reasons`` naming each segment that dropped too much. Without a
        production version the candidate passes (nothing to compare with).

    Raises
    ------
    GateError
        No reference data or unreadable cases.
    ModelStoreError
        Unknown version.
    """
    if tolerance < 0:
        raise GateError(f"tolerance must be >= 0, got {tolerance}")
    candidate = store.resolve(f"{name}:{version}")
    folder = reference_folder(store, candidate, data)
    cases = load_reference_cases(folder)
    runner = runner or ModelRunner()
    store.verify(candidate)
    cand_scores = evaluate(runner, candidate, cases)
    prod_version = store.aliases(name).get(PRODUCTION)
    result = GateResult(
        passed=True,
        candidate_version=candidate.version,
        production_version=prod_version,
        data=str(folder),
        cases=len(cases),
        tolerance=float(tolerance),
        candidate=cand_scores,
    )
    if not cand_scores:
        raise GateError(
            f"reference data {folder}: no truth for any segment of {candidate.ref} "
            f"({[s.key for s in candidate.manifest.segments]})"
        )
    if prod_version is None or prod_version == candidate.version:
        return result
    try:
        production = store.resolve(f"{name}:{prod_version}")
    except ModelStoreError as exc:
        raise GateError(f"cannot load production {name}:{prod_version}: {exc}") from exc
    result.production = evaluate(runner, production, cases)
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
