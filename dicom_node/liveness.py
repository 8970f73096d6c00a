"""Liveness that tells the truth: every internal loop reports progress, ``/healthz`` checks it.

A constant "ok" hides the failures an operator most needs to see: a dead dispatcher thread, a
job store that fails every call, a watcher that stopped. Each loop registers here with the
longest silence it may keep (a few of its own periods), and calls :meth:`Liveness.beat` after each
*successful* pass, so a loop that is alive but keeps failing looks as dead as one that stopped.
``/healthz`` answers 503 naming the silent loops; an orchestrator (systemd watchdog, Kubernetes
liveness probe, Docker HEALTHCHECK) then restarts the process, and nothing is lost, because every
stage resumes from the job store.

Exceptions that escape a background thread are logged with the thread's name and counted in
``dicom_node_thread_exceptions_total{thread}`` (:func:`install_thread_excepthook`), never silent.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from dicom_node import metrics

LOGGER = logging.getLogger(__name__)

_THREAD_LABEL = re.compile(r"[-_]?\d+$")


@dataclass
class _Loop:
    max_silence: float
    last_beat: float
    alive: Callable[[], bool] | None
    detail: str = ""


class Liveness:
    """A registry of internal loops and when each last made progress. Thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._loops: dict[str, _Loop] = {}
        self._lock = threading.Lock()

    def register(
        self, name: str, max_silence: float, alive: Callable[[], bool] | None = None
    ) -> None:
        """Watch loop ``name``: unhealthy when silent longer than ``max_silence`` seconds.

        ``alive``, when given, is also asked (e.g. ``thread.is_alive``): a dead thread is unhealthy
        at once, without waiting for its silence to run out.
        """
        if max_silence <= 0:
            raise ValueError(f"max_silence for loop {name!r} must be > 0, got {max_silence}")
        with self._lock:
            self._loops[name] = _Loop(max_silence, self._clock(), alive)

    def unregister(self, name: str) -> None:
        with self._lock:
            self._loops.pop(name, None)

    def beat(self, name: str) -> None:
        """Record that loop ``name`` just completed a pass successfully."""
        with self._lock:
            loop = self._loops.get(name)
            if loop is not None:
                loop.last_beat = self._clock()
                loop.detail = ""

    def trouble(self, name: str, detail: str) -> None:
        """Remember why loop ``name`` failed its last pass (shown by ``/healthz`` when silent)."""
        with self._lock:
            loop = self._loops.get(name)
            if loop is not None:
                loop.detail = detail

    def check(self) -> dict[str, tuple[bool, str]]:
        """``{loop: (ok, detail)}`` for every registered loop."""
        now = self._clock()
        out: dict[str, tuple[bool, str]] = {}
        with self._lock:
            loops = dict(self._loops)
        for name, loop in loops.items():
            silence = now - loop.last_beat
            if loop.alive is not None and not loop.alive():
                out[name] = (False, "thread has stopped")
            elif silence > loop.max_silence:
                why = f"; last error: {loop.detail}" if loop.detail else ""
                out[name] = (False, f"no progress for {silence:.0f} s{why}")
            else:
                out[name] = (True, f"progress {silence:.1f} s ago")
        return out

    def healthy(self) -> bool:
        return all(ok for ok, _ in self.check().values())


def install_thread_excepthook() -> None:
    """Log and count every exception that escapes a background thread (idempotent)."""
    if getattr(threading.excepthook, "_dicom_node", False):
        return
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            previous(args)
            return
        name = args.thread.name if args.thread is not None else "unknown"
        label = _THREAD_LABEL.sub("", name) or "unknown"  # bounded label set: no thread numbers
        metrics.THREAD_EXCEPTIONS.labels(thread=label).inc()
        LOGGER.error(
            "background thread %s died: %s",
            name,
            args.exc_type.__name__,
            exc_info=(args.exc_type, args.exc_value, args.exc_traceback),  # type: ignore[arg-type]
        )

    hook._dicom_node = True  # type: ignore[attr-defined]
    threading.excepthook = hook
