"""DICOM TLS on the SCP: TLS senders are served; plain TCP and missing client certs are not."""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import NuclearMedicineImageStorage  # type: ignore[attr-defined]

from dicom_node.config import NodeConfig, TLSConfig
from dicom_node.jobs.records import InstanceRecord
from dicom_node.receive.handler import STATUS_SUCCESS
from dicom_node.receive.scp import StorageSCP
from dicom_node.receive.spool import Spool
from dicom_node.receive.transport import build_ssl_context
from tests.helpers.dicom_factory import make_nm, write_series
from tests.helpers.peers import echoscu, storescu

NODE_AE = "DICOMNODE"


@dataclass
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A throw-away CA with a server certificate (127.0.0.1/localhost) and a client certificate."""
    d = tmp_path_factory.mktemp("certs")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=dicom-node test CA",
        cwd=d,
    )
    for name, extra in (
        ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
            cwd=d,
        )
        (d / f"{name}.ext").write_text(extra + "\n")
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
            cwd=d,
        )
    return Certs(
        d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key"
    )


@pytest.fixture
def tls_node(tmp_path: Path, certs: Certs) -> Iterator[Callable[..., tuple[StorageSCP, list]]]:
    """Start TLS-only StorageSCPs; all are stopped at teardown."""
    started: list[StorageSCP] = []

    def start(require_client_cert: bool = False) -> tuple[StorageSCP, list[InstanceRecord]]:
        tls = TLSConfig(
            cert=certs.server_cert,
            key=certs.server_key,
            ca=certs.ca,
            require_client_cert=require_client_cert,
        )
        config = NodeConfig(
            ae_title=NODE_AE,
            host="127.0.0.1",
            port=0,
            storage=tmp_path / f"var{len(started)}",
            min_free_disk=0,
            tls=tls,
        )
        records: list[InstanceRecord] = []
        scp = StorageSCP(config, Spool(config.storage), records.append)
        started.append(scp)
        scp.start()
        return scp, records

    yield start
    for scp in started:
        scp.stop()


def client_context(certs: Certs, with_cert: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(certs.ca))
    if with_cert:
        context.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    return context


def pynetdicom_tls_store(port: int, context: ssl.SSLContext) -> Any:
    ae = AE(ae_title="TLSSCU")
    ae.add_requested_context(NuclearMedicineImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE, tls_args=(context, "localhost"))
    if not assoc.is_established:
        return None
    try:
        rsp = assoc.send_c_store(make_nm(rows=32, cols=32, seed="tls-py"))
        return int(rsp.Status) if rsp else None
    finally:
        assoc.release()


class TestTLS:
    def test_dcmtk_tls_sender_is_served(
        self, tls_node: Callable[..., Any], certs: Certs, tmp_path: Path
    ) -> None:
        scp, records = tls_node()
        files = write_series([make_nm(rows=32, cols=32, seed="tls")], tmp_path / "in")
        result = storescu(files, scp.port, NODE_AE, extra_args=["+tla", "+cf", str(certs.ca)])
        assert result.returncode == 0, result.stderr
        assert len(records) == 1

    def test_pynetdicom_tls_sender_is_served(
        self, tls_node: Callable[..., Any], certs: Certs
    ) -> None:
        scp, records = tls_node()
        assert pynetdicom_tls_store(scp.port, client_context(certs, False)) == STATUS_SUCCESS
        assert len(records) == 1

    def test_plain_tcp_sender_is_refused_and_tls_still_works(
        self, tls_node: Callable[..., Any], certs: Certs, tmp_path: Path
    ) -> None:
        scp, records = tls_node()
        files = write_series([make_nm(rows=32, cols=32, seed="plain")], tmp_path / "in")
        assert echoscu(scp.port, NODE_AE).returncode != 0
        assert storescu(files, scp.port, NODE_AE).returncode != 0
        assert records == []
        assert echoscu(scp.port, NODE_AE, tls=(None, None, certs.ca)).returncode == 0

    def test_required_client_certificate(self, tls_node: Callable[..., Any], certs: Certs) -> None:
        scp, records = tls_node(require_client_cert=True)
        assert pynetdicom_tls_store(scp.port, client_context(certs, False)) is None
        anonymous = echoscu(scp.port, NODE_AE, tls=(None, None, certs.ca))
        assert anonymous.returncode != 0
        with_cert = echoscu(scp.port, NODE_AE, tls=(certs.client_key, certs.client_cert, certs.ca))
        assert with_cert.returncode == 0, with_cert.stderr
        assert pynetdicom_tls_store(scp.port, client_context(certs, True)) == STATUS_SUCCESS
        assert len(records) == 1

    def test_client_certificates_need_a_ca(self, certs: Certs) -> None:
        tls = TLSConfig(cert=certs.server_cert, key=certs.server_key, require_client_cert=True)
        with pytest.raises(ValueError, match="require_client_cert needs tls.ca"):
            build_ssl_context(tls)
