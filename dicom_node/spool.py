"""The spool: received instances on disk, durable before the sender hears "success".

Layout (relative to ``storage``, so that ``storage`` can be a shared volume)::

    spool/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm

A file is written to a temporary name in its final folder, fsynced, hard-linked to its final name
(``link`` fails when the name exists, so two associations racing on one SOP Instance UID store it
once) and the folder is fsynced. The paths handed out are relative strings (``spool/1.2/1.3/1.4.dcm``).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from dicom_node import metrics

LOGGER = logging.getLogger(__name__)

SPOOL_DIR = "spool"
"""Folder under ``storage`` that holds received instances."""

FSYNC: bool = True
"""fsync files and folders before a store returns. Only benchmarks that measure the cost of
durability turn this off; the node never does (DESIGN.md: success only after the bytes are on disk)."""

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_TMP_PREFIX = ".tmp-"


def validate_uid(value: object) -> tuple[bool, str]:
    """Check that a peer-supplied UID is safe and well-formed enough to become a path part.

    Parameters
    ----------
    value:
        The UID as received (``str``; anything else fails).

    Returns
    -------
    tuple of (bool, str)
        ``(True, "")`` when ``value`` is 1-64 characters of digits and single dots, not starting
        or ending with a dot; else ``(False, reason)``.
    """
    if not isinstance(value, str):
        return False, f"UID must be a str, got {type(value).__name__}"
    if not value:
        return False, "UID is empty"
    if len(value) > 64:
        return False, f"UID must be at most 64 characters, got {len(value)}"
    if not _UID_RE.match(value):
        return False, "UID must be digits separated by single dots"
    return True, ""


class InvalidUID(ValueError):
    """A UID that cannot become part of a spool path."""


@dataclass(frozen=True)
class StoredFile:
    """Outcome of :meth:`Spool.store`."""

    path: str
    """Path relative to ``storage`` (``spool/<study>/<series>/<sop>.dcm``), POSIX separators."""
    size: int
    """Bytes of the file on disk."""
    created: bool
    """False when the SOP instance was already in the spool (the new bytes were discarded)."""


class Spool:
    """Received instances under ``storage_root/spool``.

    Parameters
    ----------
    storage_root:
        The node's ``storage`` folder; created if missing.
    fsync:
        Make every store durable before returning (default :data:`FSYNC`).

    Notes
    -----
    Thread-safe: the C-STORE handler runs on one thread per association.
    """

    def __init__(self, storage_root: Path, fsync: bool | None = None) -> None:
        self.storage_root = Path(storage_root)
        self.root = self.storage_root / SPOOL_DIR
        self.fsync = FSYNC if fsync is None else fsync
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._known_dirs: set[str] = set()
        self._bytes = self._scan()
        metrics.SPOOL_BYTES.set(self._bytes)

    def _scan(self) -> int:
        """Sum the sizes of spooled files; remove temporary files a crash left behind."""
        total = 0
        for dirpath, _dirnames, filenames in os.walk(self.root):
            for name in filenames:
                full = os.path.join(dirpath, name)
                try:
                    if name.startswith(_TMP_PREFIX):
                        os.unlink(full)
                        continue
                    total += os.stat(full).st_size
                except FileNotFoundError:
                    continue
        return total

    def relative_path(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> str:
        """Return ``spool/<study>/<series>/<sop>.dcm`` after validating the three UIDs.

        Raises
        ------
        InvalidUID
            One of the UIDs is not 1-64 characters of digits and dots; the message names it.
        """
        for name, uid in (
            ("StudyInstanceUID", study_uid),
            ("SeriesInstanceUID", series_uid),
            ("SOPInstanceUID", sop_instance_uid),
        ):
            ok, reason = validate_uid(uid)
            if not ok:
                raise InvalidUID(f"{name} {uid!r} is not usable: {reason}")
        return f"{SPOOL_DIR}/{study_uid}/{series_uid}/{sop_instance_uid}.dcm"

    def absolute(self, relative: str) -> Path:
        """Return the absolute path of a relative spool path."""
        return self.storage_root / relative

    def exists(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> bool:
        """Return True when the instance is already in the spool."""
        rel = self.relative_path(study_uid, series_uid, sop_instance_uid)
        return os.path.exists(self.storage_root / rel)

    def store(
        self,
        study_uid: str,
        series_uid: str,
        sop_instance_uid: str,
        chunks: Iterable[bytes | bytearray | memoryview],
    ) -> StoredFile:
        """Write one instance durably, once.

        Parameters
        ----------
        study_uid, series_uid, sop_instance_uid:
            Where the instance goes; validated before they become path parts.
        chunks:
            The file's bytes (preamble + file meta, then the data set as received).

        Returns
        -------
        StoredFile
            Its relative path, size and whether this call created it (False: already there, the
            existing file is kept and ``chunks`` are discarded).

        Raises
        ------
        InvalidUID
            A UID is unusable as a path part.
        OSError
            The file could not be written (``errno.ENOSPC`` when the disk is full); nothing is left
            behind under the final name.
        """
        rel = self.relative_path(study_uid, series_uid, sop_instance_uid)
        final = os.path.join(self.storage_root, rel)
        folder = os.path.dirname(final)
        try:
            size = os.stat(final).st_size
        except FileNotFoundError:
            pass
        else:
            return StoredFile(rel, size, created=False)
        self._ensure_dir(folder)
        tmp = os.path.join(folder, f"{_TMP_PREFIX}{sop_instance_uid}.{threading.get_ident()}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        try:
            fd = os.open(tmp, flags, 0o644)
        except FileNotFoundError:  # the folder was cleaned up since we cached it
            with self._lock:
                self._known_dirs.discard(folder)
            self._ensure_dir(folder)
            fd = os.open(tmp, flags, 0o644)
        try:
            size = 0
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    written = os.write(fd, view)
                    size += written
                    view = view[written:]
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            _unlink_quietly(tmp)
            raise
        os.close(fd)
        try:
            os.link(tmp, final)
        except FileExistsError:
            _unlink_quietly(tmp)
            return StoredFile(rel, os.stat(final).st_size, created=False)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        os.unlink(tmp)
        if self.fsync:
            _fsync_dir(folder)
        with self._lock:
            self._bytes += size
            total = self._bytes
        metrics.SPOOL_BYTES.set(total)
        return StoredFile(rel, size, created=True)

    def remove(self, relative: str) -> None:
        """Delete a spooled file (missing is fine) and account for its bytes."""
        full = self.storage_root / relative
        try:
            size = full.stat().st_size
            full.unlink()
        except FileNotFoundError:
            return
        with self._lock:
            self._bytes = max(0, self._bytes - size)
            total = self._bytes
        metrics.SPOOL_BYTES.set(total)

    def _ensure_dir(self, folder: str) -> None:
        """Create ``folder`` (and parents) durably; remembered so that the hot path skips it."""
        if folder in self._known_dirs:
            return
        missing: list[str] = []
        current = folder
        while not os.path.isdir(current):
            missing.append(current)
            current = os.path.dirname(current)
        for path in reversed(missing):
            try:
                os.mkdir(path, 0o755)
            except FileExistsError:
                continue
            if self.fsync:
                _fsync_dir(os.path.dirname(path))
        with self._lock:
            if len(self._known_dirs) > 100_000:
                self._known_dirs.clear()
            self._known_dirs.add(folder)

    def free_bytes(self) -> int:
        """Return the bytes available to this user on the file system holding ``storage``."""
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def bytes_used(self) -> int:
        """Return the bytes held in the spool (running total, initialised by a scan)."""
        with self._lock:
            return self._bytes


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            LOGGER.warning("could not remove temporary spool file: %s", exc.strerror)
