"""Shared pieces of the benchmarks: a node subprocess with an Orthanc PACS, and RSS readings.

Benchmarks take their ports from the test helper (never a fixed 11112/4242) and stop every server
they start. They run from the repository root: ``python bench/run.py [--quick]``.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dicom_node.config import Destination, NodeConfig  # noqa: E402
from tests.helpers.ports import free_port, wait_for_port  # noqa: E402


def machine() -> str:
    """One line naming the machine, for RESULTS.md."""
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node()}: {os.cpu_count()} cores ({cpu}), Python {platform.python_version()}"


def load() -> str:
    """The 1/5/15-minute load averages, to print beside every figure (other sessions share
    these two cores)."""
    one, five, fifteen = os.getloadavg()
    return f"load {one:.2f}/{five:.2f}/{fifteen:.2f}"


def command_line() -> str:
    """The command that is running, as it would be typed from the repository root."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(REPO)
    except ValueError:
        pass
    return " ".join(["python", str(script), *sys.argv[1:]])


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def settle(pid: int, quiet: float = 0.05, window: float = 0.5, timeout: float = 30.0) -> float:
    """Wait until ``pid`` uses less than ``quiet`` of a core over ``window`` seconds, so that work
    left over from one run does not land in the next; return the seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        before = cpu_seconds(pid)
        time.sleep(window)
        if cpu_seconds(pid) - before < quiet * window:
            break
    return time.monotonic() - start


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def node_config(
    workdir: Path, models: Path, rules: Path, pacs_port: int, **overrides: object
) -> NodeConfig:
    values: dict[str, object] = {
        "host": "127.0.0.1",
        "port": free_port(),
        "http_host": "127.0.0.1",
        "http_port": free_port(),
        "storage": workdir / "var",
        "rules": rules,
        "models": models,
        "min_free_disk": 0,
        "poll_interval": 0.05,
        "log_level": "WARNING",
        "destinations": {"pacs": Destination(ae_title="ORTHANC", host="127.0.0.1", port=pacs_port)},
    }
    values.update(overrides)
    return NodeConfig(**values)  # type: ignore[arg-type]


class NodeServer:
    """``dicom-node serve`` as a subprocess, the way an operator runs it."""

    def __init__(self, config: NodeConfig, workdir: Path) -> None:
        from ruamel.yaml import YAML

        self.config = config
        self.path = workdir / "node.yaml"
        with self.path.open("w") as fh:
            YAML(typ="safe").dump(config.model_dump(mode="json", exclude_none=True), fh)
        self.log = workdir / "node.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> NodeServer:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(self.path)],
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        if self.config.role != "worker":  # a worker has no DICOM port
            wait_for_port(self.config.port, timeout=60)
        self._wait_ready()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def metrics(self) -> dict[str, float]:
        """The node's ``/metrics`` as ``{sample name with labels: value}`` (counters summed over
        nothing: one entry per line)."""
        import urllib.request

        url = f"http://127.0.0.1:{self.config.http_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                # every sample ends with the process's node label: keys stay as before it
                name = re.sub(r'\{node="[^"]*"\}$', "", name)
                name = re.sub(r',node="[^"]*"\}$', "}", name)
                values[name] = float(value)
        return values

    def _wait_ready(self, timeout: float = 60.0) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.config.http_port}/readyz"
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"node not ready: see {self.log}")

    def __exit__(self, *exc: object) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
