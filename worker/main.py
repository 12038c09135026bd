"""`sdqueue worker`: check everything a worker needs, then run the Celery worker.

Shutdown, as an operator expects it:
- SIGTERM (or Ctrl+C): stop taking jobs, finish the batch in hand, give back the jobs held but not
  started (queued again and sent at once, so another worker takes them now), exit.
- a second SIGTERM or Ctrl+C, or SIGQUIT: stop now; every held job is given back, uncharged.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import warnings
from typing import Any

from celery.signals import setup_logging, worker_ready, worker_shutdown

from models.constants import worker_queues
from models.registry import model_key
from models.db import Database
from models.errors import ConfigError
from models.logs import configure_logging, redirect_std_streams
from models.settings import Settings
from worker.app import configure

log = logging.getLogger("worker")


def node_name(settings: Settings) -> str:
    """The Celery node name (Flower, `celery inspect`): unique per worker process, host and pid,
    so that two workers on one host are two nodes."""
    return f"sdqueue-{settings.queue}-{os.getpid()}@{socket.gethostname()}"


def run_worker(settings: Settings, *, loglevel: str = "INFO") -> int:
    configure_logging(settings, loglevel)
    # A receiver of this signal tells Celery to set up no logging of its own: its lines go through
    # the root handler above, as JSON with SDQUEUE_LOG_FORMAT=json.
    setup_logging.connect(lambda **_: None, weak=False)
    if settings.log_format == "json":
        json_lines_only()
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

    engine = generate.context.engine  # loads the pipeline and starts the engine
    model = engine.model
    log.info("model %s from %s (revision %s)", model.spec.name, model.source, model.revision or "-")
    worker_shutdown.connect(lambda **_: reset_context(), weak=False)
    queues = worker_queues(settings.queue, model_key(settings.model))  # its model's: interactive, then bulk
    worker_ready.connect(lambda sender, **_: control_consuming(engine, sender, queues), weak=False)

    class Worker(app.Worker):  # type: ignore[name-defined,misc]
        def install_platform_tweaks(self, worker: Any) -> None:
            super().install_platform_tweaks(worker)
            install_shutdown_handlers(engine)
            # After Celery's logging set-up, which shows all of its own warnings: its notice that
            # running tasks are not cancelled when the broker connection drops is by design here
            # (leases in the database say which jobs are still ours).
            warnings.filterwarnings("ignore", message="\nIn Celery 5.1 we introduced an optional breaking change")

    worker = Worker(
        hostname=node_name(settings),
        # One process per GPU; its threads each hold one job, and the engine batches them.
        pool_cls="threads",
        concurrency=settings.worker_slots,
        queues=queues,  # interactive and bulk: kombu alternates between them
        loglevel=loglevel,
        without_gossip=True,
        without_mingle=True,
        quiet=settings.log_format == "json",  # no banner on stdout: every line is a JSON object
    )
    worker.start()
    return int(worker.exitcode or 0)


def json_lines_only() -> None:
    """SDQUEUE_LOG_FORMAT=json: nothing but JSON lines on stdout and stderr. What still writes there
    directly (print(), a library's own stderr handler, a thread's traceback) becomes log lines, and
    Celery's shutdown notices, which it writes on the raw stdout from its signal handlers, become
    lines of its logger."""
    import celery.apps.worker

    redirect_std_streams()
    said = logging.getLogger("celery.apps.worker")
    celery.apps.worker.safe_say = lambda msg, f=None: said.warning("%s", msg.strip())  # type: ignore[attr-defined]


def control_consuming(engine: Any, consumer: Any, queues: list[str]) -> None:
    """Let the engine stop and resume taking messages (quarantine), and exit with a status
    (SDQUEUE_QUARANTINE_EXIT) through Celery's warm shutdown. The consumer's own event loop
    changes its queues (`call_soon`), as Celery's cancel_consumer / add_consumer commands do."""

    def pause() -> None:
        for queue in queues:
            consumer.call_soon(consumer.cancel_task_queue, queue)

    def resume() -> None:
        for queue in queues:
            consumer.call_soon(consumer.add_task_queue, queue)

    def exit_with(status: int) -> None:
        from celery.worker import state

        threading.Thread(target=engine.drain, name="sdqueue-drain", daemon=True).start()
        state.should_stop = status  # the consumer's loop raises WorkerShutdown(status): a warm shutdown

    engine.pause_consuming, engine.resume_consuming, engine.exit_with = pause, resume, exit_with
    if engine.quarantined:  # quarantined before the consumer was ready
        pause()


def install_shutdown_handlers(engine: Any) -> None:
    """Replace Celery's handlers (its cold shutdown cannot stop the thread pool) with ours; the
    first SIGTERM still goes through Celery's warm shutdown."""
    celery_warm = signal.getsignal(signal.SIGTERM)
    signals_seen = {"stop": 0}

    def on_stop(signum: int, frame: Any) -> None:
        signals_seen["stop"] += 1
        if signals_seen["stop"] > 1:
            stop_now(engine)
        log.warning("%s: finishing the batch in hand and giving back the jobs not started "
                    "(again to stop now)", signal.Signals(signum).name)
        threading.Thread(target=engine.drain, name="sdqueue-drain", daemon=True).start()
        if callable(celery_warm):
            celery_warm(signum, frame)  # stop consuming, wait for the running tasks, exit

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGQUIT, lambda signum, frame: stop_now(engine))


def stop_now(engine: Any) -> None:
    """Give every held job back and leave at once, with no traceback."""
    # Database work off the signal handler: the main thread may hold a lock the handler would need.
    helper = threading.Thread(target=engine.abort, name="sdqueue-abort", daemon=True)
    helper.start()
    helper.join(15)
    log.warning("stopped")
    logging.shutdown()
    os._exit(0)
