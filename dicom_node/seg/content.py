"""Value objects describing what goes into a SEG: segments and the algorithm that made them.

Coded concepts are the model contract's :class:`~dicom_node.modelstore.codes.Code` (the type a
manifest's segment codes are), re-exported here; :func:`coded_concept` turns one into highdicom's.

They validate in ``__init__`` (dataclass ``__post_init__``), are immutable, and convert to the
highdicom objects the builder needs. :meth:`SegmentSpec.from_manifest` accepts a segment entry of a
model manifest (a mapping, or the pydantic object of ``dicom_node.modelstore.manifest``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import highdicom as hd
from pydicom.sr.codedict import codes

from dicom_node.modelstore.codes import Code

LOGGER = logging.getLogger(__name__)

_KEY_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")

ARTIFICIAL_INTELLIGENCE = codes.cid7162.ArtificialIntelligence
"""Algorithm family (CID 7162) of every model the node serves."""


def _code_entry(obj: Any) -> Code | Mapping[str, Any]:
    """A segment's code as given: a :class:`Code`, or a mapping (pydantic models are dumped)."""
    return obj if isinstance(obj, Code) else _as_mapping(obj, "code")


def _as_mapping(obj: Any, what: str) -> Mapping[str, Any]:
    """Return ``obj`` as a mapping: pydantic models are dumped, mappings pass through."""
    if isinstance(obj, Mapping):
        return obj
    dump = getattr(obj, "model_dump", None)
    if callable(dump):
        return dump()
    raise TypeError(f"{what} must be a mapping or a pydantic model, got {type(obj).__name__}")


def coded_concept(code: Code) -> hd.sr.CodedConcept:
    """Return the highdicom coded concept of a model-contract :class:`Code`."""
    return hd.sr.CodedConcept(code.value, code.scheme, code.meaning)


@dataclass(frozen=True)
class SegmentSpec:
    """One segment of a SEG: its key in the masks, label, SNOMED CT category and type, color.

    Parameters
    ----------
    key
        Short identifier used as the key of the masks mapping (``thyroid``, ``nodule``).
    label
        Segment Label shown by viewers (LO, at most 64 characters).
    category
        Segmented Property Category, e.g. SCT 123037004 Anatomical Structure.
    type
        Segmented Property Type, e.g. SCT 69748006 Thyroid structure.
    color
        Recommended display color as RGB 0-255, or ``None``.

    Raises
    ------
    ValueError
        For an invalid key, an empty or too long label, or a color that is not three 0-255 ints.
    """

    key: str
    label: str
    category: Code
    type: Code
    color: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not _KEY_RE.match(self.key):
            raise ValueError(
                f"segment key must start with a letter and contain only letters, digits, "
                f"'_', '.', '-' (at most 64), got {self.key!r}"
            )
        if not isinstance(self.label, str) or not self.label.strip() or len(self.label) > 64:
            raise ValueError(f"segment label must be 1-64 characters, got {self.label!r}")
        for name in ("category", "type"):
            if not isinstance(getattr(self, name), Code):
                raise TypeError(f"segment {name} must be a Code, got {getattr(self, name)!r}")
        if self.color is not None:
            color = tuple(self.color)
            if len(color) != 3 or not all(
                isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in color
            ):
                raise ValueError(f"segment color must be three ints 0-255, got {self.color!r}")
            object.__setattr__(self, "color", color)

    @classmethod
    def from_manifest(cls, entry: Mapping[str, Any] | Any) -> SegmentSpec:
        """Build from a manifest segment entry (extra keys such as ``channel`` are ignored).

        Parameters
        ----------
        entry
            ``{key, label, category: {value, scheme, meaning}, type: {...}, color: [r, g, b]}``
            as a mapping or a pydantic model.

        Returns
        -------
        SegmentSpec

        Raises
        ------
        ValueError
            If ``key``, ``label``, ``category`` or ``type`` is missing or invalid.
        """
        data = _as_mapping(entry, "segment")
        missing = {"key", "label", "category", "type"} - set(data)
        if missing:
            raise ValueError(f"segment entry is missing {sorted(missing)}; got keys {sorted(data)}")
        color = data.get("color")
        return cls(
            key=str(data["key"]),
            label=str(data["label"]),
            category=Code.from_mapping(_code_entry(data["category"])),
            type=Code.from_mapping(_code_entry(data["type"])),
            color=tuple(int(c) for c in color) if color is not None else None,  # type: ignore[arg-type]
        )

    @classmethod
    def coerce(cls, entry: SegmentSpec | Mapping[str, Any] | Any) -> SegmentSpec:
        """Return ``entry`` if it already is a SegmentSpec, else :meth:`from_manifest`."""
        return entry if isinstance(entry, SegmentSpec) else cls.from_manifest(entry)

    def to_highdicom(
        self, segment_number: int, algorithm: hd.AlgorithmIdentificationSequence
    ) -> hd.seg.SegmentDescription:
        """Return the highdicom description numbered ``segment_number``, algorithm AUTOMATIC."""
        return hd.seg.SegmentDescription(
            segment_number=segment_number,
            segment_label=self.label,
            segmented_property_category=coded_concept(self.category),
            segmented_property_type=coded_concept(self.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(*self.color) if self.color else None,
        )


@dataclass(frozen=True)
class AlgorithmInfo:
    """The resolved model version that produced the masks, and why it ran.

    Parameters
    ----------
    model
        Model name (Algorithm Name), e.g. ``thyroid-seg``.
    version
        Resolved version (Algorithm Version), e.g. ``"1"``; never an alias.
    alias
        Alias the rule asked for (``production``), or ``None`` when the rule pinned a version.
    sha256
        Hex digest of the ONNX file that ran.
    rule
        Name of the routing rule that sent the series to the model.

    Raises
    ------
    ValueError
        If ``model``, ``version`` or ``rule`` is empty, a value contains ``,`` or ``=`` (they
        separate Algorithm Parameters), or ``sha256`` is not hexadecimal.
    """

    model: str
    version: str
    alias: str | None
    sha256: str
    rule: str

    def __post_init__(self) -> None:
        for name in ("model", "version", "rule"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip() or len(value) > 64:
                raise ValueError(f"algorithm {name} must be 1-64 characters, got {value!r}")
        if self.alias is not None and (not isinstance(self.alias, str) or not self.alias.strip()):
            raise ValueError(
                f"algorithm alias must be None or a non-empty string, got {self.alias!r}"
            )
        if not isinstance(self.sha256, str) or not re.fullmatch(r"[0-9a-fA-F]{1,128}", self.sha256):
            raise ValueError(f"algorithm sha256 must be a hex digest, got {self.sha256!r}")
        for name, value in self.parameters.items():
            if "," in value or "=" in value:
                raise ValueError(f"algorithm {name} must not contain ',' or '=', got {value!r}")

    @property
    def parameters(self) -> dict[str, str]:
        """Algorithm Parameters: ``alias`` (when set), ``sha256`` and ``rule``."""
        params: dict[str, str] = {"alias": self.alias} if self.alias is not None else {}
        params.update({"sha256": self.sha256.lower(), "rule": self.rule})
        return params

    def to_highdicom(self) -> hd.AlgorithmIdentificationSequence:
        """Return the Segmentation Algorithm Identification Sequence (family: AI, CID 7162)."""
        return hd.AlgorithmIdentificationSequence(
            name=self.model,
            version=self.version,
            family=ARTIFICIAL_INTELLIGENCE,
            parameters=self.parameters,
        )
