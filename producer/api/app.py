"""The app: `create_app(settings)` puts the routes, the body bound, the error handlers and one
shared Backend (the Client, a Redis connection pool) together.

Routes are `async def` and hand every blocking call (SQLAlchemy, redis-py, boto3) to a worker
thread. The Client is made at the first request that needs it, not at start: a process started
while the database is down answers 503 (and /readyz says why) until it is back.
"""

from __future__ import annotations

import threading
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request

from models.errors import ServiceUnavailable
from models.settings import Settings, load_settings
from models.storage import Storage, open_storage
from producer.api import errors
from producer.api.bodies import BodyLimit
from producer.client import Client

DESCRIPTION = """Submit Stable Diffusion 2.1 jobs to the sdqueue workers, follow them, fetch their images.

Every route but /healthz and /readyz takes `Authorization: Bearer TOKEN` (a key from
`sdqueue keys create`), unless the server runs with SDQUEUE_API_AUTH=off. A key sees only its own
jobs. POSTs take an `Idempotency-Key` header: a retry with the same key and request gets the first
answer again and makes no job.
"""


class Backend:
    """What the routes share: settings, the Client (made on first use), a Redis client."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._client: Client | None = None
        self._redis: Any = None
        self._storage: Storage | None = None
        self._lock = threading.Lock()

    @property
    def client(self) -> Client:
        """The Client; ServiceUnavailable (503) while the database cannot be reached."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    client = Client(self.settings)
                    if not self.settings.in_process_broker:
                        client.send([])  # makes the sender and its publisher now, not in racing threads
                    self._client = client
        return self._client

    @property
    def storage(self) -> Storage:
        """The object store (no call made to open it): the client's, or one of its own while the
        database keeps the client from being made."""
        if self._client is not None:
            return self._client.storage
        if self._storage is None:
            self._storage = open_storage(self.settings.storage_url, endpoint_url=self.settings.s3_endpoint_url,
                                         region=self.settings.s3_region)
        return self._storage

    @property
    def redis(self) -> Any:
        """A redis-py client of the broker (rate limits, readiness); connects when first used."""
        if self._redis is None:
            if self.settings.in_process_broker:
                raise ServiceUnavailable("SDQUEUE_BROKER_URL is memory://: the API needs a Redis broker")
            import redis

            with self._lock:
                if self._redis is None:
                    self._redis = redis.Redis.from_url(self.settings.broker_url, socket_timeout=5,
                                                       socket_connect_timeout=3)
        return self._redis

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        if self._redis is not None:
            self._redis.close()


def backend(request: Request) -> Backend:
    """The dependency routes take their Backend from."""
    return request.app.state.backend  # type: ignore[no-any-return]


def root(request: Request) -> str:
    """The prefix of this app's own URLs (behind a proxy that mounts it under a path)."""
    return str(request.scope.get("root_path", "")).rstrip("/")


def create_app(settings: Settings | None = None) -> FastAPI:
    from producer.api import dashboard, docs, events, health, jobs, metrics, runs

    settings = settings or load_settings()
    shared = Backend(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        shared.close()

    app = FastAPI(title="sdqueue", version="1", description=DESCRIPTION, lifespan=lifespan, docs_url=None,
                  redoc_url=None)  # docs.py serves both pages from installed files, not a CDN
    app.state.backend = shared
    app.add_middleware(BodyLimit, max_bytes=settings.api_max_body_bytes, exempt=runs.OWN_BODY_BOUND)
    errors.install(app)
    app.include_router(jobs.router)
    app.include_router(runs.router)
    app.include_router(events.router)
    app.include_router(health.router)
    app.include_router(dashboard.router)  # the web pages, left out of the OpenAPI document
    docs.install(app)
    metrics.install(app, shared)
    return app


def create_app_from_environment() -> FastAPI:
    """The factory uvicorn calls in each of its worker processes (`sdqueue api --workers N`)."""
    return create_app(load_settings())
