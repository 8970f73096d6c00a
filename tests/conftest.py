"""Fixtures shared by the suite: tiny model stores, rule folders, configs and running nodes.

Every server a test starts (nodes, Orthanc, DCMTK) takes free loopback ports and is stopped in the
fixture's teardown, whether the test passed or not.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from dicom_node.config import Destination, NodeConfig, load_config
from tests.helpers.onnx_models import make_store
from tests.helpers.ports import free_port
from tests.helpers.waiting import wait_until

REPO = Path(__file__).resolve().parents[1]
DICOM_NODE = [sys.executable, "-m", "dicom_node.cli"]

THYROID_RULE = """\
rules:
  - name: thyroid
    priority: 100
    when:
      Modality: NM
    complete: {instances: %(instances)d}
    model: thyroid-seg@production
    send_to: [pacs]
    stop: true
"""


def write_rules(folder: Path, text: str, name: str = "rules.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    """A model store with ``thyroid-seg`` version 1 (a tiny real ONNX model), production -> 1."""
    return make_store(tmp_path / "models", versions=["1"], production="1", size=(64, 64))


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    """Rules routing every NM series to ``thyroid-seg@production``, complete at 1 instance."""
    folder = tmp_path / "rules"
    write_rules(folder, THYROID_RULE % {"instances": 1})
    return folder


def make_config(
    tmp_path: Path, models: Path, rules: Path, pacs_port: int, **overrides: Any
) -> NodeConfig:
    """A node configuration on free loopback ports with a small, fast pipeline."""
    values: dict[str, Any] = {
        "ae_title": "DICOMNODE",
        "host": "127.0.0.1",
        "port": free_port(),
        "http_host": "127.0.0.1",
        "http_port": free_port(),
        "storage": tmp_path / "var",
        "rules": rules,
        "models": models,
        "min_free_disk": 0,
        "poll_interval": 0.1,
        "reload_interval": 0.5,
        "export_retries": 2,
        "export_backoff": 0.2,
        "export_timeout": 10.0,
        "workers": 2,
        "destinations": {"pacs": Destination(ae_title="ORTHANC", host="127.0.0.1", port=pacs_port)},
    }
    values.update(overrides)
    return NodeConfig(**values)


def config_file(config: NodeConfig, path: Path) -> Path:
    """Write ``config`` as a YAML file a ``dicom-node --config`` subprocess can read."""
    data = config.model_dump(mode="json", exclude_none=True)
    with path.open("w") as fh:
        YAML(typ="safe").dump(data, fh)
    return path


@pytest.fixture
def node_factory() -> Iterator[Callable[[NodeConfig], Any]]:
    """Start in-process nodes; every one is stopped at teardown."""
    from dicom_node.node import Node

    started: list[Node] = []

    def start(config: NodeConfig) -> Node:
        node = Node(config)
        started.append(node)
        node.start()
        return node

    yield start
    for node in reversed(started):
        node.stop()


class NodeProcess:
    """``dicom-node serve`` in a subprocess (for kill -9 and signal tests)."""

    def __init__(self, config: NodeConfig, workdir: Path) -> None:
        self.config = config
        self.path = config_file(config, workdir / "node.yaml")
        self.log = workdir / "node.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str] | None = None) -> NodeProcess:
        log = self.log.open("ab")
        self.proc = subprocess.Popen(
            [*DICOM_NODE, "serve", "--config", str(self.path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, **(env or {})},
        )
        url = f"http://127.0.0.1:{self.config.http_port}/readyz"

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"dicom-node exited early:\n{self.output()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    return bool(json.loads(resp.read())["ready"])
            except (OSError, ValueError):
                return False

        # /readyz, not a TCP probe of the DICOM port: the tests should see the node's own
        # shutdown, not a half-open connection of ours
        wait_until(ready, timeout=60, what="dicom-node to be ready")
        return self

    def kill9(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 60) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@pytest.fixture
def node_process() -> Iterator[Callable[[NodeConfig, Path], NodeProcess]]:
    """Start ``dicom-node serve`` subprocesses; every one is killed at teardown."""
    procs: list[NodeProcess] = []

    def start(config: NodeConfig, workdir: Path) -> NodeProcess:
        proc = NodeProcess(config, workdir)
        procs.append(proc)
        return proc.start()

    yield start
    for proc in procs:
        proc.kill9()


# -- PostgreSQL (tests/helpers/postgres.py): one throw-away server per pytest(-xdist) worker ------
@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Any]:
    """A PostgreSQL server of Debian's binaries on a free loopback port, stopped at session end.

    Fails (never skips) when the binaries are missing: ``make test`` installs them.
    """
    from tests.helpers.postgres import PostgresMissing, PostgresServer

    try:
        server = PostgresServer()
    except PostgresMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    atexit.register(server.stop)  # also if the session ends without its teardown
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(postgres_server: Any) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test (dropped after): its SQLAlchemy URL,
    with the password of the node's login role in it."""
    name, url = postgres_server.create_database()
    try:
        yield url
    finally:
        postgres_server.drop_database(name)


DATABASES = ("sqlite", "postgresql")


@pytest.fixture(params=DATABASES)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The job store's database, once per kind: an SQLite file, then a PostgreSQL database."""
    if request.param == "postgresql":
        return str(request.getfixturevalue("pg_url"))
    return f"sqlite:///{tmp_path / 'jobs.db'}"


__all__ = ["load_config", "make_config", "write_rules", "config_file", "THYROID_RULE"]
