"""Export a training checkpoint to an ONNX model version with its ``manifest.yaml``.

The version folder holds ``model.onnx`` (opset >= 17, dynamic batch axis, batch norm folded by
the exporter's constant folding), ``manifest.yaml`` (the contract in BRIEF/DESIGN: input,
output, segments with SNOMED codes, sha256, provenance and evaluation metrics) and
``training_history.json`` (the learning curve, shown by ``evaluate``).

torch 2.13 defaults to the dynamo exporter, which needs ``onnxscript``; we use the TorchScript
exporter (``dynamo=False``). Either way the export is checked against PyTorch on probe inputs
(a synthetic study through the node's own preprocessing, random noise, a constant image, with
batch sizes 1 and 3): a max absolute logit difference above ``PARITY_TOLERANCE`` fails.
"""

from __future__ import annotations

import copy
import datetime as _dt
import io
import json
import logging
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ruamel.yaml import YAML

from dicom_node.modelstore.files import atomic_write, fsync_dir, sha256_file
from dicom_node.modelstore.manifest import MANIFEST_FILE, InputSpec, parse_manifest
from dicom_node.modelstore.processing import Preprocess
from training.confidence_eval import confidence_block
from training.data import load_dataset
from training.schema import check_keys, inference_settings, measurement_settings
from training.train import load_checkpoint, segment_refs

LOGGER = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4
"""Largest accepted max |ONNX Runtime - PyTorch| logit difference on the probe inputs."""

HISTORY_FILE = "training_history.json"
"""Learning curve written next to the model (read by ``evaluate``)."""


REFERENCE_DIR = "reference"
"""Folder (inside the version folder) of the promotion gate's reference cases."""


def copy_reference(
    source: Path, target: Path, n: int, nifti_labels: dict[str, list[int]] | None = None
) -> list[Path]:
    """Copy the first ``n`` case folders of ``source`` to ``target`` (the gate's reference set).

    A case folder is any training case (:mod:`dicom_node.modelstore.cases`): one or more DICOM
    files and ``truth.npz``, a SEG or NIfTI masks; its files are copied as they are (not its
    sub-folders). ``nifti_labels`` (the config's) is written as ``labels.yaml`` so that the gate
    decodes label maps as training did.

    Raises
    ------
    ValueError
        ``source`` holds no case folder with files.
    """
    folders = [
        p
        for p in sorted(source.iterdir())
        if p.is_dir() and not p.name.startswith(".") and any(f.is_file() for f in p.iterdir())
    ][:n]
    if not folders:
        raise ValueError(
            f"reference folder {source} has no case folder (DICOM images + truth.npz, a SEG or "
            f"NIfTI masks)"
        )
    copied = []
    for folder in folders:
        dest = target / folder.name
        dest.mkdir(parents=True, exist_ok=True)
        for path in sorted(folder.iterdir()):
            if path.is_file():
                shutil.copyfile(path, dest / path.name)
        copied.append(dest)
    if nifti_labels:
        lines = [f"{key}: {[int(v) for v in values]}" for key, values in nifti_labels.items()]
        (target / "labels.yaml").write_text(
            "# NIfTI label values per segment key (from the training config)\n"
            + "\n".join(lines)
            + "\n"
        )
    return copied


class ParityError(RuntimeError):
    """The exported ONNX model does not reproduce the PyTorch outputs."""


@dataclass
class ExportResult:
    """What :func:`export_model` wrote."""

    onnx_path: Path
    manifest_path: Path
    sha256: str
    size_bytes: int
    max_abs_diff: float
    manifest: dict[str, Any]


def git_commit(cwd: Path | None = None) -> str | None:
    """HEAD commit of the repository around ``cwd``, or None (no git, no commit yet)."""
    try:
        proc = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


INFERENCE_FILE_KEYS = (
    "postprocess",
    "tta",
    "probabilities",
    "thresholds",
    "measurements",
    "confidence",
)
"""Keys of ``export --inference FILE``: the training config's inference keys and thresholds, the
report's ``measurements`` and the ``confidence`` settings (its threshold is chosen on a validation
report, after training; none of them changes the weights, so a trained run can take them)."""


def with_inference(config: dict[str, Any], inference: Any, source: str = "inference") -> dict:
    """A copy of training ``config`` whose ``model`` takes the inference settings given.

    ``inference``: ``postprocess``, ``tta``, ``probabilities``, ``measurements``,
    ``confidence`` (replacing the config's ``model.`` keys) and ``thresholds: {segment key:
    value}`` (each segment's ``threshold``).

    Raises
    ------
    ValueError
        An unknown key (with "did you mean"), an unknown segment, or a value the manifest
        would refuse.
    """
    settings = check_keys(inference or {}, INFERENCE_FILE_KEYS, source)
    out = copy.deepcopy(config)
    model = out["model"]
    keys = [str(seg.get("key")) for seg in model.get("segments") or []]
    thresholds = check_keys(settings.pop("thresholds", None) or {}, keys, f"{source}: thresholds")
    model.update(settings)
    inference_settings(model, keys, source)
    measurement_settings(model, keys, source)
    for seg in model.get("segments") or []:
        if seg.get("key") in thresholds:
            value = thresholds[seg["key"]]
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
                raise ValueError(
                    f"{source}: thresholds.{seg['key']} must be a number between 0 and 1, "
                    f"got {value!r}"
                )
            seg["threshold"] = float(value)
    return out


def probe_inputs(input_spec: InputSpec) -> list[np.ndarray]:
    """Probe batches (N, C, h, w) for the parity check: a phantom study, noise, a constant."""
    from dicom_node.demo.phantoms import make_case

    pre = Preprocess(input_spec)
    rows = input_spec.size[0]
    studies = [pre(make_case(seed, max(32, rows)).dataset.pixel_array) for seed in (11, 12, 13)]
    rng = np.random.default_rng(0)
    noise = rng.random((1, input_spec.channels, *input_spec.size), dtype=np.float32)
    const = np.full((1, input_spec.channels, *input_spec.size), 0.5, dtype=np.float32)
    return [np.stack(studies[:1]), np.stack(studies), noise, const]


def parity_check(net: torch.nn.Module, onnx_bytes: bytes, probes: list[np.ndarray]) -> float:
    """Largest |ONNX Runtime - PyTorch| over the probes; the ONNX model runs on CPU."""
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    worst = 0.0
    with torch.no_grad():
        for batch in probes:
            expected = net(torch.from_numpy(batch)).numpy()
            got = session.run(None, {name: batch})[0]
            if got.shape != expected.shape:
                raise ParityError(
                    f"ONNX output shape {got.shape} differs from PyTorch's {expected.shape}"
                )
            worst = max(worst, float(np.abs(got - expected).max()))
    return worst


def report_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """Manifest ``metrics`` from an evaluation report (means, detection, per matrix size)."""
    metrics: dict[str, Any] = {
        key: {k: _round(v) for k, v in values.items()} for key, values in report["mean"].items()
    }
    for key, det in (report.get("detection") or {}).items():
        metrics[f"{key}_fp_per_image"] = _round(det.get("fp_per_image"))
        metrics[f"{key}_sensitivity"] = _round(det.get("sensitivity"))
    metrics["n_images"] = report.get("n_images")
    if report.get("by_size"):
        metrics["by_size"] = {
            str(size): {
                **{k: {m: _round(v) for m, v in vals.items()} for k, vals in part["mean"].items()},
                **{
                    f"{key}_fp_per_image": _round(det["fp_per_image"])
                    for key, det in (part.get("detection") or {}).items()
                },
                "n_images": part["n_images"],
            }
            for size, part in report["by_size"].items()
        }
    flags = report.get("confidence")
    if flags:  # does the low-confidence flag catch the worst results (training.confidence_eval)
        metrics["confidence"] = {
            "worst_fraction": flags["worst_fraction"],
            "worst_images": flags["worst"]["n"],
            "worst_flagged": flags["worst"]["flagged"],
            "worst_recall": _round(flags["worst"]["recall"]),
            "other_images": flags["good"]["n"],
            "other_flagged": flags["good"]["flagged"],
            "other_false_alarm_rate": _round(flags["good"]["false_alarm_rate"]),
            "precision": _round(flags["precision"]),
        }
    if report.get("strata"):  # lesion sensitivity per location / size / counts stratum
        metrics["strata"] = {
            key: {
                f"{group}: {name}": {
                    "lesions": row["lesions"],
                    "sensitivity": _round(row["sensitivity"]),
                }
                for group, rows in groups.items()
                for name, row in rows.items()
            }
            for key, groups in report["strata"].items()
        }
    if report.get("data"):
        metrics["evaluated_on"] = report["data"]
    return metrics


def training_confidence(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The manifest's ``confidence:`` block of a checkpoint: the config's ``model.confidence``
    (default: entropy) with the ``ood`` ranges measured on the training data (the
    checkpoint's ``data_dir``; without it, no ``ood`` block and a warning)."""
    config = ckpt["config"]
    wanted = config["model"].get("confidence")
    root = Path(str(ckpt.get("data_dir") or ""))
    cases: list[Any] = []
    if wanted is None or wanted.get("ood", True):
        try:
            cases, _ = load_dataset(
                root,
                segment_refs(config),
                skip_bad=True,
                nifti_labels=config["data"].get("nifti_labels"),
            )
        except (OSError, ValueError) as exc:  # moved or deleted since training
            LOGGER.warning("no input provenance in the manifest: training data %s: %s", root, exc)
    if not cases:
        wanted = {**(wanted or {}), "ood": False}
    return confidence_block(wanted, cases)


def _round(value: Any) -> Any:
    if isinstance(value, float):
        return None if value != value else round(value, 4)
    return value


def _export(
    net: torch.nn.Module,
    dummy: torch.Tensor,
    buffer: io.BytesIO,
    in_name: str,
    out_name: str,
    opset: int,
) -> None:
    torch.onnx.export(
        net,
        (dummy,),
        # the TorchScript exporter (dynamo=False) writes to file objects; the stub lists paths only
        buffer,  # type: ignore[arg-type]
        input_names=[in_name],
        output_names=[out_name],
        dynamic_axes={in_name: {0: "batch"}, out_name: {0: "batch"}},
        opset_version=opset,
        do_constant_folding=True,
        dynamo=False,
    )


def export_model(
    checkpoint: Path | str,
    out: Path | str,
    *,
    name: str | None = None,
    version: str | None = None,
    report: Path | str | list[Path | str] | None = None,
    opset: int = 17,
    reference: Path | str | None = None,
    reference_n: int = 12,
    inference: dict[str, Any] | None = None,
) -> ExportResult:
    """Export ``checkpoint`` to ``out/model.onnx`` + ``out/manifest.yaml``.

    Parameters
    ----------
    checkpoint : path
        ``best.pt`` from ``train``.
    out : path
        Version folder to create; its name is the version unless ``version`` is given.
    name : str, optional
        Model name; default the config's ``model.name``.
    version : str, optional
        Version string; default ``out``'s folder name.
    report : path or list of paths, optional
        ``report.json`` from ``evaluate``; its figures become the manifest's ``metrics``. With
        several, the first gives the top-level figures and every one is also recorded under
        ``metrics.evaluations.<name of the report's folder>`` (e.g. the training style's and an
        independent style's held-out test, :mod:`dicom_node.demo.phantoms_alt`).
    opset : int
        ONNX opset, at least 17.
    reference : path, optional
        Case folders (any training case: :func:`copy_reference`); the first ``reference_n`` are
        copied into
        ``out/reference`` and named as the manifest's ``reference_data``, the set the promotion
        gate (``dicom-node models promote``) compares versions on.
    reference_n : int
        How many reference cases to copy.
    inference : dict, optional
        ``postprocess``, ``tta``, ``probabilities``, ``measurements`` and ``thresholds``
        (``{segment key: threshold}``) chosen after training on validation data
        (:func:`with_inference`):
        they replace the training config's ``model.`` keys in the manifest and in the
        recorded config.

    Returns
    -------
    ExportResult

    Raises
    ------
    ParityError
        ONNX Runtime and PyTorch disagree by more than ``PARITY_TOLERANCE``.
    ValueError
        ``opset`` below 17, an existing non-empty ``out``, an invalid manifest or reference set.

    Notes
    -----
    Atomic: everything is written into a hidden temporary folder beside ``out`` and renamed to
    ``out`` at the end, so a failed export (parity, a bad reference set, an invalid manifest)
    leaves nothing behind and the same command can simply be run again.
    """
    if opset < 17:
        raise ValueError(f"opset must be at least 17, got {opset!r}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(
            f"{out} already exists and is not empty; versions are immutable, pick a new folder"
        )
    net, ckpt = load_checkpoint(checkpoint)
    if inference is not None:
        ckpt = {**ckpt, "config": with_inference(ckpt["config"], inference)}
    config = ckpt["config"]
    model_cfg = config["model"]
    input_spec = InputSpec(**model_cfg["input"])
    out_name = model_cfg["output"]["name"]
    dummy = torch.zeros(1, input_spec.channels, *input_spec.size)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # the TorchScript exporter is deprecated in favour of dynamo, which needs onnxscript
        warnings.simplefilter("ignore", DeprecationWarning)
        _export(net, dummy, buffer, input_spec.name, out_name, opset)
    onnx_bytes = buffer.getvalue()
    diff = parity_check(net, onnx_bytes, probe_inputs(input_spec))
    if not diff <= PARITY_TOLERANCE:
        raise ParityError(
            f"ONNX Runtime differs from PyTorch by {diff:.3g} (max abs logit), "
            f"tolerance {PARITY_TOLERANCE:g}; not exporting"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    work.chmod(0o755)  # mkdtemp makes it 0700; the version folder is meant to be shared
    try:
        return _write_version(
            work,
            out,
            ckpt,
            onnx_bytes,
            diff,
            name,
            version,
            report,
            opset,
            reference,
            reference_n,
        )
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _write_version(
    work: Path,
    out: Path,
    ckpt: dict[str, Any],
    onnx_bytes: bytes,
    diff: float,
    name: str | None,
    version: str | None,
    report: Path | str | list[Path | str] | None,
    opset: int,
    reference: Path | str | None,
    reference_n: int,
) -> ExportResult:
    """Write the version into ``work``, then rename ``work`` to ``out`` (the last step)."""
    config = ckpt["config"]
    model_cfg = config["model"]
    input_spec = InputSpec(**model_cfg["input"])
    atomic_write(work / "model.onnx", onnx_bytes)
    digest = sha256_file(work / "model.onnx")
    metrics: dict[str, Any] = {}
    reports = [report] if isinstance(report, str | Path) else list(report or [])
    if reports:
        metrics = report_metrics(json.loads(Path(reports[0]).read_text()))
    if len(reports) > 1:
        metrics["evaluations"] = {
            Path(r).parent.name: report_metrics(json.loads(Path(r).read_text())) for r in reports
        }
    validation = ckpt.get("validation") or {}
    manifest = {
        "name": name or model_cfg["name"],
        "version": str(version or out.name),
        "description": model_cfg.get("description", ""),
        "created": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model_file": "model.onnx",
        "sha256": digest,
        "input": input_spec.model_dump(mode="json", exclude_none=True),
        "output": model_cfg["output"],
        "segments": model_cfg["segments"],
        "reference_data": REFERENCE_DIR if reference is not None else None,
        "confidence": training_confidence(ckpt),
        # how the node and evaluate run it (model.postprocess / tta / probabilities), if set
        **inference_settings(model_cfg, [str(s.get("key")) for s in model_cfg["segments"]]),
        # what the node's report measures per segment (model.measurements), if set
        **measurement_settings(model_cfg, [str(s.get("key")) for s in model_cfg["segments"]]),
        "provenance": {
            "data_hash": ckpt.get("data_hash"),
            "data_dir": ckpt.get("data_dir"),
            "n_patients": ckpt.get("n_patients"),
            "n_train_cases": ckpt.get("n_train_cases"),
            "n_val_cases": ckpt.get("n_val_cases"),
            "seed": ckpt.get("seed"),
            "config_path": ckpt.get("config_path"),
            "config": config,
            "git_commit": git_commit(),
            "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "best_epoch": ckpt.get("epoch"),
            "validation": {k: _round(v) for k, v in validation.items()},
            "parameters": ckpt.get("parameters"),
            "torch": ckpt.get("torch"),
            "training_git": ckpt.get("git"),
            "versions": ckpt.get("versions"),
            "onnx_opset": opset,
            "parity_max_abs_diff": float(f"{diff:.3g}"),
        },
        "metrics": metrics,
    }
    parse_manifest(json.loads(json.dumps(manifest)), source=str(out / MANIFEST_FILE))
    if reference is not None:
        copy_reference(
            Path(reference),
            work / REFERENCE_DIR,
            reference_n,
            (config.get("data") or {}).get("nifti_labels"),
        )
    yaml = YAML()
    yaml.default_flow_style = None
    yaml.width = 100
    text = io.StringIO()
    yaml.dump(json.loads(json.dumps(manifest)), text)
    history = ckpt.get("history") or []
    if history:
        atomic_write(work / HISTORY_FILE, json.dumps(history, indent=1))
    atomic_write(work / MANIFEST_FILE, text.getvalue())
    if out.exists():
        out.rmdir()  # empty (checked before the export started); a race makes this fail loudly
    work.rename(out)  # last: the version folder appears whole or not at all
    fsync_dir(out.parent)
    onnx_path = out / "model.onnx"
    LOGGER.info("exported %s (%d bytes), parity %.2e", onnx_path, onnx_path.stat().st_size, diff)
    return ExportResult(
        onnx_path=onnx_path,
        manifest_path=out / MANIFEST_FILE,
        sha256=digest,
        size_bytes=onnx_path.stat().st_size,
        max_abs_diff=diff,
        manifest=manifest,
    )
