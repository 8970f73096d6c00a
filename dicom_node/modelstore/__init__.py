"""The model store: versioned ONNX models, aliases, pre/post-processing, runner and hot swap.

Public API (see ``models/README.md`` for the store layout and the manifest fields)::

    store = ModelStore(cfg.models)
    version = store.resolve("thyroid-seg@production", study_uid)
    runner = ModelRunner(threads=cfg.inference_threads)
    masks = runner.run(version, frames)          # [{segment key: bool (H, W)}] per frame
"""

from dicom_node.modelstore.aliases import AliasError, canary_bucket, in_canary
from dicom_node.modelstore.manifest import (
    Code,
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
    normalize,
    resize_bilinear,
    resize_nearest,
)
from dicom_node.modelstore.runner import (
    InferenceError,
    LoadedModel,
    ModelLoadError,
    ModelRunner,
    choose_providers,
)
from dicom_node.modelstore.serving import ServingModels
from dicom_node.modelstore.store import (
    ModelStore,
    ModelStoreError,
    ResolvedVersion,
    parse_ref,
    sha256_file,
)

__all__ = [
    "AliasError",
    "Code",
    "InferenceError",
    "LoadedModel",
    "ModelLoadError",
    "ModelRunner",
    "ServingModels",
    "choose_providers",
    "InputSpec",
    "Manifest",
    "ManifestError",
    "ModelStore",
    "ModelStoreError",
    "Normalization",
    "OutputSpec",
    "Postprocess",
    "Preprocess",
    "ResolvedVersion",
    "Segment",
    "canary_bucket",
    "contract_differences",
    "in_canary",
    "load_manifest",
    "normalize",
    "parse_manifest",
    "parse_ref",
    "resize_bilinear",
    "resize_nearest",
    "sha256_file",
]
