"""The leases a worker holds, kept alive from threads of their own.

The heartbeat pushes every held lease forward each `heartbeat_seconds`, whatever the GPU loop is
doing, and reports the jobs that are no longer this worker's (cancelled, or claimed again after
its lease expired). A listener on the broker's cancel channel asks about a job at once when a
producer cancels it, so its samples leave the loop at the next step rather than the next beat.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Iterable

from models import jobs
from models.broker import CANCEL_CHANNEL, redis_client, uses_redis
from models.db import Database
from models.outage import is_outage
from models.settings import Settings

log = logging.getLogger(__name__)

OnLost = Callable[[set[jobs.Lease]], None]
OnForgotten = Callable[[list[tuple[str, "str | None"]]], None]


class LeaseKeeper:
    def __init__(self, settings: Settings, db: Database, owner: str, on_lost: OnLost,
                 on_forgotten: OnForgotten | None = None):
        self.settings = settings
        self.db = db
        self.owner = owner
        self.on_lost = on_lost
        self.on_forgotten = on_forgotten
        self._held: dict[str, jobs.Lease] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._beat, name="sdqueue-heartbeat", daemon=True)]
        if uses_redis(settings):
            self._threads.append(threading.Thread(target=self._listen, name="sdqueue-cancels", daemon=True))
        for thread in self._threads:
            thread.start()

    def hold(self, lease: jobs.Lease) -> None:
        with self._lock:
            self._held[lease.job_id] = lease

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._held.pop(job_id, None)

    def held(self) -> list[str]:
        with self._lock:
            return list(self._held)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop renewing; waits for a heartbeat in progress, so that the database (its pool) can
        be closed after this returns without a connection coming back to it."""
        self._stop.set()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout)

    # --- the heartbeat ------------------------------------------------------------------------

    def _beat(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_seconds):
            self.beat()

    def beat(self) -> None:
        with self._lock:
            leases = dict(self._held)
        ids = list(leases)
        try:
            with self.db.session() as session:
                kept = jobs.renew(session, self.owner, ids, self.settings.lease_seconds) if ids else set()
                # Claims in this worker's name that it does not hold, their leases run out: their
                # commit's answer was lost in an outage. Nobody else would take them while this
                # worker lives (its heartbeat is fresh in the registry): give them back.
                forgotten = jobs.release_forgotten(session, self.owner, ids)
        except Exception as exc:
            # The database is away: the leases run on; a short outage costs nothing, and a long
            # one lets the sweeper give the jobs to others (our records are then refused).
            level = logging.WARNING if is_outage(exc) else logging.ERROR
            log.log(level, "heartbeat: could not renew %d lease(s): %s", len(ids), exc)
            return
        if forgotten:
            log.warning("heartbeat: %d claim(s) of this worker that it never held given back: %s",
                        len(forgotten), ", ".join(job_id for job_id, _ in forgotten))
            if self.on_forgotten is not None:
                self.on_forgotten(forgotten)
        lost = self._still_these((job_id for job_id in ids if job_id not in kept), leases)
        if lost:
            log.info("heartbeat: %d job(s) are no longer ours (cancelled or claimed again): %s",
                     len(lost), ", ".join(sorted(lease.job_id for lease in lost)))
            self.on_lost(lost)

    # --- cancel notices -------------------------------------------------------------------------

    def _listen(self) -> None:
        delay = 0.5
        while not self._stop.is_set():
            try:
                client = redis_client(self.settings)
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(CANCEL_CHANNEL)
                delay = 0.5
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message and message.get("type") == "message":
                        job_id = message["data"].decode() if isinstance(message["data"], bytes) else message["data"]
                        if job_id in self._held:
                            self._check(job_id)
                pubsub.close()
                client.close()
            except Exception as exc:  # the broker is away; the heartbeat still finds cancellations
                log.debug("cancel listener: %s", exc)
                self._stop.wait(delay)
                delay = min(delay * 2, 15.0)

    def _still_these(self, job_ids: Iterable[str], leases: dict[str, jobs.Lease]) -> set[jobs.Lease]:
        """Of `job_ids` found lost, the leases still held as they were checked: a job given back and
        claimed again by this worker meanwhile holds a new lease, which is not lost."""
        with self._lock:
            return {leases[job_id] for job_id in job_ids
                    if job_id in self._held and self._held[job_id] is leases[job_id]}

    def still_held(self, lease: jobs.Lease) -> bool:
        """Whether `lease` still holds its job (a database error goes to the caller)."""
        try:
            with self.db.session() as session:
                jobs.check_held(session, lease)
            return True
        except jobs.LeaseLost as exc:
            log.info("job %s: %s", lease.job_id, exc)
            return False

    def _check(self, job_id: str) -> None:
        with self._lock:
            lease = self._held.get(job_id)
        if lease is None:
            return
        try:
            if not self.still_held(lease):
                lost = self._still_these([job_id], {job_id: lease})
                if lost:
                    self.on_lost(lost)
        except Exception as exc:  # the heartbeat will ask again
            log.debug("cancel check of %s: %s", job_id, exc)

