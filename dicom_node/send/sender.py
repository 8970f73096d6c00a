"""One entry point for every destination type: C-STORE (``dimse``) or STOW-RS (``dicomweb``).

The worker hands :func:`send_files` the files one destination still lacks and records each
outcome per file; which protocol carries them is the destination's ``type``.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from pathlib import Path

from dicom_node.config import Destination, DicomwebDestination
from dicom_node.send import dicomweb, dimse
from dicom_node.send.result import ExportResult


def send_files(
    paths: Sequence[str | Path],
    destination: Destination | DicomwebDestination,
    *,
    calling_ae: str = "DICOMNODE",
    timeout: float = dimse.DEFAULT_TIMEOUT,
    tls_context: ssl.SSLContext | None = None,
) -> list[ExportResult]:
    """Send files to one destination; one :class:`ExportResult` per path, in order.

    Parameters
    ----------
    paths
        DICOM files.
    destination
        A C-STORE peer (one association per file, :func:`dicom_node.send.dimse.send_file`) or a
        DICOMweb service (batched STOW-RS, :func:`dicom_node.send.dicomweb.send_files`).
    calling_ae
        Our AE title (C-STORE only).
    timeout
        Seconds per network step (a DICOMweb destination's own ``timeout`` wins).
    tls_context
        Client SSL context for C-STORE peers with ``tls: true`` (ignored otherwise).

    Returns
    -------
    list of ExportResult
        Never raises for network or peer trouble.
    """
    if isinstance(destination, DicomwebDestination):
        return dicomweb.send_files(paths, destination, timeout=timeout)
    return [
        dimse.send_file(
            path,
            destination,
            calling_ae=calling_ae,
            timeout=timeout,
            tls_context=tls_context if destination.tls else None,
        )
        for path in paths
    ]


__all__ = ["ExportResult", "send_files"]
