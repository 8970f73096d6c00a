"""Vocabularies of the outputs: which results a rule can ask for."""

from __future__ import annotations

from enum import Enum


class OutputKind(Enum):
    """What a rule's ``outputs:`` may list (DESIGN.md "Rules"); each is its own DICOM series."""

    SEG = "seg"
    """The DICOM Segmentation (:mod:`dicom_node.seg`): always built, the others derive from it."""
    OVERLAY = "overlay"
    """Secondary Capture (RGB) per source frame: contours, legend, measurements burned in."""
    GSPS = "gsps"
    """Grayscale Softcopy Presentation State with the contours on the original images."""
    REPORT = "report"
    """TID 1500 Measurement Report (Comprehensive 3D SR) referencing the SEG's segments."""


DEFAULT_OUTPUTS: tuple[OutputKind, ...] = (OutputKind.SEG,)
"""What a rule without ``outputs:`` sends back."""


def parse_outputs(values: object) -> tuple[OutputKind, ...]:
    """Return the output kinds of a rule's ``outputs:`` list, in the order given, once each.

    Parameters
    ----------
    values
        A list of :class:`OutputKind` or their names (``["seg", "overlay"]``).

    Returns
    -------
    tuple of OutputKind

    Raises
    ------
    TypeError
        ``values`` is not a list of strings or kinds.
    ValueError
        A name is not an output kind, or the list is empty.
    """
    if isinstance(values, str | bytes) or not isinstance(values, list | tuple):
        raise TypeError(f"outputs must be a list like [seg, overlay], got {values!r}")
    allowed = ", ".join(k.value for k in OutputKind)
    kinds: list[OutputKind] = []
    for value in values:
        if isinstance(value, OutputKind):
            kind = value
        elif isinstance(value, str):
            try:
                kind = OutputKind(value.strip().lower())
            except ValueError:
                raise ValueError(f"unknown output {value!r}; allowed: {allowed}") from None
        else:
            raise TypeError(f"outputs must name kinds ({allowed}), got {value!r}")
        if kind not in kinds:
            kinds.append(kind)
    if not kinds:
        raise ValueError(f"outputs must name at least one of {allowed}")
    return tuple(kinds)
