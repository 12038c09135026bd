"""The Celery app of the worker.

Messages are only hints: the database decides who runs a job (leases, models/jobs.py), and the
sweeper sends again what the broker lost. Still, acknowledge late (after the job ended), one
message in hand per slot, and retry the broker connection forever. Running tasks are not
cancelled when the broker connection drops: their leases say they are still ours.
"""

from __future__ import annotations

from celery import Celery

from models.settings import Settings
from worker.revokes import install_revoke_hook

app = Celery("sdqueue", set_as_current=False)


def configure(settings: Settings) -> Celery:
    """Point the app at `settings` (once per process in a worker; again in tests and the demo)."""
    if app._pool is not None:  # connections made for an earlier broker URL
        app._pool.force_close_all()
    # Drop the connection and producer pools whatever their state: a worker that stopped (tests,
    # the demo) closes its pool and forgets it, but its producer pool stays, and sends through it
    # would fail with "Acquire on closed pool".
    app._after_fork()
    app.conf.update(
        broker_url=settings.broker_url,
        task_default_queue=settings.queue,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout},
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        task_ignore_result=True,  # job state lives in the database
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
    )
    app.sdqueue_settings = settings  # type: ignore[attr-defined]
    install_revoke_hook()  # a Celery revoke cancels the job (every worker, in-process ones too, comes here)
    return app
