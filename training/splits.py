"""Split files: which patients (and so which case folders) train, validate and test.

``split.yaml`` (written by ``python -m training split DATA``, or by hand)::

    patients:                 # PatientID -> its case folders under the data folder
      P001: [case0001, case0002]
      P002: [case0003]
      ...
    train: [P001, P004, ...]  # PatientIDs
    val: [P002]
    test: [P007, P008]        # held out: `train` never opens these folders
    folds:                    # optional, for cross-validation: a partition of train + val
      - [P001, P002]
      - [P004, P005]
      - [P003, P006]

Rules, checked when the file is read (:func:`read_split`): every patient is in exactly one of
``train``, ``val`` and ``test``; each folder belongs to one patient; ``folds`` (if present)
partition ``train`` + ``val`` exactly. With a split file ``train`` reads only the folders of the
training and validation patients, listed here, and checks that each one's PatientID is the
patient the file says (a wrong file would leak a patient across splits); a folder in the data
folder that the split does not list is refused, so data is never dropped silently.

``train --fold K`` (1-based) validates on ``folds[K-1]`` and trains on the other folds;
``python -m training cv`` runs every fold and writes a summary (:func:`summarise_folds`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from dicom_node.modelstore.frames import MASK_SUFFIXES

LOGGER = logging.getLogger(__name__)

SPLIT_KEYS = ("patients", "train", "val", "test", "folds")
"""Keys of a split file."""

SPLITS = ("train", "val", "test")


class SplitError(ValueError):
    """A split file is invalid or does not fit the data; the message names the file."""


@dataclass(frozen=True)
class Split:
    """A split file, read and checked.

    Attributes
    ----------
    path:
        Where it was read from.
    patients:
        PatientID -> case folder names.
    train, val, test:
        PatientIDs per split.
    folds:
        Partition of ``train`` + ``val`` for cross-validation (empty: none).
    sha256:
        Of the file's bytes (recorded in the run).
    """

    path: Path
    patients: dict[str, tuple[str, ...]]
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    folds: tuple[tuple[str, ...], ...] = ()
    sha256: str = ""

    def for_fold(self, fold: int | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(training patients, validation patients) for ``fold`` (1-based; None: the file's).

        Raises
        ------
        SplitError
            The file has no folds, or ``fold`` is out of range.
        """
        if fold is None:
            return self.train, self.val
        if not self.folds:
            raise SplitError(
                f"{self.path}: --fold {fold} needs folds in the split file "
                f"(python -m training split DATA --folds N)"
            )
        if not 1 <= fold <= len(self.folds):
            raise SplitError(f"{self.path}: --fold {fold} is not in 1..{len(self.folds)}")
        val = self.folds[fold - 1]
        train = tuple(p for i, f in enumerate(self.folds) if i != fold - 1 for p in f)
        return train, val

    def folders(self, patients: Sequence[str]) -> list[str]:
        """Case folder names of ``patients``, sorted."""
        return sorted(name for p in patients for name in self.patients[p])

    def owner(self) -> dict[str, str]:
        """Case folder name -> PatientID."""
        return {name: p for p, names in self.patients.items() for name in names}


def _ids(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str | int) for v in value):
        raise SplitError(f"{where} must be a list of PatientIDs, got {value!r}")
    return tuple(str(v) for v in value)


def read_split(path: Path | str) -> Split:
    """Read and check a split file (format and rules in the module docstring).

    Raises
    ------
    FileNotFoundError
        No such file.
    SplitError
        Not YAML, an unknown key (with the closest allowed), a patient in two splits or in
        none, a folder of two patients, folds that do not partition train + val.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file {str(path)!r} does not exist")
    raw = path.read_bytes()
    try:
        data = YAML(typ="safe").load(raw.decode("utf-8")) or {}
    except (YAMLError, UnicodeDecodeError) as exc:
        raise SplitError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise SplitError(f"{path}: must be a mapping with keys {list(SPLIT_KEYS)}")
    from training.schema import check_keys

    try:
        check_keys(data, SPLIT_KEYS, str(path))
    except ValueError as exc:
        raise SplitError(str(exc)) from exc
    patients_raw = data.get("patients")
    if not isinstance(patients_raw, dict) or not patients_raw:
        raise SplitError(f"{path}: 'patients' must map each PatientID to its case folders")
    patients: dict[str, tuple[str, ...]] = {}
    owner: dict[str, str] = {}
    for pid, folders in patients_raw.items():
        names = _ids(folders if isinstance(folders, list) else [folders], f"{path}: {pid}")
        for name in names:
            if name in owner:
                raise SplitError(
                    f"{path}: case folder {name!r} is listed for patients {owner[name]!r} and "
                    f"{str(pid)!r}; a folder is one series of one patient"
                )
            owner[name] = str(pid)
        patients[str(pid)] = names
    sets = {name: _ids(data.get(name), f"{path}: {name}") for name in SPLITS}
    seen: dict[str, str] = {}
    for name, ids in sets.items():
        for pid in ids:
            if pid not in patients:
                raise SplitError(f"{path}: {name} names patient {pid!r}, not under 'patients'")
            if pid in seen:
                raise SplitError(
                    f"{path}: patient {pid!r} is in both {seen[pid]} and {name}; a patient "
                    f"belongs to one split (leakage)"
                )
            seen[pid] = name
    unassigned = sorted(set(patients) - set(seen))
    if unassigned:
        raise SplitError(f"{path}: patient(s) {unassigned[:5]} are in no split (train/val/test)")
    folds = _folds(data.get("folds"), sets, path)
    return Split(
        path=path,
        patients=patients,
        train=sets["train"],
        val=sets["val"],
        test=sets["test"],
        folds=folds,
        sha256=hashlib.sha256(raw).hexdigest(),
    )


def _folds(value: Any, sets: dict[str, tuple[str, ...]], path: Path) -> tuple[tuple[str, ...], ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) < 2:
        raise SplitError(f"{path}: folds must be a list of at least two lists of PatientIDs")
    folds = tuple(_ids(f, f"{path}: folds[{i}]") for i, f in enumerate(value))
    pool = set(sets["train"]) | set(sets["val"])
    listed = [p for f in folds for p in f]
    twice = sorted({p for p in listed if listed.count(p) > 1})
    if twice:
        raise SplitError(f"{path}: patient(s) {twice[:5]} are in more than one fold")
    if set(listed) != pool:
        extra, missing = sorted(set(listed) - pool), sorted(pool - set(listed))
        raise SplitError(
            f"{path}: folds must partition train + val exactly (in folds but not train/val: "
            f"{extra[:5]}; in train/val but in no fold: {missing[:5]}); the test split is "
            f"never in a fold"
        )
    if any(not f for f in folds):
        raise SplitError(f"{path}: a fold is empty")
    return folds


def select_folders(
    split: Split, root: Path, fold: int | None
) -> tuple[list[Path], list[Path], dict[str, str]]:
    """Folders to train and validate on, checked against what is in ``root``.

    Only ``root``'s directory listing is read: no file of any case folder is opened.

    Returns
    -------
    (train folders, validation folders, folder name -> PatientID the split says)

    Raises
    ------
    SplitError
        A listed folder is missing, a folder in ``root`` is in no split, or the validation
        set is empty.
    """
    present = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    owner = split.owner()
    missing = sorted(set(owner) - present)
    if missing:
        raise SplitError(f"{split.path}: case folder(s) {missing[:5]} are not in {root}")
    unlisted = sorted(present - set(owner))
    if unlisted:
        raise SplitError(
            f"{split.path}: {len(unlisted)} case folder(s) of {root} are in no split "
            f"({unlisted[:5]}); add them under 'patients' and to a split"
        )
    train_ids, val_ids = split.for_fold(fold)
    if not val_ids:
        raise SplitError(f"{split.path}: the validation split is empty")
    train = [root / n for n in split.folders(train_ids)]
    val = [root / n for n in split.folders(val_ids)]
    return train, val, owner


def _patient_of(folder: Path) -> str:
    """PatientID of the first DICOM file in ``folder`` (header only), else the folder name."""
    from pydicom.misc import is_dicom

    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.endswith(MASK_SUFFIXES) and is_dicom(path):
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
            return str(ds.get("PatientID", "") or "") or folder.name
    return folder.name


def make_split(
    root: Path | str,
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    folds: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """A split of ``root``'s case folders by PatientID (headers only), as split-file data.

    Patients are shuffled with ``seed``; the test split takes about ``test_fraction`` of the
    patients (at least one when the fraction is above 0), validation about ``val_fraction``
    (at least one); ``folds`` > 1 also partitions train + val into that many folds.

    Raises
    ------
    ValueError
        A fraction outside [0, 1), too few patients for the splits or folds asked for.
    """
    root = Path(root)
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    patients: dict[str, list[str]] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        patients.setdefault(_patient_of(folder), []).append(folder.name)
    ids = sorted(patients)
    rng = np.random.default_rng(seed)
    rng.shuffle(ids)
    n_test = math.ceil(test_fraction * len(ids)) if test_fraction > 0 else 0
    n_val = max(math.ceil(val_fraction * len(ids)), 1) if val_fraction > 0 or not folds else 0
    if len(ids) - n_test - n_val < 1 or (folds and len(ids) - n_test < folds):
        raise ValueError(
            f"{root}: {len(ids)} patient(s) are too few for a test split of {n_test}, a "
            f"validation split of {n_val}" + (f" and {folds} folds" if folds else "")
        )
    test, val, train = ids[:n_test], ids[n_test : n_test + n_val], ids[n_test + n_val :]
    data: dict[str, Any] = {
        "patients": {p: patients[p] for p in sorted(patients)},
        "train": sorted(train),
        "val": sorted(val),
        "test": sorted(test),
    }
    if folds > 1:
        pool = ids[n_test:]
        data["folds"] = [sorted(pool[i::folds]) for i in range(folds)]
    return data


def write_split(data: dict[str, Any], path: Path | str) -> Path:
    """Write split-file data as YAML (with a header comment); return the path."""
    import io

    path = Path(path)
    buffer = io.StringIO()
    yaml = YAML()
    yaml.default_flow_style = None
    yaml.dump(data, buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "# split file (training/README.md, 'Splits'): PatientID -> case folders, then the\n"
        "# patients of each split; `train` never opens a test folder\n" + buffer.getvalue()
    )
    return path


def summarise_folds(runs: Sequence[Path]) -> dict[str, Any]:
    """Cross-validation summary from each fold's ``run.json`` and ``history.json``.

    Returns
    -------
    dict
        ``{"folds": [{"fold", "run", "best_epoch", "val_score", "val_dice": {KEY: d}}],
        "mean": {"val_score", KEY...}, "std": {...}}`` (population standard deviation).
    """
    rows: list[dict[str, Any]] = []
    for i, run in enumerate(runs, start=1):
        record = json.loads((run / "run.json").read_text())
        history = json.loads((run / "history.json").read_text())
        best = history[int(record["best_epoch"]) - 1]
        rows.append(
            {
                "fold": i,
                "run": str(run),
                "best_epoch": int(record["best_epoch"]),
                "val_score": float(best["val_score"]),
                "val_dice": {
                    k.removeprefix("val_dice_"): float(v)
                    for k, v in best.items()
                    if k.startswith("val_dice_")
                },
            }
        )
    keys = ["val_score", *sorted({k for r in rows for k in r["val_dice"]})]

    def values(key: str) -> list[float]:
        return [r["val_score"] if key == "val_score" else r["val_dice"][key] for r in rows]

    return {
        "folds": rows,
        "mean": {k: float(np.mean(values(k))) for k in keys},
        "std": {k: float(np.std(values(k))) for k in keys},
    }


def render_summary(summary: dict[str, Any]) -> str:
    """The summary as a markdown table (one row per fold, then mean and sd)."""
    keys = list(summary["mean"])
    lines = [
        "# Cross-validation",
        "",
        "| fold | best epoch | " + " | ".join(keys) + " |",
        "| ---: | ---: | " + " | ".join("---:" for _ in keys) + " |",
    ]
    for row in summary["folds"]:
        cells = [row["val_score"] if k == "val_score" else row["val_dice"][k] for k in keys]
        lines.append(
            f"| {row['fold']} | {row['best_epoch']} | "
            + " | ".join(f"{c:.4f}" for c in cells)
            + " |"
        )
    for label in ("mean", "std"):
        lines.append(
            f"| {label} | | " + " | ".join(f"{summary[label][k]:.4f}" for k in keys) + " |"
        )
    return "\n".join(lines) + "\n"


def split_folders(split: Split | Path | str, root: Path | str, which: str = "test") -> list[Path]:
    """The case folders of one split (``train``, ``val`` or ``test``) under ``root``.

    Raises
    ------
    SplitError
        ``which`` is not a split name, the split is empty, or a listed folder is missing.
    """
    split = split if isinstance(split, Split) else read_split(split)
    if which not in SPLITS:
        raise SplitError(f"split must be one of {list(SPLITS)}, got {which!r}")
    names = split.folders(getattr(split, which))
    if not names:
        raise SplitError(f"{split.path}: the {which} split is empty")
    root = Path(root)
    missing = [n for n in names if not (root / n).is_dir()]
    if missing:
        raise SplitError(f"{split.path}: {which} case folder(s) {missing[:5]} are not in {root}")
    return [root / n for n in names]
