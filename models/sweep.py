"""The sweeper: puts back what a dead worker or the broker lost, and deletes objects no job
references.

Run periodically inside every worker and on demand by `sdqueue sweep`. Several sweepers at once
are safe: rows are taken with FOR UPDATE SKIP LOCKED on PostgreSQL (a plain transaction on
SQLite, whose writers take turns), every change is conditional on the state it read, and sending a
job's message twice only costs the second delivery a look at the database.

A lease runs past its expiry while its worker cannot reach the database (its heartbeat cannot
renew it), so a lease that expired does not prove its worker dead. Two things keep a sweeper off
a live worker's jobs: it takes no lease whose owner's heartbeat is fresh in the worker registry
(models/workers.py), and it takes none until the database has answered it for a whole lease since
the database came back to it, or since the database started (`expiry_wait`, `settle`).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable

from sqlalchemy import exists, func, or_, select, text, update
from sqlalchemy.orm import Session

from models import broker, counts, jobs
from models.constants import queue_for
from models.db import Database
from models.outage import wait_out
from models.registry import model_key
from models.settings import Settings
from models.storage import Storage
from models.tables import Image, Job, JobState, Upload, utcnow
from models.workers import healthy_workers, live_worker_names

log = logging.getLogger(__name__)

# Rows taken per transaction.
BATCH = 500

# Sends the messages of jobs to a queue (None: the sender's own).
Send = Callable[[list[str], "str | None"], None]


@dataclass
class SweepReport:
    expired: list[str] = field(default_factory=list)  # leases expired: back in the queue
    dead_lettered: list[str] = field(default_factory=list)  # their worker died with them alone, once too often
    resent: list[str] = field(default_factory=list)  # queued, but the broker had no message: sent again
    followed: list[str] = field(default_factory=list)  # follow-ups queued: the job they follow succeeded
    orphans: int = 0  # objects deleted that no job references
    folded: int = 0  # changes of runs' counts folded into their counters (not worth a log line alone)

    def __bool__(self) -> bool:
        return bool(self.expired or self.dead_lettered or self.resent or self.followed or self.orphans)

    def __str__(self) -> str:
        return (f"{len(self.expired)} expired lease(s) requeued, {len(self.dead_lettered)} dead-lettered, "
                f"{len(self.resent)} lost message(s) sent again, {len(self.followed)} follow-up(s) queued, "
                f"{self.orphans} orphan object(s) deleted, "
                f"{self.folded} count change(s) folded")


class Sweeper:
    def __init__(self, settings: Settings, db: Database, storage: Storage, send: Send):
        self.settings = settings
        self.db = db
        self.storage = storage
        self.send = send
        self._last_scan = float("-inf")
        # Since when (monotonic) the database answers this sweeper without a break; None after it
        # could not be reached, until it answers again. -inf: no outage seen.
        self.reachable_since: float | None = float("-inf")

    # 0. whether leases may be taken back yet: not before the database has answered for a whole
    #    lease since it came back or started, so that the workers whose heartbeats it could not
    #    take meanwhile renew their leases first.
    def database_lost(self) -> None:
        """The database could not be reached (before this sweeper was made, say): its next answer
        counts as its return."""
        self.reachable_since = None

    def expiry_wait(self) -> tuple[float, str]:
        """Seconds before this sweeper may take leases back (0: now), and why not before. Asks the
        database: raises its error while it cannot be reached, and then counts the next answer as
        its return."""
        try:
            with self.db.session() as session:
                uptime = self._database_uptime(session)
        except Exception:
            self.reachable_since = None
            raise
        now = time.monotonic()
        if self.reachable_since is None:
            self.reachable_since = now
        lease = self.settings.lease_seconds
        wait, why = self.reachable_since + lease - now, f"the database came back {now - self.reachable_since:.0f} s ago"
        if uptime is not None and lease - uptime > wait:
            wait, why = lease - uptime, f"the database started {uptime:.0f} s ago"
        return max(0.0, wait), why

    def settle(self, *, say: Callable[[str], None] | None = None, poll: float = 1.0) -> float:
        """Return once this sweeper may take leases back (`expiry_wait` says 0), asking the database
        every `poll` seconds meanwhile; an outage is waited out (up to `outage_timeout`, then
        OutageTooLong) and starts the lease again. `say` hears once how long it waits and why.
        Returns the seconds waited."""
        started = time.monotonic()
        told = False
        while True:
            left, why = wait_out(self.expiry_wait, "sweep: the database", timeout=self.settings.outage_timeout)
            if left <= 0:
                return time.monotonic() - started
            if say is not None and not told:
                say(f"waiting {left:.0f} s before taking any lease back: {why}, and its workers get one lease "
                    f"({self.settings.lease_seconds:g} s) to renew theirs")
                told = True
            time.sleep(min(left, poll))

    def _database_uptime(self, session: Session) -> float | None:
        """Seconds since the PostgreSQL server started, by its own clock (None on SQLite)."""
        if self.db.engine.dialect.name != "postgresql":
            session.execute(text("SELECT 1"))
            return None
        return float(session.scalar(text("SELECT EXTRACT(EPOCH FROM now() - pg_postmaster_start_time())")))

    def live_workers(self) -> set[str] | None:
        """The names (lease owners) of the workers whose heartbeat is fresh in the registry; empty
        with the in-process broker, which has no registry (the database alone decides); None when
        the registry cannot be read."""
        try:
            return live_worker_names(self.settings)
        except Exception as exc:
            log.warning("sweep: no lease expired this time: the worker registry cannot be read (%s), so live "
                        "workers cannot be told from dead ones", exc)
            return None

    def sweep(self, *, expire: bool = True, orphan_grace: float | None = None, force_scan: bool = False) -> SweepReport:
        report = SweepReport()
        if expire:
            self.requeue_expired(report)
        self.resend_lost(report, force=force_scan)
        self.settle_follow_ups(report)
        self.delete_orphans(report, self.settings.orphan_grace if orphan_grace is None else orphan_grace)
        report.folded = counts.fold(self.db)
        if report:
            log.info("sweep: %s", report)
        return report

    # 1. running jobs whose lease expired: their worker died (or lost the database for longer than
    #    a lease); suspects of a shared crash run alone next, a job that crashed alone is charged.
    #    Not a lease whose worker's heartbeat is fresh in the registry: that worker lives, and its
    #    lease ran out only because it could not reach the database to renew it.
    def requeue_expired(self, report: SweepReport) -> None:
        live = self.live_workers()
        if live is None:
            return  # the registry cannot be read: live workers' leases cannot be told from dead ones'
        while True:
            with self.db.session() as session:
                expired = session.scalars(
                    select(Job)
                    .where(Job.state == JobState.RUNNING.value, Job.lease_expires_at < utcnow(),
                           or_(Job.lease_owner.is_(None), Job.lease_owner.not_in(live)))
                    .limit(BATCH)
                    .with_for_update(skip_locked=True)
                ).all()
                back: dict[str | None, list[str]] = defaultdict(list)
                if expired:
                    requeued, lettered = jobs.requeue_dead(list(expired), self.settings.max_attempts,
                                                           healthy_workers(self.settings))
                    for job in requeued:
                        back[job.queue].append(job.id)
                    report.dead_lettered += [job.id for job in lettered]
            for queue, job_ids in back.items():
                report.expired += job_ids
                self._send(job_ids, queue)
            if len(expired) < BATCH:
                return

    # 2. queued jobs without a live message (Redis restarted empty, a producer killed between the
    #    row and the send, a message dropped): sent again. The broker is read at most once per
    #    `requeue_after`, and only when some job has waited that long.
    def resend_lost(self, report: SweepReport, *, force: bool = False) -> None:
        if not broker.uses_redis(self.settings):
            return  # the in-process broker of the demo loses nothing while its process lives
        now = time.monotonic()
        if not force and now - self._last_scan < self.settings.requeue_after:
            return
        cutoff = utcnow() - timedelta(seconds=self.settings.requeue_after)
        overdue = (Job.state == JobState.QUEUED.value, func.coalesce(Job.enqueued_at, Job.created_at) < cutoff)
        with self.db.session() as session:
            if session.scalar(select(Job.id).where(*overdue).limit(1)) is None:
                return
        self._last_scan = now
        # Reading every waiting job and message costs the database and Redis time for each (a run
        # of 100,000): one sweeper of the deployment does it per `requeue_after`, not every one.
        if not force and not broker.take_turn(self.settings, "resend-scan", self.settings.requeue_after):
            return
        waiting: dict[str | None, list[str]] = defaultdict(list)
        with self.db.session() as session:
            for job_id, queue in session.execute(select(Job.id, Job.queue).where(*overdue)):
                waiting[queue].append(job_id)
        for queue, job_ids in waiting.items():
            live = broker.live_job_ids(self.settings, queue or queue_for(self.settings.queue, "interactive",
                                                                              model_key(self.settings.default_model)))
            lost = [job_id for job_id in job_ids if job_id not in live]
            for start in range(0, len(lost), BATCH):
                with self.db.session() as session:
                    marked = list(session.scalars(
                        update(Job)
                        .where(Job.id.in_(lost[start : start + BATCH]), Job.state == JobState.QUEUED.value)
                        .values(enqueued_at=utcnow())
                        .returning(Job.id)
                    ))
                self._send(marked, queue)
                report.resent += marked

    # 3. follow-ups whose parent ended: queued and sent once it succeeded, else cancelled (most are
    #    settled where their parent ends; these are the ones a crash or a bulk cancel left).
    def settle_follow_ups(self, report: SweepReport) -> None:
        while True:
            with self.db.session() as session:
                released = jobs.settle_follow_ups(session, limit=BATCH)
            for queue, job_ids in released.items():
                self._send(job_ids, queue)
                report.followed += job_ids
            if sum(map(len, released.values())) < BATCH:
                return

    # 4. objects a claim uploaded but never recorded (cancelled, superseded, crashed), once they
    #    are older than the grace period and their claim is not still running.
    def delete_orphans(self, report: SweepReport, grace: float) -> None:
        cutoff = utcnow() - timedelta(seconds=grace)
        while True:
            with self.db.session() as session:
                rows = session.execute(
                    select(Upload, Job.state, Job.lease_token)
                    .join(Job, Job.id == Upload.job_id)
                    .where(Upload.created_at <= cutoff)
                    .order_by(Upload.created_at)
                    .limit(BATCH)
                    .with_for_update(skip_locked=True, of=Upload)
                ).all()
                done = 0
                for upload, state, token in rows:
                    if state == JobState.RUNNING.value and token == upload.lease_token:
                        continue  # its claim still runs (e.g. waiting for the store to come back)
                    recorded = session.scalar(select(exists().where(Image.object_key == upload.object_key)))
                    if not recorded:
                        self.storage.delete(upload.object_key)
                        report.orphans += 1
                    session.delete(upload)
                    done += 1
            if len(rows) < BATCH or done == 0:
                return

    def _send(self, job_ids: list[str], queue: str | None) -> None:
        if not job_ids:
            return
        try:
            self.send(job_ids, queue)
        except Exception as exc:  # the broker is down: these are found again once `requeue_after` passes
            log.warning("sweep: could not send %d message(s) (%s); they will be sent again later",
                        len(job_ids), exc)
