"""The run folder's record: what a training run was made from, how it ended, how to resume it.

``run.json`` (written when a run starts and rewritten when it ends) holds:

- ``config`` (the parsed config as trained), ``config_path``, ``data_dir``, ``data_hash``
  (:func:`training.data.dataset_hash`), ``seed``;
- ``versions``: Python, torch, numpy, onnx, onnxruntime, pydicom and dicom-node;
- ``git``: the commit of the working tree the training code ran from and whether it had
  uncommitted changes (``null`` outside a git checkout);
- ``status``: ``running`` or ``finished``; ``stopped``: ``{reason, epoch, budget_minutes,
  elapsed_minutes, budget_hit}``; ``best_epoch``, ``best_score``.

``resume.pt`` (rewritten after every epoch) holds everything the next epoch depends on: weights,
optimiser state, the best weights so far, the history, and the random states of the
augmentations, the batch order and torch/numpy, so that ``train --resume RUN_DIR`` continues
exactly where the run stopped (same weights as a run that was never interrupted, on CPU).
"""

from __future__ import annotations

import json
import logging
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dicom_node.modelstore.files import atomic_write

LOGGER = logging.getLogger(__name__)

RUN_FILE = "run.json"
"""The run record inside a run folder."""

RESUME_FILE = "resume.pt"
"""The resumable state inside a run folder."""

PACKAGES = ("torch", "numpy", "onnx", "onnxruntime", "pydicom", "dicom-node")
"""Distributions whose versions the run record names (absent ones are recorded as null)."""


def package_versions() -> dict[str, str | None]:
    """Python and :data:`PACKAGES` versions (None for a package that is not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_state(where: Path | None = None) -> dict[str, Any] | None:
    """``{"commit", "dirty"}`` of the checkout holding ``where`` (default: this package).

    Returns None when git is missing or the folder is not in a checkout.
    """
    cwd = where or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def write_run_record(out: Path, record: dict[str, Any]) -> None:
    """Write ``out/run.json`` atomically."""
    text = json.dumps(record, indent=1, default=str).encode()
    atomic_write(out / RUN_FILE, lambda fh: fh.write(text))


def read_run_record(run_dir: Path) -> dict[str, Any]:
    """Read ``run_dir/run.json``.

    Raises
    ------
    FileNotFoundError
        ``run_dir`` has no run record (not a run folder, or written before records existed).
    """
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder: no {RUN_FILE}")
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or "config" not in data:
        raise ValueError(f"{path} is not a run record (no config)")
    return data


def random_states(generators: list[np.random.Generator]) -> list[dict[str, Any]]:
    """The bit-generator states of ``generators`` (what :func:`restore_random_states` takes)."""
    return [dict(g.bit_generator.state) for g in generators]


def restore_random_states(
    generators: list[np.random.Generator], states: list[dict[str, Any]]
) -> None:
    """Put ``generators`` back into ``states`` (same order and count).

    Raises
    ------
    ValueError
        The counts differ (the augmentation changed since the state was saved).
    """
    if len(generators) != len(states):
        raise ValueError(
            f"resume state has {len(states)} augmentation random state(s), the config builds "
            f"{len(generators)}; the augmentation changed since the run started"
        )
    for gen, state in zip(generators, states, strict=True):
        gen.bit_generator.state = state


def save_resume(out: Path, state: dict[str, Any]) -> None:
    """Write ``out/resume.pt`` atomically."""
    atomic_write(out / RESUME_FILE, lambda fh: torch.save(state, fh))


def load_resume(run_dir: Path) -> dict[str, Any]:
    """Read ``run_dir/resume.pt``.

    Raises
    ------
    FileNotFoundError
        No resume state (the run ended before its first epoch, or predates resumable runs).
    """
    path = Path(run_dir) / RESUME_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {RESUME_FILE} to resume from")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "epoch" not in state:
        raise ValueError(f"{path} is not a resume state")
    return state
