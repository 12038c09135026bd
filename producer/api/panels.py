"""What the dashboard's pages show, read from the database, the broker and the worker registry as
plain data for the templates. Blocking: the routes call these in a worker thread.

A caller sees what the API shows it: with a key, its own jobs; with SDQUEUE_API_AUTH=off, every
job. Runs are made by `sdqueue run` and schedules, never by a key, so only the second sees them.
Queue depths and workers are the deployment's, not any caller's, and show to every caller (the
ids of the jobs a worker runs only with auth off, and so the reason a worker is quarantined, which
may quote a job's error). The broker is read for those panels alone: while it does not answer they
say so and the rest of the page is there.
"""

from __future__ import annotations

import io
import time
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, lazyload

from models.broker import queue_depth
from models.constants import queue_for
from models.errors import InvalidRequest, RunNotFound
from models.jobs import aware, job_record
from models.request import parse_request
from models.tables import Batch, Image, Job, JobState, Priority, Run
from models.text import refused_character
from producer.api.admit import enqueue
from producer.api.app import Backend
from producer.api.auth import Caller
from producer.api.errors import hide_secrets
from producer.api.jobs import image_key, visible_job
from producer.api.limits import check_rate
from producer.runs.status import list_runs, run_status

STATES = [state.value for state in JobState]
ENDED = [state.value for state in JobState if state.terminal]
RECENT_JOBS = 20
RUNS_SHOWN = 50
GALLERY_PAGE = 48
THUMBNAIL_SIDE = 256


# -- the overview (/) ------------------------------------------------------------------------------

def overview(shared: Backend, who: Caller) -> dict[str, Any]:
    queues, queues_error = _from_broker(lambda: queue_depths(shared))
    workers, workers_error = _from_broker(lambda: live_workers(shared, who))
    with shared.client.db.session() as session:
        counts = job_counts(session, who)
        recent = recent_jobs(session, who)
    runs = [run_row(status.as_dict()) for status in list_runs(shared.client, RUNS_SHOWN)] if who.key_id is None else None
    return {"queues": queues, "queues_error": queues_error, "workers": workers, "workers_error": workers_error,
            "counts": counts, "recent": recent, "runs": runs}


def _from_broker(read: Any) -> tuple[Any, str | None]:
    try:
        return read(), None
    except Exception as exc:  # the broker does not answer: the panel says so, the page stays
        return None, hide_secrets(" ".join(str(exc).split())[:200]) or type(exc).__name__


def queue_depths(shared: Backend) -> list[dict[str, Any]]:
    base = shared.settings.queue
    return [{"name": queue_for(base, priority), "priority": priority,
             "depth": queue_depth(shared.redis, queue_for(base, priority))}
            for priority in (Priority.INTERACTIVE.value, Priority.BULK.value)]


def live_workers(shared: Backend, who: Caller) -> list[dict[str, Any]] | None:
    """The worker registry's statuses; None where this sdqueue has no registry."""
    try:
        from models.workers import list_workers
    except ImportError:
        return None
    now = time.time()
    workers = []
    for status in list_workers(shared.settings):
        running = [dict(job) for job in status.get("running") or []]
        if who.key_id is not None:  # other keys' job ids are not this caller's to see
            for job in running:
                job["job_id"] = None
        updated = status.get("updated_at")
        workers.append({**status, "running": running, "loops": status.get("loops") or [],
                        "age": max(0.0, now - updated) if isinstance(updated, (int, float)) else None,
                        "quarantine": _quarantine(status.get("quarantined"), now, who),
                        "spool": _spool(status.get("spool"))})
    return workers


def _quarantine(found: Any, now: float, who: Caller) -> dict[str, Any] | None:
    """A quarantined worker's why and when; None when it is not (or is too old to say)."""
    if not found:
        return None
    found = found if isinstance(found, dict) else {}
    since, next_probe = found.get("since"), found.get("next_probe")
    reason = " ".join(str(found.get("reason") or "").split()) or None
    return {"reason": reason if who.sees_all else None,
            "seconds": max(0.0, now - since) if isinstance(since, (int, float)) else None,
            "probe": int(found.get("probes") or 0) + 1,  # the next one: `probes` counts those that failed
            "probe_in": max(0.0, next_probe - now) if isinstance(next_probe, (int, float)) else None}


def _spool(found: Any) -> dict[str, Any] | None:
    """A worker's spool: None when it has none, or is too old to say."""
    if not isinstance(found, dict):
        return None
    spooled, most = found.get("bytes") or 0, found.get("max_bytes") or 0
    return {"bytes": spooled, "max_bytes": most, "free_bytes": found.get("free_bytes"),
            "disk_full": bool(found.get("disk_full")), "full": bool(most) and spooled >= most}


def _owned(query: Any, who: Caller) -> Any:
    return query if who.sees_all else query.where(Job.api_key_id == who.key_id)


def job_counts(session: Session, who: Caller) -> dict[str, int]:
    counts = dict.fromkeys(STATES, 0)
    counts.update(session.execute(_owned(select(Job.state, func.count()).group_by(Job.state), who)).all())
    return counts


def recent_jobs(session: Session, who: Caller) -> list[dict[str, Any]]:
    query = (select(Job, Run.name).outerjoin(Run, Run.id == Job.run_id)
             .options(lazyload(Job.images), lazyload(Job.webhook))
             .order_by(Job.created_at.desc(), Job.id.desc()).limit(RECENT_JOBS))
    return [{"id": job.id, "state": job.state, "prompt": job.params.get("prompt", ""), "run": run,
             "size": f"{job.width}x{job.height}", "num_images": job.num_images, "created_at": aware(job.created_at)}
            for job, run in session.execute(_owned(query, who))]


def run_row(status: dict[str, Any]) -> dict[str, Any]:
    """A run's counts, with the share of its jobs in each state as bar segments (percent)."""
    total = status["total"]
    jobs = status["jobs"]
    done = sum(jobs[state] for state in ENDED)
    segments = [(state, 100.0 * jobs[state] / total) for state in ("succeeded", "failed", "cancelled", "running")
                if total and jobs[state]]
    return {**status, "done": done, "percent": round(100.0 * done / total) if total else 0, "segments": segments}


# -- a run (/runs/{name}) --------------------------------------------------------------------------

def run_page(shared: Backend, who: Caller, name: str, page: int) -> dict[str, Any]:
    # No key's jobs are in a run; and no run's name holds a control character (PostgreSQL cannot
    # even be asked about one with NUL)
    if who.key_id is not None or refused_character(name, allow_newlines=False) is not None:
        raise RunNotFound(name[:100])
    status = run_row(run_status(shared.client, name).as_dict())
    with shared.client.db.session() as session:
        run_id = session.scalars(select(Run.id).where(Run.name == name)).one()
        in_run = (select(Image, Job).join(Job, Job.id == Image.job_id).where(Job.run_id == run_id)
                  .options(lazyload(Job.images), lazyload(Job.webhook)))
        total = session.scalar(select(func.count()).select_from(in_run.subquery())) or 0
        rows = session.execute(in_run.order_by(Job.created_at, Job.id, Image.index)
                               .offset((page - 1) * GALLERY_PAGE).limit(GALLERY_PAGE)).all()
        batches = _batches(session, [image.batch_id for image, _ in rows])
        gallery = [{**_image(image, batches), "job": _job_summary(job)} for image, job in rows]
    pages = max(1, -(-total // GALLERY_PAGE))
    return {"run": status, "gallery": gallery, "images_total": total, "page": page, "pages": pages}


def _job_summary(job: Job) -> dict[str, Any]:
    return {"id": job.id, "state": job.state, "mode": job.mode, "params": job.params, "run_key": job.run_key}


# -- a job (/jobs/{id}) ----------------------------------------------------------------------------

def job_page(shared: Backend, who: Caller, job_id: str) -> dict[str, Any]:
    with shared.client.db.session() as session:
        job = visible_job(session, who, job_id)
        record = job_record(job)
        record.pop("input_key")
        run = session.get(Run, job.run_id) if job.run_id else None
        batches = _batches(session, [image.batch_id for image in job.images])
        record["images"] = [_image(image, batches) for image in job.images]
    record["run"] = run.name if run is not None else None
    record["terminal"] = JobState(record["state"]).terminal
    return record


def _batches(session: Session, batch_ids: list[str | None]) -> dict[str, Batch]:
    wanted = sorted({batch_id for batch_id in batch_ids if batch_id})
    return {batch.id: batch for batch in session.scalars(select(Batch).where(Batch.id.in_(wanted)))} if wanted else {}


def _image(image: Image, batches: dict[str, Batch]) -> dict[str, Any]:
    """An image with its provenance: the batch it ran in, and the model (and revision) that made it."""
    batch = batches.get(image.batch_id) if image.batch_id else None
    return {
        "job_id": image.job_id, "index": image.index, "seed": image.seed, "sha256": image.sha256,
        "size_bytes": image.size_bytes, "width": image.width, "height": image.height,
        "batch_id": image.batch_id, "batch_size": image.batch_size, "batch_position": image.batch_position,
        "steps_run": image.steps_run, "shared_max": image.shared_max, "shared_mean": image.shared_mean,
        "batch": None if batch is None else {
            "worker": batch.worker, "model": batch.model, "model_revision": batch.model_revision,
            "scheduler": batch.scheduler, "device": batch.device, "dtype": batch.dtype, "size": batch.size,
            "jobs": batch.jobs, "seconds": batch.seconds},
    }


# -- images and submitting again -----------------------------------------------------------------

def image_bytes(shared: Backend, who: Caller, job_id: str, index: int, thumbnail: bool) -> tuple[bytes, str]:
    """An image's PNG, or a JPEG at most THUMBNAIL_SIDE pixels a side for a gallery: (bytes, media type)."""
    data = shared.storage.get(image_key(shared, who, job_id, index))
    if not thumbnail:
        return data, "image/png"
    from PIL import Image as PILImage

    with PILImage.open(io.BytesIO(data)) as picture:
        picture.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        out = io.BytesIO()
        picture.convert("RGB").save(out, format="JPEG", quality=85)
    return out.getvalue(), "image/jpeg"


def submit_again(shared: Backend, who: Caller, job_id: str) -> str:
    """A new job with the recorded parameters and seed of `job_id` (and its img2img input), as the
    caller's own: interactive (bulk for a bulk-only key), outside any run, without a webhook.
    Counted against the key's rate and cap like an API submit. Returns the new job's id."""
    # 1. the job, if the caller may see it, and what it was asked
    with shared.client.db.session() as session:
        job = visible_job(session, who, job_id)
        fields, input_key = dict(job.params), job.input_key
    if who.rate_per_minute is not None:
        check_rate(shared.redis, who)
    # 2. the same request, the input image read back from storage
    if input_key is not None:
        fields["image"] = shared.client.storage.get(input_key)
    try:
        request = parse_request(fields)
    except InvalidRequest as exc:  # a row from an older sdqueue, say, whose fields have changed since
        raise InvalidRequest([f"job {job_id} cannot be submitted again: {p}" for p in exc.problems]) from None
    # 3. stored, counted against the caller's cap and written at once, then sent
    priority = Priority.BULK.value if who.bulk_only else Priority.INTERACTIVE.value
    [new_id] = enqueue(shared, who, [request], priority=priority, webhook_url=None)
    return new_id
