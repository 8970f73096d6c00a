"""Real DICOM peers for tests and benchmarks: DCMTK, Orthanc and dciodvfy, all on loopback.

Every server here is a context manager that picks free loopback ports, waits until it answers and
stops in ``__exit__`` even when the test failed. DCMTK and Orthanc from Debian leave Nagle on unless
their environment has ``TCP_NODELAY=1`` (see DESIGN.md, pitfalls), so every process started here
gets it.

Example
-------
>>> with Orthanc(modalities={"node": ("DICOMNODE", "127.0.0.1", 11112)}) as pacs:
...     pacs.upload(path)
...     pacs.send_to_modality("node", [pacs.instances()[0]])
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.helpers.ports import free_port, wait_for_port

LOGGER = logging.getLogger(__name__)

ORTHANC_BINARY = "/usr/sbin/Orthanc"
"""Orthanc 1.10 from Debian."""

ORTHANC_DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
"""Orthanc's DICOMweb plugin, from the Debian package ``orthanc-dicomweb`` (``make test-deps``)."""

PEER_TIMEOUT = 60.0
"""Seconds a DCMTK command line tool may run before the helper gives up on it."""


def peer_env() -> dict[str, str]:
    """Return the environment for a DCMTK/Orthanc process: ours plus ``TCP_NODELAY=1``."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


TLSArgs = tuple[str | Path | None, str | Path | None, str | Path | None]
"""``(private_key, certificate, ca_certificate)`` for DCMTK TLS; key and certificate ``None``
for anonymous TLS (``+tla``), ``ca`` ``None`` to skip verifying the server (``-ic``)."""


def _tls_args(tls: TLSArgs | None) -> list[str]:
    """DCMTK TLS arguments from ``(key, cert, ca)``."""
    if tls is None:
        return []
    key, cert, ca = tls
    args = ["+tla"] if key is None or cert is None else ["+tls", str(key), str(cert)]
    args += ["+cf", str(ca)] if ca is not None else ["-ic"]
    return args


def echoscu(
    port: int,
    called_ae: str,
    calling_ae: str = "ECHOSCU",
    tls: TLSArgs | None = None,
    host: str = "127.0.0.1",
) -> subprocess.CompletedProcess[str]:
    """Run DCMTK ``echoscu`` once against ``host:port``.

    Parameters
    ----------
    port, called_ae, calling_ae, host:
        The peer and the AE titles.
    tls:
        ``(private_key, certificate, ca_certificate)`` to talk DICOM TLS (see :data:`TLSArgs`).

    Returns
    -------
    subprocess.CompletedProcess
        ``returncode == 0`` when the echo succeeded; stdout/stderr as text.
    """
    cmd = ["echoscu", "-aet", calling_ae, "-aec", called_ae, *_tls_args(tls), host, str(port)]
    return subprocess.run(
        cmd, capture_output=True, text=True, env=peer_env(), timeout=PEER_TIMEOUT, check=False
    )


def storescu(
    files_or_dirs: Sequence[str | Path] | str | Path,
    port: int,
    called_ae: str,
    calling_ae: str = "STORESCU",
    extra_args: Iterable[str] = (),
    host: str = "127.0.0.1",
    tls: TLSArgs | None = None,
    timeout: float = PEER_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """Send files (and directories, scanned recursively) with DCMTK ``storescu``.

    Parameters
    ----------
    files_or_dirs:
        DICOM files or folders; folders are scanned with ``+sd +r``.
    port, called_ae, calling_ae, host:
        The peer and the AE titles.
    extra_args:
        More ``storescu`` options (``-xs``, ``-R``, ``-v`` ...).
    tls:
        ``(private_key, certificate, ca_certificate)`` to talk DICOM TLS (see :data:`TLSArgs`).
    timeout:
        Seconds before the run is abandoned (``subprocess.TimeoutExpired``).

    Returns
    -------
    subprocess.CompletedProcess
        ``returncode == 0`` when every C-STORE succeeded. storescu prints failure statuses to
        stderr; use ``-v`` in ``extra_args`` to see them all.
    """
    if isinstance(files_or_dirs, str | Path):
        files_or_dirs = [files_or_dirs]
    paths = [str(p) for p in files_or_dirs]
    scan = ["+sd", "+r"] if any(Path(p).is_dir() for p in paths) else []
    cmd = [
        "storescu",
        "-aet",
        calling_ae,
        "-aec",
        called_ae,
        *scan,
        *_tls_args(tls),
        *extra_args,
        host,
        str(port),
        *paths,
    ]
    return subprocess.run(
        cmd, capture_output=True, text=True, env=peer_env(), timeout=timeout, check=False
    )


@dataclass
class DciodvfyResult:
    """What ``dciodvfy`` said about one file."""

    errors: list[str] = field(default_factory=list)
    """Lines starting with ``Error``."""
    warnings: list[str] = field(default_factory=list)
    """Lines starting with ``Warning``."""
    output: str = ""
    """Everything it printed (stdout and stderr), for assertion messages."""


def dciodvfy(path: str | Path) -> DciodvfyResult:
    """Validate a DICOM file against its IOD with dicom3tools' ``dciodvfy``.

    dciodvfy prints one finding per line as ``Error - ...`` or ``Warning - ...`` (to stderr), plus
    context lines; exit status is not a reliable verdict, so the lines are what counts.
    """
    proc = subprocess.run(
        ["dciodvfy", str(path)], capture_output=True, text=True, timeout=PEER_TIMEOUT, check=False
    )
    output = proc.stdout + proc.stderr
    lines = [line.strip() for line in output.splitlines()]
    return DciodvfyResult(
        errors=[line for line in lines if line.startswith("Error")],
        warnings=[line for line in lines if line.startswith("Warning")],
        output=output,
    )


class _Process:
    """A server process with a tmp dir that is always cleaned up."""

    name = "peer"

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        self.log_path = self.tmp / "log.txt"
        self._log: Any = None

    def _spawn(self, cmd: list[str], cwd: Path | None = None) -> None:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env=peer_env(), cwd=cwd
        )

    def log_text(self) -> str:
        """Return what the process printed so far (for assertion messages)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}"
            )

    def stop(self) -> None:
        """Terminate the process (kill after 10 s), close its log; keep the tmp dir."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def cleanup(self) -> None:
        """Stop and remove the tmp dir."""
        self.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


class Orthanc(_Process):
    """Orthanc 1.10 as a PACS on free loopback ports, with a generated configuration.

    Parameters
    ----------
    aet:
        Orthanc's own AE title.
    modalities:
        ``{name: (ae_title, host, port)}`` peers Orthanc may send to (``/modalities/{name}/store``)
        and accept from.
    stable_age:
        Seconds of quiet before Orthanc calls a series stable.
    keep:
        Keep the tmp dir (storage, config, log) after exit, for debugging.
    dicomweb:
        Load the DICOMweb plugin: STOW-RS, QIDO-RS and WADO-RS under :attr:`dicomweb_url`.
    users:
        ``{user: password}``: HTTP Basic authentication on the whole REST API (DICOMweb too);
        the helper's own REST calls use the first user.
    max_patients:
        ``MaximumPatientCount``: with every stored patient protected
        (:meth:`protect_patients`), a new patient is refused as "storage full".
    """

    name = "orthanc"

    def __init__(
        self,
        aet: str = "ORTHANC",
        modalities: dict[str, tuple[str, str, int]] | None = None,
        stable_age: int = 1,
        keep: bool = False,
        dicomweb: bool = False,
        users: dict[str, str] | None = None,
        max_patients: int = 0,
    ) -> None:
        super().__init__()
        if dicomweb and not ORTHANC_DICOMWEB_PLUGIN.exists():
            raise FileNotFoundError(
                f"{ORTHANC_DICOMWEB_PLUGIN} is missing: install the Debian package "
                "orthanc-dicomweb (make test-deps)"
            )
        self.dicomweb = dicomweb
        self.users = dict(users or {})
        self.max_patients = max_patients
        self.aet = aet
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.modalities = dict(modalities or {})
        self.stable_age = stable_age
        self.keep = keep
        self.base_url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb_url = f"{self.base_url}/dicom-web"
        """Base of the DICOMweb services (STOW-RS posts to ``{dicomweb_url}/studies``)."""

    def config(self) -> dict[str, Any]:
        """Return the Orthanc configuration this instance runs with."""
        return {
            "Name": "test-orthanc",
            "StorageDirectory": str(self.tmp / "storage"),
            "IndexDirectory": str(self.tmp / "index"),
            "Plugins": [str(ORTHANC_DICOMWEB_PLUGIN)] if self.dicomweb else [],
            "DicomWeb": {"Enable": self.dicomweb, "Root": "/dicom-web/"},
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users,
            "MaximumPatientCount": self.max_patients,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomCheckModalityHost": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomModalities": {
                name: [aet, host, port] for name, (aet, host, port) in self.modalities.items()
            },
            "DicomModalitiesInDatabase": False,
            "DicomScuTimeout": 30,
            "StableAge": self.stable_age,
            "ConcurrentJobs": 2,
            "HttpTimeout": 60,
            "StorageCompression": False,
            "SaveJobs": False,
        }

    def set_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Add or replace a DICOM peer, also in a running Orthanc (``PUT /modalities/{name}``)."""
        self.modalities[name] = (aet, host, port)
        if self.proc is not None:
            self._request("PUT", f"/modalities/{name}", {"AET": aet, "Host": host, "Port": port})

    def __enter__(self) -> Orthanc:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            LOGGER.warning("orthanc log tail:\n%s", self.log_text()[-3000:])
        if self.keep:
            self.stop()
        else:
            self.cleanup()

    def start(self, timeout: float = 30.0) -> None:
        """Write the configuration, start Orthanc and wait until ``/system`` answers."""
        config_path = self.tmp / "config.json"
        config_path.write_text(json.dumps(self.config(), indent=2))
        self._spawn([ORTHANC_BINARY, str(config_path)], cwd=self.tmp)
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            try:
                self.rest_get("/system")
                break
            except (urllib.error.URLError, ConnectionError, OSError) as exc:
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(
                        f"Orthanc did not answer in {timeout} s:\n{self.log_text()}"
                    ) from exc
                time.sleep(0.1)
        wait_for_port(self.dicom_port, timeout=timeout)

    def _request(self, method: str, path: str, body: Any = None, raw: bytes | None = None) -> Any:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        self._authorize(req)
        if raw is not None:
            req.add_header("Content-Type", "application/dicom")
        elif body is not None:
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=120) as rsp:
            payload = rsp.read()
        if not payload:
            return None
        try:
            return json.loads(payload)
        except ValueError:
            return payload

    def _authorize(self, req: urllib.request.Request) -> None:
        if self.users:
            user, password = next(iter(self.users.items()))
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")

    def protect_patients(self) -> None:
        """Protect every stored patient from recycling (``PUT /patients/{id}/protected``)."""
        for pid in self.rest_get("/patients"):
            self._request("PUT", f"/patients/{pid}/protected", raw=b"1")

    def rest_get(self, path: str) -> Any:
        """GET a REST path (``/instances``) and return its JSON (bytes if not JSON)."""
        return self._request("GET", path)

    def rest_post(self, path: str, body: Any) -> Any:
        """POST JSON to a REST path and return the JSON answer."""
        return self._request("POST", path, body)

    def rest_delete(self, path: str) -> Any:
        """DELETE a REST resource."""
        return self._request("DELETE", path)

    def instances(self) -> list[str]:
        """Return the Orthanc ids of every stored instance."""
        return list(self.rest_get("/instances"))

    def upload(self, path: str | Path) -> list[dict[str, Any]]:
        """Store DICOM files through REST (``POST /instances``); a folder uploads every file in it.

        Returns
        -------
        list of dict
            Orthanc's answer per file (``ID``, ``Status``, ``ParentSeries`` ...).
        """
        path = Path(path)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        return [self._request("POST", "/instances", raw=p.read_bytes()) for p in files]

    def send_to_modality(self, name: str, resources: Sequence[str]) -> Any:
        """C-STORE Orthanc resources (instance/series/study ids) to a configured modality.

        Synchronous: returns when the transfer is over. Raises ``urllib.error.HTTPError`` when
        Orthanc reports a failure.
        """
        return self.rest_post(
            f"/modalities/{name}/store", {"Resources": list(resources), "Synchronous": True}
        )

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        """Return ``/instances/{id}/simplified-tags`` (keyword -> value)."""
        return dict(self.rest_get(f"/instances/{instance_id}/simplified-tags"))

    def instance_file(self, instance_id: str) -> bytes:
        """Return the stored DICOM file of an instance."""
        req = urllib.request.Request(f"{self.base_url}/instances/{instance_id}/file")
        self._authorize(req)
        with urllib.request.urlopen(req, timeout=60) as rsp:
            return bytes(rsp.read())

    def wait_for_instances(self, count: int, timeout: float = 30.0) -> list[str]:
        """Poll until at least ``count`` instances are stored; return their ids."""
        deadline = time.monotonic() + timeout
        while True:
            ids = self.instances()
            if len(ids) >= count or time.monotonic() > deadline:
                return ids
            time.sleep(0.1)


class StoreSCP(_Process):
    """DCMTK ``storescp`` writing what it receives into ``output_dir`` on a free loopback port.

    Parameters
    ----------
    aet:
        Its AE title (``storescp`` answers any called AE unless told otherwise).
    output_dir:
        Folder for received files; a fresh tmp folder when None.
    ignore:
        Receive but do not store (``--ignore``), to measure the network path alone.
    extra_args:
        More ``storescp`` options.
    """

    name = "storescp"

    def __init__(
        self,
        aet: str = "STORESCP",
        output_dir: str | Path | None = None,
        ignore: bool = False,
        extra_args: Iterable[str] = (),
    ) -> None:
        super().__init__()
        self.aet = aet
        self.port = free_port()
        self.output_dir = Path(output_dir) if output_dir is not None else self.tmp / "out"
        self.ignore = ignore
        self.extra_args = list(extra_args)

    def __enter__(self) -> StoreSCP:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        cmd = ["storescp", "-aet", self.aet, "-od", str(self.output_dir), *self.extra_args]
        if self.ignore:
            cmd.append("--ignore")
        cmd.append(str(self.port))
        try:
            self._spawn(cmd)
            deadline = time.monotonic() + 15
            while True:
                self._check_alive()
                try:
                    wait_for_port(self.port, timeout=0.5)
                    break
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def received(self) -> list[Path]:
        """Return the files received so far, sorted by name."""
        return sorted(p for p in self.output_dir.rglob("*") if p.is_file())
