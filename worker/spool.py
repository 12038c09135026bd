"""The spool: finished images wait on local disk while the object store cannot take them.

Bounded in bytes: while it holds `max_bytes` the engine starts no new batch, so a long outage
stops the worker taking work instead of filling its disk. A thread uploads what waits, oldest
first, with back-off, and hands each job back to the engine to record once all its objects are
stored: nothing is denoised again. The files belong to this process's claims only; those of an
earlier life are deleted at start (their jobs went to other workers when the leases expired).
"""

from __future__ import annotations

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
    ):
        self.folder = folder
        self.max_bytes = max_bytes
        self.storage = storage
        self.still_held = still_held
        self.give_up_after = give_up_after
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        self._parcels: deque[Parcel] = deque()
        self._bytes = 0
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._lock_fd: int | None = None
        self._thread = threading.Thread(target=self._run, name="sdqueue-spool", daemon=True)
        self._thread.start()

    @classmethod
    def open(cls, base: Path, max_bytes: int, storage: Storage, still_held: Callable[[Lease], bool], *,
             give_up_after: float) -> Spool:
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
        spool = cls(base / name, max_bytes, storage, still_held, give_up_after=give_up_after)
        # Held for the life of the process: the kernel lets go of it however the process ends.
        spool._lock_fd = os.open(base / f"{name}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(spool._lock_fd, fcntl.LOCK_EX)
        return spool

    @property
    def full(self) -> bool:
        return self._bytes >= self.max_bytes

    def __len__(self) -> int:
        with self._changed:
            return len(self._parcels)

    def add(self, lease: Lease, objects: list[tuple[str, bytes]], done: Callable[[bool], None]) -> None:
        """Keep `objects` (key, data) on disk until the store takes them."""
        stored = []
        for key, data in objects:
            path = self.folder / f"{uuid.uuid4().hex}.part"
            path.write_bytes(data)
            stored.append((key, path, len(data)))
        parcel = Parcel(lease, stored, done)
        with self._changed:
            self._parcels.append(parcel)
            self._bytes += parcel.size
            self._changed.notify_all()
        log.warning("spool: job %s waits for the object store (%d object(s), spool now %.1f MB of %.1f MB)",
                    lease.job_id, len(stored), self._bytes / 1e6, self.max_bytes / 1e6)

    def drop(self, job_ids: set[str]) -> None:
        """Forget the parcels of jobs that are no longer ours."""
        with self._changed:
            gone = [p for p in self._parcels if p.lease.job_id in job_ids]
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

    def _run(self) -> None:
        delay = 0.5
        while not self._stop.is_set():
            with self._changed:
                while not self._parcels and not self._stop.is_set():
                    self._changed.wait(1.0)
                if self._stop.is_set():
                    return
                parcel = self._parcels[0]
            if self._upload(parcel):
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
        try:
            parcel.done(stored)
        except Exception:  # e.g. the engine stopped meanwhile: never let it end the upload thread
            log.exception("spool: job %s: handing it back failed", parcel.lease.job_id)
