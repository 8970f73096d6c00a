"""Training loop: U-Net, Dice + BCE loss, AdamW, per-epoch validation, early stopping.

``train(config, out_dir)`` writes into ``out_dir``:

- ``best.pt``: the checkpoint with the best validation score (state dict, config, data hash,
  epoch, validation figures) - what ``export`` takes;
- ``last.pt``: the last epoch's weights;
- ``history.csv`` and ``history.json``: the learning curve (loss, validation Dice per segment,
  learning rate, seconds per epoch);
- ``split.json``: which cases and patients went to training and validation (and the split file
  and fold when one was given: :mod:`training.splits`);
- ``run.json``: config, data hash, package versions, git commit, how the run stopped
  (:mod:`training.runrecord`);
- ``resume.pt``: the state after the last finished epoch, for ``train --resume RUN_DIR``.

Reproducible: the seed drives the split, the weight initialisation, the batch order and every
augmentation (CPU; CUDA kernels may add non-determinism). The learning-rate schedule follows the
epochs only; ``train.max_minutes`` stops a run at the end of the epoch that would overrun it but
never shapes the schedule, so a run that the budget does not stop gives the same weights on any
machine, and a run it stops can be resumed to those same weights. The validation score is the
mean of the per-segment Dice over the validation set (pixels pooled per segment).
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from ruamel.yaml import YAML

from dicom_node.modelstore.files import atomic_write
from dicom_node.modelstore.manifest import InputSpec
from training import runrecord, schema, warmstart
from training.data import (
    Case,
    DataError,
    FrameDataset,
    SegmentRef,
    dataset_hash,
    load_dataset,
    patient_split,
)
from training.splits import Split, SplitError, read_split, select_folders
from training.transforms import Compose, RandCrop, Randomizable, ToNetworkInput, build_augmentation
from training.unet import build_unet, count_parameters

LOGGER = logging.getLogger(__name__)

REQUIRED_SECTIONS = ("model", "network", "data", "train")
"""Top-level sections a training config must have."""


@dataclass
class TrainResult:
    """What :func:`train` produced."""

    out_dir: Path
    best_checkpoint: Path
    best_epoch: int
    best_score: float
    history: list[dict[str, float]]
    skipped: list[str]
    stopped: str


def load_config(path: Path | str) -> dict[str, Any]:
    """Read a training config (YAML) and check its sections.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        A required section is missing, a key is unknown anywhere in the config (the message
        says which and suggests the closest allowed key: :mod:`training.schema`), or the model
        input is invalid.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config {str(path)!r} does not exist")
    data = YAML(typ="safe").load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"config {path} must be a mapping, got {type(data).__name__}")
    missing = [s for s in REQUIRED_SECTIONS if s not in data]
    if missing:
        raise ValueError(
            f"config {path} lacks section(s) {missing}; needs {list(REQUIRED_SECTIONS)}"
        )
    schema.check_config(data, str(path))
    InputSpec(**data["model"]["input"])  # validates early, with pydantic's message
    return data


def segment_refs(config: dict[str, Any]) -> list[SegmentRef]:
    """The config's segments, ordered by output channel."""
    segs = sorted(config["model"]["segments"], key=lambda s: int(s["channel"]))
    return [
        SegmentRef(key=s["key"], label=s.get("label", ""), type_code=str(s["type"]["value"]))
        for s in segs
    ]


def pick_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    """Seed torch and numpy's legacy global state (transforms use their own generators)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def dice_bce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    bce_weight: float = 1.0,
    dice_weight: float = 1.0,
    channel_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Binary cross-entropy (mean) plus soft Dice per channel (pooled over the batch).

    ``channel_weights`` weighs each channel's Dice term (normalised to sum to the channel count).
    """
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    probs = torch.sigmoid(logits)
    dims = (0, 2, 3)
    inter = (probs * target).sum(dims)
    denom = probs.sum(dims) + target.sum(dims)
    soft_dice = 1.0 - (2.0 * inter + 1.0) / (denom + 1.0)
    if channel_weights is not None:
        w = channel_weights * (len(channel_weights) / channel_weights.sum())
        soft_dice = soft_dice * w
    return bce_weight * bce + dice_weight * soft_dice.mean()


def _collate(samples: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(np.stack([s["image"] for s in samples]))
    masks = torch.from_numpy(np.stack([s["masks"] for s in samples]).astype(np.float32))
    return images, masks


def _worker_init(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    if info is not None:
        dataset = info.dataset
        if not isinstance(dataset, FrameDataset) or not isinstance(dataset.transform, Compose):
            raise TypeError(
                f"worker dataset must be a FrameDataset with a Compose transform, "
                f"got {type(dataset).__name__}"
            )
        dataset.transform.set_random_state(int(info.seed % 2**32))


def _validate(
    net: torch.nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    device: torch.device,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batch_size: int,
) -> tuple[float, list[float]]:
    """Validation loss and pooled Dice per channel (threshold 0.5)."""
    net.eval()
    losses, inter, total = [], None, None
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = images[i : i + batch_size].to(device).contiguous(memory_format=torch.channels_last)
            y = masks[i : i + batch_size].to(device)
            logits = net(x)
            losses.append(float(loss_fn(logits, y)) * len(x))
            pred = (logits > 0).float()
            bi = (pred * y).sum((0, 2, 3))
            bt = pred.sum((0, 2, 3)) + y.sum((0, 2, 3))
            inter = bi if inter is None else inter + bi
            total = bt if total is None else total + bt
    assert inter is not None and total is not None
    dices = [
        (2 * float(a) / float(b)) if float(b) > 0 else 1.0
        for a, b in zip(inter, total, strict=True)
    ]
    return sum(losses) / len(images), dices


def _lr_at(epoch_progress: float, epochs: int, warmup: int, base: float) -> float:
    """Linear warm-up then cosine decay to 2% of ``base``."""
    if warmup > 0 and epoch_progress < warmup:
        return base * max(epoch_progress / warmup, 0.05)
    span = max(epochs - warmup, 1)
    t = min((epoch_progress - warmup) / span, 1.0)
    return base * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t)))


def train(
    config: dict[str, Any],
    out_dir: Path | str,
    *,
    data_dir: Path | str | None = None,
    skip_bad: bool = False,
    config_path: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    resume: bool = False,
    split: Path | str | Split | None = None,
    fold: int | None = None,
    init: Path | str | None = None,
) -> TrainResult:
    """Train a U-Net as ``config`` says and write checkpoints and the learning curve.

    Parameters
    ----------
    config : dict
        Parsed config (:func:`load_config`).
    out_dir : path
        Output folder (created).
    data_dir : path, optional
        Overrides ``config["data"]["train"]``.
    skip_bad : bool
        Skip (and list) bad cases instead of stopping at the first.
    config_path : str, optional
        Recorded in the checkpoint's provenance.
    progress : callable, optional
        ``progress(stage, done, total)`` for a progress bar (stages ``load``, ``epoch N``).
    resume : bool
        Continue the run in ``out_dir`` from its ``resume.pt`` (see :func:`resume_run`).
    split : path or Split, optional
        A split file (:mod:`training.splits`; default the config's ``data.split``): only the
        folders of its training and validation patients are opened, never the test split's.
    fold : int, optional
        Cross-validation fold (1-based) of the split file: validate on that fold, train on the
        others.
    init : path, optional
        Start from this checkpoint's weights (fine-tuning; default the config's ``train.init``).
        The optimiser, schedule and epochs start afresh; the network must have the config's
        shape. Recorded in ``run.json`` and the checkpoints (path, sha256, its epoch and data).

    Returns
    -------
    TrainResult

    Raises
    ------
    DataError
        A bad case (without ``skip_bad``).
    ValueError
        No usable case, or fewer than two patients for a validation split; a split file that
        is invalid or does not fit the data (:class:`~training.splits.SplitError`); with
        ``resume``, the data changed since the run started, or the run has already finished;
        an ``init`` checkpoint whose network differs from the config's.
    FileNotFoundError
        With ``resume``: ``out_dir`` has no ``resume.pt``; no ``init`` checkpoint at that path.
    """
    schema.check_config(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed = int(config.get("seed", 0))
    seed_everything(seed)
    tcfg = config["train"]
    threads = tcfg.get("threads") or os.cpu_count() or 1
    torch.set_num_threads(int(threads))
    device = pick_device()
    refs = segment_refs(config)
    input_spec = InputSpec(**config["model"]["input"])

    root = Path(data_dir or config["data"]["train"])
    split = split if split is not None else config["data"].get("split")
    split_file = split if isinstance(split, Split) or split is None else read_split(split)
    train_cases, val_cases, skipped = _load_splits(
        root, refs, config, split_file, fold, seed, skip_bad, progress
    )
    cases = [*train_cases, *val_cases]
    _write_split(out / "split.json", train_cases, val_cases, split_file, fold)
    LOGGER.info(
        "%d training frames, %d validation frames (%d skipped)",
        sum(c.frames.shape[0] for c in train_cases),
        sum(c.frames.shape[0] for c in val_cases),
        len(skipped),
    )

    to_input = ToNetworkInput(input_spec)
    depth = int(config["network"]["depth"])
    for side in (*input_spec.size, int(tcfg.get("crop") or 0)):
        if side % 2**depth:
            raise ValueError(
                f"input size and train.crop must be divisible by 2**depth = {2**depth}, got {side}"
            )
    steps: list[Callable[[dict[str, Any]], dict[str, Any]]] = [
        *build_augmentation(config.get("augment") or {}, input_spec.modalities),
        to_input,
    ]
    if tcfg.get("crop"):
        steps.append(RandCrop(int(tcfg["crop"]), float(tcfg.get("crop_foreground", 0.8))))
    augment = Compose(steps).set_random_state(seed)
    train_set = FrameDataset(train_cases, augment)
    val_set = FrameDataset(val_cases, Compose([to_input]))
    val_samples = [val_set[i] for i in range(len(val_set))]
    val_x, val_y = _collate(val_samples)

    net_cfg = config["network"]
    net = build_unet(
        input_spec.channels, len(refs), int(net_cfg["depth"]), int(net_cfg["base_channels"])
    )
    init = init if init is not None else tcfg.get("init")
    # a resumed run has its weights from resume.pt; run.json keeps the record of its start
    warm = init and not resume
    init_record = (
        _warm_start(net, Path(init), net_cfg, input_spec, refs, train_set) if warm else None
    )
    # torch's stub omits Module.to(memory_format=...), which the runtime accepts
    net = net.to(device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    optimiser = torch.optim.AdamW(
        net.parameters(), lr=float(tcfg["lr"]), weight_decay=float(tcfg.get("weight_decay", 1e-4))
    )
    per_segment = schema.train_segments(config, [r.key for r in refs])
    weights = torch.tensor([per_segment[r.key]["weight"] for r in refs], device=device)

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return dice_bce_loss(
            logits,
            target,
            float(tcfg.get("bce_weight", 1.0)),
            float(tcfg.get("dice_weight", 1.0)),
            weights,
        )

    generator = torch.Generator().manual_seed(seed)
    loader: torch.utils.data.DataLoader[dict[str, Any]] = torch.utils.data.DataLoader(
        # DataLoader takes any map-style object (__getitem__ + __len__); its stub wants a Dataset
        cast("torch.utils.data.Dataset[dict[str, Any]]", train_set),
        batch_size=int(tcfg["batch_size"]),
        shuffle=True,
        drop_last=len(train_set) > int(tcfg["batch_size"]),
        collate_fn=_collate,
        num_workers=int(tcfg.get("num_workers", 0)),
        worker_init_fn=_worker_init,
        generator=generator,
        persistent_workers=False,
    )
    epochs = int(tcfg["epochs"])
    warmup = int(tcfg.get("warmup_epochs", 0))
    patience = int(tcfg.get("patience", epochs))
    max_minutes = tcfg.get("max_minutes")
    budget = float(max_minutes) * 60.0 if max_minutes is not None else math.inf
    meta = {
        "config": config,
        "config_path": config_path,
        "data_dir": str(root),
        "data_hash": dataset_hash(cases),
        "n_train_cases": len(train_cases),
        "n_val_cases": len(val_cases),
        "n_patients": len({c.patient_id for c in cases}),
        "seed": seed,
        "parameters": count_parameters(net),
        "device": str(device),
        "torch": torch.__version__,
        "init": init_record,
    }
    record: dict[str, Any] = {
        "status": "running",
        "config": config,
        "config_path": config_path,
        "data_dir": str(root),
        "data_hash": meta["data_hash"],
        "seed": seed,
        "versions": runrecord.package_versions(),
        "git": runrecord.git_state(),
        "device": str(device),
        "threads": int(threads),
        "budget_minutes": max_minutes,
        "split": _split_record(split_file, fold),
        "init": init_record,
    }
    generators: list[Randomizable] = [
        cast("Randomizable", t) for t in augment.transforms if isinstance(t, Randomizable)
    ]
    history: list[dict[str, float]] = []
    best_score, best_epoch, best_state = -1.0, 0, copy.deepcopy(net.state_dict())
    first_epoch = 1
    if resume:
        state = runrecord.load_resume(out)
        previous = runrecord.read_run_record(out)
        data_hash = str(meta["data_hash"])
        if state["data_hash"] != data_hash:
            raise ValueError(
                f"cannot resume {out}: the data changed since the run started "
                f"(data hash {str(state['data_hash'])[:12]} then, {data_hash[:12]} now)"
            )
        if previous.get("status") == "finished" and not previous.get("stopped", {}).get(
            "budget_hit"
        ):
            raise ValueError(
                f"cannot resume {out}: the run finished ({previous['stopped']['reason']}); "
                f"only a run stopped by the time budget or interrupted can be resumed"
            )
        net.load_state_dict(state["state_dict"])
        optimiser.load_state_dict(state["optimiser"])
        history, best_score, best_epoch = state["history"], state["best_score"], state["best_epoch"]
        best_state = state["best_state"]
        runrecord.restore_random_states([g.R for g in generators], state["augment_rng"])
        generator.set_state(state["loader_rng"])
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(state["numpy_rng"])
        first_epoch = int(state["epoch"]) + 1
        if first_epoch > epochs:
            raise ValueError(f"cannot resume {out}: all {epochs} epoch(s) are done")
        record["resumed_from_epoch"] = int(state["epoch"])
        record["init"] = meta["init"] = previous.get("init")
        LOGGER.info("resuming %s after epoch %d", out, state["epoch"])
    meta["git"], meta["versions"] = record["git"], record["versions"]
    runrecord.write_run_record(out, record)
    started = time.monotonic()
    stopped = "completed all epochs"
    budget_hit = False
    steps_per_epoch = max(len(loader), 1)
    lr = float(tcfg["lr"])
    for epoch in range(first_epoch, epochs + 1):
        net.train()
        t0 = time.monotonic()
        running, seen = 0.0, 0
        for step, (x, y) in enumerate(loader):
            # the schedule follows the epoch count only: the time budget may end a run early (at
            # an epoch boundary) but never changes the learning rate, so the same config and
            # seed give the same weights however fast the machine is
            lr = _lr_at(epoch - 1 + step / steps_per_epoch, epochs, warmup, float(tcfg["lr"]))
            for group in optimiser.param_groups:
                group["lr"] = lr
            x = x.to(device).contiguous(memory_format=torch.channels_last)
            y = y.to(device)
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn(net(x), y)
            loss.backward()
            optimiser.step()
            running += float(loss.detach()) * len(x)
            seen += len(x)
            if progress:
                progress(f"epoch {epoch}/{epochs}", step + 1, steps_per_epoch)
        val_loss, val_dice = _validate(net, val_x, val_y, device, loss_fn, int(tcfg["batch_size"]))
        score = float(np.mean(val_dice))
        row: dict[str, float] = {
            "epoch": epoch,
            "train_loss": running / max(seen, 1),
            "val_loss": val_loss,
            **{f"val_dice_{r.key}": d for r, d in zip(refs, val_dice, strict=True)},
            "val_score": score,
            "lr": lr,
            "seconds": time.monotonic() - t0,
        }
        history.append(row)
        LOGGER.info(
            "epoch %d: train loss %.4f, val loss %.4f, val Dice %s (%.0f s)",
            epoch,
            row["train_loss"],
            val_loss,
            ", ".join(f"{d:.3f}" for d in val_dice),
            row["seconds"],
        )
        _write_history(out, history)
        if score > best_score:
            best_score, best_epoch = score, epoch
            best_state = copy.deepcopy(net.state_dict())
            _save(out / "best.pt", best_state, meta, epoch, row, history, net_cfg, input_spec, refs)
        runrecord.save_resume(
            out,
            {
                "epoch": epoch,
                "state_dict": net.state_dict(),
                "optimiser": optimiser.state_dict(),
                "best_state": best_state,
                "best_score": best_score,
                "best_epoch": best_epoch,
                "history": history,
                "data_hash": meta["data_hash"],
                "augment_rng": runrecord.random_states([g.R for g in generators]),
                "loader_rng": generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "numpy_rng": np.random.get_state(),
            },
        )
        elapsed = time.monotonic() - started
        if epoch - best_epoch >= patience:
            stopped = f"early stop: no improvement for {patience} epochs"
            break
        # stop at this epoch boundary when the next epoch (as long as this one) would overrun
        if elapsed + row["seconds"] > budget and epoch < epochs:
            stopped = (
                f"time budget of {float(max_minutes or 0):g} min reached after epoch {epoch} "
                f"of {epochs} (resume with: python -m training train --resume {out})"
            )
            budget_hit = True
            break
    _save(
        out / "last.pt",
        net.state_dict(),
        meta,
        len(history),
        history[-1],
        history,
        net_cfg,
        input_spec,
        refs,
    )
    # best.pt is rewritten with the complete history (the learning curve the report shows)
    best_row = history[best_epoch - 1]
    _save(
        out / "best.pt", best_state, meta, best_epoch, best_row, history, net_cfg, input_spec, refs
    )
    record.update(
        status="finished",
        best_epoch=best_epoch,
        best_score=best_score,
        epochs_run=len(history),
        stopped={
            "reason": stopped,
            "epoch": len(history),
            "budget_minutes": max_minutes,
            "elapsed_minutes": round((time.monotonic() - started) / 60.0, 4),
            "budget_hit": budget_hit,
        },
    )
    runrecord.write_run_record(out, record)
    LOGGER.info("best epoch %d, score %.4f; %s", best_epoch, best_score, stopped)
    return TrainResult(
        out_dir=out,
        best_checkpoint=out / "best.pt",
        best_epoch=best_epoch,
        best_score=best_score,
        history=history,
        skipped=[str(e) for e in skipped],
        stopped=stopped,
    )


def _save(
    path: Path,
    state: dict[str, Any],
    meta: dict[str, Any],
    epoch: int,
    row: dict[str, float],
    history: list[dict[str, float]],
    net_cfg: dict[str, Any],
    input_spec: InputSpec,
    refs: list[SegmentRef],
) -> None:
    payload = {
        "state_dict": state,
        "network": {
            "in_channels": input_spec.channels,
            "out_channels": len(refs),
            "depth": int(net_cfg["depth"]),
            "base_channels": int(net_cfg["base_channels"]),
        },
        "epoch": epoch,
        "validation": row,
        "history": history,
        **meta,
    }
    atomic_write(path, lambda fh: torch.save(payload, fh))


def _warm_start(
    net: torch.nn.Module,
    path: Path,
    net_cfg: dict[str, Any],
    input_spec: InputSpec,
    refs: list[SegmentRef],
    train_set: FrameDataset,
) -> dict[str, Any]:
    """Load ``path``'s weights into ``net``; return what run.json records of the checkpoint.

    ``path`` is a checkpoint of an earlier run or a published version's folder
    (``models/<name>/<version>``, :mod:`training.warmstart`: its folded batch norms are
    re-calibrated on up to 64 augmented training samples). A checkpoint of another shape would
    load nothing useful (or fail deep inside torch with a list of tensor names), so the shapes
    are compared first and the error says which differs.
    """
    if warmstart.is_published_version(path):
        record = warmstart.load_published(net, path)
        samples = [train_set[i] for i in range(min(len(train_set), 64))]
        batches = [_collate(samples[i : i + 16])[0] for i in range(0, len(samples), 16)]
        record["calibration_samples"] = warmstart.calibrate_norms(net, batches)
        return record
    source, ckpt = load_checkpoint(path)
    wanted = {
        "in_channels": input_spec.channels,
        "out_channels": len(refs),
        "depth": int(net_cfg["depth"]),
        "base_channels": int(net_cfg["base_channels"]),
    }
    differs = {
        k: (ckpt["network"].get(k), v) for k, v in wanted.items() if ckpt["network"].get(k) != v
    }
    if differs:
        detail = ", ".join(f"{k} {a} there, {b} in the config" for k, (a, b) in differs.items())
        raise ValueError(
            f"cannot start from {path}: its network differs from the config's ({detail}); "
            f"fine-tune with the network section it was trained with"
        )
    net.load_state_dict(source.state_dict())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    LOGGER.info("starting from the weights of %s (epoch %s)", path, ckpt.get("epoch"))
    return {
        "checkpoint": str(path),
        "sha256": digest,
        "epoch": ckpt.get("epoch"),
        "data_dir": ckpt.get("data_dir"),
        "data_hash": ckpt.get("data_hash"),
    }


def _write_history(out: Path, history: list[dict[str, float]]) -> None:
    (out / "history.json").write_text(json.dumps(history, indent=1))
    with (out / "history.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def _load_splits(
    root: Path,
    refs: list[SegmentRef],
    config: dict[str, Any],
    split: Split | None,
    fold: int | None,
    seed: int,
    skip_bad: bool,
    progress: Callable[[str, int, int], None] | None,
) -> tuple[list[Case], list[Case], list[DataError]]:
    """(training cases, validation cases, skipped): by the split file, else by val_fraction."""
    labels = config["data"].get("nifti_labels")
    report = (lambda n: progress("load", n, 0)) if progress else None
    if split is None:
        if fold is not None:
            raise SplitError(
                f"--fold {fold} needs a split file with folds (--split FILE or data.split; "
                f"python -m training split DATA --folds N writes one)"
            )
        cases, skipped = load_dataset(
            root, refs, skip_bad=skip_bad, nifti_labels=labels, progress=report
        )
        train_cases, val_cases = patient_split(
            cases, float(config["data"].get("val_fraction", 0.15)), seed
        )
        if not val_cases:
            raise ValueError(
                f"validation split is empty: {len(cases)} case(s) from "
                f"{len({c.patient_id for c in cases})} patient(s); need at least two patients"
            )
        return train_cases, val_cases, skipped
    # only the listed training and validation folders are opened: the test split stays unread
    train_folders, val_folders, owner = select_folders(split, root, fold)
    train_cases, skipped = load_dataset(
        root, refs, skip_bad=skip_bad, nifti_labels=labels, progress=report, folders=train_folders
    )
    val_cases, skipped_val = load_dataset(
        root, refs, skip_bad=skip_bad, nifti_labels=labels, folders=val_folders
    )
    for case in [*train_cases, *val_cases]:
        expected = owner[case.name]
        if case.patient_id not in (expected, case.name):
            raise SplitError(
                f"{split.path}: case folder {case.name!r} is listed for patient {expected!r} "
                f"but its images have another PatientID; fix the split file (python -m "
                f"training split writes it from the headers)"
            )
    return train_cases, val_cases, [*skipped, *skipped_val]


def _split_record(split: Split | None, fold: int | None) -> dict[str, Any] | None:
    if split is None:
        return None
    return {"file": str(split.path), "sha256": split.sha256, "fold": fold}


def _write_split(
    path: Path,
    train_cases: list[Case],
    val_cases: list[Case],
    split: Split | None = None,
    fold: int | None = None,
) -> None:
    data: dict[str, Any] = {
        "train": sorted(c.name for c in train_cases),
        "val": sorted(c.name for c in val_cases),
        "train_patients": len({c.patient_id for c in train_cases}),
        "val_patients": len({c.patient_id for c in val_cases}),
    }
    if split is not None:
        data.update(split_file=str(split.path), fold=fold, test_patients=len(split.test))
    path.write_text(json.dumps(data, indent=1))


def load_checkpoint(path: Path | str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the network from a checkpoint; returns (network in eval mode, checkpoint dict).

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        The file is not a training checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "network" not in ckpt:
        raise ValueError(f"{path} is not a training checkpoint (no state_dict/network)")
    from training.unet import UNet

    net = UNet(**ckpt["network"])
    net.load_state_dict(ckpt["state_dict"])
    net.eval()
    return net, ckpt
