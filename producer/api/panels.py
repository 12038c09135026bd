"""What the dashboard's pages show, read from the database, the broker and the worker registry as
plain data for the templates. Blocking: the routes call these in a worker thread.

A caller sees what the API shows it: with a key, its own jobs and runs; with an admin key or
SDQUEUE_API_AUTH=off, every job and run (the operator's, made by `sdqueue run` and schedules,
belong to no key, so only those see them). Another key's run is "no run named", as a missing one.
Queue depths and workers are the deployment's, not any caller's, and show to every caller (the
ids of the jobs a worker runs only with auth off, and so the reason a worker is quarantined, which
may quote a job's error). The broker is read for those panels alone: while it does not answer they
say so and the rest of the page is there.

Lists page by keyset (`before`/`after` cursors on created_at and id, as the API's list), never by
OFFSET, and count nothing but jobs by state: a page costs the same with a million jobs (given the
indexes that ordering needs; see README). A prompt search may scan, so it is LIMITed to a page of
the newest matches and bounded in time on PostgreSQL.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import PurePath
from typing import Any
from urllib.parse import urlencode

from sqlalchemy import and_, func, or_, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, lazyload

from models.broker import model_queue_depths
from models.counts import read_counts
from models.errors import InvalidRequest, RunNotFound
from models.jobs import aware, job_record, queued_by_model
from models.registry import REGISTRY, built_models_dir
from models.request import parse_request
from models.tables import STATES, Batch, Image, Job, JobState, Priority, Run
from models.text import refused_character
from producer.api.admit import enqueue
from producer.api.app import Backend
from producer.api.auth import Caller
from producer.api.errors import hide_secrets
from producer.api.jobs import decode_cursor, encode_cursor, image_key, visible_job
from producer.api.limits import check_rate
from producer.runs.status import run_status

ENDED = [state.value for state in JobState if state.terminal]
JOBS_PAGE = 20
RUNS_SHOWN = 50
GALLERY_PAGE = 48
THUMBNAIL_SIDE = 256
# The longest prompt search, and how long PostgreSQL may scan for one before it is given up.
SEARCH_MOST = 200
SEARCH_MS = 5000


# -- the overview (/) ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Search:
    """What the overview's job list is asked for: prompt text, a state, and where the page starts."""

    q: str = ""
    state: str = ""
    before: str | None = None
    after: str | None = None

    def link(self, **cursor: str) -> str:
        """The query string of this search at another page (`before=` or `after=`, or the first)."""
        return urlencode({k: v for k, v in {"q": self.q, "state": self.state, **cursor}.items() if v})


def read_search(q: str | None, state: str | None, before: str | None, after: str | None) -> Search:
    """A Search from the page's query string; InvalidRequest (a 422 page) naming what is wrong."""
    q, state = " ".join((q or "").split()), (state or "").strip()
    problems = []
    if len(q) > SEARCH_MOST:
        problems.append(f"q: a prompt search takes at most {SEARCH_MOST} characters, not {len(q)}")
    elif (refused := refused_character(q, allow_newlines=False)) is not None:
        problems.append(f"q: must not hold control characters: {refused}")
    if state and state not in STATES:
        problems.append(f"state={state[:30]!r}: must be one of {', '.join(STATES)}")
    for name, cursor in (("before", before), ("after", after)):
        if cursor is not None and len(cursor) > 500:
            problems.append(f"{name}: not a cursor of this page")
    if problems:
        raise InvalidRequest(problems)
    return Search(q, state, before or None, None if before else (after or None))


def overview(shared: Backend, who: Caller, search: Search) -> dict[str, Any]:
    queues, queues_error = _from_broker(lambda: queue_depths(shared))
    workers, workers_error = _from_broker(lambda: live_workers(shared, who))
    with shared.client.db.session() as session:
        counts = job_counts(session, who)
        by_model = queued_by_model(session) if who.sees_all else {}  # every key's jobs: an operator's view
        runs = visible_runs(session, who, RUNS_SHOWN)
    # in a session of its own: a search that PostgreSQL gives up on ends its transaction
    with shared.client.db.session() as session:
        jobs = job_list(session, who, search)
    return {"queues": queues, "queues_error": queues_error, "workers": workers, "workers_error": workers_error,
            "counts": counts, "queued_by_model": by_model, "jobs": jobs, "search": search, "states": STATES, "runs": runs,
            "search_most": SEARCH_MOST}


def _from_broker(read: Any) -> tuple[Any, str | None]:
    try:
        return read(), None
    except Exception as exc:  # the broker does not answer: the panel says so, the page stays
        return None, hide_secrets(" ".join(str(exc).split())[:200]) or type(exc).__name__


def queue_depths(shared: Backend) -> list[dict[str, Any]]:
    return model_queue_depths(shared.redis, shared.settings)


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
                        "spool": _spool(status.get("spool")),
                        "model_name": model_name(status.get("model"), shared)})
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


def like_pattern(text: str) -> str:
    """`text` anywhere, its LIKE wildcards (and the escape character) taken literally."""
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def job_list(session: Session, who: Caller, search: Search) -> dict[str, Any]:
    """A page of the caller's jobs, newest first, matching `search`: the rows, and the query
    strings of the newer and older pages (None: there is none)."""
    query = _owned(select(Job, Run.name, Run.api_key_id).outerjoin(Run, Run.id == Job.run_id)
                   .options(lazyload(Job.images), lazyload(Job.webhook)), who)
    if search.state:
        query = query.where(Job.state == search.state)
    if search.q:
        query = query.where(Job.params["prompt"].as_string().ilike(like_pattern(search.q), escape="\\"))
        if session.get_bind().dialect.name == "postgresql":
            session.execute(text(f"SET LOCAL statement_timeout = {SEARCH_MS}"))
    try:
        if search.after is not None:  # the page before, read upwards from its cursor
            created, last_id = decode_cursor(search.after)
            found = session.execute(query.where(or_(Job.created_at > created,
                                                    and_(Job.created_at == created, Job.id > last_id)))
                                    .order_by(Job.created_at, Job.id).limit(JOBS_PAGE + 1)).all()
            if len(found) <= JOBS_PAGE:  # it reaches the newest: the first page, full
                return job_list(session, who, Search(search.q, search.state))
            rows, newer, older = found[:JOBS_PAGE][::-1], True, True
        else:
            if search.before is not None:
                created, last_id = decode_cursor(search.before)
                query = query.where(or_(Job.created_at < created, and_(Job.created_at == created, Job.id < last_id)))
            found = session.execute(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(JOBS_PAGE + 1)).all()
            rows, newer, older = found[:JOBS_PAGE], search.before is not None, len(found) > JOBS_PAGE
    except OperationalError as exc:
        if "statement timeout" not in str(exc) and "canceling statement" not in str(exc):
            raise
        return {"rows": [], "newer": None, "older": None, "timed_out": SEARCH_MS // 1000, "page": JOBS_PAGE}
    return {
        "rows": [{"id": job.id, "state": job.state, "prompt": job.params.get("prompt", ""), "run": run,
                  "run_visible": run is not None and (who.sees_all or owner == who.key_id),
                  "size": f"{job.width}x{job.height}", "num_images": job.num_images,
                  "created_at": aware(job.created_at)} for job, run, owner in rows],
        "newer": search.link(after=encode_cursor(rows[0][0])) if newer and rows else (search.link() if newer else None),
        "older": search.link(before=encode_cursor(rows[-1][0])) if older and rows else None,
        "timed_out": None, "page": JOBS_PAGE}


def visible_runs(session: Session, who: Caller, limit: int) -> list[dict[str, Any]]:
    """The newest runs the caller may see, each with its jobs counted by state (as run_row takes them)."""
    query = select(Run).order_by(Run.created_at.desc(), Run.id.desc()).limit(limit)
    if not who.sees_all:
        query = query.where(Run.api_key_id == who.key_id)
    runs = {run.id: {"name": run.name, "priority": run.priority, "created_at": aware(run.created_at),
                     "schedule": run.schedule, "sealed": run.sealed_at is not None,
                     "jobs": dict.fromkeys(STATES, 0)} for run in session.scalars(query)}
    for run_id, counts in read_counts(session, runs, 0).items():
        runs[run_id]["jobs"].update(counts.jobs)
    return [run_row({**run, "total": sum(run["jobs"].values())}) for run in runs.values()]


def run_row(status: dict[str, Any]) -> dict[str, Any]:
    """A run's counts, with the share of its jobs in each state as bar segments (percent)."""
    total = status["total"]
    jobs = status["jobs"]
    done = sum(jobs[state] for state in ENDED)
    segments = [(state, 100.0 * jobs[state] / total) for state in ("succeeded", "failed", "cancelled", "running")
                if total and jobs[state]]
    return {**status, "done": done, "percent": round(100.0 * done / total) if total else 0, "segments": segments}


# -- a run (/runs/{name}) --------------------------------------------------------------------------

def run_page(shared: Backend, who: Caller, name: str, before: str | None, after: str | None) -> dict[str, Any]:
    """A run's progress and a page of its gallery: images of its newest jobs first, GALLERY_PAGE
    at a time, paged by keyset (`before`/`after`: cursors of the last and first image shown)."""
    # No run's name holds a control character (PostgreSQL cannot even be asked about one with NUL);
    # another key's run is not this caller's to know of
    if refused_character(name, allow_newlines=False) is not None:
        raise RunNotFound(name[:100])
    with shared.client.db.session() as session:
        run = session.scalars(select(Run).where(Run.name == name)).one_or_none()
        if run is None or not who.owns_run(run):
            raise RunNotFound(name[:100])
        run_id = run.id
    status = run_row(run_status(shared.client, name).as_dict())
    with shared.client.db.session() as session:
        # Only succeeded jobs have images: named, so that ix_jobs_run_state_created finds them newest
        # first, not a walk from the run's newest job, queued, down to its first with images.
        in_run = (select(Image, Job).join(Job, Job.id == Image.job_id)
                  .where(Job.run_id == run_id, Job.state == JobState.SUCCEEDED.value)
                  .options(lazyload(Job.images), lazyload(Job.webhook)))
        if after is not None:  # the page before this one, read upwards from its first image
            created, job_id, index = _image_cursor(after)
            found = session.execute(in_run.where(or_(
                Job.created_at > created, and_(Job.created_at == created, or_(
                    Job.id > job_id, and_(Job.id == job_id, Image.index < index)))))
                .order_by(Job.created_at, Job.id, Image.index.desc()).limit(GALLERY_PAGE + 1)).all()
            rows, newer, older = found[:GALLERY_PAGE][::-1], len(found) > GALLERY_PAGE, True
        else:
            if before is not None:
                created, job_id, index = _image_cursor(before)
                in_run = in_run.where(or_(Job.created_at < created, and_(Job.created_at == created, or_(
                    Job.id < job_id, and_(Job.id == job_id, Image.index > index)))))
            found = session.execute(in_run.order_by(Job.created_at.desc(), Job.id.desc(), Image.index)
                                    .limit(GALLERY_PAGE + 1)).all()
            rows, newer, older = found[:GALLERY_PAGE], before is not None, len(found) > GALLERY_PAGE
        batches = _batches(session, [image.batch_id for image, _ in rows])
        gallery = [{**_image(image, batches, shared), "job": _job_summary(job)} for image, job in rows]
    return {"run": status, "gallery": gallery, "images_total": status["images_done"],
            "newer": (urlencode({"after": _image_cursor_of(*rows[0])}) if rows else "") if newer else None,
            "older": urlencode({"before": _image_cursor_of(*rows[-1])}) if older and rows else None}


def _image_cursor_of(image: Image, job: Job) -> str:
    created = aware(job.created_at)
    assert created is not None
    raw = json.dumps([created.isoformat(), job.id, image.index]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _image_cursor(cursor: str) -> tuple[datetime, str, int]:
    try:
        created, job_id, index = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        when = datetime.fromisoformat(created)
        if not isinstance(index, int):
            raise TypeError(index)
        return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)), str(uuid.UUID(job_id)), index
    except (ValueError, TypeError, binascii.Error, RecursionError):
        raise InvalidRequest([f"cursor={cursor[:60]!r}: not a cursor of this gallery (follow its links)"]) from None


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
        record["images"] = [_image(image, batches, shared) for image in job.images]
    record["run"] = run.name if run is not None else None
    record["run_visible"] = run is not None and who.owns_run(run)
    record["model_name"] = model_name(record.get("model"), shared)
    started, finished = aware(job.started_at), aware(job.finished_at)
    if started is not None and finished is not None:
        record["run_seconds"] = (finished - started).total_seconds()
    record["terminal"] = JobState(record["state"]).terminal
    return record


def _batches(session: Session, batch_ids: list[str | None]) -> dict[str, Batch]:
    wanted = sorted({batch_id for batch_id in batch_ids if batch_id})
    return {batch.id: batch for batch in session.scalars(select(Batch).where(Batch.id.in_(wanted)))} if wanted else {}


def _image(image: Image, batches: dict[str, Batch], shared: Backend) -> dict[str, Any]:
    """An image with its provenance: the batch it ran in, and the model (and revision) that made it."""
    batch = batches.get(image.batch_id) if image.batch_id else None
    return {
        "job_id": image.job_id, "index": image.index, "seed": image.seed, "sha256": image.sha256,
        "size_bytes": image.size_bytes, "width": image.width, "height": image.height,
        "batch_id": image.batch_id, "batch_size": image.batch_size, "batch_position": image.batch_position,
        "steps_run": image.steps_run, "shared_max": image.shared_max, "shared_mean": image.shared_mean,
        "batch": None if batch is None else {
            "worker": batch.worker, "model": batch.model, "model_name": model_name(batch.model, shared),
            "model_revision": batch.model_revision,
            "scheduler": batch.scheduler, "device": batch.device, "dtype": batch.dtype, "size": batch.size,
            "jobs": batch.jobs, "seconds": batch.seconds},
    }


def model_name(model: str | None, shared: Backend) -> str | None:
    """What people call a model: its registry name for a registry name, a hub id of the registry,
    a folder `sdqueue models build-*` made or a hub cache snapshot of a registry model; else the
    last part of its folder. (Workers record where they loaded it from, a path people do not read.)"""
    if not model:
        return None
    if model in REGISTRY:
        return model
    path = PurePath(model)
    built = built_models_dir(shared.settings.data_dir)
    for spec in REGISTRY.values():
        if spec.hub_id is not None and (model == spec.hub_id
                                        or "models--" + spec.hub_id.replace("/", "--") in path.parts):
            return spec.name
        if path == PurePath(built / spec.name) or (spec.local_dir is not None and path == PurePath(spec.local_dir)):
            return spec.name
    return path.name or model


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
        fields, input_key, mask_key, depth_key = dict(job.params), job.input_key, job.mask_key, job.depth_key
        if job.mode == "upscale":  # its size follows from its input's, and may be none of the request's sizes
            fields.pop("width", None), fields.pop("height", None)
    if who.rate_per_minute is not None:
        check_rate(shared.redis, who)
    # 2. the same request, the input image read back from storage
    if input_key is not None and "after" not in fields:  # a follow-up's input is its parent's image again
        fields["image"] = shared.client.storage.get(input_key)
    if mask_key is not None:
        fields["mask"] = shared.client.storage.get(mask_key)
    if depth_key is not None:
        fields["depth_map"] = shared.client.storage.get(depth_key)
    try:
        request = parse_request(fields, shared.settings)
    except InvalidRequest as exc:  # a row from an older sdqueue, say, whose fields have changed since
        raise InvalidRequest([f"job {job_id} cannot be submitted again: {p}" for p in exc.problems]) from None
    # 3. stored, counted against the caller's cap and written at once, then sent
    priority = Priority.BULK.value if who.bulk_only else Priority.INTERACTIVE.value
    [new_id] = enqueue(shared, who, [request], priority=priority, webhook_url=None)
    return new_id
