"""Who may call: ``allowed_callers`` pinned to a host and to a TLS client certificate subject.

Real TLS on loopback: a throw-away CA signs a client certificate for ``CN=modality1`` and one
for ``CN=intruder``; both verify against the node's ``tls.ca``, so only the subject tells the
right modality from the wrong one (issue 10 item 9).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import NuclearMedicineImageStorage  # type: ignore[attr-defined]

from dicom_node.config import CallerEntry, ConfigError, NodeConfig, TLSConfig, load_config
from dicom_node.jobs.records import InstanceRecord
from dicom_node.receive.handler import STATUS_SUCCESS
from dicom_node.receive.scp import CallerPolicy, StorageSCP
from dicom_node.receive.spool import Spool
from tests.helpers.dicom_factory import make_nm
from tests.helpers.peers import echoscu
from tests.test_receive_tls import _openssl

NODE_AE = "DICOMNODE"
MODALITY = "MODALITY1"
SUBJECT_OK = (("commonName", "modality1"), ("organizationName", "Hospital"))


@dataclass
class Pki:
    ca: Path
    server: tuple[Path, Path]  # certificate, key
    clients: dict[str, tuple[Path, Path]]  # CN -> certificate, key


def _signed(d: Path, name: str, subject: str, ext: str) -> tuple[Path, Path]:
    """A key and a certificate for ``subject`` signed by ``d/ca.pem``."""
    request = f"req -newkey rsa:2048 -nodes -keyout {name}.key -out {name}.csr -subj"
    _openssl(*request.split(), subject, cwd=d)
    (d / f"{name}.ext").write_text(ext + "\n")
    sign = (
        f"x509 -req -in {name}.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out {name}.pem "
        f"-days 2 -extfile {name}.ext"
    )
    _openssl(*sign.split(), cwd=d)
    return d / f"{name}.pem", d / f"{name}.key"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throw-away CA, a server certificate and client certificates for two subjects."""
    d = tmp_path_factory.mktemp("pki")
    ca = "req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj"
    _openssl(*ca.split(), "/CN=dicom-node callers CA", cwd=d)
    server = _signed(d, "server", "/CN=server", "subjectAltName=IP:127.0.0.1,DNS:localhost")
    clients = {
        cn: _signed(d, cn, f"/O=Hospital/CN={cn}", "extendedKeyUsage=clientAuth")
        for cn in ("modality1", "intruder")
    }
    return Pki(d / "ca.pem", server, clients)


@pytest.fixture
def tls_node(tmp_path: Path, pki: Pki) -> Iterator[Callable[..., tuple[StorageSCP, list]]]:
    """Start TLS StorageSCPs requiring client certificates; stopped at teardown."""
    started: list[StorageSCP] = []

    def start(allowed_callers: list[Any]) -> tuple[StorageSCP, list[InstanceRecord]]:
        tls = TLSConfig(cert=pki.server[0], key=pki.server[1], ca=pki.ca, require_client_cert=True)
        config = NodeConfig(
            ae_title=NODE_AE,
            host="127.0.0.1",
            port=0,
            storage=tmp_path / f"var{len(started)}",
            min_free_disk=0,
            tls=tls,
            allowed_callers=allowed_callers,
        )
        records: list[InstanceRecord] = []
        scp = StorageSCP(config, Spool(config.storage), records.append)
        started.append(scp)
        scp.start()
        return scp, records

    yield start
    for scp in started:
        scp.stop()


def tls_store(port: int, pki: Pki, client: str, calling_ae: str = MODALITY) -> str | int:
    """C-STORE one instance over TLS with ``client``'s certificate.

    Returns ``"rejected"`` when the association is rejected, else the C-STORE status.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    context.load_cert_chain(*(str(p) for p in pki.clients[client]))
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(NuclearMedicineImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE, tls_args=(context, "localhost"))
    if assoc.is_rejected:
        return "rejected"
    assert assoc.is_established, "neither established nor rejected"
    try:
        rsp = assoc.send_c_store(make_nm(rows=32, cols=32, seed=f"callers-{client}"))
        return int(rsp.Status) if rsp else "no response"
    finally:
        assoc.release()


class TestCertificatePinning:
    def test_right_ae_wrong_subject_is_rejected_right_subject_accepted(
        self, tls_node: Callable[..., Any], pki: Pki
    ) -> None:
        scp, records = tls_node(
            [{"ae_title": MODALITY, "host": "127.0.0.1", "cert_subject": "CN=modality1"}]
        )
        assert tls_store(scp.port, pki, "intruder") == "rejected"
        assert records == []
        assert tls_store(scp.port, pki, "modality1") == STATUS_SUCCESS
        assert len(records) == 1
        # the right certificate does not make another AE title acceptable
        assert tls_store(scp.port, pki, "modality1", calling_ae="OTHER") == "rejected"

    def test_dcmtk_peer_with_the_right_certificate(
        self, tls_node: Callable[..., Any], pki: Pki
    ) -> None:
        scp, _ = tls_node([{"ae_title": MODALITY, "cert_subject": "CN=modality1, O=Hospital"}])
        good, bad = (
            echoscu(scp.port, NODE_AE, MODALITY, tls=(key, cert, pki.ca))
            for cert, key in (pki.clients["modality1"], pki.clients["intruder"])
        )
        assert good.returncode == 0, good.stderr
        assert bad.returncode != 0
        assert "Calling AE Title Not Recognized" in bad.stdout + bad.stderr

    def test_string_entries_still_work_next_to_mappings(
        self, tls_node: Callable[..., Any], pki: Pki
    ) -> None:
        scp, records = tls_node(["OTHER", f"{MODALITY}@127.0.0.1"])
        assert tls_store(scp.port, pki, "intruder") == STATUS_SUCCESS  # no subject pinned
        scp, records = tls_node([f"{MODALITY}@10.9.9.9"])
        assert tls_store(scp.port, pki, "modality1") == "rejected"  # wrong host


class TestCallerPolicy:
    def test_reasons(self) -> None:
        policy = CallerPolicy.from_entries(
            [
                "ANY",
                "CT@10.0.0.5",
                CallerEntry(ae_title=MODALITY, cert_subject="CN=modality1, O=Hospital"),
            ]
        )
        assert policy is not None
        assert policy.check("ANY", "10.1.1.1") is None
        assert policy.check(" ANY ", "10.1.1.1") is None  # padded AE titles as sent
        assert policy.check("CT", "10.0.0.5") is None
        assert policy.check("CT", "10.0.0.6") == "calling AE not allowed from this host"
        assert policy.check("NOPE", "10.0.0.5") == "calling AE not in allowed_callers"
        assert policy.check(MODALITY, "10.0.0.5", SUBJECT_OK) is None
        assert policy.check(MODALITY, "h", SUBJECT_OK + (("countryName", "CH"),)) is None
        assert "does not match" in str(policy.check(MODALITY, "h", SUBJECT_OK[:1]))
        assert "no client certificate" in str(policy.check(MODALITY, "h", None))
        assert CallerPolicy.from_entries([]) is None


class TestConfig:
    TLS = "tls: {cert: s.pem, key: s.key, ca: ca.pem, require_client_cert: true}\n"

    def load(self, tmp_path: Path, text: str) -> NodeConfig:
        (tmp_path / "node.yaml").write_text(text)
        return load_config(tmp_path / "node.yaml", environ={})

    def test_all_forms(self, tmp_path: Path) -> None:
        config = self.load(
            tmp_path,
            self.TLS + "allowed_callers:\n  - ORTHANC\n  - CT1@10.0.0.5\n"
            "  - {ae_title: NM1, host: 10.0.0.6, cert_subject: 'CN=nm1, O=Hospital'}\n",
        )
        assert config.allowed_callers[:2] == ["ORTHANC", "CT1@10.0.0.5"]
        entry = config.allowed_callers[2]
        assert isinstance(entry, CallerEntry) and entry.host == "10.0.0.6"
        assert entry.subject == (("commonName", "nm1"), ("organizationName", "Hospital"))

    @pytest.mark.parametrize(
        ("entry", "message"),
        [
            ("{ae_title: NM1, cert_subject: 'XX=nm1'}", "cert_subject must be comma-separated"),
            ("{ae_title: NM1, cert_subjet: 'CN=nm1'}", "cert_subjet: Extra inputs"),
            ("'CT1@'", "host must be an IP address or a host name, got ''"),
            ("'A_TITLE_LONGER_THAN_16'", "ae_title must be 1-16 characters"),
            ("{host: 10.0.0.5}", "ae_title: Field required"),
            ("3", "must be text or a mapping, got int"),
        ],
    )
    def test_bad_entries_name_the_entry(self, tmp_path: Path, entry: str, message: str) -> None:
        with pytest.raises(ConfigError, match=r"allowed_callers: entry 1 \(") as info:
            self.load(tmp_path, self.TLS + f"allowed_callers: [{entry}]\n")
        assert message in str(info.value)

    def test_subject_needs_client_certificates(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="cert_subject .for NM1. needs TLS with client"):
            self.load(tmp_path, "allowed_callers: [{ae_title: NM1, cert_subject: 'CN=nm1'}]\n")
