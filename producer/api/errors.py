"""Errors into HTTP answers, in one place: every handler of the app, and the idempotency store (which
keeps a refusal as it keeps a success), ask `answer_for` what an exception means to a caller.

A user's mistake is a 4xx with a `detail` that says what to change; an outage of the database, the
broker or storage is a 503 with Retry-After (nothing half-written: the client takes back what it
wrote); anything else is a 500 whose trace goes to the log, not to the caller.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from models.errors import (
    ConfigError, InvalidRequest, JobNotFound, RunNotFound, SchemaOutOfDate, ServiceUnavailable, StorageError,
)
from models.jobs import IllegalTransition

log = logging.getLogger("sdqueue.api")

# What a 503 asks a caller to wait before trying again, in seconds.
RETRY_AFTER_OUTAGE = 5


class ApiError(Exception):
    """An answer decided by the API itself: its status, detail and headers."""

    status_code = 400

    def __init__(self, detail: Any, *, headers: dict[str, str] | None = None):
        super().__init__(detail if isinstance(detail, str) else repr(detail))
        self.detail = detail
        self.headers = headers or {}


class BadBody(ApiError):
    """A body that cannot be read as what the route takes (not JSON, a broken multipart)."""

    status_code = 400


class BodyTooLarge(ApiError):
    status_code = 413

    def __init__(self, bound: int):
        super().__init__(f"the request body is larger than the bound of {bound} bytes (SDQUEUE_API_MAX_BODY_BYTES)")


class Unauthorized(ApiError):
    status_code = 401

    def __init__(self, detail: str, *, token_given: bool):
        challenge = 'Bearer realm="sdqueue"' + (', error="invalid_token"' if token_given else "")
        super().__init__(detail, headers={"WWW-Authenticate": challenge})


class TooManyRequests(ApiError):
    status_code = 429

    def __init__(self, detail: str, retry_after: float):
        super().__init__(detail, headers={"Retry-After": str(max(1, int(-(-retry_after // 1))))})


class Conflict(ApiError):
    status_code = 409


class NotFound(ApiError):
    status_code = 404


@dataclass
class Answer:
    status_code: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status_code, headers=self.headers)


def _outage_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean a service does not answer (imported here: redis and SQLAlchemy only)."""
    import redis.exceptions
    import sqlalchemy.exc

    return (ServiceUnavailable, SchemaOutOfDate, sqlalchemy.exc.OperationalError, sqlalchemy.exc.TimeoutError,
            sqlalchemy.exc.InterfaceError, redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


OUTAGES = _outage_types()


def hide_secrets(message: str) -> str:
    """URLs in a message without their user and password (a broker URL may carry one)."""
    return re.sub(r"([a-z][a-z0-9+.-]*://)[^/@\s]+@", r"\1***@", message)


def outage_detail(exc: BaseException) -> str:
    import redis.exceptions
    import sqlalchemy.exc

    if isinstance(exc, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.TimeoutError, sqlalchemy.exc.InterfaceError)):
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        return f"the database cannot be reached ({hide_secrets(reason)}); nothing was enqueued"
    if isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
        return f"the broker cannot be reached ({hide_secrets(str(exc))}); nothing was enqueued"
    return hide_secrets(str(exc))


def answer_for(exc: BaseException) -> Answer | None:
    """The answer an exception gives a caller; None for one that is a bug (a 500)."""
    if isinstance(exc, ApiError):
        return Answer(exc.status_code, {"detail": exc.detail}, dict(exc.headers))
    if isinstance(exc, InvalidRequest):
        return Answer(422, {"detail": list(exc.problems)})
    if isinstance(exc, (JobNotFound, RunNotFound)):
        return Answer(404, {"detail": str(exc)})
    if isinstance(exc, IllegalTransition):
        return Answer(409, {"detail": str(exc), "state": exc.current.value})
    if isinstance(exc, OUTAGES) or (isinstance(exc, StorageError) and isinstance(exc, ServiceUnavailable)):
        return Answer(503, {"detail": outage_detail(exc)}, {"Retry-After": str(RETRY_AFTER_OUTAGE)})
    if isinstance(exc, ConfigError):
        return Answer(500, {"detail": f"the server is misconfigured: {hide_secrets(str(exc))}"})
    return None


def describe_validation(error: dict[str, Any]) -> str:
    """FastAPI's check of a query, path or header parameter, as one line like InvalidRequest's:
    `name=value: bound`."""
    where = error.get("loc", ())
    loc = [str(part) for part in where if part not in ("query", "path", "header", "body")]
    name = ".".join(loc) or "request"
    if error.get("type") == "missing":
        return f"{name} is required"
    value = error.get("input")
    # A parameter of the URL or a header is text as given: shown as typed, not quoted.
    if isinstance(value, str):
        value = value if len(value) <= 60 else value[:57] + "..."
        shown = value if where and where[0] in ("query", "path", "header") and value.isprintable() else repr(value)
    else:
        shown = repr(value)
    message = str(error.get("msg", "is invalid"))
    return f"{name}={shown}: {message[0].lower() + message[1:]}"


def install(app: FastAPI) -> None:
    """The app's exception handlers: every known error through answer_for."""

    async def known(request: Request, exc: Exception) -> JSONResponse:
        answer = answer_for(exc)
        if answer is None:
            return await unexpected(request, exc)
        if answer.status_code >= 500:
            log.warning("%s %s: %s", request.method, request.url.path, hide_secrets(str(exc)))
        return answer.response()

    async def invalid_parameters(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": [describe_validation(e) for e in exc.errors()]}, status_code=422)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return internal_error(request, exc)

    def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # Registered for Exception, this runs in Starlette's outermost middleware, which raises the
        # exception again afterwards: the server logs its trace.
        return JSONResponse({"detail": "internal error: the server's log says more"}, status_code=500)

    for kind in (ApiError, InvalidRequest, JobNotFound, RunNotFound, IllegalTransition, ConfigError, StorageError,
                 *OUTAGES):
        app.add_exception_handler(kind, known)
    app.add_exception_handler(RequestValidationError, invalid_parameters)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, internal_error)
