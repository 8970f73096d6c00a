"""The model store: versioned ONNX models, aliases, the model contract, runner and hot swap.

Public API (see ``models/README.md`` for the store layout and the manifest fields)::

    store = ModelStore(cfg.models)
    version = store.resolve("thyroid-seg@production", study_uid)
    series = read_series(paths)                  # ordered, Modality-LUT-applied float32 frames
    runner = ModelRunner(threads=cfg.inference_threads)
    masks = runner.run(version, series.frames)   # [{segment key: bool (H, W)}] per frame

The model contract, shared by the worker, the promotion gate, training and the demo:
:mod:`~dicom_node.modelstore.frames` (pixels in), :mod:`~dicom_node.modelstore.processing`
(pre/post-processing), :mod:`~dicom_node.modelstore.scoring` (Dice, IoU),
:mod:`~dicom_node.modelstore.refs` (``name@alias`` / ``name:version``),
:mod:`~dicom_node.modelstore.confidence` (uncertainty and input checks of a result),
:mod:`~dicom_node.modelstore.codes` (coded concepts) and :mod:`~dicom_node.modelstore.files`
(sha256, atomic writes).

May import: ``dicom_node.metrics`` only; no other room (training and the node both build on it).
"""

from dicom_node.modelstore.aliases import AliasError, canary_bucket, in_canary
from dicom_node.modelstore.codes import Code
from dicom_node.modelstore.confidence import (
    Confidence,
    ConfidenceSpec,
    InputSummary,
    OodSpec,
    SegmentUncertainty,
    summarize_input,
)
from dicom_node.modelstore.files import atomic_write, fsync_dir, sha256_bytes, sha256_file
from dicom_node.modelstore.frames import (
    CaseImages,
    PixelBudgetError,
    SeriesFrames,
    SeriesReadError,
    decode_pixels,
    decoded_size,
    decoder_backends,
    read_case_folder,
    read_instances,
    read_series,
    series_frames,
)
from dicom_node.modelstore.manifest import (
    InputSpec,
    Manifest,
    ManifestError,
    Normalization,
    OutputSpec,
    Segment,
    contract_differences,
    load_manifest,
    parse_manifest,
)
from dicom_node.modelstore.processing import (
    Postprocess,
    Preprocess,
    apply_steps,
    normalize,
    resize_bilinear,
    resize_nearest,
)
from dicom_node.modelstore.refs import ModelRef, ModelRefError, parse_model_ref
from dicom_node.modelstore.runner import (
    ConfidentRun,
    InferenceError,
    LoadedModel,
    ModelLoadError,
    ModelRunner,
    Prediction,
    choose_providers,
)
from dicom_node.modelstore.scoring import agreement, dice, iou
from dicom_node.modelstore.serving import ServingModels
from dicom_node.modelstore.store import ModelStore, ModelStoreError, ResolvedVersion

__all__ = [
    "AliasError",
    "CaseImages",
    "Code",
    "Confidence",
    "ConfidenceSpec",
    "ConfidentRun",
    "InferenceError",
    "InputSpec",
    "InputSummary",
    "LoadedModel",
    "Manifest",
    "ManifestError",
    "ModelLoadError",
    "ModelRef",
    "ModelRefError",
    "ModelRunner",
    "ModelStore",
    "ModelStoreError",
    "Normalization",
    "OodSpec",
    "OutputSpec",
    "Postprocess",
    "Prediction",
    "Preprocess",
    "ResolvedVersion",
    "Segment",
    "SegmentUncertainty",
    "PixelBudgetError",
    "SeriesFrames",
    "SeriesReadError",
    "ServingModels",
    "atomic_write",
    "canary_bucket",
    "choose_providers",
    "contract_differences",
    "agreement",
    "apply_steps",
    "dice",
    "fsync_dir",
    "in_canary",
    "iou",
    "load_manifest",
    "normalize",
    "parse_manifest",
    "parse_model_ref",
    "read_case_folder",
    "decode_pixels",
    "decoded_size",
    "decoder_backends",
    "read_instances",
    "read_series",
    "resize_bilinear",
    "resize_nearest",
    "series_frames",
    "sha256_bytes",
    "sha256_file",
    "summarize_input",
]
