"""The job state machine and the leases that guard it.

    queued -> running -> succeeded | failed | cancelled
                 `-> queued (lease expired, given back, or a failed attempt to retry)
    waiting -> queued (a follow-up, once the job it follows succeeded) | cancelled (once that one did not)

A worker claims a queued job with a lease: an owner (the worker process), an expiry it keeps
pushing forward while it holds the job, and a token that grows at every claim. Only the holder of
the current lease may upload and record; everything it writes checks owner and token in the same
transaction, so a stale holder (its lease expired and the job was claimed again) can change
nothing. Producer, worker and sweeper change a job only through these functions, each in the
caller's transaction.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterable

from sqlalchemy import Row, and_, delete, func, or_, select, text, update
from sqlalchemy.orm import Session, aliased, lazyload, object_session

from models.db import Database, dialect_insert
from models.errors import JobNotFound
from models.tables import Batch, Image, Job, JobState, Upload, WebhookDelivery, utcnow

ALLOWED = {
    JobState.WAITING: {JobState.QUEUED, JobState.CANCELLED},
    JobState.QUEUED: {JobState.RUNNING, JobState.FAILED, JobState.CANCELLED},
    JobState.RUNNING: {JobState.QUEUED, JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED},
    JobState.SUCCEEDED: set(),
    JobState.FAILED: set(),
    JobState.CANCELLED: set(),
}

# IN lists of at most this many ids per statement.
CHUNK = 500

# Why `claim` does not claim a job this worker holds already (a second delivery).
HELD_HERE = "this worker holds it already"

# Why `claim` leaves a job alone that failed on this worker as often as it may fail: another
# worker is to try it (the caller sends its message again).
LEFT_TO_OTHERS = "it failed on this worker before: left to another worker"


class IllegalTransition(Exception):
    def __init__(self, job_id: str, current: JobState, wanted: JobState):
        super().__init__(f"job {job_id} is {current.value}: it cannot become {wanted.value}")
        self.current = current


class LeaseLost(Exception):
    """The job is no longer this claim's: cancelled, ended, or claimed again by another."""

    def __init__(self, job_id: str, state: str):
        super().__init__(f"job {job_id} is no longer held by this claim (it is {state})")
        self.job_id = job_id
        self.state = state


@dataclass(frozen=True)
class Lease:
    job_id: str
    owner: str
    token: int


def aware(value: datetime | None) -> datetime | None:
    """SQLite hands datetimes back without their zone; every time here is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


def get_job(session: Session, job_id: str, *, lock: bool = False) -> Job:
    """The job; `lock`: its row locked FOR UPDATE, as every change takes it (a worker's claim, record
    and failure): then its images and webhook load only if asked for, not with it (two statements
    fewer, on the hot paths)."""
    query = select(Job).where(Job.id == job_id)
    if lock:
        query = query.with_for_update().options(lazyload(Job.images), lazyload(Job.webhook))
    job = session.scalars(query).one_or_none()
    if job is None:
        raise JobNotFound(job_id)
    return job


def transition(job: Job, wanted: JobState) -> None:
    """Every change of a job's state goes through here (the bulk UPDATEs of runs aside: run jobs
    have no webhook). A job that ends with a webhook_url gets its delivery row in the same
    transaction: no end goes unannounced, and `sdqueue webhooks` finds it in the table."""
    current = JobState(job.state)
    if wanted not in ALLOWED[current]:
        raise IllegalTransition(job.id, current, wanted)
    job.state = wanted.value
    if wanted.terminal:
        now = job.finished_at = utcnow()
        if job.webhook_url is not None and job.webhook is None and (  # a job ends once: one delivery
                job.webhook_events is None or wanted.value in job.webhook_events):  # ... if it asked for this end
            # Assigned through the relationship, it joins the job's session (object_session(job)).
            job.webhook = WebhookDelivery(job_id=job.id, url=job.webhook_url, next_attempt_at=now, created_at=now)
    if wanted is not JobState.RUNNING:
        job.lease_owner = None
        job.lease_expires_at = None
        job.running_alone = False
    if wanted in (JobState.FAILED, JobState.CANCELLED):
        cancel_followers(job, wanted)


def cancel_followers(job: Job, ended: JobState) -> None:
    """The follow-ups waiting on `job`, which ended without images: cancelled with the reason, in
    the same transaction (and theirs in turn). A bulk UPDATE that ends jobs leaves this to the
    sweeper's `settle_follow_ups`."""
    session = object_session(job)
    if session is None:
        return
    followers = session.scalars(select(Job).where(Job.after_job_id == job.id, Job.state == JobState.WAITING.value)
                                .with_for_update()).all()
    for follower in followers:
        transition(follower, JobState.CANCELLED)
        follower.error = f"after: job {job.id}, the job it follows, {ended.value}: there is no image to follow"


def have_follow_ups(session: Session, parents: list[str]) -> bool:
    """Whether any of `parents` has a follow-up waiting: one index lookup, cheaper to plan and run
    than settle_follow_ups, for the worker to ask after every batch (most jobs have none)."""
    return session.scalar(select(Job.id).where(Job.after_job_id.in_(parents), Job.state == JobState.WAITING.value)
                          .limit(1)) is not None


def settle_follow_ups(session: Session, parents: list[str] | None = None,
                      limit: int = 500) -> dict[str | None, list[str]]:
    """Waiting follow-ups whose parent ended (of `parents`, else any): those of a parent that
    succeeded become queued, their input its image (`after_index`); the others are cancelled
    with the reason (their parent failed, was cancelled or deleted). Returns the ids of those
    queued, by queue: the caller sends their messages after the commit (the sweeper sends any it
    could not). At most `limit` follow-ups a call."""
    parent = aliased(Job)
    ended = [state.value for state in JobState if state.terminal]
    query = (select(Job, parent.state, Image.object_key, Image.sha256)
             .outerjoin(parent, parent.id == Job.after_job_id)
             .outerjoin(Image, and_(Image.job_id == Job.after_job_id, Image.index == Job.after_index))
             .where(Job.state == JobState.WAITING.value, or_(parent.id.is_(None), parent.state.in_(ended)))
             .limit(limit).with_for_update(of=Job, skip_locked=True))
    if parents is not None:
        query = query.where(Job.after_job_id.in_(parents))
    released: dict[str | None, list[str]] = defaultdict(list)
    for follower, state, key, sha256 in session.execute(query).all():
        if state == JobState.SUCCEEDED.value and key is not None:
            follower.input_key, follower.input_sha256 = key, sha256
            transition(follower, JobState.QUEUED)
            follower.enqueued_at = utcnow()
            released[follower.queue].append(follower.id)
            continue
        transition(follower, JobState.CANCELLED)
        if state is None:
            why = "no longer exists (deleted with its run?)"
        elif state == JobState.SUCCEEDED.value:
            why = f"succeeded without an image {follower.after_index}"
        else:
            why = state
        follower.error = f"after: job {follower.after_job_id}, the job it follows, {why}: there is no image to follow"
    return dict(released)


def claim(
    session: Session, job_id: str, owner: str, model: str, *, lease_seconds: float, max_attempts: int,
    healthy_workers: Callable[[], int] | None = None, live_workers: Callable[[], set[str]] | None = None,
) -> tuple[Job | None, str]:
    """Claim a job for `owner`: (the job, "claimed") or (None, why it was not claimed).

    A job that ended, or whose lease is live (another worker's, or this one's: a second delivery),
    is not claimed, whatever message arrived. A lease that expired is taken over as the sweeper
    would have: its holder died (but a group of suspects that died together is the sweeper's to
    split, and a holder whose heartbeat is fresh in the registry, `live_workers()`, lives: its
    lease ran out in a database outage, and it renews it once the database is back). A job that failed on `owner` as often as it may fail is left to another worker
    (LEFT_TO_OTHERS) while `healthy_workers()` says there is one.
    """
    job = get_job(session, job_id, lock=True)
    now = utcnow()
    if JobState(job.state).terminal:
        return None, f"it is {job.state}"
    if job.state == JobState.WAITING.value:  # its message comes when the job it follows succeeds
        return None, f"it waits for job {job.after_job_id}, the job it follows"
    if job.model is not None and job.model != model:
        # A message in another model's queue: its own goes there again (the sweeper's resend).
        return None, f"it is for model {job.model}, and this worker runs {model}"
    if job.state == JobState.RUNNING.value:
        expires = aware(job.lease_expires_at)
        if job.lease_owner == owner:
            return None, HELD_HERE
        if expires is not None and expires > now:
            return None, f"{job.lease_owner} holds it until {expires.isoformat(timespec='seconds')}"
        if live_workers is not None:
            try:
                alive = job.lease_owner in live_workers()
            except Exception:  # the registry cannot be read: live cannot be told from dead
                return None, "its lease ran out, and whether its worker lives cannot be read: the sweeper decides"
            if alive:
                return None, f"{job.lease_owner} lives (its heartbeat is fresh): its lease ran out in an outage"
        if job.running_alone and session.scalar(
                select(Job.id).where(Job.lease_owner == job.lease_owner, Job.state == JobState.RUNNING.value,
                                     Job.running_alone.is_(True), Job.id != job.id).limit(1)) is not None:
            return None, "its worker died running a group of suspects: the sweeper splits the group"
        requeued, _ = requeue_dead([job], max_attempts, healthy_workers() if healthy_workers else 1)
        if not requeued:
            return None, "dead-lettered"
    if (job.failures >= max_attempts and owner in (job.failed_on or []) and healthy_workers is not None
            and healthy_workers() > 1):
        return None, LEFT_TO_OTHERS
    transition(job, JobState.RUNNING)
    job.attempts += 1
    job.lease_token += 1
    job.lease_owner = owner
    job.lease_expires_at = now + timedelta(seconds=lease_seconds)
    job.started_at = now
    job.worker = owner
    job.model = model
    session.flush()
    return job, "claimed"


# --- The worker's hot paths: one statement each ------------------------------------------------
# A worker claims each job, says which objects it will upload, and records its images. On
# PostgreSQL each of these is one statement of fixed text (psycopg prepares it after a few uses),
# committed by itself (no BEGIN and COMMIT round trips), with the lease checked in its WHERE and no
# ORM objects built. When it changes nothing (the job is not plainly queued, the lease is not this
# one's, the job has a webhook, the rows were written before an outage cut the answer off), the
# caller goes the general way above, in a transaction that finds out why. On SQLite, always.
# bench/fleet.py measured what they save; the README's sizing section has the figures.
#
# Each finds its job by its id alone: a state is compared as `coalesce(state, '')`, which no index
# matches. Compared plainly, the planner may walk ix_jobs_state_lease instead, through every running
# job, whenever its statistics say few jobs are running (after a big enqueue, they say none): it did,
# at half a millisecond a statement, growing with the fleet.


def _state_is(state: JobState) -> Any:
    return func.coalesce(Job.state, "") == state.value

# What a claim hands the worker.
CLAIMED = (Job.id, Job.mode, Job.params, Job.seed, Job.input_key, Job.input_sha256, Job.mask_key, Job.mask_sha256,
           Job.depth_key, Job.depth_sha256, Job.priority, Job.suspect, Job.suspect_group, Job.run_id, Job.created_at,
           Job.started_at, Job.attempts, Job.lease_owner, Job.lease_token)

_CLAIM = text(f"""
UPDATE jobs SET state = 'running', attempts = attempts + 1, lease_token = lease_token + 1, lease_owner = :owner,
  lease_expires_at = :expires, started_at = :now, updated_at = :now, worker = :owner, model = :model
WHERE id = ANY(CAST(:job_ids AS varchar[])) AND coalesce(state, '') = 'queued' AND failures < :max_attempts
  AND coalesce(model, :model) = :model
RETURNING {", ".join(column.key for column in CLAIMED)}
""").columns(*CLAIMED)


def claim_queued(db: Database, job_ids: list[str], owner: str, model: str, *, lease_seconds: float,
                 max_attempts: int) -> dict[str, Row[Any]]:
    """`claim` of the queued jobs of `model` among `job_ids` that have not failed as often as they
    may (the one case where a claim asks nothing more), all in one UPDATE: the claimed rows (the CLAIMED
    columns) by job id. A job left out is not such a job, and `claim` must decide."""
    if not db.postgres or not job_ids:
        return {}
    now = utcnow()
    with db.statement() as conn:
        rows = conn.execute(_CLAIM, {"owner": owner, "expires": now + timedelta(seconds=lease_seconds), "now": now,
                                     "model": model, "job_ids": job_ids, "max_attempts": max_attempts}).all()
    return {row.id: row for row in rows}


# The leases of several jobs, as three arrays a statement unnests side by side.
_LEASES = "unnest(CAST(:l_job_id AS varchar[]), CAST(:l_owner AS varchar[]), CAST(:l_token AS integer[]))"

_RECORD_UPLOADS = text(f"""
INSERT INTO uploads (object_key, job_id, lease_token, created_at)
SELECT u.key, jobs.id, jobs.lease_token, :now
FROM unnest(CAST(:u_job_id AS varchar[]), CAST(:u_key AS varchar[])) AS u(job_id, key)
  JOIN {_LEASES} AS l(job_id, owner, token) ON l.job_id = u.job_id
  JOIN jobs ON jobs.id = u.job_id
WHERE jobs.id = ANY(CAST(:l_job_id AS varchar[])) AND coalesce(jobs.state, '') = 'running'
  AND jobs.lease_owner = l.owner AND jobs.lease_token = l.token
ON CONFLICT DO NOTHING
RETURNING job_id
""")


def _leases(leases: list[Lease]) -> dict[str, list[Any]]:
    return {"l_job_id": [lease.job_id for lease in leases], "l_owner": [lease.owner for lease in leases],
            "l_token": [lease.token for lease in leases]}


def record_uploads_now(db: Database, uploads: list[tuple[Lease, list[str]]]) -> set[str]:
    """`record_uploads` of several jobs in one statement, each job's (lease, keys): the ids of
    the jobs whose rows it wrote, all of them. A job left out (its lease is lost, or its rows are
    there already) goes through `record_uploads`, which says which."""
    uploads = [(lease, keys) for lease, keys in uploads if keys]
    if not db.postgres or not uploads:
        return set()
    params: dict[str, Any] = {"now": utcnow(), **_leases([lease for lease, _ in uploads]),
                              "u_job_id": [lease.job_id for lease, keys in uploads for _ in keys],
                              "u_key": [key for _, keys in uploads for key in keys]}
    with db.statement() as conn:
        written = Counter(conn.execute(_RECORD_UPLOADS, params).scalars())
    return {lease.job_id for lease, keys in uploads if written[lease.job_id] == len(keys)}


IMAGE_COLUMNS = ("index", "seed", "object_key", "sha256", "pixel_sha256", "size_bytes", "width", "height",
                 "batch_id", "batch_size", "batch_position", "steps_run", "shared_max", "shared_mean")
_IMAGE_TYPES = {"index": "integer", "seed": "bigint", "size_bytes": "integer", "width": "integer",
                "height": "integer", "batch_size": "integer", "batch_position": "integer", "steps_run": "integer",
                "shared_max": "integer", "shared_mean": "double precision"}
BATCH_COLUMNS = ("id", "worker", "model", "model_revision", "scheduler", "device", "dtype", "size", "versions",
                 "compat_key", "jobs", "seconds", "peak_memory_bytes", "started_at", "finished_at")

# The jobs succeed, their batch's row is written unless there, their images' rows are written,
# and their uploads' rows go: each job only if its lease holds and it has no webhook (whose
# delivery row `transition` writes).
_SUCCEED = text(f"""
WITH done AS (
  UPDATE jobs SET state = 'succeeded', finished_at = :now, updated_at = :now, error = NULL, suspect = false,
    suspect_group = NULL, lease_owner = NULL, lease_expires_at = NULL, running_alone = false
  FROM {_LEASES} AS l(job_id, owner, token)
  WHERE jobs.id = ANY(CAST(:l_job_id AS varchar[])) AND jobs.id = l.job_id AND coalesce(jobs.state, '') = 'running'
    AND jobs.lease_owner = l.owner AND jobs.lease_token = l.token AND jobs.webhook_url IS NULL
  RETURNING jobs.id
), batch AS (
  INSERT INTO batches ({", ".join(BATCH_COLUMNS)})
  SELECT {", ".join(f"CAST(:b_{c} AS json)" if c == "versions" else f":b_{c}" for c in BATCH_COLUMNS)}
  WHERE EXISTS (SELECT 1 FROM done)
  ON CONFLICT (id) DO NOTHING
), image AS (
  INSERT INTO images (job_id, {", ".join(IMAGE_COLUMNS)}, created_at)
  SELECT i.job_id, {", ".join(f"i.{c}" for c in IMAGE_COLUMNS)}, :now
  FROM unnest(CAST(:i_job_id AS varchar[]), {", ".join(f"CAST(:i_{c} AS {_IMAGE_TYPES.get(c, 'varchar')}[])" for c in IMAGE_COLUMNS)})
    AS i(job_id, {", ".join(IMAGE_COLUMNS)})
  WHERE i.job_id IN (SELECT id FROM done)
), gone AS (
  DELETE FROM uploads USING unnest(CAST(:i_job_id AS varchar[]), CAST(:i_object_key AS varchar[])) AS g(job_id, object_key)
  WHERE uploads.object_key = g.object_key AND uploads.job_id = g.job_id AND g.job_id IN (SELECT id FROM done)
)
SELECT id FROM done
""")


def succeed_now(db: Database, succeeded: list[tuple[Lease, list[dict[str, Any]]]], batch: dict[str, Any]) -> set[str]:
    """`succeed` of several jobs made in one batch, in one statement: each job's (lease, the
    values of its images' rows: IMAGE_COLUMNS), `batch` the values of the batch's row
    (BATCH_COLUMNS). The ids of the jobs it recorded; one left out goes through `succeed`, which
    records it or says why it cannot."""
    if not db.postgres or not succeeded:
        return set()
    params: dict[str, Any] = {"now": utcnow(), **_leases([lease for lease, _ in succeeded]),
                              "i_job_id": [lease.job_id for lease, images in succeeded for _ in images]}
    params.update({f"b_{c}": json.dumps(batch[c]) if c == "versions" else batch[c] for c in BATCH_COLUMNS})
    params.update({f"i_{c}": [image[c] for _, images in succeeded for image in images] for c in IMAGE_COLUMNS})
    with db.statement() as conn:
        return set(conn.execute(_SUCCEED, params).scalars())


def lease_of(job: Job) -> Lease:
    assert job.lease_owner is not None
    return Lease(job.id, job.lease_owner, job.lease_token)


def _held(session: Session, lease: Lease) -> Job:
    """The job, locked, if `lease` still holds it; else LeaseLost."""
    job = get_job(session, lease.job_id, lock=True)
    if job.state != JobState.RUNNING.value or job.lease_owner != lease.owner or job.lease_token != lease.token:
        raise LeaseLost(job.id, job.state if job.state != JobState.RUNNING.value else f"held by {job.lease_owner}")
    return job


def check_held(session: Session, lease: Lease) -> None:
    _held(session, lease)


def renew(session: Session, owner: str, job_ids: Iterable[str], lease_seconds: float) -> set[str]:
    """Push the leases `owner` holds forward; returns the ids it still holds (the rest are lost)."""
    expires = utcnow() + timedelta(seconds=lease_seconds)
    ids = list(job_ids)
    kept: set[str] = set()
    for start in range(0, len(ids), CHUNK):
        kept.update(session.scalars(
            update(Job)
            .where(Job.id.in_(ids[start : start + CHUNK]), Job.lease_owner == owner, _state_is(JobState.RUNNING))
            .values(lease_expires_at=expires)
            .returning(Job.id)
        ))
    return kept


def release_forgotten(session: Session, owner: str, held: list[str]) -> list[tuple[str, str | None]]:
    """Running jobs in `owner`'s name, their leases run out, that it does not hold (`held`): a claim
    whose commit's answer it never got. Queued again, uncharged; returns (id, queue) to send."""
    found = session.execute(select(Job.id, Job.queue).where(
        Job.state == JobState.RUNNING.value, Job.lease_expires_at < utcnow(), Job.lease_owner == owner)).all()
    kept = set(held)
    forgotten = [(job_id, queue) for job_id, queue in found if job_id not in kept]
    released = set(release(session, owner, [job_id for job_id, _ in forgotten])) if forgotten else set()
    return [(job_id, queue) for job_id, queue in forgotten if job_id in released]


def running_alone(session: Session, lease: Lease, alone: bool = True) -> None:
    """The job is about to run alone on the GPU (True: if its worker dies now, the job is the
    cause), or has just left it (False: a death later, while it waits to be stored, is not)."""
    _held(session, lease).running_alone = alone


def record_uploads(session: Session, lease: Lease, keys: list[str]) -> None:
    """Say which objects this claim is about to upload, so that none is left behind unseen."""
    _held(session, lease)
    if keys:  # a retry after an outage may find them written: nothing again
        rows = [{"object_key": key, "job_id": lease.job_id, "lease_token": lease.token, "created_at": utcnow()}
                for key in keys]
        session.execute(dialect_insert(session, Upload).on_conflict_do_nothing().values(rows))



def succeed(session: Session, lease: Lease, images: list[Image], batch: dict[str, Any] | None = None) -> Job:
    """The job succeeded with `images`, made in `batch` (the values of its row: written here unless
    another job of the same batch wrote it first)."""
    job = _held(session, lease)
    transition(job, JobState.SUCCEEDED)
    job.error = None
    job.suspect = False
    job.suspect_group = None
    if batch is not None:
        session.execute(dialect_insert(session, Batch).on_conflict_do_nothing().values(**batch))
    for image in images:
        session.add(image)
    session.flush()
    recorded = [image.object_key for image in images]
    session.execute(delete(Upload).where(Upload.job_id == job.id, Upload.object_key.in_(recorded)))
    return job


def fail(session: Session, lease: Lease, error: str) -> Job:
    """The job failed by itself in a way another attempt cannot mend: failed now."""
    job = _held(session, lease)
    transition(job, JobState.FAILED)
    job.error = error
    return job


def charge(session: Session, lease: Lease, error: str, max_attempts: int, healthy_workers: int = 1) -> bool:
    """An attempt that failed by the job's own fault. True: back to the queue for another
    attempt (send it); False: that was its last, it is failed and dead-lettered.

    Dead-lettered only once it failed `max_attempts` times AND on at least two different workers,
    or on the only healthy one (`healthy_workers`, the live workers not quarantined): one host's
    repeated fault never dead-letters a job that others could run."""
    job = _held(session, lease)
    return _charge(job, error, max_attempts, lease.owner, healthy_workers)


def _charge(job: Job, error: str, max_attempts: int, worker: str | None, healthy_workers: int) -> bool:
    job.failures += 1
    job.error = error
    failed_on = [*(job.failed_on or []), *([worker] if worker is not None else [])]
    job.failed_on = failed_on  # a new list (one entry a charge): the JSON column sees the change
    if job.failures >= max_attempts and (len(set(failed_on)) >= 2 or healthy_workers <= 1):
        transition(job, JobState.FAILED)
        job.dead_letter = True
        job.error = f"dead-lettered after {job.failures} failed attempts; the last: {error}"
        return False
    _requeue(job)
    return True


def _requeue(job: Job) -> None:
    transition(job, JobState.QUEUED)
    job.enqueued_at = utcnow()


def refund(session: Session, job_ids: Iterable[str], worker: str) -> list[str]:
    """Take back the attempts `worker` charged to these jobs (they turned out to be faults of its
    own host), unless the job has ended. Returns the ids refunded."""
    refunded = []
    for job in session.scalars(select(Job).where(Job.id.in_(list(job_ids))).with_for_update()):
        charged = (job.failed_on or []).count(worker)
        if JobState(job.state).terminal or not charged:
            continue
        job.failures = max(0, job.failures - charged)
        job.failed_on = [w for w in job.failed_on or [] if w != worker]
        if not job.failures:
            job.error = None
        refunded.append(job.id)
    return refunded


def queued_by_model(session: Session) -> dict[str, int]:
    """Queued jobs by the model they wait for (None: from before jobs named their model), the most first."""
    rows = session.execute(select(Job.model, func.count()).where(Job.state == JobState.QUEUED.value)
                           .group_by(Job.model).order_by(func.count().desc(), Job.model)).all()
    return {model or "(none named)": count for model, count in rows}


def others_succeeded(session: Session, worker: str, mode: str, queues: list[str], *, minutes: float) -> bool:
    """Whether workers other than `worker` recorded a job of `mode` from these queues (one
    deployment's) in the last `minutes`: a run of failures on `worker` alone is then its host's."""
    since = utcnow() - timedelta(minutes=minutes)
    return session.scalar(
        select(Job.id).where(Job.state == JobState.SUCCEEDED.value, Job.finished_at >= since, Job.queue.in_(queues),
                             Job.worker != worker, Job.mode == mode).limit(1)
    ) is not None


def requeue_dead(dead: list[Job], max_attempts: int, healthy_workers: int = 1) -> tuple[list[Job], list[Job]]:
    """Running jobs whose leases expired, locked by the caller: their workers died. Returns
    (requeued: send them, dead-lettered).

    By dead worker (lease owner): if it was running suspects (`running_alone`: a suspect group
    with nothing else in its process), one of them killed it. A group of one is charged; a larger
    group is split in halves, each a new group, so that a job that kills its worker is found in
    log2(n) deaths, not n; its other jobs (held, not on the GPU) go back as they were. With no
    suspects on its GPU, every job it held becomes a suspect, all of them one group: they run
    together again (in loops, with nothing else), and split only if that kills a worker too.
    """
    by_owner: dict[str | None, list[Job]] = defaultdict(list)
    for job in dead:
        by_owner[job.lease_owner].append(job)
    requeued: list[Job] = []
    lettered: list[Job] = []
    for owner, held in by_owner.items():
        suspects = sorted((j for j in held if j.running_alone), key=lambda j: j.id)
        innocent = [j for j in held if not j.running_alone]
        if len(suspects) == 1:
            job = suspects[0]
            error = f"its worker died while running it alone (attempt {job.attempts})"
            (requeued if _charge(job, error, max_attempts, owner, healthy_workers) else lettered).append(job)
        elif suspects:
            half = len(suspects) // 2
            for group in (suspects[:half], suspects[half:]):
                _suspects(group)
            for job in suspects:
                _requeue(job)
            requeued += suspects
        if not suspects:
            _suspects(innocent)
        for job in innocent:
            _requeue(job)
        requeued += innocent
    return requeued, lettered


def _suspects(group: list[Job]) -> None:
    """`group` runs again together as suspects of one group of their own, with nothing else."""
    name = uuid.uuid4().hex[:16]
    for job in group:
        job.suspect = True
        job.suspect_group = name


def requeue_expired(job: Job, max_attempts: int, healthy_workers: int = 1) -> bool:
    """One running job whose lease expired (its holder died), as `requeue_dead` takes it back.
    True when it goes back to the queue."""
    requeued, _ = requeue_dead([job], max_attempts, healthy_workers)
    return bool(requeued)


def release(session: Session, owner: str, job_ids: Iterable[str]) -> list[str]:
    """Give back jobs `owner` holds (shutdown, an outage it cannot wait out): queued again, no
    attempt charged. Returns the ids given back (to send)."""
    ids = list(job_ids)
    released: list[str] = []
    for start in range(0, len(ids), CHUNK):
        released += session.scalars(
            update(Job)
            .where(Job.id.in_(ids[start : start + CHUNK]), Job.lease_owner == owner, _state_is(JobState.RUNNING))
            .values(state=JobState.QUEUED.value, lease_owner=None, lease_expires_at=None, running_alone=False,
                    enqueued_at=utcnow())
            .returning(Job.id)
        )
    return released


def cancel(session: Session, job_id: str, *, reason: str | None = None) -> Job:
    """Cancel a queued or running job (IllegalTransition once it has ended). `reason`, when given
    (a cancel that did not come from `sdqueue cancel`), is kept in the job's error."""
    job = get_job(session, job_id, lock=True)
    transition(job, JobState.CANCELLED)
    if reason is not None:
        job.error = reason
    return job


def job_record(job: Job, *, locate: Any = None) -> dict[str, Any]:
    """The whole record of a job as plain data (status --json, the Python client, the HTTP API).

    "webhook" is None for a job without a webhook_url; else where its end is POSTed, which ends
    are (`events`), and how that went: state None until the job ends (and after an end not asked
    for), then pending, delivered or failed, with every try.
    """

    def when(value: Any) -> str | None:
        return value.isoformat() if value is not None else None

    def webhook() -> dict[str, Any] | None:
        if job.webhook_url is None:
            return None
        delivery = job.webhook
        events = job.webhook_events or [state.value for state in JobState if state.terminal]
        if delivery is None:
            return {"url": job.webhook_url, "events": events, "state": None, "attempts": 0, "next_attempt_at": None,
                    "finished_at": None, "tries": []}
        return {
            "url": delivery.url,
            "events": events,
            "state": delivery.state,
            "attempts": delivery.attempts,
            "next_attempt_at": when(delivery.next_attempt_at) if delivery.state == "pending" else None,
            "finished_at": when(delivery.finished_at),
            "tries": [{"at": when(t.at), "status_code": t.status_code, "error": t.error, "seconds": t.seconds}
                      for t in delivery.tries],
        }

    return {
        "id": job.id,
        "state": job.state,
        "mode": job.mode,
        "params": job.params,
        "seed": job.seed,
        "seed_was_drawn": job.seed_was_drawn,
        "input_key": job.input_key,
        "mask_sha256": job.mask_sha256,
        # The job it follows (its image `index` is this one's input), and the jobs that follow it.
        "after": {"job": job.after_job_id, "index": job.after_index} if job.after_job_id is not None else None,
        "followers": [follower.id for follower in job.followers],
        "depth_sha256": job.depth_sha256,  # depth-to-image: the caller's depth map's (None: estimated)
        "model": job.model,
        "priority": job.priority,
        "run_id": job.run_id,
        "run_key": job.run_key,
        "attempts": job.attempts,
        "failures": job.failures,
        "dead_letter": job.dead_letter,
        "error": job.error,
        "worker": job.worker,
        "lease_expires_at": when(job.lease_expires_at),
        "created_at": when(job.created_at),
        "started_at": when(job.started_at),
        "finished_at": when(job.finished_at),
        "images": [
            {
                "index": image.index,
                "seed": image.seed,
                "key": image.object_key,
                "location": locate(image.object_key) if locate else None,
                "sha256": image.sha256,  # of the PNG file
                "pixel_sha256": image.pixel_sha256,  # of its decoded RGB pixels (None: made before 0009)
                "size_bytes": image.size_bytes,
                "width": image.width,
                "height": image.height,
                "batch_id": image.batch_id,
                "batch_size": image.batch_size,
                "batch_position": image.batch_position,
                "steps_run": image.steps_run,
                "shared_max": image.shared_max,
                "shared_mean": image.shared_mean,
            }
            for image in job.images
        ],
        "webhook": webhook(),
    }
