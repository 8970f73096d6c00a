"""The operator's HTTP port: ``/metrics`` (Prometheus), ``/healthz`` (alive), ``/readyz`` (ready).

``/healthz`` answers 200 while every internal loop made progress recently (see
:mod:`dicom_node.liveness`), else 503 naming the silent loop. ``/readyz`` answers 200 only when
rules are loaded, every production model is loaded, and the SCP is listening; otherwise 503, and
the JSON body says which check failed (including the last rule reload error), so an operator does
not have to read logs to know why. The checks' details (model versions, rule errors) are shown to
loopback callers only unless ``health_detail: any``: a hospital network need not learn them.
Every ``/metrics`` sample carries the process's ``node`` label
(:func:`dicom_node.metrics.node_registry`).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from dicom_node.metrics import REGISTRY, node_registry

LOGGER = logging.getLogger(__name__)

ReadinessCheck = Callable[[], dict[str, tuple[bool, str]]]
"""Returns ``{check name: (ok, detail)}``."""

LivenessCheck = ReadinessCheck
"""Same shape: ``{loop name: (ok, detail)}``."""


def _always_alive() -> dict[str, tuple[bool, str]]:
    return {}


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, generate_latest(self.server.registry), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            self._checks("alive", self.server.liveness())
        elif path == "/readyz":
            self._checks("ready", self.server.readiness())
        else:
            self._send(404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain")

    def _checks(self, key: str, checks: dict[str, tuple[bool, str]]) -> None:
        ok_all = all(ok for ok, _ in checks.values())
        body: dict[str, object] = {key: ok_all}
        if self._detail_allowed():
            body["checks"] = {k: {"ok": ok, "detail": d} for k, (ok, d) in checks.items()}
        self._send(
            200 if ok_all else 503,
            json.dumps(body, indent=1).encode() + b"\n",
            "application/json",
        )

    def _detail_allowed(self) -> bool:
        if self.server.detail_from == "any":
            return True
        try:
            return ipaddress.ip_address(self.client_address[0]).is_loopback
        except ValueError:
            return False

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt: str, *args: object) -> None:
        LOGGER.debug("http: " + fmt, *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        readiness: ReadinessCheck,
        liveness: LivenessCheck,
        detail_from: str,
        registry: CollectorRegistry,
    ) -> None:
        self.readiness = readiness
        self.liveness = liveness
        self.detail_from = detail_from
        self.registry = registry
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().server_bind()


class HealthServer:
    """Serves metrics and health in a background thread.

    Parameters
    ----------
    host, port:
        Where to listen; port 0 takes a free port (see :attr:`port`).
    readiness:
        Called on each ``/readyz``.
    liveness:
        Called on each ``/healthz``; none: always alive.
    detail_from:
        ``loopback`` (check details to loopback callers only) or ``any``.
    node:
        The ``node`` label of every metric served (:func:`dicom_node.metrics.node_registry`);
        None serves the metrics without it.
    """

    def __init__(
        self,
        host: str,
        port: int,
        readiness: ReadinessCheck,
        liveness: LivenessCheck | None = None,
        detail_from: str = "loopback",
        node: str | None = None,
    ) -> None:
        registry = node_registry(node) if node else REGISTRY
        self._server = _Server(
            (host, port), readiness, liveness or _always_alive, detail_from, registry
        )
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
