"""Who is asking: the Caller of a request, from `Authorization: Bearer TOKEN`.

With SDQUEUE_API_AUTH=on (the default) a request without a live key's token is refused with 401
and `WWW-Authenticate: Bearer`; each job belongs to the key that submitted it, and a key is told
that another key's job does not exist (404, as for an id never used). With SDQUEUE_API_AUTH=off
every caller is the same anonymous one, who sees every job.

The key is read from the database at every request: a revoked key is refused at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from models.tables import Job, Run
from producer.api.app import Backend, backend
from producer.api.errors import Unauthorized
from producer.api.keys import TOKEN_PREFIX, find_key

# Documents the scheme in OpenAPI (the "Authorize" button of /docs); the checks are ours.
bearer = HTTPBearer(auto_error=False, description="a token from `sdqueue keys create`")
# Idempotency rows of anonymous callers (SDQUEUE_API_AUTH=off) share this scope.
ANONYMOUS = "-"


@dataclass(frozen=True)
class Caller:
    key_id: str | None  # None: no auth
    name: str | None = None
    rate_per_minute: int | None = None
    max_queued: int | None = None
    bulk_only: bool = False
    admin: bool = False  # sees every job and run, the operator's and other keys'

    @property
    def scope(self) -> str:
        return self.key_id or ANONYMOUS

    @property
    def sees_all(self) -> bool:
        """No auth (SDQUEUE_API_AUTH=off), or an admin key."""
        return self.key_id is None or self.admin

    def owns(self, job: Job) -> bool:
        return self.sees_all or job.api_key_id == self.key_id

    def owns_run(self, run: Run) -> bool:
        """A run belongs to the key that made it; the CLI's and the schedules' runs (no key) to the operator."""
        return self.sees_all or run.api_key_id == self.key_id


async def caller(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
                 shared: Backend = Depends(backend)) -> Caller:
    """The dependency every /v1 route takes."""
    if shared.settings.api_auth == "off":
        return Caller(key_id=None)
    if credentials is None:
        given = "authorization" in request.headers
        raise Unauthorized("an `Authorization: Bearer TOKEN` header is needed (`sdqueue keys create` makes a key)"
                           if not given else "the Authorization header must be `Bearer TOKEN`", token_given=given)
    return await caller_of_token(shared, credentials.credentials)


async def caller_of_token(shared: Backend, token: str) -> Caller:
    """The caller a token names (the header's, or the dashboard's cookie); Unauthorized when no live key has it."""
    key = None
    if token.startswith(TOKEN_PREFIX) and len(token) < 100:
        key = await run_in_threadpool(lambda: find_key(shared.client.db, token))
    if key is None or key.revoked_at is not None:
        raise Unauthorized("unknown or revoked API key", token_given=True)
    return Caller(key_id=key.id, name=key.name, rate_per_minute=key.rate_per_minute, max_queued=key.max_queued,
                  bulk_only=key.bulk_only, admin=key.admin)
