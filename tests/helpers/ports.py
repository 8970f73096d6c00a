"""Free loopback ports for servers the tests start (never a fixed 11112/4242)."""

from __future__ import annotations

import socket
import threading

_TAKEN: set[int] = set()
_LOCK = threading.Lock()


def free_port() -> int:
    """Return a loopback TCP port that is free now and was not handed out before in this process."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        with _LOCK:
            if port not in _TAKEN:
                _TAKEN.add(port)
                return port


def wait_for_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    """Block until something listens on ``host:port``; raise TimeoutError otherwise."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s")
