"""`sdqueue worker`: check everything a worker needs, then run the Celery worker."""

from __future__ import annotations

import logging
import socket

from celery.signals import worker_shutdown

from models.db import Database
from models.errors import ConfigError
from models.settings import Settings
from worker.app import configure

log = logging.getLogger("worker")


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run_worker(settings: Settings, *, loglevel: str = "INFO") -> int:
    setup_logging(loglevel)
    if settings.in_process_broker:
        raise ConfigError(
            "SDQUEUE_BROKER_URL is memory:// (in-process): a worker needs a real broker, "
            "e.g. SDQUEUE_BROKER_URL=redis://127.0.0.1:6379/0"
        )
    # Fail at start, not on the first job: the schema, then the weights and the pipeline,
    # loaded once in this process. Task threads share it through the engine's batches.
    Database(settings.database_url).dispose()
    app = configure(settings)
    from worker.tasks import generate, reset_context

    model = generate.context.engine.model  # loads the pipeline and starts the engine
    log.info("model %s from %s (revision %s)", model.spec.name, model.source, model.revision or "-")
    worker_shutdown.connect(lambda **_: reset_context(), weak=False)
    app.worker_main(
        [
            "worker",
            f"--loglevel={loglevel}",
            # One process per GPU; its threads each hold one job, and the engine batches them.
            "--pool=threads",
            f"--concurrency={settings.worker_slots}",
            f"--queues={settings.queue}",
            f"--hostname=sdqueue-{settings.queue}@{socket.gethostname()}",
            "--without-gossip",
            "--without-mingle",
        ]
    )
    return 0
