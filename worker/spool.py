"""The spool: finished images wait on local disk while the object store cannot take them.

Bounded in bytes: while it holds `max_bytes` the engine starts no new batch, so a long outage
stops the worker taking work instead of filling its disk. Bounded by the disk too: while the
spool is in use and its filesystem has less than `min_free_bytes` free, or since a write failed
for lack of space, it counts as full until there is room again (or the store takes images again).
A parcel that does not fit raises DiskFull and leaves nothing on disk.

A thread uploads what waits, oldest first, with back-off, and hands each job back to the engine
to record once all its objects are stored: nothing is denoised again. The files belong to this
process's claims only; those of an earlier life are deleted at start (their jobs went to other
workers when the leases expired).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from models.errors import StorageError
from models.jobs import Lease
from models.storage import Storage

log = logging.getLogger(__name__)

# The GPU loop asks `full` at every step: the filesystem is asked at most this often (seconds).
DISK_READ_INTERVAL = 1.0
# While the disk stops new batches and nothing waits for upload, the store is pinged this often
# (seconds): once it takes images again the disk no longer matters.
STORE_PROBE_INTERVAL = 5.0
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)

Objects = list[tuple[str, bytes]]  # (key, data)


class DiskFull(OSError):
    """The spool's filesystem has no room for a parcel: none of its files were kept."""

    def __init__(self, folder: Path, free_bytes: int | None, min_free_bytes: int) -> None:
        free = "an unknown number of" if free_bytes is None else str(free_bytes)
        super().__init__(errno.ENOSPC, f"spool folder {folder} is out of space: {free} bytes free "
                                       f"(it keeps at least {min_free_bytes} free)")
        self.folder = folder
        self.free_bytes = free_bytes
        self.min_free_bytes = min_free_bytes

    def __reduce__(self):  # type: ignore[no-untyped-def]
        # OSError's own would call us back with (errno, message)
        return type(self), (self.folder, self.free_bytes, self.min_free_bytes)


@dataclass(eq=False)
class Parcel:
    """One claim's objects waiting for the store; `done(True)` once all are stored, `done(False)`
    when they are given up (the job is no longer ours, or the outage outlasted our patience)."""

    lease: Lease
    objects: list[tuple[str, Path, int]]  # (key, file, bytes), in upload order
    done: Callable[[bool], None]
    since: float = field(default_factory=time.monotonic)

    @property
    def size(self) -> int:
        return sum(size for _, _, size in self.objects)


class Spool:
    def __init__(
        self,
        folder: Path,
        max_bytes: int,
        storage: Storage,
        still_held: Callable[[Lease], bool],
        *,
        give_up_after: float,
        min_free_bytes: int = 0,
    ):
        if min_free_bytes < 0:
            raise ValueError(f"min_free_bytes={min_free_bytes}: must be 0 or more")
        self.folder = folder
        self.max_bytes = max_bytes
        self.min_free_bytes = min_free_bytes
        self.storage = storage
        self.still_held = still_held
        self.give_up_after = give_up_after
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        self._parcels: deque[Parcel] = deque()
        self._bytes = 0
        # The disk: its last reading (None: unreadable) and when; whether it stops new batches, and
        # how many free bytes end that (min_free_bytes, plus the size of a parcel that did not fit).
        self._free_bytes: int | None = None
        self._free_read_at = -float("inf")
        self._disk_full = False
        self._room_needed = 0
        self._probed_at = -float("inf")
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._lock_fd: int | None = None
        self._thread = threading.Thread(target=self._run, name="sdqueue-spool", daemon=True)
        self._thread.start()

    @classmethod
    def open(cls, base: Path, max_bytes: int, storage: Storage, still_held: Callable[[Lease], bool], *,
             give_up_after: float, min_free_bytes: int = 0) -> Spool:
        """A spool folder of this process's own under `base` (several workers may share `base`);
        the folders of processes that died are removed."""
        base.mkdir(parents=True, exist_ok=True)
        for lock in base.glob("*.lock"):
            try:
                fd = os.open(lock, os.O_RDWR)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its process lives
            finally:
                os.close(fd)
            shutil.rmtree(lock.with_suffix(""), ignore_errors=True)
            lock.unlink(missing_ok=True)
        name = uuid.uuid4().hex[:12]
        spool = cls(base / name, max_bytes, storage, still_held, give_up_after=give_up_after,
                    min_free_bytes=min_free_bytes)
        # Held for the life of the process: the kernel lets go of it however the process ends.
        spool._lock_fd = os.open(base / f"{name}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(spool._lock_fd, fcntl.LOCK_EX)
        return spool

    @property
    def full(self) -> bool:
        """No new batch should start: the spool holds max_bytes, or its disk has no room (disk_full)."""
        return self.bytes >= self.max_bytes or self.disk_full

    @property
    def disk_full(self) -> bool:
        """The disk stops new batches: a parcel did not fit, or the spool is in use with less than
        min_free_bytes free. It lasts until there is room again, or the store takes images again."""
        return self._check_disk()

    @property
    def bytes(self) -> int:
        """What the parcels waiting for the store hold, in bytes."""
        with self._changed:
            return self._bytes

    @property
    def free_bytes(self) -> int | None:
        """Free bytes on the spool's filesystem, read at most once a second; None if unreadable."""
        return self._read_free()

    def __len__(self) -> int:
        with self._changed:
            return len(self._parcels)

    def add(self, lease: Lease, objects: Objects, done: Callable[[bool], None]) -> None:
        """Keep `objects` (key, data) on disk until the store takes them. DiskFull when the disk has
        no room for them (below min_free_bytes already, or a write ran out of space): nothing of
        them is kept then, and `done` is never called."""
        size = sum(len(data) for _, data in objects)
        # 1. room: not below the margin already
        free = self._read_free(fresh=True)
        if free is not None and free < self.min_free_bytes:
            raise self._out_of_room(free, size)
        # 2. write every file; on any failure delete them all, the one half written too
        stored: list[tuple[str, Path, int]] = []
        try:
            for key, data in objects:
                path = self.folder / f"{uuid.uuid4().hex}.part"
                stored.append((key, path, len(data)))
                path.write_bytes(data)
        except BaseException as exc:
            for _, path, _ in stored:
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.errno in NO_SPACE:
                raise self._out_of_room(self._read_free(fresh=True), size) from exc
            raise
        # 3. register it for the upload thread
        parcel = Parcel(lease, stored, done)
        with self._changed:
            self._parcels.append(parcel)
            self._bytes += parcel.size
            total = self._bytes
            self._changed.notify_all()
        log.warning("spool: job %s waits for the object store (%d object(s), spool now %.1f MB of %.1f MB)",
                    lease.job_id, len(stored), total / 1e6, self.max_bytes / 1e6)

    def drop_claims(self, leases: set[Lease]) -> None:
        """Forget the parcels of claims that are no longer ours."""
        with self._changed:
            gone = [p for p in self._parcels if p.lease in leases]
        for parcel in gone:
            self._finish(parcel, False)

    def stop(self) -> None:
        self._stop.set()
        with self._changed:
            self._changed.notify_all()
        self._thread.join(5)
        shutil.rmtree(self.folder, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            (self.folder.parent / f"{self.folder.name}.lock").unlink(missing_ok=True)
            self._lock_fd = None

    def _read_free(self, fresh: bool = False) -> int | None:
        """Free bytes on the spool's filesystem: the last reading unless it is older than
        DISK_READ_INTERVAL (or `fresh`)."""
        now = time.monotonic()
        with self._changed:
            if not fresh and now - self._free_read_at < DISK_READ_INTERVAL:
                return self._free_bytes
        try:  # outside the lock: a network filesystem may take its time to answer
            free: int | None = shutil.disk_usage(self.folder).free
        except OSError:  # e.g. the folder went with stop()
            free = None
        with self._changed:
            self._free_bytes, self._free_read_at = free, now
        return free

    def _check_disk(self) -> bool:
        """Whether the disk stops new batches; starts and ends an episode as the free space says."""
        free = self._read_free()
        with self._changed:
            was = self._disk_full
            if was and free is not None and free > self._room_needed:
                self._disk_full = False
            elif not was and free is not None and free < self.min_free_bytes and self._parcels:
                self._disk_full, self._room_needed = True, self.min_free_bytes
            now = self._disk_full
        if now and not was:
            log.warning("spool: %s has %d bytes free, below SDQUEUE_SPOOL_MIN_FREE_BYTES=%d; no batch starts "
                        "until there is room again or the object store is back", self.folder, free,
                        self.min_free_bytes)
        elif was and not now:
            log.info("spool: %s has room again (%d bytes free); batches start again", self.folder, free)
        return now

    def _out_of_room(self, free: int | None, size: int) -> DiskFull:
        """Note that a parcel of `size` bytes did not fit (new batches stop until it would); the
        error to raise."""
        with self._changed:
            was = self._disk_full
            self._disk_full = True
            self._room_needed = max(self._room_needed if was else 0, self.min_free_bytes + size)
        if not was:
            log.warning("spool: %s is out of space (%s bytes free, %d bytes to keep); no batch starts "
                        "until there is room again or the object store is back",
                        self.folder, "unknown" if free is None else free, size)
        return DiskFull(self.folder, free, self.min_free_bytes)

    def _store_is_back(self, why: str) -> None:
        """The store takes images again: the disk no longer stops new batches."""
        with self._changed:
            was, self._disk_full = self._disk_full, False
        if was:
            log.info("spool: %s; batches start again although %s is short of space", why, self.folder)

    def _run(self) -> None:
        delay = 0.5
        while not self._stop.is_set():
            with self._changed:
                if not self._parcels:
                    self._changed.wait(1.0)
                parcel = self._parcels[0] if self._parcels else None
            if self._stop.is_set():
                return
            if parcel is None:
                self._probe_store()
                continue
            try:
                uploaded = self._upload(parcel)
            except OSError as exc:  # a spooled file cannot be read back (the host's disk): the job goes back
                log.error("spool: job %s: its images cannot be read back (%s); giving the job back",
                          parcel.lease.job_id, exc)
                self._finish(parcel, False)
                continue
            if uploaded:
                self._finish(parcel, True)
                delay = 0.5
                continue
            if time.monotonic() - parcel.since > self.give_up_after:
                log.error("spool: job %s: the object store stayed away for %.0f s; giving the job back",
                          parcel.lease.job_id, time.monotonic() - parcel.since)
                self._finish(parcel, False)
                continue
            self._stop.wait(delay)
            delay = min(delay * 2, 5.0)
            if not self._held(parcel):
                log.info("spool: job %s is no longer ours; its images are dropped", parcel.lease.job_id)
                self._finish(parcel, False)

    def _probe_store(self) -> None:
        """While the disk stops new batches and no parcel waits, no upload would find out that the
        store came back: ask it now and then."""
        with self._changed:
            if not self._disk_full or self._parcels or time.monotonic() - self._probed_at < STORE_PROBE_INTERVAL:
                return
            self._probed_at = time.monotonic()
        try:
            self.storage.ping()
        except Exception as exc:  # StorageError above all; never let it end the upload thread
            log.debug("spool: %s", exc)
            return
        self._store_is_back("the object store answers again")

    def _upload(self, parcel: Parcel) -> bool:
        """Upload what is left of `parcel`; False when the store refused (try again later)."""
        while parcel.objects:
            key, path, size = parcel.objects[0]
            try:
                self.storage.put(key, path.read_bytes(), content_type="image/png")
            except StorageError as exc:
                log.debug("spool: %s", exc)
                return False
            path.unlink(missing_ok=True)
            with self._changed:
                parcel.objects.pop(0)
                self._bytes -= size
        return True

    def _held(self, parcel: Parcel) -> bool:
        try:
            return self.still_held(parcel.lease)
        except Exception:  # the database is away too: keep the images
            return True

    def _finish(self, parcel: Parcel, stored: bool) -> None:
        with self._changed:
            if parcel not in self._parcels:
                return
            self._parcels.remove(parcel)
            for _, path, size in parcel.objects:
                path.unlink(missing_ok=True)
                self._bytes -= size
            parcel.objects.clear()
            drained = stored and not self._parcels
        if drained:
            self._store_is_back("the object store took every image waiting")
        try:
            parcel.done(stored)
        except Exception:  # e.g. the engine stopped meanwhile: never let it end the upload thread
            log.exception("spool: job %s: handing it back failed", parcel.lease.job_id)
