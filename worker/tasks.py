"""The generate task: one job from the database, through the pipeline, to storage.

The message carries only the job id: the job row, written before the message was sent, holds
the request. Runs are idempotent: object keys come from the job id, seeds from the row, so a
redelivered job makes the same images again.
"""

from __future__ import annotations

import logging
import socket
import traceback
import uuid
from dataclasses import dataclass
from typing import Any

from celery import Task
from celery.signals import worker_process_init

from models import jobs
from models.constants import GENERATE_TASK
from models.db import Database
from models.errors import SdqueueError, StorageError
from models.registry import resolve_model
from models.settings import Settings
from models.storage import Storage, object_key_for, open_storage
from models.tables import Batch, Image, utcnow
from worker.app import app
from worker.encode import encode_png, sha256_of

log = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    """What one worker process holds for its whole life."""

    settings: Settings
    db: Database
    storage: Storage
    model: Any  # worker.pipeline.LoadedModel
    hostname: str

    @classmethod
    def open(cls, settings: Settings) -> WorkerContext:
        from worker.pipeline import load_model

        db = Database(settings.database_url)
        storage = open_storage(settings.storage_url, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region)
        model = load_model(resolve_model(settings.model, settings.data_dir), settings.device)
        return cls(settings, db, storage, model, f"{socket.gethostname()}:{uuid.uuid4().hex[:6]}")


class PipelineTask(Task):
    """Holds the worker's context as a lazy, per-process property: the pipeline loads once."""

    _context: WorkerContext | None = None

    @property
    def context(self) -> WorkerContext:
        if PipelineTask._context is None:
            PipelineTask._context = WorkerContext.open(self.app.sdqueue_settings)
        return PipelineTask._context


def reset_context() -> None:
    """Drop the pinned context (tests that reconfigure the app)."""
    if PipelineTask._context is not None:
        PipelineTask._context.db.dispose()
    PipelineTask._context = None


@worker_process_init.connect
def _load_in_child(**_: Any) -> None:
    # Prefork: load the pipeline in the child (CUDA must not be initialised before the fork),
    # at start, so the first job does not wait and a bad model shows at once.
    if getattr(app, "sdqueue_settings", None) is not None:
        generate.context  # noqa: B018


@app.task(name=GENERATE_TASK, base=PipelineTask, bind=True, max_retries=None)
def generate(self: PipelineTask, job_id: str) -> str:
    ctx = self.context
    try:
        return run_job(ctx, job_id)
    except StorageError as exc:
        # Storage is down or refused: the job stays running and comes back later.
        if self.request.retries + 1 >= ctx.settings.max_attempts:
            _record_failure(ctx, job_id, f"gave up after {ctx.settings.max_attempts} attempts: {exc}")
            return "failed"
        log.warning("job %s: %s; retrying", job_id, exc)
        raise self.retry(exc=exc, countdown=min(60, 2 ** (self.request.retries + 1)))


def run_job(ctx: WorkerContext, job_id: str) -> str:
    """Run one job end to end; returns its final state (or "skipped" when it had ended already)."""
    from worker.pipeline import generate as generate_images
    from worker.pipeline import library_versions, prepare_input_image

    model = ctx.model
    # 1. claim the job
    with ctx.db.session() as session:
        job = jobs.start(session, job_id, ctx.hostname, model.spec.name)
        if job is None:
            log.info("job %s has ended already: skipped", job_id)
            return "skipped"
        if job.attempts > ctx.settings.max_attempts:
            jobs.fail(session, job_id, f"gave up after {job.attempts - 1} attempts (worker lost each time)")
            return "failed"
        params, seed, input_key = dict(job.params), job.seed, job.input_key
        input_sha256 = job.input_sha256
    try:
        # 2. the input image of img2img
        init_image = None
        if input_key is not None:
            init_image = prepare_input_image(ctx.storage.get(input_key), params["width"], params["height"])
        # 3. denoise and decode
        batch = Batch(
            id=str(uuid.uuid4()),
            worker=ctx.hostname,
            model=model.source if model.spec.hub_id is None else model.spec.hub_id,
            model_revision=model.revision,
            scheduler=model.scheduler_name,
            device=model.device,
            dtype=model.dtype_name,
            size=params["num_images"],
            versions=library_versions(),
        )
        pictures = generate_images(model, params, seed, init_image)
    except StorageError:
        raise
    except Exception as exc:
        log.exception("job %s failed", job_id)
        _record_failure(ctx, job_id, f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}")
        return "failed"
    # 4. encode with the full record, upload, then record the images
    rows = []
    for index, picture in enumerate(pictures):
        record = {
            **params,
            "job_id": job_id,
            "index": index,
            "seed": seed + index,
            "mode": "img2img" if input_key else "txt2img",
            "input_sha256": input_sha256,
            "model": model.spec.name,
            "model_source": batch.model,
            "model_revision": model.revision,
            "scheduler": model.scheduler_name,
            "scheduler_config": dict(model.txt2img.scheduler.config),
            "device": model.device,
            "dtype": model.dtype_name,
            "batch_id": batch.id,
            "batch_size": batch.size,
            "batch_position": index,
            "versions": batch.versions,
        }
        png = encode_png(picture, record)
        key = object_key_for(job_id, index)
        ctx.storage.put(key, png, content_type="image/png")
        rows.append(
            Image(
                job_id=job_id, index=index, seed=seed + index, object_key=key, sha256=sha256_of(png),
                size_bytes=len(png), width=picture.width, height=picture.height,
                batch_id=batch.id, batch_size=batch.size, batch_position=index,
            )
        )
    batch.finished_at = utcnow()
    with ctx.db.session() as session:
        session.add(batch)
        session.flush()
        try:
            jobs.succeed(session, job_id, rows)
        except jobs.IllegalTransition as exc:
            log.info("job %s: %s (cancelled while it ran); its images are not recorded", job_id, exc)
            return exc.current.value
    log.info("job %s succeeded: %d image(s)", job_id, len(rows))
    return "succeeded"


def _record_failure(ctx: WorkerContext, job_id: str, error: str) -> None:
    with ctx.db.session() as session:
        try:
            jobs.fail(session, job_id, error)
        except (jobs.IllegalTransition, SdqueueError) as exc:
            log.info("job %s: could not record failure: %s", job_id, exc)
