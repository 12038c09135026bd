"""The generate task: claim one job, hand it to the engine's batches, wait for its end.

Each job stays its own Celery task, with its own state, acknowledgement, retry and result; the
worker runs many task threads (`worker_slots`), and the engine runs their jobs in shared batches.
The message carries only the job id: the job row, written before the message was sent, holds the
request. Runs are idempotent: object keys come from the job id, seeds from the row, so a
redelivered job makes the same images again.
"""

from __future__ import annotations

import logging
import socket
import threading
import traceback
import uuid
from dataclasses import dataclass
from typing import Any

from celery import Task

from models import jobs
from models.constants import GENERATE_TASK
from models.db import Database
from models.errors import SdqueueError, StorageError
from models.registry import resolve_model
from models.settings import Settings
from models.storage import Storage, open_storage
from worker.app import app
from worker.batch import compat_key, job_samples
from worker.batcher import Work

log = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    """What one worker process holds for its whole life."""

    settings: Settings
    db: Database
    storage: Storage
    engine: Any  # worker.engine.Engine

    @classmethod
    def open(cls, settings: Settings) -> WorkerContext:
        from worker.engine import Engine, default_pixel_budget
        from worker.pipeline import load_model

        db = Database(settings.database_url)
        storage = open_storage(settings.storage_url, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region)
        model = load_model(resolve_model(settings.model, settings.data_dir), settings.device)
        engine = Engine(
            model, db, storage, f"{socket.gethostname()}:{uuid.uuid4().hex[:6]}",
            pixel_budget=settings.pixel_budget or default_pixel_budget(model.device),
            window=settings.batch_window_ms / 1000,
        )
        return cls(settings, db, storage, engine)

    def close(self) -> None:
        self.engine.stop()
        self.db.dispose()


class PipelineTask(Task):
    """Holds the worker's context as a lazy, per-process property: the pipeline loads once."""

    _context: WorkerContext | None = None
    _opening = threading.Lock()  # task threads start together: one of them loads

    @property
    def context(self) -> WorkerContext:
        with PipelineTask._opening:
            if PipelineTask._context is None:
                PipelineTask._context = WorkerContext.open(self.app.sdqueue_settings)
            return PipelineTask._context


def reset_context() -> None:
    """Stop the engine and drop the pinned context (worker shutdown; tests that reconfigure)."""
    with PipelineTask._opening:
        if PipelineTask._context is not None:
            PipelineTask._context.close()
        PipelineTask._context = None


@app.task(name=GENERATE_TASK, base=PipelineTask, bind=True, max_retries=None)
def generate(self: PipelineTask, job_id: str) -> str:
    ctx = self.context
    try:
        return run_job(ctx, job_id)
    except StorageError as exc:
        # Storage is down or refused: the job stays running and comes back later.
        if self.request.retries + 1 >= ctx.settings.max_attempts:
            record_failure(ctx, job_id, f"gave up after {ctx.settings.max_attempts} attempts: {exc}")
            return "failed"
        log.warning("job %s: %s; retrying", job_id, exc)
        raise self.retry(exc=exc, countdown=min(60, 2 ** (self.request.retries + 1)))


def run_job(ctx: WorkerContext, job_id: str) -> str:
    """Run one job end to end; returns its final state (or "skipped" when it had ended already)."""
    from worker.pipeline import prepare_input_image

    # 1. claim the job
    with ctx.db.session() as session:
        job = jobs.start(session, job_id, ctx.engine.hostname, ctx.engine.model.spec.name)
        if job is None:
            log.info("job %s has ended already: skipped", job_id)
            return "skipped"
        if job.attempts > ctx.settings.max_attempts:
            jobs.fail(session, job_id, f"gave up after {job.attempts - 1} attempts (worker lost each time)")
            return "failed"
        params, seed, input_key, input_sha256 = dict(job.params), job.seed, job.input_key, job.input_sha256
        created_at = job.created_at.timestamp()
    try:
        # 2. its samples: image i from seed + i
        init_image = None
        if input_key is not None:
            init_image = prepare_input_image(ctx.storage.get(input_key), params["width"], params["height"])
        samples = job_samples(job_id, params, seed, init_image)
        work = Work(job_id, compat_key(params, img2img=init_image is not None), samples, created_at,
                    params=params, input_sha256=input_sha256)
        # 3. into a batch; the engine uploads and records the images
        return ctx.engine.submit(work).result()
    except StorageError:
        raise
    except Exception as exc:
        log.exception("job %s failed", job_id)
        record_failure(ctx, job_id, f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}")
        return "failed"


def record_failure(ctx: WorkerContext, job_id: str, error: str) -> None:
    with ctx.db.session() as session:
        try:
            jobs.fail(session, job_id, error)
        except (jobs.IllegalTransition, SdqueueError) as exc:
            log.info("job %s: could not record failure: %s", job_id, exc)
