"""A Celery revoke of a job's task cancels the job, on every worker that hears it.

Celery's revoke (Flower, `celery control revoke ID`, `app.control.revoke(ID)`) is a broadcast that
each worker keeps in memory only: the worker drops the job's message, but the job stays queued in
the database, the sweeper sends it again, and a worker started later runs it. A job's task id is its
job id, so each worker that hears a revoke also cancels the job as `sdqueue cancel` does, the reason
kept in its error: the database says cancelled, and that sticks. Celery's own command still runs
first, unchanged. Every worker hears the broadcast; the first to cancel wins and the others find the
job cancelled already. A revoke sent while no worker runs is lost with the broadcast.
"""

from __future__ import annotations

import logging
import threading
from functools import partial
from typing import Any, Callable

from celery.utils.functional import maybe_list
from celery.worker.control import Panel

from models.cancel import cancel_job
from models.db import Database
from models.errors import JobNotFound
from models.jobs import IllegalTransition
from models.outage import wait_out
from models.settings import Settings

log = logging.getLogger(__name__)

# Celery's commands that revoke tasks by id: `app.control.revoke` and Flower send `revoke` (also
# with terminate=True); `celery control terminate SIGNAL ID` sends `terminate`.
COMMANDS = ("revoke", "terminate")


def install_revoke_hook() -> None:
    """Wrap Celery's revoke commands. Their registry is global to the process, and the settings
    are read from the worker's app when a revoke arrives: installing again changes nothing."""
    for name in COMMANDS:
        celery_command = Panel.data[name]
        if getattr(celery_command, "sdqueue_revoke_hook", False):
            continue
        # Same name, same signature and help: `celery inspect`, Flower and the CLI see no change.
        Panel.register(_hooked(name, celery_command), name=name, **Panel.meta[name]._asdict())


def _hooked(name: str, celery_command: Callable[..., Any]) -> Callable[..., Any]:
    reason = f"revoked through Celery (control {name})"

    def command(state: Any, **kwargs: Any) -> Any:
        try:
            return celery_command(state, **kwargs)  # raises for terminate=True on the thread pool
        finally:
            settings = getattr(state.app, "sdqueue_settings", None)
            job_ids = [str(task_id) for task_id in maybe_list(kwargs.get("task_id")) or []]
            if settings is not None and job_ids:
                # Off Celery's consumer thread: a slow or absent database must not hold up the worker.
                threading.Thread(target=cancel_revoked, args=(settings, job_ids, reason),
                                 name="sdqueue-revoke", daemon=True).start()

    command.__doc__ = celery_command.__doc__
    command.sdqueue_revoke_hook = True  # type: ignore[attr-defined]
    return command


def cancel_revoked(settings: Settings, job_ids: list[str], reason: str) -> None:
    """Cancel each revoked id that is a job not yet ended; leave the others alone. A database
    outage is waited out (up to SDQUEUE_OUTAGE_TIMEOUT); nothing here raises."""
    db = Database(settings.database_url, check=False)  # the worker checked the schema at start
    try:
        for job_id in job_ids:
            try:
                wait_out(partial(cancel_job, settings, db, job_id, reason=reason),
                         f"revoke of job {job_id}: cancelling it", timeout=settings.outage_timeout)
            except JobNotFound:
                log.info("revoke of %s: no such job here, nothing to cancel", job_id)
            except IllegalTransition as exc:  # ended, or cancelled by another worker that heard it
                log.info("revoke of %s: %s; left as it is", job_id, exc)
            except Exception:
                log.exception("revoke of %s: the job could not be cancelled", job_id)
            else:
                log.info("job %s cancelled: %s", job_id, reason)
    finally:
        db.dispose()
