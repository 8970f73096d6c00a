"""STOW-RS export against a real Orthanc with its DICOMweb plugin, and through a running node.

The sender alone: a SEG is stored and Orthanc's REST API lists it; a batch where Orthanc refuses
one instance (FailedSOPSequence, HTTP 409) records each instance's own outcome; full storage,
wrong credentials, a wrong url and a service that is down each give a sentence that says what to
check, never the password. Through the node: a rule's SEG, overlay, GSPS and report reach
Orthanc by STOW-RS; with Orthanc down the job is retried and ends failed with a clear error while
the node keeps serving.
"""

from __future__ import annotations

import http.server
import logging
import ssl
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import Dataset

from dicom_node.config import ConfigError, DicomwebDestination, NodeConfig, load_config
from dicom_node.seg import AlgorithmInfo, build_seg
from dicom_node.send import send_files
from dicom_node.send.dicomweb import store_datasets
from tests.conftest import make_config, write_rules
from tests.helpers.dicom_factory import make_nm, write_series
from tests.helpers.peers import Orthanc, dciodvfy, storescu
from tests.helpers.ports import free_port
from tests.helpers.waiting import wait_until
from tests.test_export import _make_ca, _make_leaf

SEGMENTS = [
    {
        "key": "thyroid",
        "label": "Thyroid",
        "category": {"value": "123037004", "scheme": "SCT", "meaning": "Anatomical Structure"},
        "type": {"value": "69748006", "scheme": "SCT", "meaning": "Thyroid structure"},
    }
]

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
SC = "1.2.840.10008.5.1.4.1.1.7"
SR_3D = "1.2.840.10008.5.1.4.1.1.88.34"
GSPS = "1.2.840.10008.5.1.4.1.1.11.1"

RULE = """\
rules:
  - name: thyroid
    priority: 100
    when:
      Modality: NM
    complete: {instances: 1}
    model: thyroid-seg@production
    send_to: [%(to)s]
    outputs: [seg, overlay, gsps, report]
    stop: true
"""


def make_seg(seed: int = 1) -> tuple[Dataset, Dataset]:
    """A source NM image and a SEG on it."""
    nm = make_nm(rows=64, cols=64, seed=seed)
    mask = np.zeros((1, 64, 64), bool)
    mask[0, 20:40, 10:30] = True
    algorithm = AlgorithmInfo("thyroid-seg", "1", "production", "ab" * 32, "thyroid")
    return nm, build_seg([nm], {"thyroid": mask}, SEGMENTS, algorithm)


def save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def web(url: str, **extra: Any) -> DicomwebDestination:
    return DicomwebDestination(type="dicomweb", url=url, timeout=10, **extra)


def stored_sop_uids(orthanc: Orthanc) -> set[str]:
    return {orthanc.instance_tags(i)["SOPInstanceUID"] for i in orthanc.instances()}


@contextmanager
def loopback_http(
    answer: bytes, tls: ssl.SSLContext | None = None
) -> Iterator[tuple[str, list[str | None]]]:
    """A loopback HTTP(S) server answering every POST with 200 and ``answer``; yields its
    DICOMweb url and the Authorization headers it saw."""
    seen: list[str | None] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            self.rfile.read(int(self.headers["Content-Length"] or 0))
            seen.append(self.headers.get("Authorization"))
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    scheme = "https" if tls is not None else "http"
    try:
        yield f"{scheme}://127.0.0.1:{server.server_address[1]}/dicom-web", seen
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def orthanc() -> Iterator[Orthanc]:
    with Orthanc(dicomweb=True) as pacs:
        yield pacs


class TestConfig:
    def test_dicomweb_destination_beside_dimse_ones(self, tmp_path: Path) -> None:
        path = tmp_path / "node.yaml"
        path.write_text(
            "destinations:\n"
            "  pacs: {ae_title: ORTHANC, host: 127.0.0.1, port: 4242}\n"
            "  web:\n"
            "    type: dicomweb\n"
            "    url: http://pacs:8042/dicom-web/\n"
            "    auth: {type: basic, username: node, password_file: secrets/pw}\n"
            "    ca: certs/ca.pem\n"
        )
        config = load_config(path, environ={})
        assert config.destinations["pacs"].type == "dimse"
        dest = config.destinations["web"]
        assert isinstance(dest, DicomwebDestination)
        assert dest.url == "http://pacs:8042/dicom-web"
        assert dest.ca == tmp_path / "certs" / "ca.pem"  # relative to the file, like storage
        assert dest.auth is not None and dest.auth.password_file == tmp_path / "secrets" / "pw"

    @pytest.mark.parametrize(
        ("destination", "message"),
        [
            (
                "{type: dicomweb, url: 'http://u:secret@pacs/dicom-web'}",
                "must not hold credentials",
            ),
            ("{type: dicomweb, url: 'pacs:8042'}", "url must be http(s)://host"),
            (
                "{type: dicomweb, url: 'http://p/x', auth: {type: basic, username: u}}",
                "exactly one",
            ),
            ("{type: smtp, url: 'http://p'}", "'dimse', 'dicomweb'"),
        ],
    )
    def test_bad_dicomweb_destination_is_refused_by_name(
        self, tmp_path: Path, destination: str, message: str
    ) -> None:
        path = tmp_path / "node.yaml"
        path.write_text(f"destinations:\n  web: {destination}\n")
        with pytest.raises(ConfigError, match="destinations.web") as info:
            load_config(path, environ={})
        assert message in str(info.value)
        assert "secret" not in str(info.value)  # pydantic's input_value stays out


class TestStow:
    def test_seg_is_stored_and_orthanc_lists_it(self, orthanc: Orthanc, tmp_path: Path) -> None:
        _, seg = make_seg(seed=1)
        path = save(seg, tmp_path / "seg.dcm")
        (result,) = send_files([path], web(orthanc.dicomweb_url))
        assert result.ok and result.reason == "stored", result
        assert seg.SOPInstanceUID in stored_sop_uids(orthanc)

    def test_partial_success_is_recorded_per_instance(
        self, orthanc: Orthanc, tmp_path: Path
    ) -> None:
        # posted to one study's url, Orthanc stores that study's instance and refuses the other
        # one with FailedSOPSequence (FailureReason 0x0110) and HTTP 409
        _, seg_a = make_seg(seed=2)
        _, seg_b = make_seg(seed=3)
        ok, refused = store_datasets(
            [seg_a, seg_b], web(orthanc.dicomweb_url), study_uid=str(seg_a.StudyInstanceUID)
        )
        assert ok.ok and ok.reason == "stored"
        assert not refused.ok and refused.status == 0x0110
        assert refused.reason == "failure 0x0110 (Processing Failure) (HTTP 409)"
        stored = stored_sop_uids(orthanc)
        assert seg_a.SOPInstanceUID in stored and seg_b.SOPInstanceUID not in stored

    def test_unreadable_file_fails_alone(self, orthanc: Orthanc, tmp_path: Path) -> None:
        _, seg = make_seg(seed=4)
        good = save(seg, tmp_path / "seg.dcm")
        bad = tmp_path / "broken.dcm"
        bad.write_bytes(b"not dicom")
        broken, stored = send_files([bad, good], web(orthanc.dicomweb_url))
        assert not broken.ok and broken.reason.startswith("cannot read broken.dcm")
        assert stored.ok

    def test_batches_respect_max_instances_per_request(
        self, orthanc: Orthanc, tmp_path: Path
    ) -> None:
        paths = [save(make_seg(seed=10 + n)[1], tmp_path / f"{n}.dcm") for n in range(5)]
        results = send_files(paths, web(orthanc.dicomweb_url, max_instances_per_request=2))
        assert [r.ok for r in results] == [True] * 5
        assert {pydicom.dcmread(p).SOPInstanceUID for p in paths} <= stored_sop_uids(orthanc)

    def test_wrong_url_says_where_stow_lives(self, orthanc: Orthanc, tmp_path: Path) -> None:
        path = save(make_seg(seed=5)[1], tmp_path / "seg.dcm")
        (result,) = send_files([path], web(orthanc.base_url + "/dicomweb"))
        assert not result.ok and result.status is None
        assert "no STOW-RS service at this url (HTTP 404)" in result.reason
        assert "e.g. http://pacs:8042/dicom-web" in result.reason

    def test_service_down_is_cannot_connect(self, tmp_path: Path) -> None:
        path = save(make_seg(seed=6)[1], tmp_path / "seg.dcm")
        url = f"http://127.0.0.1:{free_port()}/dicom-web"
        (result,) = send_files([path], web(url))
        assert result == result.__class__(
            False, None, f"cannot connect to {url} (refused, unreachable or timed out)"
        )

    def test_full_storage_is_not_confirmed(self, tmp_path: Path) -> None:
        # Orthanc's plugin answers HTTP 200 with both sequences empty when its storage refuses
        nm, seg = make_seg(seed=7)
        with Orthanc(dicomweb=True, max_patients=1) as full:
            full.upload(save(make_nm(seed=70, PatientID="OTHER"), tmp_path / "other.dcm"))
            full.protect_patients()
            (result,) = send_files([save(seg, tmp_path / "seg.dcm")], web(full.dicomweb_url))
        assert not result.ok
        assert "did not confirm the instance (HTTP 200" in result.reason
        assert "full storage" in result.reason


class TestAuth:
    def test_basic_auth_from_env_and_file_never_logged(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.DEBUG)
        secret = "s3cret-Pw-77"
        (tmp_path / "pw").write_text(secret + "\n")
        monkeypatch.setenv("TEST_DICOMWEB_PW", secret)
        monkeypatch.setenv("TEST_DICOMWEB_WRONG", "nope")
        with Orthanc(dicomweb=True, users={"node": secret}) as pacs:
            paths = [save(make_seg(seed=20 + n)[1], tmp_path / f"{n}.dcm") for n in range(3)]

            def send(path: Path, **auth: Any) -> Any:
                dest = web(pacs.dicomweb_url, auth={"type": "basic", "username": "node", **auth})
                return send_files([path], dest)[0]

            assert send(paths[0], password_env="TEST_DICOMWEB_PW").ok
            assert send(paths[1], password_file=tmp_path / "pw").ok
            refused = send(paths[2], password_env="TEST_DICOMWEB_WRONG")
            unset = send(paths[2], password_env="TEST_DICOMWEB_UNSET")
            assert len(pacs.instances()) == 2
        assert not refused.ok and "authentication refused (HTTP 401)" in refused.reason
        assert not unset.ok
        assert "environment variable TEST_DICOMWEB_UNSET (named by auth) is not set" in unset.reason
        assert secret not in caplog.text and "nope" not in caplog.text

    def test_bearer_token_is_sent(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        # Orthanc has no bearer tokens; a loopback HTTP server records what arrives
        monkeypatch.setenv("TEST_DICOMWEB_TOKEN", "tok-123")
        with loopback_http(b"") as (url, seen):
            dest = web(url, auth={"type": "bearer", "token_env": "TEST_DICOMWEB_TOKEN"})
            (result,) = send_files([save(make_seg(seed=30)[1], tmp_path / "s.dcm")], dest)
        assert result.ok and seen == ["Bearer tok-123"]

    @pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
    def test_https_verifies_the_service_with_the_given_ca(self, tmp_path: Path) -> None:
        _make_ca(tmp_path, "ca")
        _make_leaf(tmp_path, "server", "ca")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tmp_path / "server.crt", tmp_path / "server.key")
        path = save(make_seg(seed=32)[1], tmp_path / "s.dcm")
        with loopback_http(b"", tls=context) as (url, seen):
            (trusted,) = send_files([path], web(url, ca=tmp_path / "ca.crt"))
            (unknown,) = send_files([path], web(url))  # the system CAs do not know ours
            (unchecked,) = send_files([path], web(url, verify=False))
        assert trusted.ok and unchecked.ok and len(seen) == 2
        assert not unknown.ok
        assert "TLS certificate of the service does not verify; give its CA" in unknown.reason

    def test_endless_answer_is_not_read(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr("dicom_node.send.dicomweb.MAX_RESPONSE_BYTES", 4096)
        with loopback_http(b" " * 100_000) as (url, _):
            (result,) = send_files([save(make_seg(seed=31)[1], tmp_path / "s.dcm")], web(url))
        assert not result.ok
        assert "answer is longer than 4096 bytes (not a STOW-RS answer)" in result.reason


def _dicomweb_config(tmp_path: Path, models_dir: Path, url: str, **overrides: Any) -> NodeConfig:
    rules = tmp_path / "rules"
    write_rules(rules, RULE % {"to": "web"})
    config = make_config(tmp_path, models_dir, rules, pacs_port=9, **overrides)
    dest = web(url)
    return config.model_copy(update={"destinations": {"web": dest}})


class TestThroughTheNode:
    def test_one_study_reaches_orthanc_by_c_store_and_by_stow(
        self, tmp_path: Path, models_dir: Path, node_factory: Any
    ) -> None:
        # issue 12: "Orthanc receives all of them for one study (C-STORE and STOW-RS)"
        rules = tmp_path / "rules"
        write_rules(rules, RULE % {"to": "pacs, web"})
        with Orthanc() as by_dimse, Orthanc(dicomweb=True) as by_web:
            config = make_config(tmp_path, models_dir, rules, by_dimse.dicom_port)
            destinations = {**config.destinations, "web": web(by_web.dicomweb_url)}
            node = node_factory(config.model_copy(update={"destinations": destinations}))
            source = make_nm(frames=1, seed=41)
            files = write_series([source], tmp_path / "in")
            assert storescu(files, config.port, config.ae_title).returncode == 0
            job = wait_until(lambda: node.store.list_jobs(["done"]), what="a done job")[0]
            for pacs in (by_dimse, by_web):
                found = {}
                for iid in pacs.instances():
                    path = tmp_path / f"{pacs.http_port}-{iid}.dcm"
                    path.write_bytes(pacs.instance_file(iid))
                    ds = pydicom.dcmread(path)
                    assert ds.StudyInstanceUID == source.StudyInstanceUID
                    found[str(ds.SOPClassUID)] = ds
                    report = dciodvfy(path)
                    assert report.errors == [], (ds.SOPClassUID, report.output)
                assert sorted(found) == sorted([SEG, SC, GSPS, SR_3D])
                sr = hd.sr.Comprehensive3DSR.from_dataset(found[SR_3D])
                groups = sr.content.get_volumetric_roi_measurement_groups()
                assert {g.referenced_segment.referenced_sop_instance_uid for g in groups} == {
                    found[SEG].SOPInstanceUID
                }
        assert job.outcome == (
            "SEG, 1 overlay image(s), 1 presentation state(s), report sent to pacs, web"
        )
        assert all(r.delivered == ("pacs", "web") for r in node.store.results(job.id))

    @pytest.mark.parametrize("trouble", ["down", "refuses"])
    def test_failing_service_is_retried_then_failed_and_node_keeps_serving(
        self, tmp_path: Path, models_dir: Path, node_factory: Any, trouble: str
    ) -> None:
        with ExitStack() as stack:
            if trouble == "down":
                url = f"http://127.0.0.1:{free_port()}/dicom-web"
                expected = f"cannot connect to {url} (refused, unreachable or timed out)"
            else:  # an Orthanc that wants a password the node does not have
                pacs = stack.enter_context(Orthanc(dicomweb=True, users={"node": "pw"}))
                url = pacs.dicomweb_url
                expected = f"{url}: authentication refused (HTTP 401)"
            config = _dicomweb_config(tmp_path, models_dir, url, export_retries=2)
            node = node_factory(config)
            files = write_series([make_nm(seed=42)], tmp_path / "in")
            assert storescu(files, config.port, config.ae_title).returncode == 0
            failed = wait_until(lambda: node.store.list_jobs(["failed"]), what="failed job")[0]
            assert failed.error.startswith("export failed after 3 attempt(s): web: SEG 1 of 4: ")
            assert expected in failed.error
            assert failed.error.count("; web: ") == 3  # SEG, overlay, GSPS, report: each named
            # still serving: another study is received and gets its own job
            more = write_series([make_nm(seed=43)], tmp_path / "more")
            assert storescu(more, config.port, config.ae_title).returncode == 0
            wait_until(lambda: len(node.store.list_jobs()) == 2, what="second job")
            with urllib.request.urlopen(
                f"http://127.0.0.1:{config.http_port}/healthz", timeout=5
            ) as rsp:
                assert rsp.status == 200
