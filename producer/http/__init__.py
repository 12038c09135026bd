"""A typed client of the HTTP API (producer/api/): `Client`, and `AsyncClient` for asyncio, on httpx.

    from producer.http import Client
    with Client("http://api:8000", api_key="sdq_...") as api:   # default: SDQUEUE_API_URL, SDQUEUE_API_KEY
        job = api.submit({"prompt": "a red fox", "seed": 7})
        job = api.wait(job.id, timeout=600)        # Server-Sent Events; polling when they are refused
        api.fetch(job.id, "out/")                  # out/JOB-0.png, each whole or not at all

Every route has a method. Answers are records (Job, Image, Run, RunCreated) with the JSON the API
gave in `.raw`; refusals are ApiError's subclasses carrying the status code and the API's message.

Retries, with backoff (0.5, 1, 2 ... s, or a 503's Retry-After when it asks more):
- a connection that could not be made, on any route: nothing was sent;
- a 503, on any route: the API answers it when the database or the broker is away, having written nothing;
- a connection dropped after the request went out, only where a repeat cannot double anything: a
  GET; a submit, which carries an Idempotency-Key (one per call, the same on each try: the API
  answers a repeat with its first answer and makes no second job); a run's upload but an append
  (the same name, source and defaults again complete the run, writing nothing twice);
- a 409 with Retry-After to a submit: its Idempotency-Key's first request is still being answered.
Nothing else: a 4xx is the caller's to mend, a 500 the server's bug to report.

It imports httpx, the standard library and sdqueue's file helpers, nothing of SQLAlchemy, Redis,
Celery or Pillow: a laptop with a URL and a key needs no more, and `sdqueue status` through the
API starts fast.

The modules, each importing only those above it:
- `errors.py`: ApiError and its subclasses, by status code;
- `records.py`: the answers as frozen dataclasses;
- `wire.py`: the requests both clients send, the retry rules, the event stream's parsing;
- `transport.py`: the URL and key, the headers, the https transport made when first needed;
- `downloads.py`: fetched images and unpacked exports, each file whole or not at all;
- `sync.py`: `Client`; `aio.py`: `AsyncClient` (imported when first named).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from producer.http.errors import (ERRORS, ApiError, Conflict, Invalid, NotFound, RateLimited, Unauthorized,
                                  Unavailable, WaitTimeout, error_for)
from producer.http.records import ENDED, JOB_STATES, Image, Job, Run, RunCreated
from producer.http.sync import Client
from producer.http.transport import API_KEY_ENV, API_URL_ENV, PROXY_VARIABLES
from producer.http.wire import (BACKOFF_CAP_SECONDS, MAX_IMAGE_BYTES, MAX_MANIFEST_BYTES, POLL_SECONDS,
                                STREAM_READ_SECONDS, Call, Event, batch_call, create_run_call, jobs_params,
                                submit_call)

if TYPE_CHECKING:
    from producer.http.aio import AsyncClient

__all__ = [
    "Client", "AsyncClient",
    "Job", "Image", "Run", "RunCreated", "ENDED", "JOB_STATES",
    "ApiError", "Invalid", "NotFound", "Conflict", "RateLimited", "Unavailable", "Unauthorized", "WaitTimeout",
    "ERRORS", "error_for",
    "Call", "Event", "submit_call", "batch_call", "create_run_call", "jobs_params",
    "API_URL_ENV", "API_KEY_ENV", "PROXY_VARIABLES",
    "MAX_IMAGE_BYTES", "MAX_MANIFEST_BYTES", "STREAM_READ_SECONDS", "POLL_SECONDS", "BACKOFF_CAP_SECONDS",
]


def __getattr__(name: str) -> Any:
    # AsyncClient is imported when first named, as producer.Client is: a blocking caller (`sdqueue
    # status`) never loads its module; fetch and export load the download helpers the same way
    if name == "AsyncClient":
        from producer.http.aio import AsyncClient

        return AsyncClient
    raise AttributeError(f"module 'producer.http' has no attribute {name!r}")
