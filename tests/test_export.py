"""C-STORE SCU export against real peers: DCMTK storescp and pynetdicom SCPs on loopback."""

from __future__ import annotations

import re
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE, DEFAULT_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import CTImageStorage, SegmentationStorage, Verification

from dicom_node.config import Destination, TLSConfig
from dicom_node.seg import AlgorithmInfo, build_seg
from dicom_node.send.dimse import (
    ExportResult,
    _NoDelayAE,
    client_tls_context,
    send_dataset,
    send_file,
)
from tests.helpers.dicom_factory import make_nm
from tests.helpers.peers import StoreSCP
from tests.helpers.ports import free_port

SEGMENTS = [
    {
        "key": "thyroid",
        "label": "Thyroid",
        "category": {"value": "123037004", "scheme": "SCT", "meaning": "Anatomical Structure"},
        "type": {"value": "69748006", "scheme": "SCT", "meaning": "Thyroid structure"},
    }
]


@pytest.fixture(scope="module")
def seg() -> Dataset:
    nm = make_nm(rows=64, cols=64)
    mask = np.zeros((1, 64, 64), bool)
    mask[0, 20:40, 10:30] = True
    algorithm = AlgorithmInfo("thyroid-seg", "1", "production", "ab" * 32, "thyroid")
    return build_seg([nm], {"thyroid": mask}, SEGMENTS, algorithm)


def _make_ca(folder: Path, name: str) -> None:
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-keyout",
            str(folder / f"{name}.key"),
            "-out",
            str(folder / f"{name}.crt"),
            "-subj",
            f"/CN={name}",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
        check=True,
        capture_output=True,
    )


def _make_leaf(folder: Path, name: str, ca: str) -> None:
    (folder / f"{name}.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
    )
    subprocess.run(
        [
            "openssl",
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(folder / f"{name}.key"),
            "-out",
            str(folder / f"{name}.csr"),
            "-subj",
            f"/CN={name}",
        ],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            "openssl",
            "x509",
            "-req",
            "-in",
            str(folder / f"{name}.csr"),
            "-days",
            "2",
            "-CA",
            str(folder / f"{ca}.crt"),
            "-CAkey",
            str(folder / f"{ca}.key"),
            "-CAcreateserial",
            "-out",
            str(folder / f"{name}.crt"),
            "-extfile",
            str(folder / f"{name}.ext"),
        ],
        check=True,
        capture_output=True,
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA with server and client certificates for 127.0.0.1, and an unrelated CA."""
    folder = tmp_path_factory.mktemp("pki")
    _make_ca(folder, "ca")
    _make_ca(folder, "other-ca")
    _make_leaf(folder, "server", "ca")
    _make_leaf(folder, "client", "ca")
    return folder


@contextmanager
def pynetdicom_scp(
    handler: Callable[[Any], int] | None = None,
    *,
    aet: str = "PACS",
    contexts: tuple[str, ...] = (SegmentationStorage,),
    require_called_aet: bool = False,
    transfer_syntaxes: list[str] | None = None,
) -> Iterator[Destination]:
    """A pynetdicom storage SCP on a free port whose C-STORE handler returns ``handler(event)``."""
    ae = AE(ae_title=aet)
    ae.require_called_aet = require_called_aet
    for uid in contexts:
        ae.add_supported_context(uid, transfer_syntaxes or DEFAULT_TRANSFER_SYNTAXES)
    port = free_port()
    handlers = [(evt.EVT_C_STORE, handler)] if handler is not None else []
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
    try:
        yield Destination(ae_title=aet, host="127.0.0.1", port=port)
    finally:
        server.shutdown()


class TestSendDataset:
    def test_stored_at_dcmtk_storescp(self, seg: Dataset) -> None:
        with StoreSCP(aet="STORESCP") as scp:
            result = send_dataset(
                seg,
                Destination(ae_title="STORESCP", host="127.0.0.1", port=scp.port),
                calling_ae="DICOMNODE",
                timeout=10,
            )
            assert result == ExportResult(ok=True, status=0x0000, reason="stored")
            (received,) = scp.received()
            assert pydicom.dcmread(received).SOPInstanceUID == seg.SOPInstanceUID

    def test_send_file(self, seg: Dataset, tmp_path: Path) -> None:
        path = tmp_path / "seg.dcm"
        seg.save_as(path, enforce_file_format=True)
        with StoreSCP() as scp:
            result = send_file(
                path,
                Destination(ae_title="STORESCP", host="127.0.0.1", port=scp.port),
                calling_ae="DICOMNODE",
                timeout=10,
            )
            assert result.ok, result.reason
            assert len(scp.received()) == 1

    def test_destination_down(self, seg: Dataset) -> None:
        down = Destination(ae_title="PACS", host="127.0.0.1", port=free_port())
        result = send_dataset(seg, down, calling_ae="DICOMNODE", timeout=5)
        assert (result.ok, result.status) == (False, None)
        assert result.reason.startswith("cannot connect to PACS@127.0.0.1")

    def test_refused_association(self, seg: Dataset) -> None:
        with StoreSCP(extra_args=["--refuse"]) as scp:
            result = send_dataset(
                seg,
                Destination(ae_title="STORESCP", host="127.0.0.1", port=scp.port),
                calling_ae="DICOMNODE",
                timeout=10,
            )
        assert (result.ok, result.status) == (False, None)
        # storescp sends A-ASSOCIATE-RJ and closes at once; pynetdicom sometimes sees the close
        # first and reports an abort. Either way the reason names the peer and the refusal.
        assert re.match(r"association (rejected|aborted) by STORESCP@127\.0\.0\.1", result.reason)

    def test_wrong_called_ae_is_rejected(self, seg: Dataset) -> None:
        with pynetdicom_scp(lambda event: 0x0000, require_called_aet=True) as pacs:
            wrong = pacs.model_copy(update={"ae_title": "NOTPACS"})
            result = send_dataset(seg, wrong, calling_ae="DICOMNODE", timeout=10)
        assert (result.ok, result.status) == (False, None)
        assert "Called AE title not recognised" in result.reason

    def test_failure_status_is_not_ok(self, seg: Dataset) -> None:
        with pynetdicom_scp(lambda event: 0xA700) as pacs:
            result = send_dataset(seg, pacs, calling_ae="DICOMNODE", timeout=10)
        assert result == ExportResult(ok=False, status=0xA700, reason="failure 0xA700")

    def test_warning_status_is_ok(self, seg: Dataset) -> None:
        with pynetdicom_scp(lambda event: 0xB000) as pacs:
            result = send_dataset(seg, pacs, calling_ae="DICOMNODE", timeout=10)
        assert (result.ok, result.status) == (True, 0xB000)
        assert result.reason.startswith("warning 0xB000")

    def test_no_response_is_reported(self, seg: Dataset) -> None:
        release = threading.Event()

        def slow(event: Any) -> int:
            release.wait(10)
            return 0x0000

        with pynetdicom_scp(slow) as pacs:
            try:
                result = send_dataset(seg, pacs, calling_ae="DICOMNODE", timeout=1)
            finally:
                release.set()
        assert (result.ok, result.status) == (False, None)
        assert result.reason.startswith("no response")

    def test_peer_taking_implicit_vr_only(self, seg: Dataset) -> None:
        received: list[str] = []

        def store(event: Any) -> int:
            received.append(event.context.transfer_syntax)
            return 0x0000

        with pynetdicom_scp(store, transfer_syntaxes=[ImplicitVRLittleEndian]) as pacs:
            result = send_dataset(seg, pacs, calling_ae="DICOMNODE", timeout=10)
        assert result.ok, result.reason
        assert received == [ImplicitVRLittleEndian]

    def test_peer_without_seg_context(self, seg: Dataset) -> None:
        with pynetdicom_scp(lambda event: 0x0000, contexts=(CTImageStorage,)) as pacs:
            result = send_dataset(seg, pacs, calling_ae="DICOMNODE", timeout=10)
        assert not result.ok
        assert "accepted no presentation context" in result.reason

    def test_tls_destination_needs_a_context(self, seg: Dataset) -> None:
        tls = Destination(ae_title="PACS", host="127.0.0.1", port=free_port(), tls=True)
        result = send_dataset(seg, tls, calling_ae="DICOMNODE", timeout=5)
        assert (result.ok, result.reason) == (
            False,
            "destination requires TLS but no TLS context was given",
        )

    def test_unreadable_file(self, tmp_path: Path) -> None:
        path = tmp_path / "not.dcm"
        path.write_bytes(b"this is not DICOM")
        dest = Destination(ae_title="PACS", host="127.0.0.1", port=free_port())
        result = send_file(path, dest, calling_ae="DICOMNODE", timeout=5)
        assert (result.ok, result.status) == (False, None)
        assert result.reason.startswith("cannot read not.dcm")


class TestTLS:
    def _scp(self, pki: Path) -> StoreSCP:
        return StoreSCP(
            extra_args=[
                "+tls",
                str(pki / "server.key"),
                str(pki / "server.crt"),
                "+cf",
                str(pki / "ca.crt"),
            ]
        )

    def test_stored_over_tls(self, seg: Dataset, pki: Path) -> None:
        context = client_tls_context(
            TLSConfig(cert=pki / "client.crt", key=pki / "client.key", ca=pki / "ca.crt")
        )
        with self._scp(pki) as scp:
            dest = Destination(ae_title="STORESCP", host="127.0.0.1", port=scp.port, tls=True)
            result = send_dataset(
                seg, dest, calling_ae="DICOMNODE", timeout=10, tls_context=context
            )
            assert result == ExportResult(ok=True, status=0x0000, reason="stored")
            assert len(scp.received()) == 1

    def test_untrusted_server_certificate(self, seg: Dataset, pki: Path) -> None:
        context = client_tls_context(
            TLSConfig(cert=pki / "client.crt", key=pki / "client.key", ca=pki / "other-ca.crt")
        )
        with self._scp(pki) as scp:
            dest = Destination(ae_title="STORESCP", host="127.0.0.1", port=scp.port, tls=True)
            result = send_dataset(
                seg, dest, calling_ae="DICOMNODE", timeout=10, tls_context=context
            )
            assert (result.ok, result.status) == (False, None)
            assert "TLS handshake failed" in result.reason
            assert scp.received() == []


class TestNoDelay:
    def test_requestor_socket_has_tcp_nodelay(self) -> None:
        with pynetdicom_scp(contexts=(Verification,)) as pacs:
            ae = _NoDelayAE(ae_title="DICOMNODE")
            ae.add_requested_context(Verification)
            assoc = ae.associate(pacs.host, pacs.port, ae_title=pacs.ae_title)
            try:
                assert assoc.is_established
                raw = assoc.dul.socket.socket
                assert raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            finally:
                assoc.release()
                ae.shutdown()
