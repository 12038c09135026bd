"""Cancelling a job: the row first (the truth), then the hints that make it felt at once.

Shared by `sdqueue cancel` (producer/client.py) and a Celery revoke (worker/revokes.py).
"""

from __future__ import annotations

from models import jobs
from models.broker import announce_cancel
from models.db import Database
from models.events import publish_state
from models.settings import Settings
from models.tables import JobState


def cancel_job(settings: Settings, db: Database, job_id: str, *, reason: str | None = None) -> None:
    """Cancel a queued or running job: a queued one never starts, a running one leaves its
    denoising loop at the next step and none of its images is recorded. Raises JobNotFound, and
    IllegalTransition once the job has ended; a database error goes to the caller."""
    with db.session() as session:
        jobs.cancel(session, job_id, reason=reason)
    try:
        announce_cancel(settings, job_id)  # the worker holding it hears at once
    except Exception:  # only a hint: the worker's heartbeat reads the row anyway
        pass
    publish_state(settings, [job_id], JobState.CANCELLED.value)  # wakes waiters; never raises
