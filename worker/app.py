"""The Celery app of the worker, configured so that no job is lost.

Acknowledge late (a job is acknowledged after it ran), requeue the job of a worker process that
died, one message in hand at a time, and retry the broker connection forever.
"""

from __future__ import annotations

from celery import Celery

from models.settings import Settings

app = Celery("sdqueue", set_as_current=False)


def configure(settings: Settings) -> Celery:
    """Point the app at `settings` (once per process in a worker; again in tests and the demo)."""
    if app._pool is not None:  # connections made for an earlier broker URL
        app._pool.force_close_all()
        app._after_fork()  # drops the connection and producer pools
    app.conf.update(
        broker_url=settings.broker_url,
        task_default_queue=settings.queue,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout},
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        task_ignore_result=True,  # job state lives in the database
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
    )
    app.sdqueue_settings = settings  # type: ignore[attr-defined]
    return app
