"""The job state machine: queued -> running -> succeeded | failed | cancelled.

Producer and worker change a job's state only through these functions, each in the caller's
transaction, so every transition is checked in one place.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.errors import JobNotFound
from models.tables import Image, Job, JobState, utcnow

# A redelivered message (the worker that ran it died) finds the job still running: that is
# a new attempt of the same job, not a new transition. A queued job fails when its message
# could not be sent.
ALLOWED = {
    JobState.QUEUED: {JobState.RUNNING, JobState.FAILED, JobState.CANCELLED},
    JobState.RUNNING: {JobState.RUNNING, JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED},
    JobState.SUCCEEDED: set(),
    JobState.FAILED: set(),
    JobState.CANCELLED: set(),
}


class IllegalTransition(Exception):
    def __init__(self, job_id: str, current: JobState, wanted: JobState):
        super().__init__(f"job {job_id} is {current.value}: it cannot become {wanted.value}")
        self.current = current


def get_job(session: Session, job_id: str, *, lock: bool = False) -> Job:
    query = select(Job).where(Job.id == job_id)
    if lock:
        query = query.with_for_update()
    job = session.scalars(query).one_or_none()
    if job is None:
        raise JobNotFound(job_id)
    return job


def transition(job: Job, wanted: JobState) -> None:
    current = JobState(job.state)
    if wanted not in ALLOWED[current]:
        raise IllegalTransition(job.id, current, wanted)
    job.state = wanted.value
    now = utcnow()
    if wanted is JobState.RUNNING:
        job.started_at = now
        job.attempts += 1
        job.error = None
    elif wanted.terminal:
        job.finished_at = now


def start(session: Session, job_id: str, worker: str, model: str) -> Job | None:
    """Claim a job for a run; None when it has ended already (done, failed or cancelled)."""
    job = get_job(session, job_id, lock=True)
    if JobState(job.state).terminal:
        return None
    transition(job, JobState.RUNNING)
    job.worker = worker
    job.model = model
    # Images of an earlier, interrupted attempt are made again with the same seeds.
    for image in list(job.images):
        session.delete(image)
    session.flush()
    return job


def succeed(session: Session, job_id: str, images: list[Image]) -> Job:
    job = get_job(session, job_id, lock=True)
    transition(job, JobState.SUCCEEDED)
    for image in images:
        session.add(image)
    return job


def fail(session: Session, job_id: str, error: str) -> Job:
    job = get_job(session, job_id, lock=True)
    transition(job, JobState.FAILED)
    job.error = error
    return job


def cancel(session: Session, job_id: str) -> Job:
    job = get_job(session, job_id, lock=True)
    transition(job, JobState.CANCELLED)
    return job


def job_record(job: Job, *, locate: Any = None) -> dict[str, Any]:
    """The whole record of a job as plain data (status --json, the Python client)."""

    def when(value: Any) -> str | None:
        return value.isoformat() if value is not None else None

    return {
        "id": job.id,
        "state": job.state,
        "mode": job.mode,
        "params": job.params,
        "seed": job.seed,
        "seed_was_drawn": job.seed_was_drawn,
        "input_key": job.input_key,
        "model": job.model,
        "attempts": job.attempts,
        "error": job.error,
        "worker": job.worker,
        "created_at": when(job.created_at),
        "started_at": when(job.started_at),
        "finished_at": when(job.finished_at),
        "images": [
            {
                "index": image.index,
                "seed": image.seed,
                "key": image.object_key,
                "location": locate(image.object_key) if locate else None,
                "sha256": image.sha256,
                "size_bytes": image.size_bytes,
                "width": image.width,
                "height": image.height,
                "batch_id": image.batch_id,
                "batch_size": image.batch_size,
                "batch_position": image.batch_position,
            }
            for image in job.images
        ],
    }
