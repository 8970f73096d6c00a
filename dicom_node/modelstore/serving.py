"""Hot swap: which versions the node serves, following the alias files.

:class:`ServingModels` keeps a snapshot ``{model: {alias: ResolvedVersion}}`` of loaded and warmed
versions. :meth:`ServingModels.refresh` reads every model's aliases and loads and warms a newly
aliased version *before* switching the snapshot to it; when loading fails the old version keeps
serving, the failure is logged and counted (``dicom_node_model_load_failures_total``). It runs
every ``interval`` seconds (own thread, or the node's scheduler), and for one model whenever a job
finds that model's ``aliases.yaml`` changed since the last refresh, so that a job follows the alias
as it is when the job starts. Jobs call :meth:`ServingModels.resolve_for_job` once when they start
and finish on that version even if the alias moves meanwhile; retired sessions are released after
a grace period.

Embedding::

    serving = ServingModels(ModelStore(cfg.models), ModelRunner(cfg.inference_threads),
                            interval=cfg.reload_interval)
    serving.start()                      # first refresh is synchronous
    version = serving.resolve_for_job("thyroid-seg@production", study_uid)
    masks = serving.runner.run(version, frames)
    serving.stop()
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Iterable
from typing import Any

from dicom_node import metrics
from dicom_node.modelstore.aliases import ALIASES_FILE, CANARY, PRODUCTION, SHADOW, in_canary
from dicom_node.modelstore.refs import ModelRefError, parse_model_ref
from dicom_node.modelstore.runner import ModelLoadError, ModelRunner
from dicom_node.modelstore.store import ModelStore, ModelStoreError, ResolvedVersion

LOGGER = logging.getLogger(__name__)

SERVED_ALIASES = (PRODUCTION, CANARY, SHADOW)
"""Aliases loaded for every model; other aliases are loaded when a job first asks for them."""

RETRY_FAILED_SECONDS = 30.0
"""A version that failed to load is retried after this long (versions are immutable, so a
retry only helps after a transient error such as memory pressure)."""

RETIRE_GRACE_SECONDS = 10.0
"""A version no alias serves any more is released this long after it was retired, so that jobs
that resolved it just before the switch still find its session."""


@dataclasses.dataclass(frozen=True)
class _Served:
    resolved: ResolvedVersion
    percent: int | None = None


class ServingModels:
    """The versions a node serves, kept in step with the store's aliases.

    Parameters
    ----------
    store:
        The model store.
    runner:
        The runner holding the sessions.
    interval:
        Seconds between refreshes when started with :meth:`start` (config ``reload_interval``).
    retire_grace:
        Seconds a retired version's session is kept before release.
    """

    def __init__(
        self,
        store: ModelStore,
        runner: ModelRunner,
        interval: float = 1.0,
        retire_grace: float = RETIRE_GRACE_SECONDS,
    ) -> None:
        self.store = store
        self.runner = runner
        self.interval = float(interval)
        self.retire_grace = float(retire_grace)
        self._state: dict[str, dict[str, _Served]] = {}
        self._pinned: dict[tuple[str, str, str], ResolvedVersion] = {}
        self._wanted: set[tuple[str, str]] = set()
        self._failed: dict[tuple[str, str], tuple[float, str]] = {}
        self._retired: dict[
            tuple[str, str, str], tuple[ResolvedVersion | tuple[str, str, str], float]
        ] = {}
        self._errors: dict[str, str] = {}
        self._signatures: dict[str, tuple[int, int, int] | None] = {}
        self._lock = threading.RLock()
        self._refresh_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------- refresh
    def refresh(self) -> None:
        """Bring the served versions in line with the alias files (never raises)."""
        with self._refresh_lock:
            try:
                names = self.store.list_models()
            except OSError as exc:
                LOGGER.error("cannot list model store %s: %s", self.store.root, exc)
                return
            for name in names:
                try:
                    self._refresh_model(name)
                except Exception:  # one broken model must not stop the others
                    LOGGER.exception("refreshing model %s failed", name)
            for name in set(self._state) - set(names):
                self._switch(name, {})
            self._release_retired()

    def _alias_signature(self, name: str) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.store.model_dir(name) / ALIASES_FILE)
        except (OSError, ModelStoreError):
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _refresh_model(self, name: str) -> None:
        self._signatures[name] = self._alias_signature(name)
        try:
            aliases = self.store.aliases(name)
        except ModelStoreError as exc:
            if self._errors.get(name) != str(exc):
                LOGGER.error("keeping current versions of %s: %s", name, exc)
            self._errors[name] = str(exc)
            return
        self._errors.pop(name, None)
        with self._lock:
            old = dict(self._state.get(name, {}))
            wanted = {alias for (model, alias) in self._wanted if model == name}
        new: dict[str, _Served] = {}
        for alias in sorted(set(SERVED_ALIASES) | wanted):
            target = aliases.get(alias)
            if target is None:
                continue
            version = target["version"] if isinstance(target, dict) else target
            percent = target["percent"] if isinstance(target, dict) else None
            current = old.get(alias)
            if current is not None and current.resolved.version == version:
                new[alias] = _Served(current.resolved, percent)
                continue
            resolved = self._load(name, version, alias)
            if resolved is not None:
                new[alias] = _Served(resolved, percent)
            elif current is not None:
                new[alias] = current  # keep serving the old version
        self._switch(name, new)

    def _load(self, name: str, version: str, alias: str) -> ResolvedVersion | None:
        """Load and warm ``name:version``; None (logged, counted) on failure."""
        failed = self._failed.get((name, version))
        if failed is not None and time.monotonic() - failed[0] < RETRY_FAILED_SECONDS:
            return None
        try:
            resolved = self.store.resolve(f"{name}:{version}")
            self.runner.load(resolved)
        except (ModelStoreError, ModelLoadError) as exc:
            self._failed[(name, version)] = (time.monotonic(), str(exc))
            metrics.MODEL_LOAD_FAILURES.labels(model=name, version=version).inc()
            LOGGER.error(
                "cannot serve %s:%s as %s, keeping the current version: %s",
                name,
                version,
                alias,
                exc,
            )
            return None
        self._failed.pop((name, version), None)
        return dataclasses.replace(resolved, alias=alias)

    def _switch(self, name: str, new: dict[str, _Served]) -> None:
        with self._lock:
            old = self._state.get(name, {})
            if new:
                self._state[name] = new
            else:
                self._state.pop(name, None)
        for alias, served in old.items():
            if alias not in new or new[alias].resolved.version != served.resolved.version:
                _remove_info(name, served.resolved.version, alias)
        now = time.monotonic()
        for alias, served in new.items():
            metrics.MODEL_INFO.labels(model=name, version=served.resolved.version, alias=alias).set(
                1
            )
            previous = old.get(alias)
            if previous is None or previous.resolved.version != served.resolved.version:
                LOGGER.info("serving %s:%s as %s", name, served.resolved.version, alias)
        live = self._live_keys()
        for served in old.values():
            key = served.resolved.key
            if key not in live and key not in self._retired:
                self._retired[key] = (served.resolved, now)

    def _live_keys(self) -> set[tuple[str, str, str]]:
        with self._lock:
            keys = {s.resolved.key for aliases in self._state.values() for s in aliases.values()}
            return keys | set(self._pinned)

    def _release_retired(self) -> None:
        live = self._live_keys()
        now = time.monotonic()
        for key in self.runner.loaded():  # e.g. reloaded by a job that resolved it before a swap
            if key not in live and key not in self._retired:
                self._retired[key] = (key, now)
        for key, (resolved, since) in list(self._retired.items()):
            if key in live:
                del self._retired[key]
            elif now - since >= self.retire_grace:
                del self._retired[key]
                self.runner.release(resolved)

    # ----------------------------------------------------------------- lookups
    def resolve_for_job(self, ref: str, study_uid: str | None = None) -> ResolvedVersion:
        """Return the loaded, warmed version a new job must use (and finish on).

        Parameters
        ----------
        ref:
            ``name@alias``, ``name:version`` or ``name``.
        study_uid:
            StudyInstanceUID; decides canary membership for ``@production`` deterministically.

        Raises
        ------
        ModelStoreError
            Malformed reference, unknown model or alias, or the version cannot be loaded.
        """
        try:
            name, alias, version = parse_model_ref(ref).as_tuple()
        except ModelRefError as exc:
            raise ModelStoreError(str(exc)) from exc
        if version is not None:
            return self._pinned_version(name, version)
        assert alias is not None
        if self._alias_signature(name) != self._signatures.get(name, ()):
            self.refresh_model(name)  # the alias file changed since the last refresh
        served = self._lookup(name, alias)
        if served is None:
            with self._lock:
                self._wanted.add((name, alias))
            self.refresh_model(name)
            served = self._lookup(name, alias)
        if served is None:
            reason = self._errors.get(name) or self._failure_reason(name, alias)
            raise ModelStoreError(f"{name}@{alias}: no loaded version to serve ({reason})")
        if alias == PRODUCTION:
            with self._lock:
                canary = self._state.get(name, {}).get(CANARY)
            if canary is not None and in_canary(study_uid, canary.percent or 0):
                return canary.resolved
        return served.resolved

    def resolve_version(self, name: str, version: str, alias: str | None = None) -> ResolvedVersion:
        """Return the loaded ``name:version`` (e.g. for a resumed job that recorded its version).

        Parameters
        ----------
        alias:
            The alias the job originally resolved through, kept in the returned value.

        Raises
        ------
        ModelStoreError
            Unknown version, or it cannot be loaded.
        """
        resolved = self._pinned_version(name, str(version))
        return dataclasses.replace(resolved, alias=alias) if alias else resolved

    def run(
        self, resolved: ResolvedVersion, frames: list[Any], **geometry: Any
    ) -> list[dict[str, Any]]:
        """Run ``resolved`` on ``frames`` (see :meth:`ModelRunner.run`; records the metrics).

        ``geometry``: ``spacing``, ``slice_spacing``, ``volumes`` for the manifest's
        ``postprocess:`` steps (see :meth:`ModelRunner.run`).
        """
        return self.runner.run(resolved, frames, **geometry)

    def predict(self, resolved: ResolvedVersion, frames: list[Any], **options: Any) -> Any:
        """Masks, raw masks and probabilities (see :meth:`ModelRunner.predict`)."""
        return self.runner.predict(resolved, frames, **options)

    def run_confident(
        self, resolved: ResolvedVersion, frames: list[Any], summary: Any = None, **options: Any
    ) -> Any:
        """Run and judge the result (see :meth:`ModelRunner.run_confident`; ``options``: its
        geometry and ``probabilities``)."""
        return self.runner.run_confident(resolved, frames, summary, **options)

    def refresh_model(self, name: str) -> None:
        """Refresh one model now (what :meth:`refresh` does for every model)."""
        with self._refresh_lock:
            self._refresh_model(name)

    def _failure_reason(self, name: str, alias: str) -> str:
        try:
            target = self.store.aliases(name).get(alias)
        except ModelStoreError as exc:
            return str(exc)
        if target is None:
            return f"alias {alias!r} is not set"
        version = target["version"] if isinstance(target, dict) else target
        failed = self._failed.get((name, version))
        return failed[1] if failed else f"{name}:{version} is not loaded"

    def _lookup(self, name: str, alias: str) -> _Served | None:
        with self._lock:
            return self._state.get(name, {}).get(alias)

    def _pinned_version(self, name: str, version: str) -> ResolvedVersion:
        with self._lock:
            for aliases in self._state.get(name, {}).values():
                if aliases.resolved.version == version:
                    return dataclasses.replace(aliases.resolved, alias=None)
        resolved = self.store.resolve(f"{name}:{version}")
        with self._lock:
            pinned = self._pinned.get(resolved.key)
        if pinned is not None:
            return pinned
        try:
            self.runner.load(resolved)
        except ModelLoadError as exc:
            metrics.MODEL_LOAD_FAILURES.labels(model=name, version=version).inc()
            raise ModelStoreError(str(exc)) from exc
        with self._lock:
            self._pinned[resolved.key] = resolved
        return resolved

    def shadow_for(self, name: str) -> ResolvedVersion | None:
        """Return the loaded shadow version of ``name``, or None when no shadow is served."""
        served = self._lookup(name, SHADOW)
        return served.resolved if served is not None else None

    def served(self) -> dict[str, dict[str, Any]]:
        """Return ``{model: {alias: version or {version, percent}}}`` as currently served."""
        with self._lock:
            return {
                name: {
                    alias: (
                        {"version": s.resolved.version, "percent": s.percent}
                        if alias == CANARY
                        else s.resolved.version
                    )
                    for alias, s in aliases.items()
                }
                for name, aliases in self._state.items()
            }

    def ready(self, refs: Iterable[str] | None = None) -> tuple[bool, str]:
        """Return ``(True, "")`` when every production version needed is loaded.

        Parameters
        ----------
        refs:
            Model references the rules use (``name@production``, ...); ``None`` checks every
            model in the store that has a production alias.
        """
        if refs is None:
            needed = set()
            for name in self.store.list_models():
                try:
                    if PRODUCTION in self.store.aliases(name):
                        needed.add((name, PRODUCTION))
                except ModelStoreError as exc:
                    return False, str(exc)
        else:
            needed = set()
            for ref in refs:
                try:
                    name, alias, version = parse_model_ref(ref).as_tuple()
                except ModelRefError as exc:
                    return False, str(exc)
                if version is None and alias is not None:
                    needed.add((name, alias))
        missing = [f"{n}@{a}" for n, a in sorted(needed) if self._lookup(n, a) is None]
        if missing:
            reasons = [f"{m}: {self._failure_reason(*m.split('@'))}" for m in missing]
            return False, "models not loaded: " + "; ".join(reasons)
        return True, ""

    # ----------------------------------------------------------------- thread
    def start(self) -> None:
        """Refresh once now, then every ``interval`` seconds in a daemon thread."""
        self.refresh()
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="model-refresh", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.refresh()

    def stop(self) -> None:
        """Stop the refresh thread (sessions stay loaded until the runner is dropped)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None


def _remove_info(name: str, version: str, alias: str) -> None:
    try:
        metrics.MODEL_INFO.remove(name, version, alias)
    except KeyError:
        pass
