"""The site deployment in ``deploy/`` (README "Scaling out") is consistent with the node.

Docker cannot run here, so this reads the compose file the way compose would (merge keys,
``${VAR:-default}``) and checks what would break at ``docker compose up``: every node service's
command is a valid ``dicom-node`` command line, its configuration (``deploy/node.yaml`` plus the
image's and the service's ``DICOM_NODE_*`` variables) loads, it mounts the shared storage where
that configuration expects it, Prometheus scrapes every node's metrics port, and Orthanc knows
every receiver.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import click
import pytest
from ruamel.yaml import YAML

from dicom_node.cli import main
from dicom_node.config import NodeConfig, load_config

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"

_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def _substitute(value: str) -> str:
    """Compose's ``${VAR:-default}`` with nothing set: the default ('' without one)."""
    return _VAR.sub(lambda m: m.group(2) or "", value)


def _compose() -> dict[str, Any]:
    data = YAML(typ="safe").load(COMPOSE.read_text())
    assert isinstance(data, dict) and "services" in data
    return data


def _node_services() -> dict[str, dict[str, Any]]:
    """The services that run the dicom-node image (built from the repository's Dockerfile)."""
    services = _compose()["services"]
    return {name: svc for name, svc in services.items() if "build" in svc}


def _dockerfile() -> str:
    return (REPO / "Dockerfile").read_text()


def _image_env() -> dict[str, str]:
    """``ENV DICOM_NODE_*`` of the Dockerfile the node services are built from."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            for key, val in re.findall(r"(\w+)=(\S+)", line):
                env[key] = val
    return env


def _entrypoint() -> list[str]:
    match = re.search(r"^ENTRYPOINT\s+(\[.*\])", (REPO / "Dockerfile").read_text(), re.M)
    assert match, "the Dockerfile needs an ENTRYPOINT"
    return list(json.loads(match.group(1)))


def _service_config(svc: dict[str, Any]) -> NodeConfig:
    """The configuration the service's process would load inside its container."""
    env = {**_image_env(), **{k: _substitute(str(v)) for k, v in svc["environment"].items()}}
    args = svc["command"]
    path = args[args.index("--config") + 1]
    mounts = dict(_mount(v) for v in svc["volumes"])
    host = mounts.get(path)
    assert host is not None, f"--config {path} is not mounted into the container"
    return load_config(DEPLOY / host, environ=env)


def _mount(spec: str) -> tuple[str, str]:
    """``(container path, host path or volume)`` of a compose short volume syntax."""
    source, target = spec.split(":")[:2]
    return target, source


def _parse(args: list[str]) -> click.Context:
    """Parse a dicom-node command line as the CLI would, without running it."""
    ctx = click.Context(main, info_name="dicom-node")
    name, *rest = args
    cmd = main.get_command(ctx, name)
    assert cmd is not None, f"{name!r} is not a dicom-node verb"
    return cmd.make_context(name, rest, parent=ctx)


class TestCompose:
    def test_two_receivers_two_workers_postgres_orthanc_prometheus(self) -> None:
        services = _compose()["services"]
        assert {"postgres", "orthanc", "prometheus"} <= set(services)
        roles = sorted(_parse(s["command"]).params["role"] for s in _node_services().values())
        assert roles == ["receiver", "receiver", "worker", "worker"]

    @pytest.mark.parametrize("name", sorted(_node_services()))
    def test_every_node_command_is_a_valid_dicom_node_command_line(self, name: str) -> None:
        svc = _node_services()[name]
        assert _entrypoint() == ["dicom-node"]
        ctx = _parse(svc["command"])
        assert ctx.command.name == "serve"
        assert ctx.params["role"] in {"receiver", "worker"}

    def test_a_bad_command_would_be_caught(self) -> None:
        with pytest.raises(click.BadParameter, match="inferencer"):
            _parse(["serve", "--role", "inferencer"])
        with pytest.raises(click.UsageError, match="No such option"):
            _parse(["serve", "--rol", "worker"])

    @pytest.mark.parametrize("name", sorted(_node_services()))
    def test_every_node_config_loads_on_postgres_with_the_shared_storage(self, name: str) -> None:
        svc = _node_services()[name]
        config = _service_config(svc)
        assert str(config.database).startswith("postgresql+psycopg://")  # type: ignore[attr-defined]
        assert config.node_name == name, "metrics of each process carry its own node label"
        mounts = dict(_mount(v) for v in svc["volumes"])
        assert mounts[str(config.storage)] == "storage", "storage is the one shared volume"
        assert mounts[str(config.models)] == "../models"
        assert mounts[str(config.rules)] == "../rules"
        assert (DEPLOY / "../rules").resolve() == REPO / "rules"
        assert "storage" in _compose()["volumes"]

    def test_prometheus_scrapes_every_node_process(self) -> None:
        prom = YAML(typ="safe").load((DEPLOY / "prometheus.yml").read_text())
        targets = {
            t
            for job in prom["scrape_configs"]
            for sc in job["static_configs"]
            for t in sc["targets"]
        }
        wanted = {
            f"{name}:{_service_config(svc).http_port}" for name, svc in _node_services().items()
        }
        assert wanted <= targets
        mounts = dict(_mount(v) for v in _compose()["services"]["prometheus"]["volumes"])
        assert mounts["/etc/prometheus/prometheus.yml"] == "./prometheus.yml"

    def test_orthanc_knows_every_receiver_and_the_nodes_send_to_it(self) -> None:
        orthanc = json.loads((DEPLOY / "orthanc.json").read_text())
        receivers = {
            name: _service_config(svc)
            for name, svc in _node_services().items()
            if _parse(svc["command"]).params["role"] == "receiver"
        }
        known = {(aet, host, port) for aet, host, port in orthanc["DicomModalities"].values()}
        assert known == {(c.ae_title, name, c.port) for name, c in receivers.items()}
        for svc in _node_services().values():
            pacs = _service_config(svc).destinations["pacs"]
            assert (pacs.ae_title, pacs.host, pacs.port) == (orthanc["DicomAet"], "orthanc", 4242)

    def test_the_image_can_reach_postgresql(self) -> None:
        """The image's ``pip install .[extras]`` must bring the PostgreSQL driver."""
        project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
        match = re.search(r"pip install --no-cache-dir \.(?:\[([\w,-]+)\])?", _dockerfile())
        assert match, "the Dockerfile installs the node with pip install ."
        deps = list(project["dependencies"])
        for extra in (match.group(1) or "").split(","):
            deps += project.get("optional-dependencies", {}).get(extra, []) if extra else []
        assert any(dep.startswith("psycopg") for dep in deps), deps
