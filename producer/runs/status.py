"""What `sdqueue runs` (and /v1/runs) shows and does: a run's counts by state, its progress and
rate, cancelling or retrying its jobs in bulk, and deleting a run with its images."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, update

from models.cancel import cancel_job
from models.counts import read_counts
from models.errors import InvalidRequest, RunBusy, RunNotFound, StorageError
from models.jobs import CHUNK, IllegalTransition, aware
from models.tables import STATES, Image, Job, JobState, Run, Upload, WebhookAttempt, WebhookDelivery, utcnow
from producer.client import Client
from producer.bulk import send_batches

# images/s is measured over this much of the recent past.
RATE_WINDOW = 300.0


@dataclass
class RunStatus:
    name: str
    priority: str
    created_at: datetime
    schedule: str | None
    sealed: bool
    expected_jobs: int | None
    jobs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATES, 0))
    images: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATES, 0))  # images asked, by job state
    images_done: int = 0
    recent_images: int = 0  # made in the last `window` seconds
    window: float = RATE_WINDOW  # or less: from the first of those images, when the run began within it
    id: str = ""
    source_sha256: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    api_key_id: str | None = None  # the API key that made it; None: the operator's

    @property
    def total(self) -> int:
        return sum(self.jobs.values())

    @property
    def images_total(self) -> int:
        """Images its jobs ask for, whatever their state."""
        return sum(self.images.values())

    @property
    def finished(self) -> bool:
        return self.sealed and not (self.jobs["queued"] or self.jobs["running"])

    @property
    def state(self) -> str:
        """writing (its rows are not all in yet: enqueueing it again completes it), running (a job
        is), queued (jobs wait, none runs), cancelled (every job was), else finished."""
        if not self.sealed:
            return "writing"
        if self.jobs["running"]:
            return "running"
        if self.jobs["queued"]:
            return "queued"
        if self.total and self.jobs["cancelled"] == self.total:
            return "cancelled"
        return "finished"

    @property
    def rate(self) -> float:
        return self.recent_images / self.window

    @property
    def eta_seconds(self) -> float | None:
        left = self.images["queued"] + self.images["running"]
        if not left:
            return 0.0
        return left / self.rate if self.rate > 0 else None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "id": self.id, "state": self.state, "priority": self.priority,
                "created_at": self.created_at.isoformat(), "schedule": self.schedule, "sealed": self.sealed,
                "expected_jobs": self.expected_jobs, "jobs": self.jobs, "total": self.total,
                "images_done": self.images_done, "images_total": self.images_total,
                "images_per_second": round(self.rate, 3), "eta_seconds": self.eta_seconds,
                "source_sha256": self.source_sha256, "defaults": self.defaults}


def _status_of(run: Run) -> RunStatus:
    return RunStatus(run.name, run.priority, aware(run.created_at) or utcnow(), run.schedule, run.sealed_at is not None,
                     run.expected_jobs, id=run.id, source_sha256=run.source_sha256, defaults=dict(run.defaults or {}),
                     api_key_id=run.api_key_id)


def list_runs(client: Client, limit: int = 100, *, api_key_id: str | None = None,
              before: tuple[datetime, str] | None = None, window: float = RATE_WINDOW) -> list[RunStatus]:
    """The newest runs, each as run_status gives it. `api_key_id`: only that key's runs (None:
    every run); `before`: only runs older than this (created_at, id), the last of a page."""
    query = select(Run)
    if api_key_id is not None:
        query = query.where(Run.api_key_id == api_key_id)
    if before is not None:
        created, run_id = before
        query = query.where(or_(Run.created_at < created, and_(Run.created_at == created, Run.id < run_id)))
    with client.db.session() as session:
        runs = session.scalars(query.order_by(Run.created_at.desc(), Run.id.desc()).limit(limit)).all()
        found = {run.id: _status_of(run) for run in runs}
        _count(session, found, window)
    return list(found.values())


def run_status(client: Client, name: str, window: float = RATE_WINDOW) -> RunStatus:
    """One run: jobs and images by state, images made, images/s over the last `window` seconds."""
    with client.db.session() as session:
        run = _get_run(session, name)
        status = _status_of(run)
        _count(session, {run.id: status}, window)
    return status


def _count(session: Any, found: dict[str, RunStatus], window: float) -> None:
    """Fill in the runs' jobs and images by state and their recent images, from the counters."""
    for run_id, counts in read_counts(session, found, window).items():
        status = found[run_id]
        status.jobs.update(counts.jobs)
        status.images.update(counts.images)
        status.images_done = status.images["succeeded"]
        status.recent_images = counts.recent_images
        status.window = max(counts.window, 1.0)


CANCEL_STATES = ("queued", "running", "all")


def cancel_run(client: Client, name: str, state: str = "queued") -> int:
    """Cancel the run's queued jobs (and follow-ups waiting), its running ones (each leaves its loop at the next step, none
    of its images recorded), or all of them; returns how many were cancelled."""
    if state not in CANCEL_STATES:
        raise InvalidRequest([f"state={state!r}: must be one of {', '.join(CANCEL_STATES)}"])
    cancelled = 0
    if state in ("queued", "all"):  # with the follow-ups waiting for a job of theirs
        for waiting in (JobState.QUEUED, JobState.WAITING):
            changed = _change_jobs(client, name, waiting, state=JobState.CANCELLED.value, finished_at=utcnow())
            cancelled += sum(len(ids) for ids in changed.values())
    if state in ("running", "all"):
        with client.db.session() as session:
            run_id = _get_run(session, name).id
            running = list(session.scalars(select(Job.id).where(Job.run_id == run_id,
                                                                Job.state == JobState.RUNNING.value)))
        for job_id in running:  # one at a time, as `sdqueue cancel`: each worker must hear of its own
            try:
                cancel_job(client.settings, client.db, job_id)
                cancelled += 1
            except IllegalTransition:  # it ended meanwhile
                pass
    return cancelled


@dataclass
class RunContents:
    """What deleting a run removes."""

    jobs: int
    images: int
    objects: int  # its images' objects and its inputs' (images, masks, depth maps)
    unfinished: int  # jobs queued or running: a run is deleted only once none is


def run_contents(client: Client, name: str) -> RunContents:
    with client.db.session() as session:
        run_id = _get_run(session, name).id
        jobs, inputs, unfinished = session.execute(
            select(func.count(), func.count(Job.input_key).filter(Job.after_job_id.is_(None)) + func.count(Job.mask_key)
                   + func.count(Job.depth_key),
                   func.count().filter(Job.state.in_([JobState.WAITING.value, JobState.QUEUED.value,
                                                      JobState.RUNNING.value])))
            .where(Job.run_id == run_id)).one()
        images = session.scalar(select(func.count()).select_from(Image).join(Job, Job.id == Image.job_id)
                                .where(Job.run_id == run_id)) or 0
    return RunContents(jobs, images, images + inputs, unfinished)


def delete_run(client: Client, name: str) -> RunContents:
    """Delete a run that has no queued or running job: its rows, a chunk of jobs per transaction
    (the run's own row last, so that a delete stopped half-way is finished by running it again),
    then each chunk's objects. An object whose delete fails is left to the sweeper, which removes
    objects no row references."""
    contents = run_contents(client, name)
    if contents.unfinished:
        raise RunBusy(f"run {name!r} has {contents.unfinished} queued or running job(s): cancel them first "
                      f"(sdqueue runs cancel {name} --state all)")
    deleted = RunContents(0, 0, 0, 0)
    while True:
        with client.db.session() as session:
            run = _get_run(session, name)
            ids = list(session.scalars(select(Job.id).where(Job.run_id == run.id).limit(CHUNK)))
            if not ids:
                session.delete(run)
                break
            keys = list(session.scalars(select(Image.object_key).where(Image.job_id.in_(ids))))
            # Its inputs, not a follow-up's: that one's input is the image of the job it follows.
            inputs = [key for row in session.execute(select(Job.input_key, Job.mask_key, Job.depth_key)
                                                     .where(Job.id.in_(ids), Job.after_job_id.is_(None)))
                      for key in row if key]
            inputs += list(session.scalars(select(Job.mask_key).where(Job.id.in_(ids), Job.after_job_id.is_not(None),
                                                                        Job.mask_key.is_not(None))))
            deliveries = select(WebhookDelivery.id).where(WebhookDelivery.job_id.in_(ids))
            session.execute(delete(WebhookAttempt).where(WebhookAttempt.delivery_id.in_(deliveries)))
            for table in (WebhookDelivery, Upload, Image):
                session.execute(delete(table).where(table.job_id.in_(ids)))
            session.execute(delete(Job).where(Job.id.in_(ids)))
        deleted.jobs += len(ids)
        deleted.images += len(keys)
        for key in keys + inputs:
            try:
                client.storage.delete(key)
                deleted.objects += 1
            except StorageError:  # the store's fault, not the run's: the orphan sweep removes it later
                pass
    return deleted


def retry_run(client: Client, name: str) -> int:
    """Queue the run's failed jobs again, with their seeds and a clean failure count; returns how many."""
    back = _change_jobs(client, name, JobState.FAILED, state=JobState.QUEUED.value, failures=0, dead_letter=False,
                        error=None, finished_at=None, enqueued_at=None)
    return send_batches(client, back, mark=True)


def _change_jobs(client: Client, name: str, current: JobState, **values: Any) -> dict[str, list[str]]:
    """Set `values` on the run's jobs that are in state `current`, a chunk per transaction, each
    row only if it still is; returns the ids changed, by queue."""
    with client.db.session() as session:
        run_id = _get_run(session, name).id
        ids = list(session.scalars(select(Job.id).where(Job.run_id == run_id, Job.state == current.value)))
    changed: dict[str, list[str]] = {}
    for start in range(0, len(ids), CHUNK):
        with client.db.session() as session:
            for job_id, queue in session.execute(
                update(Job).where(Job.id.in_(ids[start : start + CHUNK]), Job.state == current.value)
                .values(**values).returning(Job.id, Job.queue)
            ):
                changed.setdefault(queue or client.settings.queue, []).append(job_id)
    return changed


def _get_run(session: Any, name: str) -> Run:
    run = session.scalars(select(Run).where(Run.name == name)).one_or_none()
    if run is None:
        raise RunNotFound(name)
    return run
