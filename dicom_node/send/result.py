"""The outcome of sending one instance to one destination, whatever the protocol."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExportResult:
    """Outcome of sending one instance to one destination (C-STORE or STOW-RS).

    Attributes
    ----------
    ok
        True when the peer keeps the instance: C-STORE Success (0x0000) or a Warning status
        (0x0001, 0x0107, 0x0116, 0xB000-0xBFFF); STOW-RS: the instance is in the answer's
        ReferencedSOPSequence (with or without a WarningReason).
    status
        The DICOM status the peer sent for this instance (C-STORE Status, STOW-RS
        FailureReason or WarningReason), or None when there was none (not connected, rejected,
        aborted, no response, an HTTP error without per-instance answer).
    reason
        Short human-readable explanation, e.g. ``stored``, ``warning 0xB000 (coercion of data
        elements)``, ``failure 0xA700: Out of resources``, ``association rejected: called AE
        title not recognised``, ``no response``, ``authentication refused (HTTP 401) ...``.
    """

    ok: bool
    status: int | None
    reason: str
