"""Real, tiny ONNX segmentation models for tests (built with ``onnx.helper``, no torch).

The models follow the manifest contract of ``models/<name>/<version>/``: input ``image``
(N x 1 x H x W float32, dynamic batch), output ``logits`` (N x 2 x H x W float32, sigmoid
activation). On an image normalised to [0, 1] (manifest normalisation ``minmax``) they give
plausible masks on a thyroid-like blob image such as :func:`thyroid_like_image`:

* channel 0 (``thyroid``): ``K * (AvgPool3x3(x) - 0.25)``, i.e. bright tissue;
* channel 1 (``nodule``): ``K * min(AvgPool11x11(x) - x - 0.12, AvgPool11x11(x) - 0.35)``, i.e.
  pixels clearly darker than a bright neighbourhood (cold spots inside the thyroid).

Variants:

``ok``
    The model above.
``worse``
    A deliberately worse model (thyroid threshold 0.7: much smaller thyroid masks; nodule
    channel never positive), for promotion-gate tests.
``shifted``
    Same as ``ok`` but with thyroid threshold 0.3: valid and slightly different, for shadow
    agreement or canary tests that need two distinguishable versions with the same contract.
``empty``
    A useless model: no channel is ever positive (it predicts nothing), for the promotion
    gate's floor and for shadow agreement on empty predictions.
``invalid_onnx``
    ``model.onnx`` holds bytes that are not an ONNX model (the manifest sha256 still matches,
    so the store accepts it and the failure shows at load time).
``wrong_output_shape``
    Output has one channel only (N x 1 x H x W), so it does not cover segment channel 1.

Typical use::

    store_root = make_store(tmp_path / "models", versions=["1", "2"], production="1")
    path = write_model_version(tmp_path / "incoming", version="3", variant="worse")
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper
from ruamel.yaml import YAML

from dicom_node.modelstore.files import sha256_file

OPSET = 17
"""ONNX opset of the generated models."""

GAIN = 20.0
"""Logit gain K: large enough that sigmoid(logit) is nearly binary away from the threshold."""

VARIANTS = ("ok", "worse", "shifted", "invalid_onnx", "wrong_output_shape", "empty")
"""Model variants :func:`build_model` and :func:`write_model_version` know."""

DEFAULT_SEGMENTS: list[dict[str, Any]] = [
    {
        "key": "thyroid",
        "label": "Thyroid",
        "channel": 0,
        "category": {"value": "123037004", "scheme": "SCT", "meaning": "Anatomical Structure"},
        "type": {"value": "69748006", "scheme": "SCT", "meaning": "Thyroid structure"},
        "color": [255, 96, 0],
    },
    {
        "key": "nodule",
        "label": "Cold nodule",
        "channel": 1,
        "category": {
            "value": "49755003",
            "scheme": "SCT",
            "meaning": "Morphologically Altered Structure",
        },
        "type": {"value": "27925004", "scheme": "SCT", "meaning": "Nodule"},
        "color": [0, 160, 255],
    },
]
"""The thyroid/nodule segment list of the manifest contract (deep-copy before editing)."""


def _const(name: str, value: float) -> onnx.NodeProto:
    return helper.make_node(
        "Constant",
        [],
        [name],
        value=helper.make_tensor(name + "_t", TensorProto.FLOAT, [], [value]),
    )


def _avgpool(inp: str, out: str, k: int) -> onnx.NodeProto:
    pad = k // 2
    return helper.make_node(
        "AveragePool",
        [inp],
        [out],
        kernel_shape=[k, k],
        pads=[pad, pad, pad, pad],
        strides=[1, 1],
        count_include_pad=0,
    )


def build_model(
    variant: str = "ok", size: tuple[int, int] | None = (64, 64), gain: float = GAIN
) -> bytes:
    """Return the serialised ONNX model of ``variant``.

    Parameters
    ----------
    variant:
        One of :data:`VARIANTS` except ``invalid_onnx``.
    size:
        Declared spatial input size (rows, cols); ``None`` declares symbolic ``H``/``W``.
        The operators are size-agnostic either way.
    gain:
        Logit gain.

    Raises
    ------
    ValueError
        Unknown variant.
    """
    if variant not in VARIANTS or variant == "invalid_onnx":
        allowed = tuple(v for v in VARIANTS if v != "invalid_onnx")
        raise ValueError(f"variant must be one of {allowed}, got {variant!r}")
    rows, cols = size if size is not None else ("H", "W")
    thr = {"ok": 0.25, "worse": 0.7, "shifted": 0.3, "wrong_output_shape": 0.25, "empty": 10.0}[
        variant
    ]
    nodes = [
        _const("gain", gain),
        _const("thr", thr),
        _avgpool("image", "avg3", 3),
        helper.make_node("Sub", ["avg3", "thr"], ["t0"]),
        helper.make_node("Mul", ["t0", "gain"], ["thyroid"]),
    ]
    if variant == "wrong_output_shape":
        nodes.append(helper.make_node("Identity", ["thyroid"], ["logits"]))
        channels = 1
    else:
        nodes += [
            _const("cold", 0.12 if variant not in ("worse", "empty") else 5.0),
            _const("bright", 0.35),
            _avgpool("image", "avg11", 11),
            helper.make_node("Sub", ["avg11", "image"], ["diff"]),
            helper.make_node("Sub", ["diff", "cold"], ["n1"]),
            helper.make_node("Sub", ["avg11", "bright"], ["n2"]),
            helper.make_node("Min", ["n1", "n2"], ["n3"]),
            helper.make_node("Mul", ["n3", "gain"], ["nodule"]),
            helper.make_node("Concat", ["thyroid", "nodule"], ["logits"], axis=1),
        ]
        channels = 2
    graph = helper.make_graph(
        nodes,
        f"tiny-seg-{variant}",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, rows, cols])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", channels, rows, cols])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="dicom-node-tests",
    )
    model.ir_version = 8  # readable by every onnxruntime >= 1.10
    onnx.checker.check_model(model)
    return model.SerializeToString()


def thyroid_like_image(
    shape: tuple[int, int] = (64, 64), seed: int = 0, counts: float = 400.0
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Return a planar-NM-like frame (uint16) with two bright lobes and one cold spot, plus truth.

    Returns
    -------
    image, truth:
        ``image`` has ``shape`` and dtype uint16 (Poisson counts); ``truth`` maps ``thyroid`` and
        ``nodule`` to boolean arrays of ``shape``.
    """
    rng = np.random.default_rng(seed)
    rows, cols = shape
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float64)
    yy /= rows
    xx /= cols
    jitter = rng.uniform(-0.02, 0.02, size=4)
    left = ((xx - 0.36 - jitter[0]) / 0.11) ** 2 + ((yy - 0.5 - jitter[1]) / 0.22) ** 2 <= 1
    right = ((xx - 0.64 - jitter[2]) / 0.11) ** 2 + ((yy - 0.5 - jitter[3]) / 0.22) ** 2 <= 1
    thyroid = left | right
    nodule = ((xx - 0.64 - jitter[2]) ** 2 + (yy - 0.45 - jitter[3]) ** 2) <= 0.05**2
    activity = np.where(thyroid, 1.0, 0.04)
    activity = np.where(nodule, 0.15, activity)
    image = rng.poisson(activity * counts).astype(np.uint16)
    return image, {"thyroid": thyroid, "nodule": nodule & thyroid}


def manifest_dict(
    name: str = "thyroid-seg",
    version: str = "1",
    sha256: str = "0" * 64,
    size: tuple[int, int] = (64, 64),
    modalities: Sequence[str] = ("NM",),
    segments: list[dict[str, Any]] | None = None,
    metrics: dict[str, Any] | None = None,
    reference_data: str | None = None,
) -> dict[str, Any]:
    """Return a valid manifest mapping for a tiny test model."""
    import copy

    return {
        "name": name,
        "version": str(version),
        "description": f"tiny test model {name} {version}",
        "created": "2026-11-24T05:00:00Z",
        "model_file": "model.onnx",
        "sha256": sha256,
        "input": {
            "name": "image",
            "size": [int(size[0]), int(size[1])],
            "channels": 1,
            "modalities": list(modalities),
            "normalization": {"method": "minmax"},
        },
        "output": {"name": "logits", "activation": "sigmoid", "threshold": 0.5},
        "segments": copy.deepcopy(segments if segments is not None else DEFAULT_SEGMENTS),
        "reference_data": reference_data,
        "provenance": {"generator": "tests/helpers/onnx_models.py"},
        "metrics": metrics
        if metrics is not None
        else {"thyroid": {"dice": 0.9}, "nodule": {"dice": 0.5}},
    }


def write_yaml(path: Path, data: Any) -> None:
    """Write ``data`` as block-style YAML."""
    yaml = YAML(typ="safe")
    yaml.default_flow_style = False
    with open(path, "w", encoding="utf-8") as handle:
        yaml.dump(data, handle)


def write_model_version(
    dest_dir: Path,
    name: str = "thyroid-seg",
    version: str = "1",
    size: tuple[int, int] = (64, 64),
    variant: str = "ok",
    modalities: Iterable[str] = ("NM",),
    segments: list[dict[str, Any]] | None = None,
    metrics: dict[str, Any] | None = None,
    reference_data: str | None = None,
) -> Path:
    """Write a version folder ``dest_dir/<version>`` with ``model.onnx`` and ``manifest.yaml``.

    The folder is what ``ModelStore.add`` and ``dicom-node models add`` take. The manifest's
    sha256 matches the written ``model.onnx`` for every variant.

    Parameters
    ----------
    dest_dir:
        Parent folder (created if missing); the version folder is ``dest_dir / version``.
    size:
        ``input.size`` of the manifest (the network's rows, cols).
    variant:
        One of :data:`VARIANTS`.
    segments:
        Segment list override (default :data:`DEFAULT_SEGMENTS`), e.g. to make a contract change.

    Returns
    -------
    Path
        The version folder.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    folder = Path(dest_dir) / str(version)
    folder.mkdir(parents=True, exist_ok=False)
    model_path = folder / "model.onnx"
    if variant == "invalid_onnx":
        model_path.write_bytes(b"this is not an ONNX model\x00\x01\x02")
    else:
        model_path.write_bytes(build_model(variant, tuple(size)))
    manifest = manifest_dict(
        name=name,
        version=str(version),
        sha256=sha256_file(model_path),
        size=tuple(size),
        modalities=tuple(modalities),
        segments=segments,
        metrics=metrics,
        reference_data=reference_data,
    )
    write_yaml(folder / "manifest.yaml", manifest)
    return folder


def make_store(
    root: Path,
    versions: Iterable[str | tuple[str, str]] = ("1",),
    production: str | None = "1",
    name: str = "thyroid-seg",
    size: tuple[int, int] = (64, 64),
    aliases: dict[str, Any] | None = None,
) -> Path:
    """Create a model store at ``root`` with one model and the given versions.

    Versions are written directly (not through ``ModelStore.add``), so this works without the
    store code and can create deliberately broken versions.

    Parameters
    ----------
    versions:
        Version strings (variant ``ok``) or ``(version, variant)`` pairs.
    production:
        Version the ``production`` alias points to, or ``None`` for no aliases file.
    aliases:
        Extra aliases to write next to ``production`` (e.g. ``{"shadow": "2"}``).

    Returns
    -------
    Path
        ``root``.
    """
    root = Path(root)
    model_dir = root / name
    model_dir.mkdir(parents=True, exist_ok=True)
    for item in versions:
        version, variant = (item, "ok") if isinstance(item, str) else item
        write_model_version(model_dir, name=name, version=version, size=size, variant=variant)
    data: dict[str, Any] = dict(aliases or {})
    if production is not None:
        data["production"] = str(production)
    if data:
        write_yaml(model_dir / "aliases.yaml", data)
    return root
