"""The API's refusals as exceptions: ApiError and a subclass per kind, by status code."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from producer.http.records import Job


class ApiError(Exception):
    """A request the API refused, or could not answer. `status_code` (None: no answer came),
    `message` (the API's `detail` as one text), `detail` (as sent: text, or a list of problems),
    `body` (the whole JSON answer, when there was one)."""

    def __init__(self, message: str, *, status_code: int | None = None, detail: Any = None, body: Any = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.detail = detail if detail is not None else message
        self.body = body
        self.headers = headers or {}


class Unauthorized(ApiError):
    """401: no key, or one the API does not know (or that was revoked)."""


class NotFound(ApiError):
    """404: no such job or run, or one of another key."""


class Conflict(ApiError):
    """409: the job has ended (`state` says how), or an Idempotency-Key was used for another request."""

    @property
    def state(self) -> str | None:
        return self.body.get("state") if isinstance(self.body, dict) else None


class Invalid(ApiError):
    """The request is refused as given (422, 400, 413), or was not sent because a file named in it
    cannot be read (status_code None). `rejects`: one line per problem, naming the field and its bound."""

    @property
    def rejects(self) -> list[str]:
        return [str(d) for d in self.detail] if isinstance(self.detail, list) else [str(self.detail)]


class RateLimited(ApiError):
    """429: over the key's rate, its cap of queued jobs or of open streams; try again after `retry_after` s."""

    @property
    def retry_after(self) -> float | None:
        return retry_after(self.headers)


class Unavailable(ApiError):
    """503 (the database or the broker is away; nothing was written), or no answer at all after
    the retries: the API cannot be reached."""

    @property
    def retry_after(self) -> float | None:
        return retry_after(self.headers)


class WaitTimeout(TimeoutError):
    """`wait` gave up: the job had not ended after `timeout` seconds. `job`: its record then."""

    def __init__(self, job: Job, timeout: float):
        super().__init__(f"job {job.id} still {job.state} after {timeout:g} s")
        self.job = job
        self.job_id = job.id
        self.state = job.state
        self.timeout = timeout


ERRORS: dict[int, type[ApiError]] = {400: Invalid, 401: Unauthorized, 403: Unauthorized, 404: NotFound, 409: Conflict,
                                     413: Invalid, 422: Invalid, 429: RateLimited, 503: Unavailable}


def error_for(response: httpx.Response) -> ApiError:
    """The exception an error answer means: its class by status, its message the API's `detail`."""
    try:
        body: Any = response.json()
    except ValueError:  # not JSON: a proxy's page, say
        body = None
    detail = body.get("detail") if isinstance(body, dict) else None
    status = response.status_code
    if isinstance(detail, list):
        message = ("invalid request: " if status == 422 else "") + "; ".join(str(d) for d in detail)
    elif detail is not None:
        message = str(detail)
    else:
        text = " ".join(response.text.split())[:200] if body is None else json.dumps(body)[:200]
        message = f"HTTP {status} {response.reason_phrase}" + (f": {text}" if text else "")
    kind = ERRORS.get(status, ApiError)
    return kind(message, status_code=status, detail=detail, body=body, headers=dict(response.headers))


def retry_after(headers: dict[str, str]) -> float | None:
    """A Retry-After header's seconds; None when there is none."""
    value = {k.lower(): v for k, v in headers.items()}.get("retry-after", "")
    try:
        return max(0.0, float(value))
    except ValueError:  # absent, or an HTTP date (this API sends seconds)
        return None


def unreachable(base_url: Any, exc: Exception) -> Unavailable:
    """No answer came (after the retries): the API cannot be reached."""
    reason = " ".join(str(exc).split()) or type(exc).__name__
    return Unavailable(f"the API at {base_url} cannot be reached ({reason})")
