"""/v1/runs: a manifest or grid uploaded as a named run, then listed, shown, cancelled, retried and
exported: `sdqueue run`, `sdqueue runs` and `sdqueue export` over HTTP.

The contract (the HTTP client is written against it):

    POST /v1/runs?name=NAME[&format=F][&skip_invalid=true][&append=true][&priority=bulk|interactive]
                  [&defaults={"num_inference_steps": 30, "width": 512}]
        The body is the manifest or grid (Content-Type application/x-ndjson, application/jsonl,
        application/json (read as JSON Lines), text/csv, application/vnd.apache.parquet, or
        application/toml for a grid), or a multipart/form-data form with it as the file part `file`
        (its format from its filename's suffix, else its type) and the options as form fields.
        `format` (jsonl, ndjson, csv, parquet, toml) overrides both. `defaults`: a JSON object of
        request fields (not prompt or image) that rows without their own value take, as
        `sdqueue run --num-inference-steps 30 ...` gives them. Rows may name no file (image,
        prompts_file): an upload is text-to-image.
        201 made, or 200 for the same name, source sha256 and defaults (resumed, or done already:
        nothing is written twice):
            {"run": RUN, "created": bool, "written": N, "rejects": [REJECT, ...], "reject_count": N}
        409 the name is taken (another source or defaults: the detail says which differs; or
        another key's run, not said whose). 413 over the bound (a manifest 4 GiB, a grid 1 MiB).
        415 no format known. 422 a bad option, {"detail": ["field=value: bound", ...]}, or bad rows
        without skip_invalid: {"detail": [lines], "rejects": [REJECT, ...], "reject_count": N}.
        429 over the key's rate, or the run would take it past max_queued (nothing written).
    GET  /v1/runs?limit=50&cursor=C             {"runs": [RUN, ...], "next_cursor": str | null}
    GET  /v1/runs/{name}                        RUN
    POST /v1/runs/{name}:cancel?state=queued|running|all (default queued)   {"run": RUN, "cancelled": N}
    POST /v1/runs/{name}:retry                  {"run": RUN, "retried": N}   (its failed jobs queued again)
    GET  /v1/runs/{name}/export?format=imagefolder|webdataset|parquet|...[&split=train=0.98,validation=0.02]
        200 application/x-tar, streamed (Content-Disposition: attachment; filename="RUN-FORMAT.tar"):
        the dataset's files under the folder RUN-FORMAT/ (RUN with characters other than
        letters, digits, ".", "_" and "-" as "_"). 409 while the run has queued or running jobs.
    GET  /v1/runs/{name}/export?format=F&to=s3[&split=...]
        The dataset written to the object store under PREFIX/exports/RUN/FORMAT/ (RUN URL-quoted;
        an earlier export of the run in that format is replaced), then 200:
            {"run": NAME, "format": F, "location": "s3://...", "images": N, "expires_in": SECONDS,
             "files": [{"name": "metadata.jsonl", "size_bytes": N, "url": PRESIGNED_URL}, ...]}

    RUN = {"name", "id", "state": "writing" | "queued" | "running" | "finished" | "cancelled",
           "created_at", "sealed", "expected_jobs", "jobs": {state: count}, "images_done",
           "images_total", "images_per_second", "eta_seconds" (null: no rate yet), "source_sha256",
           "defaults", "priority", "schedule"}
    REJECT = {"line": N, "key": the row's own key or null, "errors": ["field=value: bound", ...]}

A run made here belongs to its key, and so do its jobs (GET /v1/jobs?run=NAME lists them); a key
is told that another key's run does not exist (404, as for a name never used). Admin keys, and
every caller with SDQUEUE_API_AUTH=off, see every run, the CLI's and the schedules' too. Errors
have the shapes of errors.py.

The upload is spooled to a private temporary file (counted as it arrives: this route bounds its
own body, not SDQUEUE_API_MAX_BODY_BYTES), then read and enqueued by the CLI's code in a worker
thread: every row validated before anything is written, written in batches that a second POST
of the same run completes if this one dies half-way.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Iterator
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from models.errors import InvalidRequest, RunExists, RunNotFound, ServiceUnavailable, StorageUnavailable
from models.request import GenerationRequest, parse_request
from models.storage import S3Storage
from models.tables import Job, JobState, Priority, Run
from producer.api import schemas
from producer.api.app import Backend, backend, root
from producer.api.auth import Caller, caller
from producer.api.bodies import BOOL_FIELDS, bounded_receive
from producer.api.errors import Answer, ApiError, BadBody, Conflict, TooManyRequests
from producer.api.jobs import decode_cursor, quoted
from producer.api.limits import CAP_RETRY_SECONDS, check_cap, check_rate, hold_key
from producer.files import bound_text
from producer.runs.enqueue import MAX_RUN_NAME, check_run, check_run_name, enqueue_run
from producer.runs.manifest import (
    MAX_GRID_BYTES, MAX_MANIFEST_BYTES, SHOWN_REJECTS, SUFFIXES, Manifest, ManifestError, Rejected, SpoolFailed,
    format_rejects, load_manifest,
)
from producer.runs.status import RunStatus, cancel_run, list_runs, retry_run, run_status

router = APIRouter(prefix="/v1", tags=["runs"])

# The routes that bound their own bodies (bodies.BodyLimit leaves them to it).
OWN_BODY_BOUND = frozenset({("POST", "/v1/runs")})
FORMATS = tuple(suffix.lstrip(".") for suffix in SUFFIXES)
# A body's media type, and the manifest format it is.
MEDIA_TYPES = {
    "application/x-ndjson": "jsonl", "application/jsonl": "jsonl", "application/x-jsonlines": "jsonl",
    "application/json": "jsonl", "text/csv": "csv", "application/vnd.apache.parquet": "parquet",
    "application/x-parquet": "parquet", "application/toml": "toml",
}
OPTIONS = ("name", "format", "skip_invalid", "append", "priority", "defaults")
# What `defaults` may give: the request fields but the prompt and the input image (`sdqueue run`'s options).
DEFAULT_FIELDS = tuple(name for name in GenerationRequest.model_fields
                       if name not in ("prompt", "image", "mask", "depth_map"))
# A form's bytes beside its file: the boundary, the part headers, the option fields.
FORM_OVERHEAD = 1 << 20
CHUNK = 1 << 20
# Private folders of exports being streamed: removed when the stream ends.
EXPORT_FOLDER_PREFIX = "sdqueue-export-"
NOT_FOUND = {404: {"description": "no such run (or another key's)", "model": schemas.Refusal}}


class ManifestTooLarge(ApiError):
    status_code = 413

    def __init__(self, what: str, bound: int):
        super().__init__(f"the {what} is larger than the bound of {bound} bytes ({bound_text(bound)})")


class UnknownFormat(ApiError):
    status_code = 415


# -- what a POST asks for ------------------------------------------------------------------------

@dataclass(frozen=True)
class RunOptions:
    name: str
    format: str | None
    skip_invalid: bool
    append: bool
    priority: str
    defaults: dict[str, Any]


def read_options(raw: dict[str, str], who: Caller, settings: Any) -> RunOptions:
    """The options of a POST (query parameters and form fields, as text); InvalidRequest naming
    each one that is wrong. `settings`: the deployment's, which a default model is checked against."""
    problems: list[str] = []
    name = raw.get("name")
    if name is None:
        problems.append(f"name is required: the run's name, 1..{MAX_RUN_NAME} printable characters")
    else:
        try:
            check_run_name(name)
        except InvalidRequest as exc:
            problems += exc.problems
    fmt = raw.get("format")
    if fmt is not None and fmt.lower() not in FORMATS:
        problems.append(f"format={quoted(fmt)}: must be one of {', '.join(FORMATS)}")
    flags = {}
    for flag in ("skip_invalid", "append"):
        text = raw.get(flag, "false")
        flags[flag] = BOOL_FIELDS.get(text.strip().lower())
        if flags[flag] is None:
            problems.append(f"{flag}={quoted(text)}: must be true or false")
    allowed = [p.value for p in Priority]
    priority = raw.get("priority", Priority.BULK.value)
    if priority not in allowed:
        problems.append(f"priority={quoted(priority)}: must be one of {', '.join(allowed)}")
    elif who.bulk_only and priority != Priority.BULK.value:
        problems.append(f"priority={priority!r}: this API key submits bulk jobs only (leave priority out, or say bulk)")
    defaults, default_problems = read_defaults(raw.get("defaults"), settings)
    problems += default_problems
    if problems:
        raise InvalidRequest(problems)
    assert name is not None
    return RunOptions(name, fmt.lower() if fmt else None, bool(flags["skip_invalid"]), bool(flags["append"]),
                      priority, defaults)


def read_defaults(text: str | None, settings: Any) -> tuple[dict[str, Any], list[str]]:
    """`defaults`: a JSON object of request fields, checked as `sdqueue run` checks its options."""
    if text is None or not text.strip():
        return {}, []
    try:
        defaults = json.loads(text)
    except (ValueError, RecursionError):
        return {}, [f"defaults={quoted(text)}: not JSON: give an object of request fields, e.g. "
                    '{"num_inference_steps": 30, "width": 512}']
    if not isinstance(defaults, dict):
        return {}, [f"defaults={quoted(text)}: must be a JSON object of request fields"]
    problems = [f"defaults.{quoted(name)} is not a field rows take from defaults (those are {', '.join(DEFAULT_FIELDS)})"
                for name in defaults if name not in DEFAULT_FIELDS]
    if not problems:
        try:
            parse_request({"prompt": "-", **defaults}, settings)  # a bad default is refused once, not once per row
        except InvalidRequest as exc:
            problems += [f"defaults.{problem}" for problem in exc.problems]
    return defaults, problems


def reject_record(reject: Rejected) -> dict[str, Any]:
    key = reject.row.get("key") if isinstance(reject.row, dict) else None
    return {"line": reject.line, "key": key, "errors": reject.problems}


# -- the upload, spooled to a private file within its bound ----------------------------------------

@dataclass
class Upload:
    path: Path  # the manifest, named by its format's suffix
    shown: str  # what messages call it: the file part's name, or "the body"
    options: RunOptions


def _declared_over(request: Request, bound: int) -> bool:
    declared = request.headers.get("content-length", "")
    return declared.isdigit() and int(declared) > bound


async def spool(request: Request, folder: Path, who: Caller, settings: Any) -> Upload:
    """The manifest of a POST in `folder`, and its options; nothing of it is read into memory."""
    raw = {name: request.query_params[name] for name in OPTIONS if name in request.query_params}
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media == "multipart/form-data":
        return await _spool_form(request, folder, raw, who, settings)
    options = read_options(raw, who, settings)  # refused before the body is read
    fmt = options.format or MEDIA_TYPES.get(media)
    if fmt is None:
        raise UnknownFormat(f"Content-Type {media or '(none)'!r} is no manifest format: send one of "
                            f"{', '.join(MEDIA_TYPES)}, or say format={'|'.join(FORMATS)}")
    bound = MAX_GRID_BYTES if fmt == "toml" else MAX_MANIFEST_BYTES
    what = "grid" if fmt == "toml" else "manifest"
    if _declared_over(request, bound):
        raise ManifestTooLarge(what, bound)
    path = folder / f"upload.{fmt}"
    size = 0
    with path.open("wb") as file:
        async for chunk in request.stream():
            size += len(chunk)
            if size > bound:
                raise ManifestTooLarge(what, bound)
            file.write(chunk)
    if size == 0:
        raise BadBody("the body is empty: send the manifest or grid, or a multipart form with it as the file part "
                      "`file`")
    return Upload(path, "the body", options)


async def _spool_form(request: Request, folder: Path, raw: dict[str, str], who: Caller, settings: Any) -> Upload:
    bound = MAX_MANIFEST_BYTES + FORM_OVERHEAD
    if _declared_over(request, bound):
        raise ManifestTooLarge("manifest", MAX_MANIFEST_BYTES)
    receive = bounded_receive(request.receive, bound, lambda: ManifestTooLarge("manifest", bound))
    bounded = Request(request.scope, receive)
    form = await bounded.form(max_files=1, max_fields=len(OPTIONS))
    try:
        problems: list[str] = []
        part: Path | None = None
        guessed: str | None = None
        shown = "file"
        for name, value in form.multi_items():
            if name == "file" and isinstance(value, UploadFile):
                part = folder / "upload.part"
                with part.open("wb") as out:
                    await run_in_threadpool(shutil.copyfileobj, value.file, out, CHUNK)
                suffix = Path(value.filename or "").suffix.lower().lstrip(".")
                guessed = suffix if suffix in FORMATS else MEDIA_TYPES.get((value.content_type or "").lower())
                shown = value.filename or "file"
            elif name in OPTIONS and isinstance(value, str):
                if name in raw:
                    problems.append(f"{name} is given twice, in the query and in the form")
                raw[name] = value
            else:
                problems.append(f"{quoted(name)} is not a field of a run's form (those are file, {', '.join(OPTIONS)})")
        if part is None:
            problems.append("file is required: the manifest or grid, as the form's file part `file`")
        if problems:
            raise InvalidRequest(problems)
        assert part is not None
    finally:
        await form.close()
    options = read_options(raw, who, settings)
    fmt = options.format or guessed
    if fmt is None:
        raise UnknownFormat(f"file {shown!r}: its name's suffix and its type name no manifest format: give "
                            f"format={'|'.join(FORMATS)}")
    bound = MAX_GRID_BYTES if fmt == "toml" else MAX_MANIFEST_BYTES
    if part.stat().st_size > bound:
        raise ManifestTooLarge("grid" if fmt == "toml" else "manifest", bound)
    path = part.rename(folder / f"upload.{fmt}")
    return Upload(path, shown, options)


# -- the work of each route, in a worker thread -----------------------------------------------------

def run_record(status: RunStatus) -> dict[str, Any]:
    record = status.as_dict()
    record.pop("total")
    return record


def visible_status(shared: Backend, who: Caller, name: str) -> RunStatus:
    """The run, if `who` may see it; RunNotFound (404) for a name never used and another key's run alike."""
    if not name.isprintable() or len(name) > MAX_RUN_NAME:  # no run has such a name; PostgreSQL refuses a NUL
        raise RunNotFound(name[:100])
    status = run_status(shared.client, name)
    if not (who.sees_all or status.api_key_id == who.key_id):
        raise RunNotFound(name)
    return status


def make_run(shared: Backend, who: Caller, upload: Upload, prefix: str) -> Answer:
    client = shared.client
    options = upload.options
    # 1. every row read and validated before anything is written; the upload may name no file
    try:
        manifest = load_manifest(upload.path, options.defaults, files=False, settings=shared.settings)
    except ManifestError as exc:
        raise InvalidRequest([str(exc).replace(str(upload.path), upload.shown)]) from None
    except SpoolFailed as exc:  # this host's temporary disk, not the manifest
        raise ServiceUnavailable(str(exc)) from None
    manifest.source = upload.shown if upload.shown != "the body" else "an upload"
    rejects = [reject_record(reject) for reject in manifest.rejects[:SHOWN_REJECTS]]
    if manifest.reject_count and not options.skip_invalid:
        total = manifest.reject_count + len(manifest.rows)
        lines = [f"{manifest.reject_count} of {total} rows are invalid; nothing was enqueued (skip_invalid=true "
                 "enqueues the valid ones)", *format_rejects(manifest.rejects, total=manifest.reject_count).splitlines()]
        return Answer(422, {"detail": lines, "rejects": rejects, "reject_count": manifest.reject_count})
    # 2. a bulk-only key's rows ask for bulk too
    if who.bulk_only:
        interactive = [row.line for row in manifest.rows if row.priority == Priority.INTERACTIVE.value]
        if interactive:
            raise InvalidRequest([f"line {line}: priority='interactive': this API key submits bulk jobs only"
                                  for line in interactive[:SHOWN_REJECTS]])
    # 3. the name: this caller's run from the same source and defaults, or a new one
    try:
        check_run(client, options.name, manifest, options.defaults, append=options.append, api_key_id=who.key_id)
    except RunExists as exc:
        raise Conflict(str(exc)) from None
    # 4. the key's cap: checked for the whole run now, then counted again as each batch is written
    capped = who.key_id is not None and who.max_queued is not None
    if capped:
        check_run_cap(shared, who, options.name, manifest)

    def admit(session: Session, adding: int) -> None:
        hold_key(session, who)
        check_cap(session, who, adding)

    # 5. written and sent in batches; the same POST again completes a write that died half-way
    try:
        report = enqueue_run(client, options.name, manifest, defaults=options.defaults, priority=options.priority,
                             append=options.append, progress=False, api_key_id=who.key_id,
                             admit=admit if capped else None)
    except RunExists as exc:  # made meanwhile by another request
        raise Conflict(str(exc)) from None
    assert report is not None
    status = run_status(client, options.name)
    body = {"run": run_record(status), "created": report.created, "written": report.inserted, "rejects": rejects,
            "reject_count": manifest.reject_count}
    return Answer(201 if report.created else 200, body, {"Location": f"{prefix}/v1/runs/{quote(options.name)}"})


def _waiting(session: Session, who: Caller) -> int:
    """The key's jobs queued or running: what its max_queued caps."""
    return session.scalar(select(func.count()).select_from(Job).where(
        Job.api_key_id == who.key_id, Job.state.in_([JobState.QUEUED.value, JobState.RUNNING.value]))) or 0


def check_run_cap(shared: Backend, who: Caller, name: str, manifest: Manifest) -> None:
    """Refuse a run that would take the key past max_queued before anything is written: 422 when
    it never could, else 429."""
    assert who.max_queued is not None
    with shared.client.db.session() as session:
        run_id = session.scalar(select(Run.id).where(Run.name == name))
        existing = session.scalar(select(func.count()).select_from(Job).where(Job.run_id == run_id)) if run_id else 0
        adding = max(len(manifest.rows) - (existing or 0), 0)
        waiting = _waiting(session, who)
    if adding > who.max_queued:
        raise InvalidRequest([f"name={name!r}: the run has {adding} jobs to write, more than this API key's "
                              f"max_queued of {who.max_queued} jobs queued or running at once"])
    if waiting + adding > who.max_queued:
        raise TooManyRequests(f"run {name!r} would add {adding} jobs to this API key's {waiting} queued or running; "
                              f"its cap (max_queued) is {who.max_queued}: send it again once some have ended",
                              retry_after=CAP_RETRY_SECONDS)


def runs_page(shared: Backend, who: Caller, limit: int, cursor: str | None) -> dict[str, Any]:
    before = decode_cursor(cursor) if cursor is not None else None
    found = list_runs(shared.client, limit + 1, api_key_id=None if who.sees_all else who.key_id, before=before)
    page = found[:limit]
    next_cursor = None
    if len(found) > limit:
        last = page[-1]
        raw = json.dumps([last.created_at.isoformat(), last.id]).encode()
        next_cursor = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    return {"runs": [run_record(status) for status in page], "next_cursor": next_cursor}


def cancel_visible(shared: Backend, who: Caller, name: str, state: str) -> dict[str, Any]:
    visible_status(shared, who, name)
    cancelled = cancel_run(shared.client, name, state)
    return {"run": run_record(run_status(shared.client, name)), "cancelled": cancelled}


def retry_visible(shared: Backend, who: Caller, name: str) -> dict[str, Any]:
    status = visible_status(shared, who, name)
    # a retry queues jobs again: it counts as a submit, and against the key's cap
    if who.rate_per_minute is not None:
        check_rate(shared.redis, who)
    if who.key_id is not None and who.max_queued is not None:
        failed = status.jobs[JobState.FAILED.value]
        with shared.client.db.session() as session:
            waiting = _waiting(session, who)
        if failed and waiting + failed > who.max_queued:
            raise TooManyRequests(f"retrying run {name!r} would queue {failed} jobs again beside this API key's "
                                  f"{waiting} queued or running; its cap (max_queued) is {who.max_queued}",
                                  retry_after=CAP_RETRY_SECONDS)
    retried = retry_run(shared.client, name)
    return {"run": run_record(run_status(shared.client, name)), "retried": retried}


# -- export ---------------------------------------------------------------------------------------

def check_export(shared: Backend, who: Caller, name: str, fmt: str, to: str | None) -> None:
    """Refuse before any work: an unknown format or destination, another key's run, an unfinished one."""
    from producer.runs.export import FORMATS as EXPORT_FORMATS  # read at the call: its formats grow

    problems = []
    if fmt not in EXPORT_FORMATS:
        problems.append(f"format={quoted(fmt)}: must be one of {', '.join(EXPORT_FORMATS)}")
    if to is not None and to != "s3":
        problems.append(f"to={quoted(to)}: must be s3 (or left out: the dataset streamed as a tar)")
    elif to == "s3" and not isinstance(shared.storage, S3Storage):
        problems.append("to=s3: this server keeps images in a folder, not in S3: leave `to` out to get the dataset "
                        "as a tar")
    if problems:
        raise InvalidRequest(problems)
    status = visible_status(shared, who, name)
    if status.state in ("writing", "queued", "running"):
        waiting = ", ".join(f"{n} {state}" for state, n in status.jobs.items() if n) or "no jobs yet"
        raise Conflict(f"run {name!r} has not finished ({status.state}: {waiting}): export it once it has "
                       f"(GET /v1/runs/{{name}} says when)")


def _export(shared: Backend, name: str, dest: str, fmt: str, split: str | None, *, force: bool = False) -> Any:
    from producer.outputs import OutputFailed
    from producer.runs.export import ExportError, export_run

    try:
        return export_run(shared.settings, name, dest, format=fmt, progress=False, force=force,
                          **({"split": split} if split is not None else {}))
    except ExportError as exc:  # an option export refuses (split), or a run that changed meanwhile
        raise InvalidRequest([str(exc)]) from None
    except OutputFailed as exc:  # this host's temporary disk
        raise ServiceUnavailable(str(exc)) from None


def folder_name(name: str, fmt: str) -> str:
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}-{fmt}"


def export_to_folder(shared: Backend, who: Caller, name: str, fmt: str, split: str | None) -> Path:
    """The dataset in a new private folder, as FOLDER/RUN-FORMAT/; the caller removes FOLDER."""
    check_export(shared, who, name, fmt, None)
    folder = Path(tempfile.mkdtemp(prefix=EXPORT_FOLDER_PREFIX))
    try:
        _export(shared, name, str(folder / folder_name(name, fmt)), fmt, split)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def tar_chunks(folder: Path) -> Iterator[bytes]:
    """The files under `folder` as a tar stream (POSIX pax), a piece of a file at a time: memory
    stays bounded whatever the size of the dataset."""
    for path in sorted(folder.rglob("*")):  # a folder sorts before what is in it
        member = tarfile.TarInfo(path.relative_to(folder).as_posix())
        if path.is_dir():
            member.type, member.mode = tarfile.DIRTYPE, 0o755
            yield member.tobuf(tarfile.PAX_FORMAT)
            continue
        if not path.is_file():
            continue  # an export makes only files and folders
        with path.open("rb") as file:
            info = os.fstat(file.fileno())
            member.size, member.mode, member.mtime = info.st_size, 0o644, int(info.st_mtime)
            yield member.tobuf(tarfile.PAX_FORMAT)
            while chunk := file.read(CHUNK):
                yield chunk
        yield tarfile.NUL * (-member.size % tarfile.BLOCKSIZE)
    yield tarfile.NUL * (2 * tarfile.BLOCKSIZE)  # the end of the archive


async def streamed(folder: Path) -> AsyncIterator[bytes]:
    """The tar of `folder`, read in a worker thread; the folder removed when the stream ends or
    the client goes away."""
    chunks = tar_chunks(folder)
    try:
        while (chunk := await run_in_threadpool(next, chunks, None)) is not None:
            yield chunk
    finally:
        chunks.close()
        shutil.rmtree(folder, ignore_errors=True)


def export_to_s3(shared: Backend, who: Caller, name: str, fmt: str, split: str | None, to: str) -> dict[str, Any]:
    check_export(shared, who, name, fmt, to)
    storage = shared.storage
    assert isinstance(storage, S3Storage)
    run_part = quote(name, safe="")
    if run_part in (".", ".."):
        run_part = run_part.replace(".", "%2E")
    prefix = "/".join(part for part in (storage.prefix, "exports", run_part, fmt) if part)
    target = S3Storage(storage.bucket, prefix, endpoint_url=storage.endpoint_url, region=storage.region)
    # 1. an earlier export of this run in this format is replaced, not mixed with this one
    for key, _ in _objects(target):
        target.delete(key)
    # 2. the dataset, uploaded file by file by export_run; 3. what it wrote, each with a URL
    report = _export(shared, name, target.url, fmt, split, force=True)
    seconds = shared.settings.api_export_url_seconds
    files = [{"name": key, "size_bytes": size, "url": target.presigned_url(key, seconds)}
             for key, size in _objects(target)]
    return {"run": name, "format": fmt, "location": target.url, "images": report.images, "expires_in": seconds,
            "files": files}


def _objects(target: S3Storage) -> list[tuple[str, int]]:
    """The keys (relative to the target's prefix) and sizes of the objects under it."""
    found: list[tuple[str, int]] = []
    try:
        for page in target.client.get_paginator("list_objects_v2").paginate(Bucket=target.bucket,
                                                                             Prefix=target.prefix + "/"):
            found += [(item["Key"][len(target.prefix) + 1:], int(item["Size"])) for item in page.get("Contents", [])]
    except Exception as exc:  # the store's, not the caller's
        raise StorageUnavailable(f"listing {target.url} failed: {exc}") from exc
    return sorted(found)


# -- routes ---------------------------------------------------------------------------------------

OPTION_TEXT = {
    "name": "the run's name, unique (again with the same source and defaults: the run, completed, not doubled)",
    "format": f"the manifest's format, over its Content-Type or file name: one of {', '.join(FORMATS)}",
    "skip_invalid": "true: enqueue the valid rows, and answer the bad ones (default: refuse the whole file)",
    "append": "true: add these rows to an existing run of yours made from another source or other defaults",
    "priority": "bulk (the default) or interactive, for rows without their own",
    "defaults": 'a JSON object of request fields rows without their own take: {"num_inference_steps": 30}',
}


@router.post("/runs", status_code=201, response_model=None, summary="Start a run from a manifest or grid",
             openapi_extra={"requestBody": schemas.run_body()},
             responses={200: {"model": schemas.RunMade, "description": "the run existed (same name, source and "
                                                                       "defaults): completed, nothing doubled"},
                        201: {"model": schemas.RunMade, "description": "the run, made (Location: its URL)"},
                        409: {"model": schemas.Refusal, "description": "the name is taken: another source or "
                                                                       "defaults (said which), or another key's"},
                        415: {"model": schemas.Refusal, "description": "no manifest format known: say format="},
                        422: {"model": schemas.BadRows, "description": "a bad option (detail only), or bad rows "
                                                                       "without skip_invalid"},
                        **{code: answer for code, answer in schemas.refusals(400, 401, 413, 429, 503).items()
                           if code != 422}})
async def create_run(request: Request, who: Caller = Depends(caller), shared: Backend = Depends(backend),
                     name: str | None = Query(None, description=OPTION_TEXT["name"]),
                     format: str | None = Query(None, description=OPTION_TEXT["format"]),
                     skip_invalid: str | None = Query(None, description=OPTION_TEXT["skip_invalid"]),
                     append: str | None = Query(None, description=OPTION_TEXT["append"]),
                     priority: str | None = Query(None, description=OPTION_TEXT["priority"]),
                     defaults: str | None = Query(None, description=OPTION_TEXT["defaults"])) -> Response:
    """Every row is validated before anything is written, as `sdqueue run` does; the run and its
    jobs belong to the caller's key. Options as query parameters, or as form fields beside the
    file part `file`."""
    # 1. the key's rate: this request counts, whatever becomes of it
    if who.rate_per_minute is not None:
        await run_in_threadpool(check_rate, shared.redis, who)
    folder = Path(await run_in_threadpool(tempfile.mkdtemp, None, "sdqueue-upload-"))
    try:
        # 2. the upload, in a private file, within its bound; 3. read, checked, written
        upload = await spool(request, folder, who, shared.settings)
        answer = await run_in_threadpool(make_run, shared, who, upload, root(request))
    finally:
        await run_in_threadpool(shutil.rmtree, folder, True)
    return answer.response()


@router.get("/runs", response_model=None, summary="List runs, newest first",
            responses={200: {"model": schemas.RunPage}, **schemas.refusals(401, 503)})
async def get_runs(who: Caller = Depends(caller), shared: Backend = Depends(backend),
                   limit: int = Query(50, ge=1, le=200),
                   cursor: str | None = Query(None, max_length=500, description="next_cursor of the page before")
                   ) -> JSONResponse:
    """The caller's runs (every run for an admin key, or with auth off), a page at a time."""
    return JSONResponse(await run_in_threadpool(runs_page, shared, who, limit, cursor))


@router.post("/runs/{name:path}:cancel", response_model=None, summary="Cancel a run's jobs",
             responses={200: {"model": schemas.RunCancelled}, **schemas.refusals(401, 503), **NOT_FOUND})
async def cancel(name: str, who: Caller = Depends(caller), shared: Backend = Depends(backend),
                 state: str = Query("queued", description="which jobs: queued (the default: running ones finish), "
                                                           "running (each stops at its next step), or all")
                 ) -> JSONResponse:
    """Its queued jobs never start; its running ones, when asked, stop at their next denoising step."""
    return JSONResponse(await run_in_threadpool(cancel_visible, shared, who, name, state))


@router.post("/runs/{name:path}:retry", response_model=None, summary="Queue a run's failed jobs again",
             responses={200: {"model": schemas.RunRetried}, **schemas.refusals(401, 429, 503), **NOT_FOUND})
async def retry(name: str, who: Caller = Depends(caller), shared: Backend = Depends(backend)) -> JSONResponse:
    """Each failed job again with its seeds and a clean failure count; it counts as a submit."""
    return JSONResponse(await run_in_threadpool(retry_visible, shared, who, name))


@router.get("/runs/{name:path}/export", response_model=None, summary="A finished run as a dataset",
            responses={200: {"content": {"application/x-tar": {}, "application/json": {
                                 "schema": schemas.RunExported.model_json_schema()}},
                             "description": "the dataset as a tar, streamed; with to=s3, the URLs of its files"},
                       409: {"model": schemas.Refusal, "description": "the run has queued or running jobs"},
                       **schemas.refusals(401, 503), **NOT_FOUND})
async def export(name: str, who: Caller = Depends(caller), shared: Backend = Depends(backend),
                 format: str = Query(..., description="the dataset's layout: imagefolder, webdataset, parquet, ..."),
                 split: str | None = Query(None, max_length=1000,
                                           description="splits by share, stable by key: train=0.98,validation=0.02"),
                 to: str | None = Query(None, description="s3: write it to the object store, answer its files' URLs")
                 ) -> Response:
    """The run's images and their records in one of `sdqueue export`'s layouts, streamed as a tar
    of RUN-FORMAT/; or, with to=s3, written under exports/RUN/FORMAT/ in the bucket."""
    if to is not None:
        return JSONResponse(await run_in_threadpool(export_to_s3, shared, who, name, format, split, to))
    folder = await run_in_threadpool(export_to_folder, shared, who, name, format, split)
    filename = f"{folder_name(name, format)}.tar"
    return StreamingResponse(streamed(folder), media_type="application/x-tar",
                             headers={"Content-Disposition": f'attachment; filename="{filename}"'})


# Last: a run name may hold "/" (its path parameter takes it), so the routes above match first.
@router.get("/runs/{name:path}", response_model=None, summary="A run's progress",
            responses={200: {"model": schemas.RunOut}, **schemas.refusals(401, 503), **NOT_FOUND})
async def get_run(name: str, who: Caller = Depends(caller), shared: Backend = Depends(backend)) -> JSONResponse:
    """Its jobs by state, images done of the total, images/s over the last 5 minutes and the ETA."""
    return JSONResponse(run_record(await run_in_threadpool(visible_status, shared, who, name)))
