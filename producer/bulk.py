"""Job rows in bulk: made from validated requests, written in one transaction per batch (COPY on
PostgreSQL), their messages sent pipelined, then marked sent.

A row of the API's batch submit is written with `enqueued_at` NULL (not sent yet) and marked once
its message has gone; a run's rows are marked a batch at a time on the run's row (its
`sent_through`, producer/runs/enqueue.py). So whatever stops a producer between the two, the rows
it left unsent are found (by the next enqueue of the same run, or by the sweeper) and sent; a
message sent twice costs its second delivery a look at the database. Used by runs (`sdqueue run`,
schedules) and by the API's batch submit.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import uuid
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import select, update

from models.constants import queue_for
from models.registry import model_key
from models.request import GenerationRequest, check_inputs, follow_up
from models.errors import InvalidRequest
from models.storage import Storage, depth_key_for, input_key_for, mask_key_for
from models.tables import Job, JobState, utcnow

# Rows per transaction and per pipelined publish.
BATCH = 1000
# A drawn seed stays short enough to read and type back.
DRAWN_SEED_BOUND = 2**32
# Columns a caller may set beside the request's.
EXTRA_COLUMNS = ("run_id", "run_key", "api_key_id", "webhook_url", "webhook_events", "enqueued_at")
# Columns COPY writes as JSON text.
JSON_COLUMNS = ("params", "webhook_events")


class Sender(Protocol):
    """What sends and marks: a producer.client.Client."""

    db: Any

    def send(self, job_ids: list[str], queue: str | None = None) -> None: ...


def job_row(request: GenerationRequest, *, settings: Any, priority: str, storage: Storage,
            now: datetime | None = None, **columns: Any) -> dict[str, Any]:
    """The values of a new queued job's row, not yet sent; an img2img input goes to storage first.
    A request parsed without the deployment's settings takes its default model here. `columns`: any
    of EXTRA_COLUMNS."""
    unknown = set(columns) - set(EXTRA_COLUMNS)
    if unknown:
        raise TypeError(f"not a job column to set: {', '.join(sorted(unknown))}")
    now = now or utcnow()
    model = request.model or model_key(settings.default_model)
    if request.model is None:  # parsed without the deployment's settings: its inputs not checked against it
        try:
            request = check_inputs(request, model=model, pixel_budget=settings.pixel_budget)
        except ValueError as exc:
            raise InvalidRequest([str(exc)]) from None
    job_id = str(uuid.uuid4())
    seed = request.seed if request.seed is not None else secrets.randbelow(DRAWN_SEED_BOUND)
    input_key = input_sha256 = mask_key = mask_sha256 = depth_key = depth_sha256 = None
    if request.image is not None:
        input_key = input_key_for(job_id)
        input_sha256 = hashlib.sha256(request.image).hexdigest()
        storage.put(input_key, request.image)
    if request.mask is not None:
        mask_key = mask_key_for(job_id)
        mask_sha256 = hashlib.sha256(request.mask).hexdigest()
        storage.put(mask_key, request.mask)
    if request.depth_map is not None:
        depth_key = depth_key_for(job_id)
        depth_sha256 = hashlib.sha256(request.depth_map).hexdigest()
        storage.put(depth_key, request.depth_map)
    return {
        "id": job_id, "state": JobState.WAITING.value if request.after else JobState.QUEUED.value,
        "mode": request.mode_on(model),
        "after_job_id": request.after.job if request.after else None,
        "after_index": request.after.index if request.after else None,
        "params": {**request.parameters(), "seed": seed, "model": model}, "model": model, "seed": seed, "seed_was_drawn": request.seed is None,
        "width": request.width, "height": request.height, "num_inference_steps": request.num_inference_steps,
        "num_images": request.num_images, "input_key": input_key, "input_sha256": input_sha256,
        "mask_key": mask_key, "mask_sha256": mask_sha256, "depth_key": depth_key, "depth_sha256": depth_sha256,
        "queue": queue_for(settings.queue, priority, model), "enqueued_at": None, "priority": priority,
        "created_at": now, "updated_at": now, "attempts": 0, "failures": 0, "dead_letter": False,
        "lease_token": 0, "suspect": False, "running_alone": False,
        **dict.fromkeys(EXTRA_COLUMNS), **columns,
    }


def check_follow_ups(db: Any, requests: list[GenerationRequest], settings: Any,
                     names: list[str] | None = None) -> list[GenerationRequest]:
    """The follow-ups among `requests` checked against the jobs they follow, before anything is
    written: each such job exists, may still succeed and makes the image named; the follow-up's
    inputs fit that image (an upscaler's bound, a mask of its size), and its size defaults to
    the image's. Returns the requests as they will run; raises InvalidRequest, one line each
    (`names`: how each request is named in it, e.g. "requests[2]")."""
    wanted = {r.after.job for r in requests if r.after is not None}
    if not wanted:
        return requests
    with db.session() as session:
        parents = {row.id: row for row in session.execute(
            select(Job.id, Job.state, Job.num_images, Job.width, Job.height, Job.dead_letter)
            .where(Job.id.in_(sorted(wanted))))}
    checked, problems = [], []
    for number, request in enumerate(requests):
        if request.after is None:
            checked.append(request)
            continue
        name = f"{names[number]}." if names else ""
        after, parent = request.after, parents.get(request.after.job)
        if parent is None:
            problems.append(f"{name}after.job={after.job!r}: no such job")
        elif parent.state in (JobState.FAILED.value, JobState.CANCELLED.value):
            ended = "failed (dead-lettered)" if parent.dead_letter else parent.state
            problems.append(f"{name}after.job={after.job!r}: that job {ended}: a follow-up needs a job that may "
                            "still succeed")
        elif after.index >= parent.num_images:
            problems.append(f"{name}after.index={after.index}: job {after.job} makes {parent.num_images} image(s), "
                            f"index 0..{parent.num_images - 1}")
        else:
            try:
                checked.append(follow_up(request, (parent.width, parent.height),
                                         request.model or model_key(settings.default_model), settings.pixel_budget))
            except ValueError as exc:
                problems.append(f"{name}{exc} (the image of job {after.job})")
    if problems:
        raise InvalidRequest(problems)
    return checked


def settle_new_follow_ups(session: Any, values: list[dict[str, Any]]) -> dict[str | None, list[str]]:
    """In the transaction that wrote `values`: those follow-ups whose parent has succeeded
    already are queued now (the others wait for it, or are cancelled if it has just failed);
    the ids of those queued, by queue, to send after the commit."""
    parents = sorted({value["after_job_id"] for value in values if value["after_job_id"] is not None})
    if not parents:
        return {}
    from models.jobs import settle_follow_ups

    session.flush()
    return settle_follow_ups(session, parents, limit=len(values))


def insert_jobs(session: Any, values: list[dict[str, Any]]) -> set[str]:
    """Write the rows (all of job_row's columns) in the caller's transaction; returns the ids
    written. A row whose (run_id, run_key) is taken already is skipped, never doubled."""
    if not values:
        return set()
    if session.get_bind().dialect.name == "postgresql":
        return _copy_in(session, values)
    from sqlalchemy.dialects.sqlite import insert

    statement = insert(Job).on_conflict_do_nothing(index_elements=["run_id", "run_key"])
    return set(session.scalars(statement.returning(Job.id), values))


def _copy_in(session: Any, values: list[dict[str, Any]]) -> set[str]:
    """PostgreSQL: the rows through COPY into a temporary table shaped like jobs, then into jobs
    with ON CONFLICT DO NOTHING. A multi-row INSERT of the same rows spends most of its time in
    the driver, turning 20,000 named parameters into positional ones."""
    columns = list(values[0])
    names = ", ".join(f'"{c}"' for c in columns)
    cursor = session.connection().connection.driver_connection.cursor()
    cursor.execute("CREATE TEMPORARY TABLE IF NOT EXISTS job_rows (LIKE jobs) ON COMMIT DELETE ROWS")
    with cursor.copy(f"COPY job_rows ({names}) FROM STDIN") as copy:
        for value in values:
            copy.write_row([json.dumps(value[c]) if c in JSON_COLUMNS and value[c] is not None else value[c]
                            for c in columns])
    cursor.execute(f"INSERT INTO jobs ({names}) SELECT {names} FROM job_rows "
                   "ON CONFLICT (run_id, run_key) DO NOTHING RETURNING id")
    return {row[0] for row in cursor.fetchall()}


def by_queue(values: list[dict[str, Any]], written: set[str],
             released: dict[str | None, list[str]] | None = None) -> dict[str, list[str]]:
    """The ids written, grouped by the queue their messages go to: not follow-ups that wait
    (their message goes when the job they follow succeeds), but those `released` already."""
    grouped: dict[str, list[str]] = {}
    for value in values:
        if value["id"] in written and value["state"] == JobState.QUEUED.value:
            grouped.setdefault(value["queue"], []).append(value["id"])
    for queue, job_ids in (released or {}).items():
        if mine := [job_id for job_id in job_ids if job_id in written]:
            grouped.setdefault(queue, []).extend(mine)  # type: ignore[arg-type]
    return grouped


def send_batches(client: Sender, grouped: dict[str, list[str]], *, mark: bool) -> int:
    """Send the messages of rows, a batch at a time, and (`mark`) then mark each batch's rows sent;
    returns how many were sent. A run's enqueue marks its batches on the run's row instead."""
    sent = 0
    for queue, job_ids in grouped.items():
        for start in range(0, len(job_ids), BATCH):
            chunk = job_ids[start : start + BATCH]
            client.send(chunk, queue)
            if mark:
                with client.db.session() as session:
                    session.execute(update(Job).where(Job.id.in_(chunk), Job.enqueued_at.is_(None))
                                    .values(enqueued_at=utcnow()))
            sent += len(chunk)
    return sent
