"""What the OpenAPI document says: the bodies the routes take (written from the request schema,
models.request.GenerationRequest, so a bound changes in one place) and the answers they give.

The routes read their bodies themselves (JSON or multipart, within the body bound), so the request
bodies are described here rather than declared as parameters; answers are described by the models
below and sent as built (an idempotent replay must be byte-for-byte the first answer's JSON).
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel, Field

from models.request import SIZES, GenerationRequest
from models.tables import JobState, Priority
from models.webhooks import EVENTS

MAX_BATCH = 1000


def request_fields(*, form: bool) -> dict[str, Any]:
    """The request's fields as JSON Schema: in JSON the image is base64 text, in a form a file."""
    schema = copy.deepcopy(GenerationRequest.model_json_schema())
    schema.pop("title", None)
    schema["description"] = "One generation request: every field but `prompt` has a default."
    properties = schema["properties"]
    for name in ("width", "height"):
        properties[name]["enum"] = list(SIZES)
    if form:
        properties["image"] = {"type": "string", "format": "binary",
                               "description": "img2img, inpainting: the input image file (PNG, JPEG, WebP, ...)"}
        properties["mask"] = {"type": "string", "format": "binary",
                              "description": "inpainting: the mask file, the image's size (white repaints)"}
        properties["depth_map"] = {"type": "string", "format": "binary",
                                   "description": "depth models: the depth map file, brighter nearer (left out: "
                                                  "estimated from the image)"}
        # A form field has no null: leaving it out draws the seed.
        properties["seed"] = {**properties["seed"]["anyOf"][0], "title": "Seed"}
    else:
        properties["image"] = {"anyOf": [{"type": "string", "contentEncoding": "base64"}, {"type": "null"}],
                               "default": None, "description": "img2img, inpainting: the input image file, base64-encoded"}
        properties["mask"] = {"anyOf": [{"type": "string", "contentEncoding": "base64"}, {"type": "null"}],
                              "default": None, "description": "inpainting: the mask file (white repaints), base64-encoded"}
        properties["depth_map"] = {"anyOf": [{"type": "string", "contentEncoding": "base64"}, {"type": "null"}],
                                   "default": None, "description": "depth models: the depth map file (brighter nearer), "
                                                                   "base64-encoded (null: estimated from the image)"}
    return schema


def job_options(form: bool = False) -> dict[str, Any]:
    events = list(EVENTS)
    return {
        "webhook_url": {"type": "string", "maxLength": 2048, "format": "uri",
                        "description": "POSTed the job's final record, signed with the key's webhook secret"},
        "webhook_events": ({"type": "string", "maxLength": 100,
                            "description": f"the ends POSTed to webhook_url, comma-separated: of {', '.join(events)} "
                                           "(all when left out)"} if form else
                           {"type": "array", "items": {"type": "string", "enum": events}, "minItems": 1,
                            "maxItems": len(events), "uniqueItems": True,
                            "description": "the ends POSTed to webhook_url (all when left out)"}),
        "priority": {"type": "string", "enum": [p.value for p in Priority],
                     "description": "interactive (the default) or bulk; a bulk-only key's jobs are bulk, "
                                    "and it is refused interactive"},
    }


def submit_body() -> dict[str, Any]:
    as_json = request_fields(form=False)
    as_json["properties"].update(job_options())
    as_form = request_fields(form=True)
    as_form["properties"].update(job_options(form=True))
    return {"required": True, "content": {
        "application/json": {"schema": as_json},
        "multipart/form-data": {"schema": as_form, "encoding": {"image": {"contentType": "image/*"},
                                                                    "mask": {"contentType": "image/*"},
                                                                    "depth_map": {"contentType": "image/*"}}},
    }}


def batch_body() -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "additionalProperties": False, "required": ["requests"],
        "properties": {
            "requests": {"type": "array", "minItems": 1, "maxItems": MAX_BATCH, "items": request_fields(form=False)},
            **job_options(),
        },
    }}}}


class ImageOut(BaseModel):
    index: int
    seed: int
    sha256: str = Field(description="of the PNG file, its metadata included")
    pixel_sha256: str | None = Field(description="of its decoded pixels (RGB, row-major, 8 bits a channel): what "
                                     "`sdqueue reproduce` compares a re-made image with; null for images made "
                                     "before it was recorded")
    size_bytes: int
    width: int
    height: int
    url: str = Field(description="this API's URL of the image: a redirect to a short-lived URL of the store")


class Links(BaseModel):
    self: str
    events: str
    images: list[str]


class JobOut(BaseModel):
    """A job's record."""

    id: str
    state: JobState
    mode: str
    params: dict[str, Any] = Field(description="the request's fields, with the seed as resolved")
    seed: int
    seed_was_drawn: bool
    model: str | None
    priority: Priority
    run_id: str | None
    run_key: str | None
    attempts: int
    failures: int
    dead_letter: bool
    error: str | None
    after: dict[str, Any] | None = Field(None, description="a follow-up: the job it follows and the image (index) that "
                                                           "is its input; null otherwise")
    followers: list[str] = Field(default_factory=list, description="the ids of the jobs that follow this one")
    webhook: dict[str, Any] | None = Field(
        None, description="null without a webhook_url; else its url, the ends it is POSTed for (events), and once "
                          "the job has ended (with one of those) the delivery's state (pending, delivered, failed), "
                          "attempts and tries")
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    images: list[ImageOut]
    links: Links


class JobsOut(BaseModel):
    jobs: list[JobOut]


class JobPage(BaseModel):
    jobs: list[JobOut]
    next_cursor: str | None = Field(description="give it as `cursor` for the next page; null on the last")


class Problems(BaseModel):
    detail: list[str] = Field(description="one line per problem: `field=value: bound`")


class Refusal(BaseModel):
    detail: str


class StateConflict(BaseModel):
    detail: str
    state: JobState


class Unready(BaseModel):
    unavailable: list[str]
    detail: str


def refusals(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The `responses` entries of the refusals a route may give."""
    described = {
        400: ("the body is not JSON, or a broken form", Refusal),
        401: ("no token, or an unknown or revoked one (WWW-Authenticate: Bearer)", Refusal),
        404: ("no such job (or another key's)", Refusal),
        409: ("the Idempotency-Key was used with another request, or is being answered", Refusal),
        413: ("the body is over SDQUEUE_API_MAX_BODY_BYTES", Refusal),
        422: ("a field outside its bound: one line per problem", Problems),
        429: ("over the key's rate or its cap of queued jobs (Retry-After)", Refusal),
        503: ("the database, broker or storage does not answer (Retry-After); nothing was half-written", Refusal),
    }
    # Every route may refuse a parameter (422): FastAPI's own description of that answer is not ours.
    return {code: {"description": described[code][0], "model": described[code][1]} for code in sorted({*codes, 422})}


# -- runs (runs.py) --------------------------------------------------------------------------------

def run_body() -> dict[str, Any]:
    """A run's manifest or grid: the body itself, or the file part `file` of a form."""
    raw = {"type": "string", "format": "binary"}
    form = {"type": "object", "required": ["file"], "properties": {
        "file": {**raw, "description": "the manifest or grid; its format from its name's suffix or its type"},
        **{name: {"type": "string", "description": f"as the query parameter {name}"}
           for name in ("name", "format", "skip_invalid", "append", "priority", "defaults")},
    }}
    return {"required": True, "content": {
        "application/x-ndjson": {"schema": {**raw, "description": "JSON Lines: one request object a line, "
                                                                  "plus `key` and `priority`"}},
        "application/jsonl": {"schema": raw},
        "application/json": {"schema": {**raw, "description": "read as JSON Lines"}},
        "text/csv": {"schema": {**raw, "description": "a header of request fields, one request a line"}},
        "application/vnd.apache.parquet": {"schema": raw},
        "application/toml": {"schema": {**raw, "description": "a grid: the product of a few lists of values"}},
        "multipart/form-data": {"schema": form},
    }}


class RunOut(BaseModel):
    """A run: its jobs by state and its progress."""

    name: str
    id: str
    state: str = Field(description="writing (not all of its rows are in yet: POST it again to complete it), queued, "
                                   "running, finished or cancelled")
    created_at: str
    sealed: bool = Field(description="every row of its source is a job, sent")
    expected_jobs: int | None
    jobs: dict[str, int] = Field(description="its jobs, counted by state")
    images_done: int
    images_total: int = Field(description="the images its jobs ask for, whatever their state")
    images_per_second: float = Field(description="over the last 5 minutes")
    eta_seconds: float | None = Field(description="at that rate; null while nothing is made")
    source_sha256: str | None
    defaults: dict[str, Any] = Field(description="the request fields rows without their own value take")
    priority: Priority
    schedule: str | None


class RejectOut(BaseModel):
    line: int = Field(description="the line of the file (Parquet: the row's index; grid: its place in the expansion)")
    key: Any = Field(description="the row's own key, if it gave one")
    errors: list[str]


class RunMade(BaseModel):
    run: RunOut
    created: bool = Field(description="false: the run existed (same name, source and defaults) and was completed")
    written: int = Field(description="jobs written by this request")
    rejects: list[RejectOut] = Field(description="with skip_invalid: the first bad rows, left out")
    reject_count: int


class BadRows(BaseModel):
    """A 422 of POST /v1/runs: a bad option (`detail` alone), or bad rows (with the first rejects and their count)."""
    detail: list[str]
    rejects: list[RejectOut] | None = Field(default=None, description="bad rows: the first ones")
    reject_count: int | None = Field(default=None, description="bad rows: how many")


class RunPage(BaseModel):
    runs: list[RunOut]
    next_cursor: str | None = Field(description="give it as `cursor` for the next page; null on the last")


class RunCancelled(BaseModel):
    run: RunOut
    cancelled: int


class RunRetried(BaseModel):
    run: RunOut
    retried: int


class ExportedFile(BaseModel):
    name: str = Field(description="its path within the export")
    size_bytes: int
    url: str = Field(description="a presigned URL of the object store")


class RunExported(BaseModel):
    run: str
    format: str
    location: str = Field(description="s3://bucket/prefix/exports/RUN/FORMAT")
    images: int
    expires_in: int = Field(description="seconds the URLs stay valid (SDQUEUE_API_EXPORT_URL_SECONDS)")
    files: list[ExportedFile]
