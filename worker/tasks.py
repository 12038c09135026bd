"""The generate tasks: claim a message's jobs, hand them to the engine's batches, wait for their end.

A message carries one job's id (`sdqueue.generate`, the job id as its task id), or several bulk
jobs' ids (`sdqueue.generate_many`, SDQUEUE_JOBS_PER_MESSAGE): Celery's cost of a message (its
delivery, its task, its acknowledgement) is then paid once for them all, and they are claimed in
one statement. The worker runs many task threads (`worker_slots`), and the engine runs their jobs
in shared batches. The job rows, written before the message was sent, hold the requests, and the
database decides who runs each job: a delivery claims it with a lease of its own, or finds it ended
or leased to a live worker and leaves it, and the message is acknowledged once each of its jobs has
ended or been left. Seeds come from the row, so a job run again (its worker died) makes the same
images; its object keys carry the claim's token, so a stale claim never overwrites a newer one's
objects.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from celery import Task
from celery.exceptions import Reject
from sqlalchemy import select

from models import jobs
from models.constants import GENERATE_MANY_TASK, GENERATE_TASK, queue_for
from models.db import Database
from models.errors import JobError, JobNotFound
from models.logs import job_context
from models.outage import OutageTooLong, wait_out
from models.settings import Settings
from models.storage import Storage, open_storage
from models.sweep import Sweeper
from models.registry import model_key
from models.tables import JobState, Priority, Run
from models.workers import healthy_workers, live_worker_names
from worker import metrics
from worker.app import app
from worker.samples import compat_key, job_samples
from worker.batcher import Work
from worker.blame import host_fault
from worker.sweeping import PeriodicSweeper

log = logging.getLogger(__name__)
# Run names a worker keeps for its logs before it forgets them all and reads them again.
RUN_NAMES_KEPT = 1024


@dataclass
class WorkerContext:
    """What one worker process holds for its whole life."""

    settings: Settings
    db: Database
    storage: Storage
    engine: Any  # worker.engine.Engine
    sweeper: PeriodicSweeper | None = None
    metrics_server: metrics.MetricsServer | None = None  # /metrics on SDQUEUE_METRICS_PORT
    run_names: dict[str, str] = field(default_factory=dict)  # for the logs; a run's name never changes

    @classmethod
    def open(cls, settings: Settings) -> WorkerContext:
        from worker.backend import open_model
        from worker.engine import Engine, default_pixel_budget

        db = Database(settings.database_url)
        storage = open_storage(settings.storage_url, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region)
        model = open_model(settings)
        engine = Engine(
            model, db, storage, f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}",
            pixel_budget=settings.pixel_budget or default_pixel_budget(model),
            window=settings.batch_window_ms / 1000, bulk_share=settings.bulk_share, batching=settings.batching,
        )
        engine.unet_call = model.compile(settings, engine.budget.default)
        send = partial(send_jobs, default_queue=queue_for(settings.queue, Priority.INTERACTIVE.value,
                                                          model_key(settings.model)))
        engine.serve(settings, send)
        sweeper = PeriodicSweeper(Sweeper(settings, db, storage, send), settings)
        return cls(settings, db, storage, engine, sweeper, metrics.serve(settings, engine))

    def close(self) -> None:
        metrics.stop(self.metrics_server)
        if self.sweeper is not None:
            self.sweeper.stop()
        self.engine.stop()
        self.db.dispose()


def send_jobs(job_ids: list[str], queue: str | None = None, *, default_queue: str) -> None:
    """One message per job, as the producer sends them: the job id is the task id."""
    # A connection of its own, not the process-wide producer pool: kombu keeps one pool per broker
    # URL for the whole process, and a Celery worker that stopped in it (tests, the demo) leaves it
    # closed ("Acquire on closed pool"). These sends are rare (give-backs, retries, sweeps).
    with app.connection_for_write() as connection, connection.Producer() as producer:
        for job_id in job_ids:
            app.send_task(GENERATE_TASK, args=[job_id], task_id=job_id, queue=queue or default_queue,
                          producer=producer)


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
    with job_context(job_id=job_id):  # what this task thread logs is about this job
        return _run_message(self, [job_id])[0]


@app.task(name=GENERATE_MANY_TASK, base=PipelineTask, bind=True, max_retries=None)
def generate_many(self: PipelineTask, job_ids: list[str]) -> list[str]:
    """Several bulk jobs in one message (SDQUEUE_JOBS_PER_MESSAGE): claimed in one statement, each
    with a lease of its own, run in the engine's batches like any job; the message is acknowledged
    once every one of them has ended."""
    return _run_message(self, list(dict.fromkeys(str(job_id) for job_id in job_ids)))  # each once


def _run_message(task: PipelineTask, job_ids: list[str]) -> list[str]:
    try:
        # The queue it came from (interactive or bulk) is where a worker shutting down sends it back.
        return run_jobs(task.context, job_ids, queue=(task.request.delivery_info or {}).get("routing_key"))
    except OutageTooLong as exc:
        # The database stayed away for longer than we wait, and none of the message's jobs is
        # claimed: the message goes back to the queue rather than being acknowledged with nothing
        # recorded.
        log.error("job(s) %s: %s; their message goes back to the queue", ", ".join(job_ids), exc)
        raise Reject(str(exc), requeue=True) from None


def run_job(ctx: WorkerContext, job_id: str, queue: str | None = None) -> str:
    """Run one job end to end; returns how it ended (see worker/engine.py), or why it did not run.
    `queue`: the one its message came from (None: the worker's own)."""
    return run_jobs(ctx, [job_id], queue)[0]


def run_jobs(ctx: WorkerContext, job_ids: list[str], queue: str | None = None) -> list[str]:
    """Run the jobs of one message end to end, together in the engine's batches; returns how each
    ended, or why it did not run, in their order. Raises OutageTooLong when the database stays
    away before any of them is claimed."""
    engine = ctx.engine
    if engine.draining or engine.quarantined:
        # Shutting down, or this host is at fault: leave the jobs to another worker, unclaimed.
        _leave_to_others(engine, job_ids, queue, pause=engine.quarantined)
        return ["handed back"] * len(job_ids)
    # 1. claim them with leases (a database outage is waited out; the message stays unacknowledged)
    works, ended, left = _claim_all(ctx, job_ids, queue)
    # 2. into the engine's batches, which upload and record the images
    futures = {}
    for work in works:
        with job_context(job_id=work.job_id):
            futures[work.job_id] = _start(ctx, work)
    if left:  # they failed here as often as they may, or could not be claimed: another worker's turn
        _leave_to_others(engine, left, queue, pause=True)
    ended.update((job_id, future.result()) for job_id, future in futures.items())
    return [ended[job_id] for job_id in job_ids]


def _claim_all(ctx: WorkerContext, job_ids: list[str], queue: str | None
               ) -> tuple[list[Work], dict[str, str], list[str]]:
    """The jobs claimed, as work for the engine; why each other one was not (by id); and those to
    leave to other workers. The plainly queued jobs take one statement (`jobs.claim_queued`); each
    other one goes through `jobs.claim`, which decides. Once some are claimed, a database that stays
    away leaves the rest to other workers, unclaimed."""
    owner, settings = ctx.engine.hostname, ctx.settings
    model = model_key(settings.model)
    what = f"job {job_ids[0]}" if len(job_ids) == 1 else f"{len(job_ids)} jobs of one message"
    rows = wait_out(lambda: jobs.claim_queued(ctx.db, job_ids, owner, model, lease_seconds=settings.lease_seconds,
                                              max_attempts=settings.max_attempts),
                    f"{what}: claiming", timeout=settings.outage_timeout)
    works: list[Work] = []
    ended: dict[str, str] = {}
    left: list[str] = []
    away = False  # the database stayed away too long while some of the message's jobs were claimed
    for job_id in job_ids:
        with job_context(job_id=job_id):
            job: Any = rows.get(job_id)
            if job is None and not away:
                try:
                    job = wait_out(lambda: _claim(ctx, job_id), f"job {job_id}: claiming it",
                                   timeout=settings.outage_timeout)
                except OutageTooLong:
                    if not works and not rows:
                        raise  # nothing of the message is claimed: it goes back whole
                    log.error("job %s: the database stayed away too long; it and the message's other unclaimed "
                              "jobs are sent again", job_id)
                    away = True
                except JobNotFound:
                    log.warning("job %s: no such job (a message whose submit was taken back): dropped", job_id)
                    ended[job_id] = "unknown"
                    continue
            if job is None:  # the database stayed away
                left.append(job_id)
                ended[job_id] = "handed back"
                continue
            if isinstance(job, str):
                log.info("job %s not run: %s", job_id, job)
                if job == jobs.LEFT_TO_OTHERS:
                    left.append(job_id)
                ended[job_id] = "skipped"
                continue
            works.append(_work(ctx, job))
    return works, ended, left


def _start(ctx: WorkerContext, work: Work) -> Future:
    """A job just claimed, held and on its way to a batch: its samples (image i from seed + i; an
    img2img input read from storage, an outage waited out); the future says how it ended."""
    from worker.inputs import input_size, prepare_depth_map, prepare_input_image, prepare_mask

    engine = ctx.engine
    engine.hold(work)
    engine.announce(work.job_id, JobState.RUNNING.value)
    params = work.params
    inputs: dict[str, Any] = {"input image": None, "mask": None, "depth map": None}
    for what, key, prepare in (("input image", work.input_key, prepare_input_image), ("mask", work.mask_key, prepare_mask),
                               ("depth map", work.depth_key, lambda data, *_: prepare_depth_map(data))):  # its own size
        if key is None:
            continue
        try:
            data = wait_out(lambda: ctx.storage.get(key), f"job {work.job_id}: reading its {what}",
                            timeout=ctx.settings.outage_timeout)
            inputs[what] = prepare(data, *input_size(params))
        except OutageTooLong:
            return engine.give_back(work)
        except Exception as exc:
            if host_fault(exc) is not None:  # this host cannot read images: not the job's fault
                return engine.charge(work, exc)
            error = JobError(f"the {what} cannot be read ({type(exc).__name__}: {exc})", "input-unreadable")
            return engine.fail(work, error)
    work.samples = job_samples(work.job_id, params, work.seed, inputs["input image"], inputs["mask"],
                               depth=work.key.mode == "depth", depth_map=inputs["depth map"])
    return engine.submit(work)


def _leave_to_others(engine: Any, job_ids: list[str], queue: str | None, *, pause: bool) -> None:
    """Send the jobs' messages again (one each), unclaimed. `pause`: this worker would take them
    back at once (it still consumes), so a healthy worker gets a second to take them first."""
    if pause:
        time.sleep(1.0)
    engine.send_again(job_ids, queue)


def _run_name(ctx: WorkerContext, run_id: str | None) -> str | None:
    """The name of a job's run, read once per run (not once per claim) for the logs; its id while
    the database cannot say (the claim is made: a name for the logs must not undo it)."""
    if run_id is None:
        return None
    if run_id not in ctx.run_names:
        if len(ctx.run_names) >= RUN_NAMES_KEPT:
            ctx.run_names.clear()
        try:
            with ctx.db.session() as session:
                ctx.run_names[run_id] = session.scalar(select(Run.name).where(Run.id == run_id)) or run_id
        except Exception as exc:
            log.warning("the name of run %s cannot be read (%s): its id stands for it in the logs", run_id, exc)
            return run_id
    return ctx.run_names[run_id]


def _claim(ctx: WorkerContext, job_id: str) -> Any:
    """`jobs.claim` of a job the one statement did not claim: the claimed row, or why it was not claimed."""
    owner, settings = ctx.engine.hostname, ctx.settings
    model = model_key(settings.model)
    with ctx.db.session() as session:
        job, why = jobs.claim(session, job_id, owner, model, lease_seconds=settings.lease_seconds,
                              max_attempts=settings.max_attempts,
                              healthy_workers=lambda: healthy_workers(settings),
                              live_workers=lambda: live_worker_names(settings))
        return job if job is not None else why


def _work(ctx: WorkerContext, job: Any) -> Work:
    """A claimed job (a row of CLAIMED columns, or a Job) as work for the engine."""
    if job.attempts == 1:  # time in queue: to its first claim
        metrics.claimed(jobs.aware(job.created_at), jobs.aware(job.started_at))
    params = dict(job.params)
    return Work(
        job.id, compat_key(params, img2img=job.input_key is not None, inpaint=job.mask_key is not None,
                           depth=job.mode == "depth"), [],
        job.created_at.timestamp(), priority=job.priority, params=params, input_sha256=job.input_sha256,
        lease=jobs.lease_of(job), alone=job.suspect, suspect_group=job.suspect_group, seed=job.seed,
        input_key=job.input_key, mask_key=job.mask_key, mask_sha256=job.mask_sha256, depth_key=job.depth_key,
        depth_sha256=job.depth_sha256,
        run_id=job.run_id, run_name=_run_name(ctx, job.run_id),
    )
