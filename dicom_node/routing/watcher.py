"""Hot reload of the rules folder: poll, reload all-or-nothing, keep the last good set.

The node holds the active set in an :class:`ActiveRules`; a :class:`RulesWatcher` thread polls the
content hash of ``rules/*.yaml`` and, when it changes, loads the whole folder again. A valid set
replaces the active one with a single reference assignment; an invalid one is rejected whole
(logged with the same messages as ``rules check``, counted in
``dicom_node_rules_reload_failures_total``) and the last good set stays active.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from dicom_node import metrics
from dicom_node.routing.loader import rules_digest
from dicom_node.routing.rules import Problem, RulesError, RuleSet

LOGGER = logging.getLogger(__name__)

DEFAULT_INTERVAL = 1.0
"""Seconds between polls of the rules folder (edits are seen within about twice this)."""


class ActiveRules:
    """The rule set in force and the text of the last rejected reload (for ``/readyz``).

    Readers take ``current`` without a lock: replacing it is one reference assignment.
    """

    def __init__(self, ruleset: RuleSet | None = None) -> None:
        """Start with ``ruleset`` (or none: the node is not ready until rules load)."""
        self._state: tuple[RuleSet | None, str | None, list[Problem]] = (ruleset, None, [])

    @property
    def current(self) -> RuleSet | None:
        """The active rule set, or ``None`` when no valid set was ever loaded."""
        return self._state[0]

    @property
    def error(self) -> str | None:
        """The problems of the last rejected load as text, ``None`` after a good load."""
        return self._state[1]

    @property
    def problems(self) -> list[Problem]:
        """The problems of the last rejected load (empty after a good load)."""
        return list(self._state[2])

    @property
    def ready(self) -> bool:
        """True when a rule set is active (even if a later reload was rejected)."""
        return self._state[0] is not None

    def set(self, ruleset: RuleSet) -> None:
        """Make ``ruleset`` active and clear the error."""
        self._state = (ruleset, None, [])

    def set_error(self, problems: list[Problem]) -> None:
        """Record a rejected load; the active set (if any) stays."""
        text = "; ".join(str(p) for p in problems) or "rules could not be loaded"
        self._state = (self._state[0], text, list(problems))


class RulesWatcher:
    """Poll a rules folder and reload it when its ``*.yaml`` files change.

    Parameters
    ----------
    rules_dir:
        The folder to watch (files directly in it; subfolders are ignored).
    load:
        Loads the folder, e.g. ``lambda: load_rules(d, destinations=..., model_exists=...)``;
        raises :class:`RulesError` when invalid.
    on_change:
        Called with each newly loaded valid set (e.g. ``ActiveRules.set``).
    on_error:
        Called with the problems of each rejected set (e.g. ``ActiveRules.set_error``).
    interval:
        Seconds between polls.
    """

    def __init__(
        self,
        rules_dir: Path,
        load: Callable[[], RuleSet],
        on_change: Callable[[RuleSet], None],
        on_error: Callable[[list[Problem]], None],
        interval: float = DEFAULT_INTERVAL,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval!r}")
        self.rules_dir = Path(rules_dir)
        self._load, self._on_change, self._on_error = load, on_change, on_error
        self.interval = interval
        self._digest: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self, initial_load: bool = True) -> None:
        """Load the folder once now (unless ``initial_load`` is false), then poll in a thread."""
        if initial_load:
            self.check_now(initial=True)
        else:
            self._digest = rules_digest(self.rules_dir)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="rules-watcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop polling and wait for the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check_now()
            except Exception:  # noqa: BLE001 - the watcher must outlive any surprise
                LOGGER.exception("rules watcher: unexpected error")

    def check_now(self, initial: bool = False) -> bool | None:
        """Reload if the files changed since the last look.

        Returns
        -------
        bool | None
            ``None`` when nothing changed, ``True`` when a new set was applied, ``False``
            when it was rejected.
        """
        with self._lock:
            digest = rules_digest(self.rules_dir)
            if digest == self._digest and not initial:
                return None
            self._digest = digest
            try:
                ruleset = self._load()
            except RulesError as exc:
                problems = exc.problems
            except Exception as exc:  # noqa: BLE001 - any load failure is a rejected set
                LOGGER.exception("rules: loading %s failed", self.rules_dir)
                problems = [Problem(str(self.rules_dir), None, None, f"cannot load: {exc}")]
            else:
                metrics.RULES_INFO.clear()
                metrics.RULES_INFO.labels(version=ruleset.version).set(1)
                LOGGER.info(
                    "rules: %s set %s active (%d rules from %d files)",
                    "loaded" if initial else "reloaded",
                    ruleset.version,
                    len(ruleset.rules),
                    len(ruleset.files),
                )
                self._on_change(ruleset)
                return True
            if not initial:
                metrics.RULES_RELOAD_FAILURES.inc()
            LOGGER.warning(
                "rules: %s rejected, the previous set stays active:\n%s",
                "set" if initial else "reload",
                "\n".join(str(p) for p in problems),
            )
            self._on_error(problems)
            return False
