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

One flush per instance (:data:`DEFER_DIRECTORY_FSYNC`): a prepared file's name in
``.incoming`` is made durable by the background thread *before* the file is handed out (one
folder fsync for a batch of files). A store then writes the instance into it, sets an extended
attribute with the size and CRC-32 of what it wrote (:data:`STAGED_XATTR`), fsyncs the file
(data, inode and the attribute: one cache flush), links it to its final name and returns; the
sender hears Success. The final folder (and any folder created for the instance) is fsynced
later by the background thread, many instances per flush, and only then is the staging name
removed. Until then the staging name is the durable record of the instance: after a power cut
the start-up scan (:meth:`Spool._recover`) links every staged file whose attribute matches its
bytes to the final name its File Meta and header give, and removes the rest (never
acknowledged: a crash hit them before their fsync returned). Strict POSIX durability, in the
order "file, then name, then folder" with both flushes before Success, is still what a store
without a prepared file, or on a file system without user extended attributes, does. Measured
on this machine (``bench/RESULTS.md``, issue 15): the folder flush was ~40% of the C-STORE
handler's time.

May import: ``dicom_node.metrics``, ``dicom_node.jobs.records`` (:func:`validate_uid`, the
one UID check of the node, re-exported here), :mod:`dicom_node.receive.header` (to find the
final name of a staged file at start-up). No DICOM library: the spool stores bytes under UIDs.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import errno
import itertools
import logging
import os
import threading
import time
import uuid
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

DEFER_DIRECTORY_FSYNC: bool = True
"""One flush per instance: the final folder is fsynced by the background thread, the staging
name (durable, with a checksum attribute) standing in for it until then; see the module
docstring. Only with ``fsync`` and ``fsync_directory`` on, and a prepared file."""

STAGED_XATTR = "user.dicom_node.staged"
"""Extended attribute of a staged file: ``b"<size>:<length>=<crc32 hex>,..."`` (size, then
length and CRC-32 of each written piece: File Meta, data set), set before its fsync; the
start-up recovery trusts a staged file only when it matches."""

INCOMING_DIR = ".incoming"
"""Folder under the spool holding temporary files prepared for coming instances (files named
``.tmp-*``; never an acknowledged instance by that name, removed at start-up)."""

PREPARED_TARGET = 32
"""Temporary files the background thread keeps ready (each association uses one at a time); it
tops them up in batches (:data:`PREPARED_LOW`), so that one folder flush makes a batch durable."""

PREPARED_LOW = 24
"""The background thread is woken to top up when this few prepared files are left: early
enough that a burst on a busy disk does not run them out (a store without one takes the
strict path, two flushes)."""

SETTLE_DELAY = 0.05
"""Seconds the background thread lets published instances gather before it flushes their
folders (one flush per folder for all of them) and removes their staging names; this is what
keeps that flush off the device while the next instances' own flushes need it."""

PREPARER_IDLE = 30.0
"""Seconds without a store after which the background thread ends (restarted on demand)."""

PREALLOCATE_MAX = 16 * 2**20
"""Largest reservation for a prepared file: each one gets the blocks of the last instance's size
reserved ahead (``fallocate`` with ``FALLOC_FL_KEEP_SIZE``), so that the flush on the C-STORE
path allocates nothing (measured on this machine's ext4: 0.38-0.42 ms per 131 kB instance
instead of 0.51-0.56 ms; ``bench/RESULTS.md``, issue 15). A store frees what it did not use."""

_TMP_PREFIX = ".tmp-"
_FALLOC_FL_KEEP_SIZE = 1


def _load_fallocate() -> Any:
    """libc's ``fallocate`` (Linux), or None where there is none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        func = libc.fallocate
    except (OSError, AttributeError):
        return None
    func.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    func.restype = ctypes.c_int
    return func


_FALLOCATE = _load_fallocate()


def _reserve(fd: int, size: int) -> bool:
    """Reserve ``size`` bytes of blocks for ``fd`` without changing its size; False where the
    file system or platform cannot (nothing is reserved then)."""
    if _FALLOCATE is None or size <= 0:
        return False
    return bool(_FALLOCATE(fd, _FALLOC_FL_KEEP_SIZE, 0, size) == 0)


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
        defer_directory_fsync: bool | None = None,
        recover_min_age: float = 0.0,
    ) -> None:
        self.storage_root = Path(storage_root)
        self.root = self.storage_root / SPOOL_DIR
        self.fsync = FSYNC if fsync is None else fsync
        self.fsync_directory = FSYNC_DIRECTORY if fsync_directory is None else fsync_directory
        self.prepare_ahead = prepare_ahead
        deferred = DEFER_DIRECTORY_FSYNC if defer_directory_fsync is None else defer_directory_fsync
        self.defer_directory_fsync = deferred and self.fsync and self.fsync_directory
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._settle_lock = threading.Lock()
        self._known_dirs: set[str] = set()
        self._unsynced_dirs: set[str] = set()  # folders whose new entries are not flushed yet
        self._staged_done: list[str] = []  # staging names to remove once those are flushed
        self._settle_due: float | None = None  # monotonic time the background flush is due
        self._incoming = os.path.join(self.root, INCOMING_DIR)
        self._recover(recover_min_age)
        self._bytes = self._scan(recover_min_age)
        self._prepared: collections.deque[tuple[int, str]] = collections.deque()
        self._unlink_later: collections.deque[str] = collections.deque()
        self._prepared_names = f"{_TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}-"
        self._prepared_seq = itertools.count()
        self._expected_size = 0  # the last instance's size: what prepared files reserve
        self._reserved: dict[int, int] = {}  # prepared descriptor -> bytes reserved for it
        self.preallocate = _FALLOCATE is not None
        self._prepare_wanted = threading.Event()
        self._preparer: threading.Thread | None = None
        self._closed = False
        metrics.SPOOL_BYTES.set(self._bytes)

    def _scan(self, min_age: float = 0.0) -> int:
        """Sum the sizes of spooled files; remove temporary files a crash left behind (those
        younger than ``min_age`` seconds may be another live process's and stay)."""
        total = 0
        oldest = time.time() - min_age
        for dirpath, _dirnames, filenames in os.walk(self.root):
            for name in filenames:
                full = os.path.join(dirpath, name)
                try:
                    if name.startswith(_TMP_PREFIX):
                        if not min_age or os.stat(full).st_mtime < oldest:
                            os.unlink(full)
                        continue
                    total += os.stat(full).st_size
                except FileNotFoundError:
                    continue
        return total

    def _recover(self, min_age: float = 0.0) -> None:
        """Publish the staged files a crash left in ``.incoming`` under their final names.

        A staged file whose :data:`STAGED_XATTR` matches its size and CRC-32 was written and
        fsynced whole (perhaps acknowledged, its final name perhaps not yet flushed): it is
        linked to the name its File Meta and header give, if that name is missing, and the
        folder is fsynced. Any other staged file was never acknowledged and is removed by
        :meth:`_scan`. Files younger than ``min_age`` seconds are left to their owner (several
        receivers on one ``storage``).
        """
        try:
            names = os.listdir(self._incoming)
        except FileNotFoundError:
            return
        oldest = time.time() - min_age
        for name in names:
            staged = os.path.join(self._incoming, name)
            try:
                if not name.startswith(_TMP_PREFIX) or (
                    min_age and os.stat(staged).st_mtime >= oldest
                ):
                    continue
                rel = self._staged_destination(staged)
                if rel is None:
                    continue
                final = os.path.join(self.storage_root, rel)
                folder = os.path.dirname(final)
                self._ensure_dir(folder)
                try:
                    os.link(staged, final)
                except FileExistsError:
                    pass  # published before the crash (or stored again since): kept as it is
                else:
                    if self.fsync:
                        _fsync_dir(folder)
                    LOGGER.info("recovered a staged instance the last run had not settled")
                os.unlink(staged)
            except OSError as exc:
                LOGGER.warning("could not recover a staged spool file: %s", exc.strerror or exc)

    def _staged_destination(self, staged: str) -> str | None:
        """The relative final path of a staged file that is whole, else None."""
        from dicom_node.receive.header import parse_header, read_file_meta

        try:
            mark = os.getxattr(staged, STAGED_XATTR).decode("ascii")
        except (OSError, UnicodeDecodeError):
            return None  # prepared and never written, or written and never fsynced
        with open(staged, "rb") as fh:
            raw = fh.read()
        if not _matches_mark(raw, mark):
            LOGGER.warning("a staged spool file does not match its checksum; removed")
            return None
        try:
            transfer_syntax, sop_instance_uid, offset = read_file_meta(raw)
            header = parse_header(raw[offset:], transfer_syntax)
            return self.relative_path(
                header.study_uid or "", header.series_uid or "", sop_instance_uid
            )
        except (ValueError, InvalidUID) as exc:
            LOGGER.warning("a staged spool file has no usable UIDs (%s); removed", exc)
            return None

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
        crcs: Sequence[int | None] | None = None,
    ) -> StoredFile:
        """Write one instance durably, once.

        Parameters
        ----------
        study_uid, series_uid, sop_instance_uid:
            Where the instance goes; validated before they become path parts.
        chunks:
            The file's bytes (preamble + file meta, then the data set as received).
        crcs:
            CRC-32 (:func:`zlib.crc32`) of each chunk where the caller has it already (None
            entries, or no list: computed here when the staged file's checksum needs them).

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
        self._expected_size = size
        try:
            existing = os.stat(final).st_size
        except FileNotFoundError:
            existing = None
        if existing is not None and (existing == size or self.fsync_directory):
            return StoredFile(rel, existing, created=False)
        # Not there, or (fsync_directory off) there with another size: possibly a copy cut short
        # by a crash between link and fsync, never acknowledged; the resend replaces it.
        prepared = self._take_prepared()
        self._ensure_dir(folder, deferred=prepared is not None and self.defer_directory_fsync)
        try:
            created = self._write(
                views, size, existing, final, folder, sop_instance_uid, prepared, crcs
            )
        except FileNotFoundError:
            # the prepared file's name vanished (another Spool on this storage started and
            # cleaned up): write the instance again through a temp file of its own
            created = self._write(views, size, existing, final, folder, sop_instance_uid, None)
        if not created:
            return StoredFile(rel, os.stat(final).st_size, created=False)
        with self._lock:
            self._bytes += size - (existing or 0)
            total = self._bytes
        metrics.SPOOL_BYTES.set(total)
        return StoredFile(rel, size, created=existing is None)

    def close(self) -> None:
        """Stop preparing files ahead, make pending stores' folders durable, and close and remove
        the prepared temporary files (each holds an open descriptor: a process that starts and
        stops many receivers, such as a test run, would otherwise run out of descriptors).

        Stores after this still work, on the two-flush path. Idempotent."""
        self.prepare_ahead = False
        self._closed = True
        # no join: the preparer thread ends on its own after its idle time, and a refill it is
        # in the middle of closes its files itself once it sees the flag (see _refill)
        self._settle()
        while (prepared := self._take_prepared()) is not None:
            fd, tmp = prepared
            self._reserved.pop(fd, None)
            os.close(fd)
            _unlink_quietly(tmp)

    def prepared_files(self) -> int:
        """Temporary files prepared, made durable and ready for the next stores."""
        return len(self._prepared)

    def _take_prepared(self) -> tuple[int, str] | None:
        """A prepared temporary file (descriptor, path), or None when none is ready."""
        try:
            return self._prepared.popleft()
        except IndexError:  # none ready (or another association took the last one)
            return None

    def _write(
        self,
        views: list[memoryview],
        size: int,
        existing: int | None,
        final: str,
        folder: str,
        sop_instance_uid: str,
        prepared: tuple[int, str] | None,
        crcs: Sequence[int | None] | None = None,
    ) -> bool:
        """Write ``views`` to a temp file (``prepared``, else one of its own in ``folder``) and
        publish it under ``final``; see :meth:`store`."""
        if prepared is not None:
            fd, tmp = prepared
        else:
            tmp = os.path.join(folder, f"{_TMP_PREFIX}{sop_instance_uid}.{threading.get_ident()}")
            fd = self._open_tmp(tmp, folder)
            self._settle()  # strict path: folders created deferred by others are flushed first
        if self.prepare_ahead and (self._preparer is None or len(self._prepared) <= PREPARED_LOW):
            self.prepare()  # the thread wakes for a batch, not for every instance
        try:
            for view in views:
                while view:
                    view = view[os.write(fd, view) :]
            if prepared is not None and self._reserved.pop(fd, 0) > size:
                os.ftruncate(fd, size)  # give back the reserved blocks this instance did not fill
            if existing is not None:
                return self._replace(fd, tmp, final, folder)
            if prepared is not None and self.defer_directory_fsync:
                try:
                    os.setxattr(fd, STAGED_XATTR, _staged_mark(size, views, crcs))
                except OSError as exc:  # no user xattrs here (some NFS, old tmpfs): strict path
                    LOGGER.warning(
                        "spool: no extended attributes on this file system (%s); every instance "
                        "is now flushed twice",
                        exc.strerror or exc,
                    )
                    self.defer_directory_fsync = False
                    self._settle()
                else:
                    return self._publish_staged(fd, tmp, final, folder)
            return self._publish(fd, tmp, final, folder, prepared is not None)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        finally:
            self._reserved.pop(fd, None)
            os.close(fd)

    def _publish_staged(self, fd: int, tmp: str, final: str, folder: str) -> bool:
        """One flush: data, inode and checksum of the staged file, then its final name; the
        folder is flushed by the background thread before the staging name goes."""
        os.fsync(fd)
        try:
            os.link(tmp, final)
        except FileExistsError:
            os.unlink(tmp)
            return False
        with self._lock:
            self._unsynced_dirs.add(folder)
            self._staged_done.append(tmp)
            first = self._settle_due is None
            if first:
                self._settle_due = time.monotonic() + SETTLE_DELAY
        if first:
            self.prepare()  # the background thread learns when the flush is due
        return True

    def _settle(self) -> None:
        """Flush the folders that got new entries, then remove their files' staging names."""
        with self._settle_lock:
            with self._lock:
                folders, self._unsynced_dirs = self._unsynced_dirs, set()
                staged, self._staged_done = self._staged_done, []
                self._settle_due = None
            failed = False
            for folder in sorted(folders, key=len, reverse=True):
                try:
                    _fsync_dir(folder)
                except FileNotFoundError:  # removed since (retention): nothing left to keep
                    continue
                except OSError as exc:  # keep the staging names: the next start recovers them
                    LOGGER.error("could not flush a spool folder: %s", exc.strerror or exc)
                    failed = True
            if not failed:
                for tmp in staged:
                    _unlink_quietly(tmp)

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
            due = self._settle_due
            timeout = PREPARER_IDLE if due is None else max(0.0, due - time.monotonic())
            woken = self._prepare_wanted.wait(timeout)
            if woken:
                self._prepare_wanted.clear()
            due = self._settle_due
            if due is not None and time.monotonic() >= due:
                self._settle()
            if woken:
                while self._unlink_later:
                    _unlink_quietly(self._unlink_later.popleft())
                if len(self._prepared) <= PREPARED_LOW and not self._closed:
                    self._refill()
            elif due is None:
                with self._lock:
                    if not self._prepare_wanted.is_set() and self._settle_due is None:
                        self._preparer = None
                        return

    def _refill(self) -> None:
        """Create temporary files up to :data:`PREPARED_TARGET`; make their names durable (one
        folder flush for the batch) before any store may take one."""
        ready: list[tuple[int, str]] = []
        while len(self._prepared) + len(ready) < PREPARED_TARGET:
            tmp = os.path.join(self._incoming, f"{self._prepared_names}{next(self._prepared_seq)}")
            try:
                fd = self._open_tmp(tmp, self._incoming)
            except OSError as exc:
                LOGGER.warning("could not prepare a spool file: %s", exc.strerror or exc)
                break
            expected = self._expected_size
            if self.preallocate and 0 < expected <= PREALLOCATE_MAX:
                if _reserve(fd, expected):
                    self._reserved[fd] = expected
                else:  # this file system cannot: stop asking
                    self.preallocate = False
            ready.append((fd, tmp))
        if ready and self.defer_directory_fsync:
            try:
                _fsync_dir(self._incoming)
            except OSError as exc:
                LOGGER.warning("could not flush prepared spool files: %s", exc.strerror or exc)
                for fd, tmp in ready:
                    self._reserved.pop(fd, None)
                    os.close(fd)
                    _unlink_quietly(tmp)
                ready = []
        if self._closed:  # closed while these were made: nobody will take them
            for fd, tmp in ready:
                self._reserved.pop(fd, None)
                os.close(fd)
                _unlink_quietly(tmp)
            return
        self._prepared.extend(ready)

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

    def _ensure_dir(self, folder: str, deferred: bool = False) -> None:
        """Create ``folder`` (and parents) durably; remembered so that the hot path skips it.

        ``deferred``: the new folders' entries are flushed by :meth:`_settle` (before the staging
        name of a file in them is removed) instead of here.
        """
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
            if deferred:
                with self._lock:
                    self._unsynced_dirs.add(os.path.dirname(path))
            elif self.fsync:
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


def _staged_mark(
    size: int, views: Sequence[memoryview], crcs: Sequence[int | None] | None
) -> bytes:
    """:data:`STAGED_XATTR` of a staged file: ``<size>:<len>=<crc32 hex>,...`` per chunk."""
    pieces = []
    for i, view in enumerate(views):
        crc = crcs[i] if crcs is not None and i < len(crcs) else None
        if crc is None:
            crc = zlib.crc32(view)
        pieces.append(f"{len(view)}={crc & 0xFFFFFFFF:08x}")
    return f"{size}:{','.join(pieces)}".encode("ascii")


def _matches_mark(raw: bytes, mark: str) -> bool:
    """Whether ``raw`` is exactly what :func:`_staged_mark` described."""
    size, _, pieces = mark.partition(":")
    if size != str(len(raw)):
        return False
    pos = 0
    view = memoryview(raw)
    try:
        for piece in pieces.split(","):
            length, _, crc = piece.partition("=")
            end = pos + int(length)
            if end > len(raw) or f"{zlib.crc32(view[pos:end]):08x}" != crc:
                return False
            pos = end
    except ValueError:
        return False
    return pos == len(raw)


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
