"""/v1/jobs: submit one job or a batch, read one, list a key's jobs, fetch an image, cancel.

A submit runs in the CLI's order: validate everything, store the img2img input, write the row,
send the message; the key's cap is counted in the transaction that writes the rows (admit.py), and
an input is taken back if anything after it fails. The answer is the record as written, with the
URLs of the job's events and images on this API. Job records here leave out what only operators
need (storage keys, lease holders): `sdqueue status ID --json` has those.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session, lazyload
from sqlalchemy.orm.attributes import set_committed_value
from starlette.concurrency import run_in_threadpool

from models import jobs
from models.errors import InvalidRequest, JobNotFound, RunNotFound
from models.jobs import aware
from models.request import GenerationRequest, parse_request
from models.settings import Settings
from models.tables import Job, JobState, Priority, Run
from models.text import refused_character
from models.webhooks import check_webhook_events, check_webhook_url
from producer.api import schemas
from producer.api.admit import enqueue
from producer.api.app import Backend, backend, root
from producer.api.auth import Caller, caller
from producer.api.bodies import decode_image, is_form, read_form, read_json
from producer.api.errors import Answer, NotFound
from producer.api.idempotency import answer_once, request_sha256
from producer.api.limits import check_rate

router = APIRouter(prefix="/v1", tags=["jobs"])

IDEMPOTENCY_KEY = Header(default=None, alias="Idempotency-Key", min_length=1, max_length=255,
                         pattern=r"^[!-~]+$", description=(
    "1 to 255 visible ASCII characters (a UUID, say): a retry of the same request with the same key gets the "
    "first answer again and makes no job; the same key with another request is a 409"))
# What a submit may say beside the request's own fields.
OPTIONS = ("webhook_url", "webhook_events", "priority")
BATCH_FIELDS = ("requests", *OPTIONS)


# -- records -------------------------------------------------------------------------------------

def api_record(job: Job, prefix: str) -> dict[str, Any]:
    """The record a caller sees: job_record without storage keys and lease holders, with this API's URLs."""
    record = jobs.job_record(job)
    for internal in ("input_key", "worker", "lease_expires_at"):
        record.pop(internal, None)
    path = f"{prefix}/v1/jobs/{job.id}"
    record["images"] = [
        {"index": image["index"], "seed": image["seed"], "sha256": image["sha256"],
         "pixel_sha256": image["pixel_sha256"], "size_bytes": image["size_bytes"], "width": image["width"],
         "height": image["height"], "url": f"{path}/images/{image['index']}"}
        for image in record["images"]
    ]
    record["links"] = {"self": path, "events": f"{path}/events", "images": [image["url"] for image in record["images"]]}
    return record


def quoted(text: str, most: int = 60) -> str:
    """Text a caller sent, as a refusal shows it: quoted, escaped, cut short."""
    return repr(text if len(text) <= most else text[:most] + "...")


def visible_job(session: Session, who: Caller, job_id: str) -> Job:
    """The job, if `who` may see it; JobNotFound (404) for an id never used and for another key's job alike."""
    try:
        canonical = str(uuid.UUID(job_id))
    except ValueError:
        raise JobNotFound(job_id[:100]) from None
    job = session.get(Job, canonical)
    if job is None or not who.owns(job):
        raise JobNotFound(job_id)
    return job


def read_record(shared: Backend, who: Caller, job_id: str, prefix: str) -> dict[str, Any]:
    with shared.client.db.session() as session:
        return api_record(visible_job(session, who, job_id), prefix)


def read_submitted(shared: Backend, job_ids: list[str], prefix: str) -> list[dict[str, Any]]:
    """The records of jobs just submitted. They have no images and no webhook delivery yet: said so
    rather than read, the answer to a submit costs one query, not three (each relationship is a
    query of its own), about a third of a submit's time."""
    found: dict[str, Job] = {}
    with shared.client.db.session() as session:
        for start in range(0, len(job_ids), jobs.CHUNK):
            chunk = job_ids[start : start + jobs.CHUNK]
            for job in session.scalars(select(Job).where(Job.id.in_(chunk))
                                       .options(lazyload(Job.images), lazyload(Job.webhook))):
                set_committed_value(job, "images", [])
                set_committed_value(job, "webhook", None)
                found[job.id] = job
        return [api_record(found[job_id], prefix) for job_id in job_ids]


# -- what a submit asks for ----------------------------------------------------------------------

def parse_fields(fields: dict[str, Any], settings: Settings, where: str = "") -> tuple[GenerationRequest | None, list[str]]:
    """A request from JSON or form fields (image as base64 or bytes); the problems, each named."""
    fields = dict(fields)
    problems = decode_image(fields, where)
    try:
        request = parse_request(fields, settings)
    except InvalidRequest as exc:
        return None, problems + [where + problem for problem in exc.problems]
    return (None if problems else request), problems


@dataclass(frozen=True)
class Options:
    """What a submit asks beside its request: where its end is POSTed, for which ends, its priority."""

    webhook_url: str | None
    webhook_events: list[str] | None
    priority: str


def job_options(options: dict[str, Any], who: Caller, settings: Settings) -> tuple[Options, list[str]]:
    """The webhook URL and events and the priority a submit asks for; the problems found.

    A bulk-only key's jobs are bulk: it may leave priority out (bulk, then) or say bulk; asking
    for interactive is refused rather than quietly changed, so the caller learns what it got."""
    problems: list[str] = []
    webhook_url = options.get("webhook_url")
    if webhook_url is not None:
        if not isinstance(webhook_url, str):
            problems.append(f"webhook_url={webhook_url!r}: must be a URL (text)")
            webhook_url = None
        elif (refused := refused_character(webhook_url, allow_newlines=False)) is not None:
            # before the URL is parsed or its host resolved: PostgreSQL cannot store NUL, and a
            # header or log line must not be split by a newline
            problems.append(f"webhook_url={quoted(webhook_url)}: must not hold control characters: {refused}")
            webhook_url = None
        else:
            try:
                webhook_url = check_webhook_url(webhook_url, allow_private=settings.webhook_allow_private,
                                                allow=settings.webhook_allow_list)
            except InvalidRequest as exc:
                problems += exc.problems
                webhook_url = None
    webhook_events = None
    try:
        webhook_events = check_webhook_events(options.get("webhook_events"))
    except InvalidRequest as exc:
        problems += exc.problems
    if webhook_events is not None and options.get("webhook_url") is None:
        problems.append("webhook_events is given without a webhook_url: give both, or neither")
    allowed = [p.value for p in Priority]
    priority = options.get("priority")
    if priority is None:
        priority = Priority.BULK.value if who.bulk_only else Priority.INTERACTIVE.value
    elif priority not in allowed:
        problems.append(f"priority={priority!r}: must be one of {', '.join(allowed)}")
    elif who.bulk_only and priority != Priority.BULK.value:
        problems.append(f"priority={priority!r}: this API key submits bulk jobs only (leave priority out, or say bulk)")
    return Options(webhook_url, webhook_events, str(priority)), problems


def read_submission(data: Any, who: Caller, settings: Settings) -> tuple[GenerationRequest, Options]:
    if not isinstance(data, dict):
        parse_request(data)  # raises, naming what was sent instead of an object
    fields = {k: v for k, v in data.items() if k not in OPTIONS}
    options, problems = job_options(data, who, settings)
    request, request_problems = parse_fields(fields, settings)
    if request is None or problems:
        raise InvalidRequest(request_problems + problems)
    return request, options


def read_batch(data: Any, who: Caller, settings: Settings) -> tuple[list[GenerationRequest], Options]:
    if not isinstance(data, dict):
        raise InvalidRequest([f"the body must be an object {{\"requests\": [...]}}, not {type(data).__name__}"])
    problems = [f"{name!r} is not a batch field (those are {', '.join(BATCH_FIELDS)})"
                for name in data if name not in BATCH_FIELDS]
    options, option_problems = job_options(data, who, settings)
    items = data.get("requests")
    requests: list[GenerationRequest] = []
    if items is None:
        problems.append("requests is required: a list of 1 to 1000 requests")
    elif not isinstance(items, list) or not 1 <= len(items) <= schemas.MAX_BATCH:
        shown = f"<{len(items)} requests>" if isinstance(items, list) else repr(items)[:60]
        problems.append(f"requests={shown}: must be a list of 1 to {schemas.MAX_BATCH} requests")
    else:
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                problems.append(f"requests[{index}]={repr(item)[:60]}: must be an object of request fields")
                continue
            request, item_problems = parse_fields(item, settings, f"requests[{index}].")
            problems += item_problems
            if request is not None:
                requests.append(request)
    if problems or option_problems:
        raise InvalidRequest(problems + option_problems)
    return requests, options


# -- the work of each route, in a worker thread ---------------------------------------------------

def submit_one(shared: Backend, who: Caller, data: Any, prefix: str) -> Answer:
    # 1. the caller's rate (a refused request counts too: it cost a look), then the request
    if who.rate_per_minute is not None:
        check_rate(shared.redis, who)
    request, options = read_submission(data, who, shared.settings)
    # 2. stored, then counted against the caller's cap and written at once, then sent
    [job_id] = enqueue(shared, who, [request], priority=options.priority, webhook_url=options.webhook_url,
                       webhook_events=options.webhook_events)
    [record] = read_submitted(shared, [job_id], prefix)
    return Answer(201, record, {"Location": record["links"]["self"]})


def submit_batch(shared: Backend, who: Caller, data: Any, prefix: str) -> Answer:
    if who.rate_per_minute is not None:
        check_rate(shared.redis, who)
    requests, options = read_batch(data, who, shared.settings)
    job_ids = enqueue(shared, who, requests, priority=options.priority, webhook_url=options.webhook_url,
                      webhook_events=options.webhook_events)
    return Answer(201, {"jobs": read_submitted(shared, job_ids, prefix)})


def cancel_one(shared: Backend, who: Caller, job_id: str, prefix: str) -> dict[str, Any]:
    client = shared.client
    with client.db.session() as session:
        job_id = visible_job(session, who, job_id).id
    client.cancel(job_id)  # IllegalTransition (409) once it has ended
    return read_record(shared, who, job_id, prefix)


def image_key(shared: Backend, who: Caller, job_id: str, index: int) -> str:
    with shared.client.db.session() as session:
        job = visible_job(session, who, job_id)
        for image in job.images:
            if image.index == index:
                return image.object_key
        raise NotFound(f"job {job.id} has no image {index}" + ("" if job.images else f" (it is {job.state})"))


def encode_cursor(job: Job) -> str:
    created = aware(job.created_at)
    assert created is not None
    raw = json.dumps([created.isoformat(), job.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        created, job_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        when = datetime.fromisoformat(created)
        return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)), str(uuid.UUID(job_id))
    except (ValueError, TypeError, binascii.Error, RecursionError):
        raise InvalidRequest([f"cursor={cursor[:60]!r}: not a cursor this API gave (take a page's next_cursor)"]) \
            from None


def list_page(shared: Backend, who: Caller, *, state: JobState | None, run: str | None, since: datetime | None,
              limit: int, cursor: str | None, prefix: str) -> dict[str, Any]:
    query = select(Job)
    if not who.sees_all:
        query = query.where(Job.api_key_id == who.key_id)
    if state is not None:
        query = query.where(Job.state == state.value)
    if since is not None:
        query = query.where(Job.created_at >= (since if since.tzinfo else since.replace(tzinfo=timezone.utc)))
    if cursor is not None:
        created, last_id = decode_cursor(cursor)
        query = query.where(or_(Job.created_at < created, and_(Job.created_at == created, Job.id < last_id)))
    if run is not None and (refused := refused_character(run, allow_newlines=False)) is not None:
        raise InvalidRequest([f"run={quoted(run)}: must not hold control characters: {refused}"])
    with shared.client.db.session() as session:
        if run is not None:
            found_run = session.scalar(select(Run).where(or_(Run.name == run, Run.id == run)).limit(1))
            if found_run is None or not who.owns_run(found_run):  # another key's run: as if none had the name
                raise RunNotFound(run[:100])
            query = query.where(Job.run_id == found_run.id)
        found = list(session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
        page = found[:limit]
        return {"jobs": [api_record(job, prefix) for job in page],
                "next_cursor": encode_cursor(page[-1]) if len(found) > limit else None}


# -- routes ---------------------------------------------------------------------------------------

@router.post("/jobs", status_code=201, response_model=None, summary="Submit a job",
             openapi_extra={"requestBody": schemas.submit_body()},
             responses={200: {"model": schemas.JobOut, "description": "with `Prefer: wait=N`: the job, ended "
                                                                      "within N seconds"},
                        201: {"model": schemas.JobOut, "description": "the job, queued (Location: its URL); with "
                                                                      "`Prefer: wait=N`, as it is after N seconds"},
                        **schemas.refusals(400, 401, 409, 413, 422, 429, 503)})
async def submit(request: Request, who: Caller = Depends(caller), shared: Backend = Depends(backend),
                 idempotency_key: str | None = IDEMPOTENCY_KEY,
                 prefer: str | None = Header(default=None, alias="Prefer", max_length=1000, description=(
                     "`wait=N` (1 to 300 seconds; more waits 300): answer 200 with the ended job if it ends "
                     "within N seconds, else 201 with its record then; `Preference-Applied: wait=N` says so"))
                 ) -> Response:
    """Validate, record and enqueue one job: a JSON object of request fields (`image` base64-encoded),
    or a multipart form with the img2img image as the file part `image`. Answers at once, or with
    `Prefer: wait=N` when the job ends (at most N seconds later)."""
    data, body = await (read_form(request) if is_form(request) else read_json(request))
    digest = request_sha256("POST", request.url.path, body)
    prefix = root(request)

    def work() -> Answer:
        return answer_once(shared.client.db, who.scope, idempotency_key, digest,
                           lambda: submit_one(shared, who, data, prefix))

    answer = await run_in_threadpool(work)
    # events.py imports this module: its wait is imported here, at the call
    from producer.api.events import preferred_wait, wait_for_end

    seconds = preferred_wait(prefer)
    if seconds is None or answer.status_code != 201:
        return answer.response()
    # the job is made (or was, by the first answer to this Idempotency-Key): wait for its end
    record, waited = await wait_for_end(request, shared, who, answer.body, seconds, prefix)
    if not waited:
        return answer.response()
    status = 200 if JobState(record["state"]).terminal else 201
    return JSONResponse(record, status_code=status, headers={**answer.headers, "Preference-Applied": f"wait={seconds}"})


@router.post("/jobs:batch", status_code=201, response_model=None, summary="Submit a batch of jobs",
             openapi_extra={"requestBody": schemas.batch_body()},
             responses={201: {"model": schemas.JobsOut, "description": "the jobs, queued, in the order given"},
                        **schemas.refusals(400, 401, 409, 413, 422, 429, 503)})
async def submit_many(request: Request, who: Caller = Depends(caller), shared: Backend = Depends(backend),
                      idempotency_key: str | None = IDEMPOTENCY_KEY) -> Response:
    """1 to 1000 requests, all or nothing: one bad request refuses the batch (422 naming
    `requests[i].field`), and nothing is enqueued unless everything is."""
    data, body = await read_json(request)
    digest = request_sha256("POST", request.url.path, body)
    prefix = root(request)

    def work() -> Answer:
        return answer_once(shared.client.db, who.scope, idempotency_key, digest,
                           lambda: submit_batch(shared, who, data, prefix))

    return (await run_in_threadpool(work)).response()


@router.get("/jobs", response_model=None, summary="List jobs, newest first",
            responses={200: {"model": schemas.JobPage}, **schemas.refusals(401, 404, 422, 503)})
async def list_jobs(request: Request, who: Caller = Depends(caller), shared: Backend = Depends(backend),
                    state: JobState | None = Query(None, description="only jobs in this state"),
                    run: str | None = Query(None, max_length=255, description="only the jobs of this run (name or id)"),
                    since: datetime | None = Query(None, description="only jobs created at or after (ISO 8601; UTC "
                                                                     "when no offset is given)"),
                    limit: int = Query(50, ge=1, le=200),
                    cursor: str | None = Query(None, max_length=500, description="next_cursor of the page before")
                    ) -> JSONResponse:
    """The caller's jobs (every job, with auth off), newest first, a page at a time."""
    page = await run_in_threadpool(lambda: list_page(shared, who, state=state, run=run, since=since, limit=limit,
                                                     cursor=cursor, prefix=root(request)))
    return JSONResponse(page)


@router.get("/jobs/{job_id}", response_model=None, summary="A job's record",
            responses={200: {"model": schemas.JobOut}, **schemas.refusals(401, 404, 503)})
async def get_job(job_id: str, request: Request, who: Caller = Depends(caller),
                  shared: Backend = Depends(backend)) -> JSONResponse:
    """State, attempts, times, seed, and per image its seed, sha256, size and URL."""
    return JSONResponse(await run_in_threadpool(read_record, shared, who, job_id, root(request)))


@router.get("/jobs/{job_id}/images/{index}", response_model=None, summary="One of a job's images",
            responses={200: {"content": {"image/png": {}}, "description": "the PNG (storage in a local folder)"},
                       307: {"description": "to a presigned URL of the object store, valid SDQUEUE_API_URL_SECONDS"},
                       **schemas.refusals(401, 404, 503)})
async def get_image(job_id: str, index: int, who: Caller = Depends(caller),
                    shared: Backend = Depends(backend)) -> Response:
    """A redirect (307) to the object store, or the PNG itself when images are kept in a folder."""
    key = await run_in_threadpool(image_key, shared, who, job_id, index)
    storage = shared.storage
    presign = getattr(storage, "presigned_url", None)
    if presign is not None:
        url = await run_in_threadpool(presign, key, shared.settings.api_url_seconds)
        return RedirectResponse(url, status_code=307)
    return Response(await run_in_threadpool(storage.get, key), media_type="image/png")


@router.delete("/jobs/{job_id}", response_model=None, summary="Cancel a job",
               responses={200: {"model": schemas.JobOut, "description": "the job, cancelled"},
                          409: {"model": schemas.StateConflict, "description": "the job has ended: its state"},
                          **schemas.refusals(401, 404, 503)})
async def cancel(job_id: str, request: Request, who: Caller = Depends(caller),
                 shared: Backend = Depends(backend)) -> JSONResponse:
    """A queued job never starts; a running one stops at its next denoising step, no image kept."""
    return JSONResponse(await run_in_threadpool(cancel_one, shared, who, job_id, root(request)))
