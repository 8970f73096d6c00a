"""The coded concept of the model contract: one type for manifests, training and SEG output.

A manifest's segment ``category`` and ``type`` and a SEG's Segmented Property Category/Type are the
same thing, a (code value, coding scheme designator, code meaning) triple such as SNOMED CT
``69748006`` "Thyroid structure". :class:`Code` is that triple, validated once. The manifest
(pydantic) validates its segment codes into this class, and :mod:`dicom_node.seg` builds its
highdicom concepts from it, so a code means the same thing wherever it appears.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

LOGGER = logging.getLogger(__name__)

_LIMITS = (("value", 64), ("scheme", 16), ("meaning", 64))
"""Field lengths: Code Value (long code values up to 64), Coding Scheme Designator (SH, 16),
Code Meaning (LO, 64)."""


@dataclass(frozen=True)
class Code:
    """A coded concept: ``Code("69748006", "SCT", "Thyroid structure")``.

    Parameters
    ----------
    value
        Code value (at most 64 characters; highdicom writes values over 16 as Long Code Value).
    scheme
        Coding scheme designator, e.g. ``SCT`` or ``DCM`` (at most 16 characters).
    meaning
        Code meaning (LO, at most 64 characters).

    Raises
    ------
    TypeError
        A part is not a string.
    ValueError
        A part is empty (or only blanks) or too long.
    """

    value: str
    scheme: str
    meaning: str

    # pydantic (the manifest) validates this dataclass field by field; refuse unknown keys there
    __pydantic_config__: ClassVar[dict[str, Any]] = {"extra": "forbid"}

    def __post_init__(self) -> None:
        for name, limit in _LIMITS:
            part = getattr(self, name)
            if not isinstance(part, str):
                raise TypeError(f"code {name} must be a string, got {part!r}")
            if not part.strip() or len(part) > limit:
                raise ValueError(
                    f"code {name} must be a non-empty string of at most {limit} characters, "
                    f"got {part!r}"
                )

    @classmethod
    def from_mapping(cls, entry: Code | Mapping[str, Any]) -> Code:
        """Build from ``{value: "69748006", scheme: SCT, meaning: Thyroid structure}``.

        A YAML integer code value (``value: 69748006`` unquoted) is taken as its text. A
        :class:`Code` is returned as it is.

        Raises
        ------
        TypeError
            ``entry`` is neither a Code nor a mapping.
        ValueError
            A key is missing or unknown, or a part is invalid.
        """
        if isinstance(entry, Code):
            return entry
        if not isinstance(entry, Mapping):
            raise TypeError(f"code must be a mapping {{value, scheme, meaning}}, got {entry!r}")
        missing = {"value", "scheme", "meaning"} - set(entry)
        if missing:
            raise ValueError(f"code needs value, scheme and meaning; missing {sorted(missing)}")
        unknown = set(entry) - {"value", "scheme", "meaning"}
        if unknown:
            raise ValueError(
                f"code has unknown keys {sorted(unknown)} (allowed: value, scheme, meaning)"
            )
        value = entry["value"]
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        return cls(value, entry["scheme"], entry["meaning"])

    def to_dict(self) -> dict[str, str]:
        """Return ``{"value", "scheme", "meaning"}`` as in a manifest."""
        return {"value": self.value, "scheme": self.scheme, "meaning": self.meaning}
