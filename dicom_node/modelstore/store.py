"""The model store: versioned, immutable model folders plus atomic aliases.

Layout (see ``models/README.md``)::

    <root>/<name>/aliases.yaml          production: "1", shadow: "2", canary: {version, percent}
    <root>/<name>/history.yaml          append-only alias history
    <root>/<name>/<version>/model.onnx
    <root>/<name>/<version>/manifest.yaml

A version folder is immutable once added: :meth:`ModelStore.add` copies it into a temporary
folder inside the store, verifies it, fsyncs it and renames it into place, and refuses (leaving
nothing behind) when the manifest is invalid, the sha256 does not match, the version exists or the
output contract differs from production. Alias changes are atomic file replacements.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_node.modelstore.aliases import (
    CANARY,
    PRODUCTION,
    SHADOW,
    AliasError,
    append_history,
    in_canary,
    model_lock,
    read_aliases,
    read_history,
    validate_alias_name,
    write_aliases,
)
from dicom_node.modelstore.files import fsync_dir, sha256_file
from dicom_node.modelstore.manifest import (
    MANIFEST_FILE,
    Manifest,
    ManifestError,
    contract_differences,
    load_manifest,
)
from dicom_node.modelstore.refs import NAME_PATTERN, ModelRefError, parse_model_ref

LOGGER = logging.getLogger(__name__)


class ModelStoreError(LookupError):
    """A store operation was refused or a reference cannot be resolved; the message says why."""


@dataclass(frozen=True)
class ResolvedVersion:
    """One concrete model version, as a job records and finishes on it.

    Attributes
    ----------
    name, version:
        The model and its version folder.
    alias:
        The alias the reference went through (``production``, ``canary`` ...), or ``None`` for a
        ``name:version`` reference.
    path:
        The version folder.
    manifest:
        Its validated manifest.
    sha256:
        The manifest's sha256 of the weights (verified by :meth:`ModelStore.verify` and before
        every load).
    """

    name: str
    version: str
    alias: str | None
    path: Path
    manifest: Manifest
    sha256: str

    @property
    def ref(self) -> str:
        """``name:version``: the exact version, independent of aliases."""
        return f"{self.name}:{self.version}"

    @property
    def model_file(self) -> Path:
        """The ONNX file."""
        return self.path / self.manifest.model_file

    @property
    def key(self) -> tuple[str, str, str]:
        """``(name, version, sha256)``: identity of a loaded session."""
        return (self.name, self.version, self.sha256)


def _version_sort_key(version: str) -> tuple[Any, ...]:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[._-]", version))


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for filename in filenames:
            fd = os.open(os.path.join(dirpath, filename), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


class ModelStore:
    """A folder of models, their versions and aliases.

    Parameters
    ----------
    root:
        The store folder (config ``models``). It need not exist until something is added.

    Notes
    -----
    Thread-safe: manifests are cached per immutable version folder; alias changes are serialised
    per model by a file lock, so several processes (CLI and node) may share one store.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._manifests: dict[tuple[str, str], Manifest] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ reading
    def model_dir(self, name: str) -> Path:
        """Return ``root/name`` (validating ``name``)."""
        if not isinstance(name, str) or not re.match(rf"^{NAME_PATTERN}$", name):
            raise ModelStoreError(
                f"model name must be letters, digits, '.', '_' or '-', got {name!r}"
            )
        return self.root / name

    def list_models(self) -> list[str]:
        """Return the model names in the store, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and not p.name.startswith(".") and not p.name.startswith("_")
        )

    def versions(self, name: str) -> list[str]:
        """Return the versions of ``name`` (folders with a manifest), in version order."""
        folder = self.model_dir(name)
        if not folder.is_dir():
            return []
        found = [
            p.name
            for p in folder.iterdir()
            if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST_FILE).is_file()
        ]
        return sorted(found, key=_version_sort_key)

    def manifest(self, name: str, version: str) -> Manifest:
        """Return the validated manifest of ``name:version`` (cached: versions are immutable).

        Raises
        ------
        ModelStoreError
            No such version, or its manifest is invalid (message from :class:`ManifestError`).
        """
        key = (name, str(version))
        with self._lock:
            cached = self._manifests.get(key)
        if cached is not None:
            return cached
        folder = self.model_dir(name) / str(version)
        if not (folder / MANIFEST_FILE).is_file():
            known = self.versions(name)
            raise ModelStoreError(
                f"{name}:{version}: no such version in {self.root} (versions: {known or 'none'})"
            )
        try:
            manifest = load_manifest(folder, check_folder=True)
        except ManifestError as exc:
            raise ModelStoreError(str(exc)) from exc
        if manifest.name != name:
            raise ModelStoreError(
                f"{folder / MANIFEST_FILE}: name: must equal the model folder {name!r}, "
                f"got {manifest.name!r}"
            )
        with self._lock:
            self._manifests[key] = manifest
        return manifest

    def aliases(self, name: str) -> dict[str, Any]:
        """Return the aliases of ``name``: ``{"production": "1", "canary": {...}, ...}``.

        Raises
        ------
        ModelStoreError
            The aliases file is invalid.
        """
        try:
            return read_aliases(self.model_dir(name))
        except AliasError as exc:
            raise ModelStoreError(str(exc)) from exc

    def history(self, name: str) -> list[dict[str, Any]]:
        """Return the alias history of ``name``, oldest first."""
        return read_history(self.model_dir(name))

    def _resolved(self, name: str, version: str, alias: str | None) -> ResolvedVersion:
        manifest = self.manifest(name, version)
        return ResolvedVersion(
            name=name,
            version=str(version),
            alias=alias,
            path=self.model_dir(name) / str(version),
            manifest=manifest,
            sha256=manifest.sha256,
        )

    def resolve(self, ref: str, study_uid: str | None = None) -> ResolvedVersion:
        """Resolve a reference to one concrete version.

        Parameters
        ----------
        ref:
            ``name@alias``, ``name:version`` or ``name`` (= ``name@production``).
        study_uid:
            StudyInstanceUID of the study. For ``@production`` with an active canary, the canary
            version is chosen when ``sha256(study_uid) % 100 < percent`` (deterministic, so a study
            always gets the same version); without a UID, production is chosen.

        Returns
        -------
        ResolvedVersion
            With ``alias`` = the alias actually used (``canary`` when the canary was chosen).

        Raises
        ------
        ModelStoreError
            Malformed reference, unknown model, alias not set, version missing or invalid.
        """
        try:
            name, alias, version = parse_model_ref(ref).as_tuple()
        except ModelRefError as exc:
            raise ModelStoreError(str(exc)) from exc
        if not self.model_dir(name).is_dir():
            raise ModelStoreError(
                f"{ref}: no model {name!r} in {self.root} (models: {self.list_models() or 'none'})"
            )
        if version is not None:
            return self._resolved(name, version, None)
        assert alias is not None
        aliases = self.aliases(name)
        if alias == PRODUCTION and CANARY in aliases:
            canary = aliases[CANARY]
            if in_canary(study_uid, canary["percent"]):
                return self._resolved(name, canary["version"], CANARY)
        if alias not in aliases:
            raise ModelStoreError(
                f"{ref}: alias {alias!r} is not set for {name} "
                f"(aliases: {sorted(aliases) or 'none'})"
            )
        target = aliases[alias]
        target_version = target["version"] if isinstance(target, dict) else target
        return self._resolved(name, target_version, alias)

    def model_exists(self, ref: str) -> tuple[bool, str]:
        """Return ``(True, "")`` when ``ref`` resolves now, else ``(False, reason)``."""
        try:
            self.resolve(ref)
        except ModelStoreError as exc:
            return False, str(exc)
        return True, ""

    def verify(self, resolved: ResolvedVersion) -> None:
        """Check the weights' sha256 against the manifest.

        Raises
        ------
        ModelStoreError
            The model file is missing or its sha256 differs (the message shows both digests).
        """
        path = resolved.model_file
        try:
            actual = sha256_file(path)
        except OSError as exc:
            raise ModelStoreError(f"{resolved.ref}: cannot read {path}: {exc.strerror}") from exc
        if actual != resolved.sha256:
            raise ModelStoreError(
                f"{resolved.ref}: sha256 of {path.name} is {actual}, manifest says "
                f"{resolved.sha256}: the weights were changed or corrupted"
            )

    # ------------------------------------------------------------------ adding
    def add(self, path: str | Path, allow_contract_change: bool = False) -> ResolvedVersion:
        """Copy a version folder into the store atomically.

        Parameters
        ----------
        path:
            A folder with ``manifest.yaml`` and the model file it names (any folder name; the
            manifest's ``name`` and ``version`` decide where it goes).
        allow_contract_change:
            Accept a segment contract (keys, labels, codes, channels) that differs from the
            current production version's.

        Returns
        -------
        ResolvedVersion
            The added version (``alias`` None).

        Raises
        ------
        ModelStoreError
            Refused: invalid manifest, missing model file, sha256 mismatch, version exists,
            missing reference data, or contract change. Nothing is left in the store.
        """
        source = Path(path)
        if not source.is_dir():
            raise ModelStoreError(f"refused {source}: not a folder (expected a version folder)")
        try:
            manifest = load_manifest(source, check_folder=False)
        except ManifestError as exc:
            raise ModelStoreError(f"refused: invalid manifest: {exc}") from exc
        label = f"{manifest.name}:{manifest.version}"
        model_file = source / manifest.model_file
        if not model_file.is_file():
            raise ModelStoreError(f"refused {label}: model_file {model_file} does not exist")
        actual = sha256_file(model_file)
        if actual != manifest.sha256:
            raise ModelStoreError(
                f"refused {label}: sha256 of {model_file} is {actual}, manifest says "
                f"{manifest.sha256}"
            )
        if manifest.reference_data and not (source / manifest.reference_data).is_dir():
            raise ModelStoreError(
                f"refused {label}: reference_data {manifest.reference_data!r} is not a folder "
                f"in {source}"
            )
        model_dir = self.model_dir(manifest.name)
        self._check_new_version(manifest, model_dir, allow_contract_change)  # before any write
        created_model_dir = not model_dir.exists()
        model_dir.mkdir(parents=True, exist_ok=True)
        tmp = model_dir / f".add-{manifest.version}-{uuid.uuid4().hex[:8]}"
        try:
            with model_lock(model_dir):
                target = model_dir / manifest.version
                self._check_new_version(manifest, model_dir, allow_contract_change)
                for stale in model_dir.glob(".add-*"):  # left by a crash: adds hold this lock
                    if stale != tmp:
                        shutil.rmtree(stale, ignore_errors=True)
                shutil.copytree(source, tmp)
                copied = sha256_file(tmp / manifest.model_file)
                if copied != manifest.sha256:
                    raise ModelStoreError(
                        f"refused {label}: copy has sha256 {copied}, manifest says "
                        f"{manifest.sha256} (source changed while copying?)"
                    )
                load_manifest(tmp / MANIFEST_FILE, check_folder=False)
                _fsync_tree(tmp)
                os.rename(tmp, target)
                fsync_dir(model_dir)
                if created_model_dir:
                    fsync_dir(self.root)
                append_history(
                    model_dir,
                    {"alias": None, "from": None, "to": manifest.version, "reason": "add"},
                )
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if created_model_dir:
                with contextlib.suppress(OSError):
                    (model_dir / ".lock").unlink()
                    model_dir.rmdir()
            raise
        LOGGER.info("added model %s", label)
        return self._resolved(manifest.name, manifest.version, None)

    def _check_new_version(self, manifest: Manifest, model_dir: Path, allow: bool) -> None:
        if (model_dir / manifest.version).exists():
            raise ModelStoreError(
                f"refused {manifest.name}:{manifest.version}: version {manifest.version!r} "
                f"already exists in {model_dir} (versions are immutable; publish a new version)"
            )
        self._check_contract(manifest, allow)

    def _check_contract(self, manifest: Manifest, allow: bool) -> None:
        try:
            aliases = self.aliases(manifest.name)
        except ModelStoreError:
            aliases = {}
        prod = aliases.get(PRODUCTION)
        if prod is None:
            return
        current = self.manifest(manifest.name, prod)
        diffs = contract_differences(current, manifest)
        if diffs and not allow:
            raise ModelStoreError(
                f"refused {manifest.name}:{manifest.version}: output contract differs from "
                f"production {manifest.name}:{prod}: {'; '.join(diffs)} "
                f"(use --allow-contract-change if consumers are ready)"
            )

    # ------------------------------------------------------------------ aliases
    def _require_version(self, name: str, version: str) -> None:
        self.manifest(name, version)  # raises ModelStoreError naming the known versions

    def set_alias(
        self,
        name: str,
        alias: str,
        version: str | None,
        reason: str = "set",
        gate_result: dict[str, Any] | None = None,
        percent: int | None = None,
    ) -> dict[str, Any]:
        """Point ``alias`` of ``name`` at ``version`` (``None`` removes it), atomically.

        ``canary`` takes ``percent`` (0-100). The change is appended to the history.

        Returns
        -------
        dict
            The history entry written.

        Raises
        ------
        ModelStoreError
            Unknown model or version, invalid alias name or percent.
        """
        try:
            validate_alias_name(alias)
        except AliasError as exc:
            raise ModelStoreError(str(exc)) from exc
        model_dir = self.model_dir(name)
        if not model_dir.is_dir():
            raise ModelStoreError(f"no model {name!r} in {self.root}")
        if version is not None:
            version = str(version)
            self._require_version(name, version)
        with model_lock(model_dir):
            aliases = self.aliases(name)
            before = aliases.get(alias)
            if version is None:
                aliases.pop(alias, None)
            elif alias == CANARY:
                if percent is None:
                    raise ModelStoreError("canary needs a percent (0-100)")
                aliases[CANARY] = {"version": version, "percent": percent}
            else:
                aliases[alias] = version
            if alias == PRODUCTION and version is not None:
                for follower in (CANARY, SHADOW):
                    value = aliases.get(follower)
                    follower_version = value["version"] if isinstance(value, dict) else value
                    if follower_version == version:
                        aliases.pop(follower)  # the trial is over: it is production now
            try:
                write_aliases(model_dir, aliases)
            except AliasError as exc:
                raise ModelStoreError(str(exc)) from exc
            entry: dict[str, Any] = {
                "alias": alias,
                "from": before,
                "to": aliases.get(alias),
                "reason": reason,
            }
            if gate_result is not None:
                entry["gate"] = gate_result
            record = append_history(model_dir, entry)
        LOGGER.info("model %s: alias %s %s -> %s (%s)", name, alias, before, entry["to"], reason)
        return record

    def promote(
        self,
        name: str,
        version: str,
        alias: str = PRODUCTION,
        gate_result: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Point ``alias`` (default production) at ``version``; record the gate result.

        Promoting the version a canary or shadow points at ends that canary or shadow.
        """
        return self.set_alias(name, alias, version, reason="promote", gate_result=gate_result)

    def previous_production(self, name: str) -> str | None:
        """Return the production version before the current one, from the history."""
        stack: list[str] = []
        for entry in self.history(name):
            if entry.get("alias") != PRODUCTION:
                continue
            if entry.get("reason") == "rollback":
                if stack:
                    stack.pop()
                continue
            if not stack and entry.get("from"):
                stack.append(str(entry["from"]))
            if entry.get("to"):
                stack.append(str(entry["to"]))
        current = self.aliases(name).get(PRODUCTION)
        if stack and stack[-1] == current:
            stack.pop()
        existing = set(self.versions(name))
        while stack and (stack[-1] == current or stack[-1] not in existing):
            stack.pop()
        return stack[-1] if stack else None

    def rollback(self, name: str) -> dict[str, Any]:
        """Point production back at the previous production version (repeatable).

        Raises
        ------
        ModelStoreError
            No previous production version in the history.
        """
        previous = self.previous_production(name)
        if previous is None:
            raise ModelStoreError(
                f"{name}: no previous production version in {name}/history.yaml to roll back to"
            )
        return self.set_alias(name, PRODUCTION, previous, reason="rollback")

    def shadow(self, name: str, version: str | None) -> dict[str, Any]:
        """Run ``version`` in shadow of production (``None`` stops it)."""
        return self.set_alias(name, SHADOW, version, reason="shadow")

    def canary(self, name: str, version: str | None, percent: int = 0) -> dict[str, Any]:
        """Send ``percent`` % of studies (by StudyInstanceUID) to ``version`` (``None`` stops)."""
        if version is not None and (
            isinstance(percent, bool) or not isinstance(percent, int) or not 0 <= percent <= 100
        ):
            raise ModelStoreError(f"canary percent must be an integer 0-100, got {percent!r}")
        return self.set_alias(name, CANARY, version, reason="canary", percent=percent)
