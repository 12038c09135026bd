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
                               "description": "img2img: the input image file (PNG, JPEG, WebP, ...)"}
        # A form field has no null: leaving it out draws the seed.
        properties["seed"] = {**properties["seed"]["anyOf"][0], "title": "Seed"}
    else:
        properties["image"] = {"anyOf": [{"type": "string", "contentEncoding": "base64"}, {"type": "null"}],
                               "default": None, "description": "img2img: the input image file, base64-encoded"}
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
        "multipart/form-data": {"schema": as_form, "encoding": {"image": {"contentType": "image/*"}}},
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
    sha256: str
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
