"""Fine-tune from a published model version when its training run is gone.

A model store keeps ``model.onnx`` and ``manifest.yaml``, not the checkpoint: a run folder may
be deleted, or live on another machine. ``train --init models/<name>/<version>`` rebuilds the
training network from the served graph, so a developer can fine-tune the version the node serves
(MLflow's "start from a registered model").

Export folds each batch normalisation into the convolution before it (``W' = W g / s``,
``b' = beta - m g / s``), so the ONNX graph holds ``W'`` and ``b'`` only. Loading ``W'`` into the
convolution and ``b'`` into the norm's shift reproduces the served model exactly in eval mode,
but training normalises by *batch* statistics, which would throw the folded scale and shift
away at the first step. So the norms are then calibrated on training samples: with ``m`` and
``s`` the per-channel mean and standard deviation of ``W' x`` over those samples, running stats
``(m, s**2)``, scale ``sqrt(s**2 + eps)`` and shift ``b' + m`` give the same output in eval
mode (exactly) and in train mode (up to the batch's own statistics).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

LOGGER = logging.getLogger(__name__)


class PublishedModelError(ValueError):
    """A published version that cannot start a training run (what differs, what to do)."""


def is_published_version(path: Path) -> bool:
    """True for a model-store version folder (``manifest.yaml`` beside the model file)."""
    return path.is_dir() and (path / "manifest.yaml").is_file()


def load_published(net: nn.Module, version_dir: Path) -> dict[str, Any]:
    """Load the weights of ``version_dir``'s ONNX graph into ``net`` (norms still uncalibrated).

    Returns what ``run.json`` records of the start. Raises :class:`PublishedModelError` when the
    graph does not fit ``net`` (another depth, width or number of segments).
    """
    import onnx
    from onnx import numpy_helper

    from dicom_node.modelstore.manifest import load_manifest

    manifest = load_manifest(version_dir / "manifest.yaml")
    model_path = version_dir / manifest.model_file
    graph = onnx.load(str(model_path)).graph
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    modules = dict(net.named_modules())
    loaded: set[str] = set()
    for node in graph.node:
        if node.op_type not in ("Conv", "ConvTranspose"):
            continue
        name = _module_name(node.name)
        conv = modules.get(name)
        if not isinstance(conv, nn.Conv2d | nn.ConvTranspose2d):
            raise PublishedModelError(
                f"{model_path}: its layer {name!r} is not in the config's network; fine-tune "
                f"with the network section version {manifest.version} was trained with"
            )
        w = weights[node.input[1]]
        b = weights[node.input[2]] if len(node.input) > 2 else np.zeros(w.shape[0], np.float32)
        _copy(conv.weight, w, model_path, name)
        norm = _norm_after(modules, name)
        if norm is not None:
            _copy(norm.bias, b, model_path, name)
            running_mean, running_var = _running_stats(norm)
            running_mean.zero_()
            running_var.fill_(1.0)
            with torch.no_grad():
                norm.weight.fill_(float(np.sqrt(1.0 + norm.eps)))
            loaded.add(_norm_name(name))
        elif conv.bias is not None:
            _copy(conv.bias, b, model_path, name)
        loaded.add(name)
    expected = {n for n, m in modules.items() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)}
    if missing := sorted(expected - loaded):
        raise PublishedModelError(
            f"{model_path} has no weights for {', '.join(missing)}: the config's network is "
            f"larger than version {manifest.version}'s"
        )
    digest = hashlib.sha256(model_path.read_bytes()).hexdigest()
    LOGGER.info("starting from %s version %s (%s)", manifest.name, manifest.version, model_path)
    return {
        "model": manifest.name,
        "version": manifest.version,
        "model_file": str(model_path),
        "sha256": digest,
        "data_dir": manifest.provenance.get("data_dir") if manifest.provenance else None,
        "data_hash": manifest.provenance.get("data_hash") if manifest.provenance else None,
    }


@torch.no_grad()
def calibrate_norms(net: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Set every batch norm's statistics from ``batches`` without changing eval output.

    Returns the number of samples used.
    """
    modules = dict(net.named_modules())
    pairs = {
        name: norm
        for name, mod in modules.items()
        if isinstance(mod, nn.Conv2d) and (norm := _norm_after(modules, name)) is not None
    }
    sums: dict[str, list[torch.Tensor]] = {n: [] for n in pairs}
    hooks = [
        modules[name].register_forward_hook(_collector(sums[name]))  # conv output, before norm
        for name in pairs
    ]
    net.eval()
    n = 0
    try:
        for x in batches:
            net(x)
            n += int(x.shape[0])
    finally:
        for hook in hooks:
            hook.remove()
    if n == 0:
        raise ValueError("no samples to calibrate the batch norms on")
    for name, norm in pairs.items():
        stacked = torch.stack(sums[name])  # (batches, 3, C): count, sum, sum of squares
        count, total, squares = stacked.sum(0)
        mean = total / count
        var = (squares / count - mean**2).clamp_min(1e-8)
        shift = norm.bias.detach().clone()
        running_mean, running_var = _running_stats(norm)
        running_mean.copy_(mean)
        running_var.copy_(var)
        norm.weight.copy_(torch.sqrt(var + norm.eps))
        norm.bias.copy_(shift + mean)
    return n


def _collector(store: list[torch.Tensor]) -> Any:
    def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        per_channel = output.transpose(0, 1).reshape(output.shape[1], -1).double()
        count = torch.full_like(per_channel[:, 0], per_channel.shape[1])
        store.append(torch.stack([count, per_channel.sum(1), (per_channel**2).sum(1)]).float())

    return hook


def _module_name(node_name: str) -> str:
    """``/down.0/down.0.3/Conv`` -> ``down.0.3``, ``/head/Conv`` -> ``head`` (TorchScript)."""
    parts = [p for p in node_name.split("/") if p]
    return parts[-2] if len(parts) >= 2 else parts[0]


def _norm_name(conv_name: str) -> str:
    head, _, index = conv_name.rpartition(".")
    return f"{head}.{int(index) + 1}" if index.isdigit() else ""


def _norm_after(modules: dict[str, nn.Module], conv_name: str) -> nn.BatchNorm2d | None:
    norm = modules.get(_norm_name(conv_name))
    return norm if isinstance(norm, nn.BatchNorm2d) else None


def _running_stats(norm: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    # the training network's norms always track statistics (unet.DoubleConv)
    if norm.running_mean is None or norm.running_var is None:
        raise PublishedModelError("a batch norm without running statistics cannot be calibrated")
    return norm.running_mean, norm.running_var


def _copy(param: torch.Tensor, value: np.ndarray, path: Path, name: str) -> None:
    if tuple(param.shape) != tuple(value.shape):
        raise PublishedModelError(
            f"{path}: layer {name!r} is {tuple(value.shape)} there and {tuple(param.shape)} in "
            f"the config's network; fine-tune with the network section it was trained with"
        )
    with torch.no_grad():
        param.copy_(torch.from_numpy(np.array(value, dtype=np.float32)))
