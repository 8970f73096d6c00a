"""The spool: received instances on disk, durable before the sender hears "success".

Layout (relative to ``storage``, so that ``storage`` can be a shared volume)::

    spool/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm

A file is written to a temporary name, fsynced, hard-linked to its final name (``link`` fails when
the name exists, so two associations racing on one SOP Instance UID store it once) and the final
folder is fsynced. The paths handed out are relative strings (``spool/1.2/1.3/1.4.dcm``).

Creating a file is the costliest step before the flushes on ext4 without a journal (this build
machine's root file system): the inode allocator scans its group from the start and skips every
inode freed in the last minutes, reading each one's table entry, so ``open(O_CREAT)`` took
0.2-0.6 ms per instance while other files were being removed (``perf``: ``ext4_create`` ->
``recently_deleted``; ``bench/RESULTS.md``). The spool therefore creates temporary files ahead of
time on a background thread (:meth:`Spool.prepare`), in ``spool/.incoming``, and a store takes
one, writes it, fsyncs it, links it to its final name and fsyncs the final folder; the staging
name is removed later by the same background thread. A store that finds no prepared file creates
one in its final folder, as before.

May import: ``dicom_node.metrics``, ``dicom_node.jobs.records`` (:func:`validate_uid`, the
one UID check of the node, re-exported here). No DICOM library: the spool stores bytes under UIDs.
"""

from __future__ import annotations

import collections
import errno
import itertools
import logging
import os
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from dicom_node import metrics
from dicom_node.jobs.records import validate_uid

LOGGER = logging.getLogger(__name__)

SPOOL_DIR = "spool"
"""Folder under ``storage`` that holds received instances."""

FSYNC: bool = True
"""fsync files and folders before a store returns. Only benchmarks that measure the cost of
durability turn this off; the node never does (DESIGN.md: success only after the bytes are on
disk)."""

FSYNC_DIRECTORY: bool = True
"""Two flushes per new instance: fsync the temp file, link it to its final name, fsync the folder.

This is what POSIX asks for. With ``False`` the spool links first and then fsyncs the file once:
on journaling file systems (ext4, XFS, btrfs) and NFS that single commit also carries the new
name, which roughly halves the cost of durability on a disk whose cache flush is slow (see
``bench/RESULTS.md``). A crash between link and fsync can then leave a short file under the final
name; it was never acknowledged, and the PACS's resend replaces it (a spooled file whose size
differs from a resent copy is rewritten)."""

INCOMING_DIR = ".incoming"
"""Folder under the spool holding temporary files prepared for coming instances (files named
``.tmp-*``; never an acknowledged instance by that name, removed at start-up)."""

PREPARED_TARGET = 4
"""Temporary files the background thread keeps ready (each association uses one at a time)."""

PREPARER_IDLE = 30.0
"""Seconds without a store after which the background thread ends (restarted on demand)."""

_TMP_PREFIX = ".tmp-"


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
    fsync_directory:
        Strict POSIX durability with two flushes per instance (default
        :data:`FSYNC_DIRECTORY`); see there.
    prepare_ahead:
        Create temporary files ahead of time on a background thread; see the module docstring.
        :class:`~dicom_node.receive.scp.StorageSCP` turns it on for the spool it receives into.

    Notes
    -----
    Thread-safe: the C-STORE handler runs on one thread per association.
    """

    def __init__(
        self,
        storage_root: Path,
        fsync: bool | None = None,
        fsync_directory: bool | None = None,
        prepare_ahead: bool = False,
    ) -> None:
        self.storage_root = Path(storage_root)
        self.root = self.storage_root / SPOOL_DIR
        self.fsync = FSYNC if fsync is None else fsync
        self.fsync_directory = FSYNC_DIRECTORY if fsync_directory is None else fsync_directory
        self.prepare_ahead = prepare_ahead
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._known_dirs: set[str] = set()
        self._bytes = self._scan()
        self._incoming = os.path.join(self.root, INCOMING_DIR)
        self._prepared: collections.deque[tuple[int, str]] = collections.deque()
        self._unlink_later: collections.deque[str] = collections.deque()
        self._prepared_names = f"{_TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}-"
        self._prepared_seq = itertools.count()
        self._prepare_wanted = threading.Event()
        self._preparer: threading.Thread | None = None
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
            One of the UIDs fails :func:`validate_uid`; the message names it.
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
            Its relative path, size and whether this call created it. False: the instance is
            already there; the file is kept and ``chunks`` are discarded (with
            ``fsync_directory`` off, a file of another size is replaced atomically instead).

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
        views = [memoryview(chunk).cast("B") for chunk in chunks]
        size = sum(len(v) for v in views)
        try:
            existing = os.stat(final).st_size
        except FileNotFoundError:
            existing = None
        if existing is not None and (existing == size or self.fsync_directory):
            return StoredFile(rel, existing, created=False)
        # Not there, or (fsync_directory off) there with another size: possibly a copy cut short
        # by a crash between link and fsync, never acknowledged; the resend replaces it.
        self._ensure_dir(folder)
        try:
            created = self._write(views, existing, final, folder, sop_instance_uid, staged=True)
        except FileNotFoundError:
            # the prepared file's name vanished (another Spool on this storage started and
            # cleaned up): write the instance again through a temp file of its own
            created = self._write(views, existing, final, folder, sop_instance_uid, staged=False)
        if not created:
            return StoredFile(rel, os.stat(final).st_size, created=False)
        with self._lock:
            self._bytes += size - (existing or 0)
            total = self._bytes
        metrics.SPOOL_BYTES.set(total)
        return StoredFile(rel, size, created=existing is None)

    def _write(
        self,
        views: list[memoryview],
        existing: int | None,
        final: str,
        folder: str,
        sop_instance_uid: str,
        staged: bool,
    ) -> bool:
        """Write ``views`` to a temp file (a prepared one if ``staged`` and there is one) and
        publish it under ``final``; see :meth:`store`."""
        prepared = None
        if staged:
            try:
                prepared = self._prepared.popleft()
            except IndexError:  # none ready (or another association took the last one)
                pass
        if prepared is not None:
            fd, tmp = prepared
        else:
            tmp = os.path.join(folder, f"{_TMP_PREFIX}{sop_instance_uid}.{threading.get_ident()}")
            fd = self._open_tmp(tmp, folder)
        if self.prepare_ahead:
            self.prepare()
        try:
            for view in views:
                while view:
                    view = view[os.write(fd, view) :]
            if existing is not None:
                return self._replace(fd, tmp, final, folder)
            return self._publish(fd, tmp, final, folder, prepared is not None)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        finally:
            os.close(fd)

    def prepare(self) -> None:
        """Have the background thread top up the prepared temporary files (start it if needed).

        Called by :meth:`store` when ``prepare_ahead`` is set. The thread creates up to
        :data:`PREPARED_TARGET` empty files in ``spool/.incoming``, removes the staging names of
        files already published, and ends after :data:`PREPARER_IDLE` idle seconds.
        """
        self._prepare_wanted.set()
        with self._lock:
            if self._preparer is None:
                self._preparer = threading.Thread(
                    target=self._prepare_loop, name="spool-prepare", daemon=True
                )
                self._preparer.start()

    def _prepare_loop(self) -> None:
        while True:
            if not self._prepare_wanted.wait(PREPARER_IDLE):
                with self._lock:
                    if not self._prepare_wanted.is_set():
                        self._preparer = None
                        return
                continue
            self._prepare_wanted.clear()
            while self._unlink_later:
                _unlink_quietly(self._unlink_later.popleft())
            while len(self._prepared) < PREPARED_TARGET:
                tmp = os.path.join(
                    self._incoming, f"{self._prepared_names}{next(self._prepared_seq)}"
                )
                try:
                    fd = self._open_tmp(tmp, self._incoming)
                except OSError as exc:
                    LOGGER.warning("could not prepare a spool file: %s", exc.strerror or exc)
                    break
                self._prepared.append((fd, tmp))

    def _open_tmp(self, tmp: str, folder: str) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        try:
            return os.open(tmp, flags, 0o644)
        except FileNotFoundError:  # the folder was cleaned up since we cached it
            with self._lock:
                self._known_dirs.discard(folder)
            self._ensure_dir(folder)
            return os.open(tmp, flags, 0o644)

    def _publish(self, fd: int, tmp: str, final: str, folder: str, staged: bool = False) -> bool:
        """Give the written temp file its final name durably; False if the name was taken.

        Durability does not depend on where the temp file was (its folder or ``.incoming``): its
        data and inode are fsynced before the link, and the folder holding the final name is
        fsynced after it. A staging name left behind by a crash is removed at start-up.
        """
        if self.fsync and self.fsync_directory:
            os.fsync(fd)  # data first ...
        try:
            os.link(tmp, final)  # ... then the name, which fails rather than overwrite
        except FileExistsError:
            os.unlink(tmp)
            return False
        if staged:  # off the critical path: the background thread removes the staging name
            self._unlink_later.append(tmp)
        else:
            os.unlink(tmp)
        if self.fsync:
            if self.fsync_directory:
                _fsync_dir(folder)
            else:
                os.fsync(fd)  # one journal commit: data, inode and the new name together
        return True

    def _replace(self, fd: int, tmp: str, final: str, folder: str) -> bool:
        """Atomically replace a wrong-sized file under the final name."""
        if self.fsync:
            os.fsync(fd)
        os.replace(tmp, final)
        if self.fsync:
            _fsync_dir(folder)
        LOGGER.info("replaced a spooled file whose size did not match a resent copy")
        return True

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
