"""The version manifest (``models/<name>/<version>/manifest.yaml``) as validated value objects.

Everything the node needs to run a version without model-specific code is declared here: input
tensor name and size, normalisation, output activation and threshold, and the segment list with
coded concepts. Unknown keys are refused (typos must not silently change behaviour) and every
error names the file and the field path, e.g.
``models/thyroid-seg/2/manifest.yaml: output.threshold: Input should be less than 1 (got 1.5)``.
"""

from __future__ import annotations

import difflib
import logging
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from ruamel.yaml import YAML

from dicom_node.modelstore.codes import Code
from dicom_node.modelstore.confidence import ConfidenceSpec
from dicom_node.modelstore.measureplan import SegmentMeasurements

LOGGER = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.yaml"
"""File name of the manifest inside a version folder."""

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_KEY_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")

DEFAULT_SEGMENT_COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 96, 0),
    (0, 160, 255),
    (60, 200, 60),
    (230, 40, 200),
    (255, 220, 0),
    (0, 220, 220),
)
"""Display colours of segments whose manifest entry has no ``color``, by position (cycled):
distinct hues that stand out on a grey image (the overlay and presentation-state outlines)."""


class ManifestError(ValueError):
    """A manifest is unreadable or invalid; the message names the file and the field path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Normalization(_Strict):
    """How a frame's intensities are scaled before the network.

    ``percentile``: clip to the ``lower``/``upper`` percentiles and scale to [0, 1];
    ``minmax``: scale min..max to [0, 1]; ``zscore``: subtract mean, divide by std;
    ``fixed``: ``x * scale + offset``; ``none``: cast only.
    """

    method: Literal["percentile", "minmax", "zscore", "fixed", "none"]
    lower: float | None = Field(default=None, ge=0, le=100)
    upper: float | None = Field(default=None, ge=0, le=100)
    scale: float | None = None
    offset: float | None = None

    @model_validator(mode="after")
    def _params(self) -> Normalization:
        allowed = {
            "percentile": {"lower", "upper"},
            "fixed": {"scale", "offset"},
        }.get(self.method, set())
        for param in ("lower", "upper", "scale", "offset"):
            if getattr(self, param) is not None and param not in allowed:
                raise ValueError(f"'{param}' is not a parameter of method '{self.method}'")
        if self.method == "percentile":
            lower = 0.0 if self.lower is None else self.lower
            upper = 100.0 if self.upper is None else self.upper
            if not lower < upper:
                raise ValueError(f"lower must be below upper, got {lower} and {upper}")
        if self.method == "fixed" and self.scale is None:
            raise ValueError("method 'fixed' needs 'scale' (and optionally 'offset')")
        return self


class InputSpec(_Strict):
    """The network input: ONNX input name, spatial size, channels, modalities, normalisation."""

    name: str = Field(min_length=1)
    size: tuple[int, int]
    channels: int = Field(1, ge=1, le=16)
    modalities: list[str] = Field(default_factory=list)
    normalization: Normalization = Normalization(method="none")
    volume: bool = False
    """The model needs the whole series as one consistent volume (one matrix size,
    orientation and Frame of Reference). False (the default, 2-D models): a series that mixes
    them is split into groups, each with its own SEG; True: such a series fails its job."""

    @field_validator("size")
    @classmethod
    def _size(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not all(1 <= v <= 8192 for v in value):
            raise ValueError(f"size must be [rows, cols] between 1 and 8192, got {list(value)}")
        return value

    @field_validator("modalities")
    @classmethod
    def _modalities(cls, value: list[str]) -> list[str]:
        return [v.strip().upper() for v in value]


class OutputSpec(_Strict):
    """The network output: ONNX output name, activation and binarisation threshold."""

    name: str = Field(min_length=1)
    activation: Literal["sigmoid", "softmax", "none"] = "sigmoid"
    threshold: float = Field(0.5, gt=0, lt=1)


class Segment(_Strict):
    """One output segment: short key, label, output channel, codes, display colour."""

    key: str
    label: str = Field(min_length=1, max_length=64)
    channel: int = Field(ge=0)
    category: Code
    type: Code
    color: tuple[int, int, int] = (255, 0, 0)
    description: str | None = None
    threshold: float | None = Field(default=None, gt=0, lt=1)
    """This segment's binarisation threshold (sigmoid / none activation), instead of
    ``output.threshold``; unset: ``output.threshold``."""

    @field_validator("category", "type", mode="before")
    @classmethod
    def _code_value_text(cls, value: Any) -> Any:
        # YAML reads an unquoted code value (value: 69748006) as an integer: take its text
        if isinstance(value, dict) and isinstance(value.get("value"), int):
            if not isinstance(value["value"], bool):
                return {**value, "value": str(value["value"])}
        return value

    @field_validator("key")
    @classmethod
    def _key(cls, value: str) -> str:
        if not _KEY_RE.match(value):
            raise ValueError(
                f"key must be lower-case letters, digits or '_' starting with a letter "
                f"(at most 32), got {value!r}"
            )
        return value

    @field_validator("color")
    @classmethod
    def _color(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if not all(0 <= c <= 255 for c in value):
            raise ValueError(f"color must be three values 0-255, got {list(value)}")
        return value


class _Step(_Strict):
    """What every post-processing step has: the segment it changes and its connectivity."""

    segment: str
    connectivity: Literal["2d", "3d"] = "2d"
    """``2d``: each frame on its own (8 neighbours); ``3d``: each volume of the series as one
    (26 neighbours across frames), see ``models/README.md``."""

    def others(self) -> list[str]:
        """The other segment keys this step reads."""
        return []


class LargestComponent(_Step):
    """Keep the ``keep`` largest connected components of ``segment`` (ties: the first in raster
    order), drop the rest."""

    op: Literal["largest_component"]
    keep: int = Field(1, ge=1, le=1000)


class MinSize(_Step):
    """Drop the components of ``segment`` smaller than a size.

    ``mm2`` (2-D) or ``mm3`` (3-D) is converted with the series' spacing when the caller knows it
    (the node and ``evaluate`` always pass the frame reader's pixel spacing; ``mm3`` also needs
    the slice spacing); ``pixels`` (pixels per frame in 2-D, voxels in 3-D) is used when no
    physical size is given or the spacing it needs is unknown.
    """

    op: Literal["min_size"]
    pixels: int | None = Field(default=None, ge=1)
    mm2: float | None = Field(default=None, gt=0)
    mm3: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _units(self) -> MinSize:
        if self.pixels is None and self.mm2 is None and self.mm3 is None:
            raise ValueError("min_size needs a size: pixels, mm2 (2d) or mm3 (3d)")
        if self.mm2 is not None and self.connectivity == "3d":
            raise ValueError("mm2 is an area of one frame; with connectivity 3d give mm3 or pixels")
        if self.mm3 is not None and self.connectivity == "2d":
            raise ValueError("mm3 is a volume; give mm2 or pixels, or set connectivity: 3d")
        return self


class FillHoles(_Step):
    """Fill the holes of ``segment`` (background enclosed by it, not reaching the image border).

    With ``where: OTHER`` (e.g. a nodule inside its gland): only the holes that ``OTHER``
    overlaps are filled, and every component of ``OTHER`` that overlaps or touches ``segment`` is
    added to it, so a nodule at the gland's edge leaves neither a hole nor a notch.
    """

    op: Literal["fill_holes"]
    where: str | None = None

    def others(self) -> list[str]:
        return [self.where] if self.where else []


class Within(_Step):
    """Keep only the components of ``segment`` that overlap or touch (are next to) ``of``.

    ``min_inside`` (0-1]: instead, keep only components with at least that fraction of their
    pixels inside ``of``.
    """

    op: Literal["within"]
    of: str
    min_inside: float | None = Field(default=None, gt=0, le=1)

    def others(self) -> list[str]:
        return [self.of]


class KeepInRegion(_Step):
    """Keep only the components of ``segment`` whose centre lies in a box of the frame.

    ``rows`` / ``cols``: ``[from, to]`` as fractions of the frame's height / width (0 = top /
    left edge, 1 = bottom / right edge). ``border: false`` also drops every component that
    touches the frame's edge (the body outline and shoulders of a wide field do; a framed
    organ does not).
    """

    op: Literal["keep_in_region"]
    rows: tuple[float, float] = (0.0, 1.0)
    cols: tuple[float, float] = (0.0, 1.0)
    border: bool = True

    @field_validator("rows", "cols")
    @classmethod
    def _box(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 <= value[0] < value[1] <= 1.0:
            raise ValueError(f"must be [from, to] with 0 <= from < to <= 1, got {list(value)}")
        return value


PostprocessStep = Annotated[
    LargestComponent | MinSize | FillHoles | Within | KeepInRegion, Field(discriminator="op")
]
"""One ``postprocess:`` entry, told apart by ``op``."""

POSTPROCESS_STEPS: dict[str, type[_Step]] = {
    "largest_component": LargestComponent,
    "min_size": MinSize,
    "fill_holes": FillHoles,
    "within": Within,
    "keep_in_region": KeepInRegion,
}
"""The class of each ``op`` of ``postprocess:`` steps."""

POSTPROCESS_OPS = tuple(POSTPROCESS_STEPS)
"""The ``op`` values of ``postprocess:`` steps."""

TTA_OPS = ("flip_lr", "flip_ud")
"""Test-time augmentations the runner knows (``tta:``)."""


def _check_ops(value: Any) -> Any:
    """Refuse an unknown or missing ``op`` with "did you mean" before pydantic's union error."""
    if not isinstance(value, list):
        return value
    for n, step in enumerate(value):
        if not isinstance(step, dict):
            raise ValueError(f"step {n} must be a mapping with an 'op', got {step!r}")
        op = step.get("op")
        if op not in POSTPROCESS_OPS:
            close = difflib.get_close_matches(str(op), POSTPROCESS_OPS, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            what = "has no 'op'" if op is None else f"has unknown op {op!r}"
            raise ValueError(f"step {n} {what}{hint} (ops: {', '.join(POSTPROCESS_OPS)})")
    return value


class GateSpec(_Strict):
    """Promotion-gate settings a version declares (``gate:`` in the manifest).

    ``min_dice`` maps segment keys to the lowest mean Dice on the reference set that the gate
    accepts for this version, with or without a production version to compare with.
    """

    min_dice: dict[str, float] = Field(default_factory=dict)

    @field_validator("min_dice")
    @classmethod
    def _floors(cls, value: dict[str, float]) -> dict[str, float]:
        for key, floor in value.items():
            if not 0.0 <= float(floor) <= 1.0:
                raise ValueError(f"min_dice[{key!r}] must be in [0, 1], got {floor!r}")
        return value


class Manifest(_Strict):
    """A model version's manifest. See ``models/README.md`` for every field."""

    name: str
    version: str
    description: str = ""
    created: str | None = None
    model_file: str = "model.onnx"
    sha256: str
    input: InputSpec
    output: OutputSpec
    segments: list[Segment] = Field(min_length=1)
    reference_data: str | None = None
    gate: GateSpec | None = None
    confidence: ConfidenceSpec | None = None
    """How sure a result must be, and the training data's provenance (see
    :mod:`dicom_node.modelstore.confidence`); ``None``: results carry no confidence."""
    postprocess: list[PostprocessStep] = Field(default_factory=list)
    """Steps applied in order to the thresholded masks (node and ``evaluate`` alike)."""
    tta: list[Literal["flip_lr", "flip_ud"]] = Field(default_factory=list)
    """Test-time augmentations: the runner also runs these flipped inputs, flips the outputs
    back and averages the probabilities with the plain run's before thresholding."""
    probabilities: bool = False
    """The SEG carries the probability maps (FRACTIONAL, 0-255) instead of the binary masks."""
    measurements: dict[str, SegmentMeasurements] | None = None
    """What the report measures per segment key (see :mod:`dicom_node.modelstore.measureplan`);
    ``None`` or a segment left out: its size and the sum and mean of its counts."""
    provenance: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)

    _ops = field_validator("postprocess", mode="before")(_check_ops)

    @field_validator("tta")
    @classmethod
    def _tta(cls, value: list[str]) -> list[str]:
        dupes = sorted({v for v in value if value.count(v) > 1})
        if dupes:
            raise ValueError(f"each augmentation once, got {dupes} twice")
        return value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError(
                f"name must be 1-64 letters, digits, '.', '_' or '-' starting with a letter or "
                f"digit, got {value!r}"
            )
        return value

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if isinstance(value, str) and not _NAME_RE.match(value):
            raise ValueError(
                f"version must be 1-64 letters, digits, '.', '_' or '-', got {value!r}"
            )
        return value

    @field_validator("created", mode="before")
    @classmethod
    def _created(cls, value: Any) -> Any:
        return value.isoformat() if hasattr(value, "isoformat") else value

    @field_validator("sha256")
    @classmethod
    def _sha(cls, value: str) -> str:
        value = value.strip().lower()
        if not _SHA_RE.match(value):
            raise ValueError(f"sha256 must be 64 hex digits, got {value!r}")
        return value

    @field_validator("model_file", "reference_data")
    @classmethod
    def _relative(cls, value: str | None) -> str | None:
        if value is None:
            return value
        path = Path(value)
        if path.is_absolute() or ".." in path.parts or not value.strip():
            raise ValueError(f"must be a path inside the version folder, got {value!r}")
        return value

    @model_validator(mode="after")
    def _segments(self) -> Manifest:
        keys = [s.key for s in self.segments]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise ValueError(f"segments: duplicate key(s) {dupes}")
        channels = [s.channel for s in self.segments]
        dupes_c = sorted({c for c in channels if channels.count(c) > 1})
        if dupes_c and self.output.activation == "softmax":
            raise ValueError(f"segments: channel(s) {dupes_c} used twice with softmax")
        if self.output.activation == "softmax" and 0 in channels:
            raise ValueError("segments: with softmax, channel 0 is the background, not a segment")
        unknown = sorted(set(self.gate.min_dice) - set(keys)) if self.gate else []
        if unknown:
            raise ValueError(
                f"gate.min_dice: unknown segment key(s) {unknown}; segments are {keys}"
            )
        unknown = sorted(set(self.confidence.thresholds) - set(keys)) if self.confidence else []
        if unknown:
            raise ValueError(
                f"confidence.thresholds: unknown segment key(s) {unknown}; segments are {keys}"
            )
        if self.confidence and self.confidence.method == "tta" and not getattr(self, "tta", None):
            raise ValueError(
                "confidence.method 'tta' compares the test-time augmented runs with the plain "
                "one: declare them (tta: [flip_lr]) or use method 'entropy'"
            )
        self._check_postprocess(keys)
        return self

    def _check_postprocess(self, keys: list[str]) -> None:
        """Every segment a ``postprocess:`` step names exists; no per-segment softmax threshold."""
        for n, step in enumerate(self.postprocess):
            for name in [step.segment, *step.others()]:
                if name not in keys:
                    close = difflib.get_close_matches(name, keys, n=1, cutoff=0.6)
                    hint = f"; did you mean {close[0]!r}?" if close else ""
                    raise ValueError(
                        f"postprocess[{n}] ({step.op}): unknown segment {name!r}{hint}; "
                        f"segments are {keys}"
                    )
            if step.segment in step.others():
                raise ValueError(f"postprocess[{n}] ({step.op}): a segment cannot refer to itself")
        if self.output.activation == "softmax":
            own = [s.key for s in self.segments if s.threshold is not None]
            if own:
                raise ValueError(
                    f"segments {own}: threshold is not used with softmax (argmax decides)"
                )

    @model_validator(mode="after")
    def _measurement_keys(self) -> Manifest:
        keys = [s.key for s in self.segments]
        unknown = sorted(set(self.measurements or {}) - set(keys))
        if unknown:
            raise ValueError(f"measurements: unknown segment key(s) {unknown}; segments are {keys}")
        return self

    @model_validator(mode="after")
    def _default_colors(self) -> Manifest:
        # a segment without `color` gets the palette colour of its position, so that two
        # segments never share the same default outline colour
        for n, seg in enumerate(self.segments):
            if "color" not in seg.model_fields_set:
                color = DEFAULT_SEGMENT_COLORS[n % len(DEFAULT_SEGMENT_COLORS)]
                self.segments[n] = seg.model_copy(update={"color": color})
        return self

    @property
    def max_channel(self) -> int:
        """The highest output channel any segment reads."""
        return max(s.channel for s in self.segments)

    def segment(self, key: str) -> Segment:
        """Return the segment with ``key``; KeyError naming the known keys otherwise."""
        for seg in self.segments:
            if seg.key == key:
                return seg
        raise KeyError(f"segment {key!r} not in {[s.key for s in self.segments]}")

    def contract(self) -> list[tuple[str, str, str, str, str, str, int]]:
        """Return the output contract: what a PACS and the rules see of this version.

        One tuple per segment, sorted by key: ``(key, label, category scheme, category value,
        type scheme, type value, channel)``. Two versions with equal contracts are
        interchangeable for consumers of their SEGs.
        """
        return sorted(
            (
                s.key,
                s.label,
                s.category.scheme,
                s.category.value,
                s.type.scheme,
                s.type.value,
                s.channel,
            )
            for s in self.segments
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the manifest as plain YAML-able data (tuples as lists, unset fields left out)."""
        data = self.model_dump(mode="json", exclude_none=True)
        # inference options at their defaults are left out: older manifests stay as they were
        for key, default in (("postprocess", []), ("tta", []), ("probabilities", False)):
            if data.get(key) == default:
                data.pop(key, None)
        return data

    def threshold(self, key: str) -> float:
        """The binarisation threshold of segment ``key`` (its own, else ``output.threshold``)."""
        own = self.segment(key).threshold
        return self.output.threshold if own is None else own


def contract_differences(old: Manifest, new: Manifest) -> list[str]:
    """Return human-readable differences between two output contracts (empty when equal)."""
    diffs: list[str] = []
    old_by_key = {s.key: s for s in old.segments}
    new_by_key = {s.key: s for s in new.segments}
    for key in sorted(old_by_key.keys() - new_by_key.keys()):
        diffs.append(f"segment {key!r} removed")
    for key in sorted(new_by_key.keys() - old_by_key.keys()):
        diffs.append(f"segment {key!r} added")
    for key in sorted(old_by_key.keys() & new_by_key.keys()):
        a, b = old_by_key[key], new_by_key[key]
        for field in ("label", "channel"):
            if getattr(a, field) != getattr(b, field):
                diffs.append(
                    f"segment {key!r} {field}: {getattr(a, field)!r} -> {getattr(b, field)!r}"
                )
        for field in ("category", "type"):
            ca, cb = getattr(a, field), getattr(b, field)
            if (ca.scheme, ca.value) != (cb.scheme, cb.value):
                diffs.append(
                    f"segment {key!r} {field}: {ca.scheme} {ca.value} -> {cb.scheme} {cb.value}"
                )
    return diffs


def format_validation_error(source: str, exc: ValidationError) -> str:
    """Return ``source: field.path: message (got value); ...`` for a pydantic error."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            msg = "unknown field (not part of the manifest; check the spelling)"
        elif err["type"] == "missing":
            msg = "required field is missing"
        elif "input" in err and not isinstance(err["input"], dict | list) and "got" not in msg:
            msg = f"{msg} (got {err['input']!r})"
        parts.append(f"{loc}: {msg}")
    return f"{source}: " + "; ".join(parts)


def parse_manifest(data: Any, source: str = "manifest") -> Manifest:
    """Validate already-parsed manifest data.

    Raises
    ------
    ManifestError
        ``data`` is not a mapping or a field is invalid; the message names ``source`` and fields.
    """
    if not isinstance(data, dict):
        raise ManifestError(f"{source}: must be a mapping of fields, got {type(data).__name__}")
    try:
        return Manifest(**data)
    except ValidationError as exc:
        raise ManifestError(format_validation_error(source, exc)) from exc


def load_manifest(path: str | Path, check_folder: bool = False) -> Manifest:
    """Read and validate a manifest.

    Parameters
    ----------
    path:
        The ``manifest.yaml`` file, or a version folder containing one.
    check_folder:
        Require the folder holding the manifest to be named like ``version`` (the store does this
        for its own folders; folders outside the store may be named anything).

    Returns
    -------
    Manifest
        The validated manifest.

    Raises
    ------
    ManifestError
        The file is missing or unreadable, is not valid YAML, or a field is invalid. The message
        starts with the file path and names the field path.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ManifestError(f"{path}: no manifest (expected {MANIFEST_FILE} here)") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: cannot read manifest: {exc}") from exc
    try:
        data = YAML(typ="safe").load(text)
    except Exception as exc:  # ruamel raises many error types; all mean "not YAML"
        raise ManifestError(f"{path}: not valid YAML: {exc}") from exc
    manifest = parse_manifest(data, str(path))
    folder = path.parent.name
    if check_folder and folder != manifest.version:
        raise ManifestError(
            f"{path}: version: must equal the version folder name {folder!r}, "
            f"got {manifest.version!r}"
        )
    return manifest
