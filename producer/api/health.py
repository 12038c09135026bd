"""/healthz: the process answers. /readyz: so do the database, the broker and storage.

Neither needs a key. A load balancer sends traffic on /readyz and restarts on /healthz: an outage
of a service behind the API makes it unready, never restarted.

A bucket that is not there yet is made by /readyz (a fresh deployment has none until something
uploads): the API is ready as soon as the store answers, not after its first img2img submit.
"""

from __future__ import annotations

import logging
from typing import Callable

import anyio
import anyio.to_thread
from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from sqlalchemy import text

from models.errors import StorageError
from models.storage import S3Storage
from producer.api import schemas
from producer.api.app import Backend, backend
from producer.api.errors import hide_secrets

router = APIRouter(tags=["health"])
log = logging.getLogger("sdqueue.api")

# Each check gets this long; one that takes longer counts as not answering.
CHECK_SECONDS = 3.0


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="The database, broker and storage answer",
            responses={503: {"model": schemas.Unready, "description": "what does not answer, and why"}})
async def readyz(shared: Backend = Depends(backend)) -> JSONResponse:
    checks: dict[str, Callable[[], object]] = {
        "database": lambda: _database(shared),
        "broker": lambda: shared.redis.ping(),
        "storage": lambda: _storage(shared),
    }
    failures: dict[str, str] = {}

    async def run(name: str, check: Callable[[], object]) -> None:
        try:
            with anyio.fail_after(CHECK_SECONDS):
                await anyio.to_thread.run_sync(check, abandon_on_cancel=True)
        except TimeoutError:
            failures[name] = f"{name}: no answer in {CHECK_SECONDS:g} s"
        except Exception as exc:
            reason = " ".join(str(exc).split())[:300] or type(exc).__name__
            failures[name] = f"{name}: {hide_secrets(reason)}"

    async with anyio.create_task_group() as group:
        for name, check in checks.items():
            group.start_soon(run, name, check)
    if failures:
        unavailable = [name for name in checks if name in failures]
        return JSONResponse({"unavailable": unavailable, "detail": "; ".join(failures[n] for n in unavailable)},
                            status_code=503, headers={"Retry-After": "5"})
    return JSONResponse({"status": "ready"})


def _database(shared: Backend) -> None:
    with shared.client.db.engine.connect() as connection:
        connection.execute(text("SELECT 1"))


def _storage(shared: Backend) -> None:
    storage = shared.storage
    try:
        storage.ping()
    except StorageError:
        if not isinstance(storage, S3Storage) or not _bucket_missing(storage):
            raise
        _make_bucket(storage)
        storage.ping()


def _bucket_missing(storage: S3Storage) -> bool:
    from botocore.exceptions import ClientError

    try:
        storage.client.head_bucket(Bucket=storage.bucket)
    except ClientError as exc:
        return exc.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket", "NotFound")
    return False


def _make_bucket(storage: S3Storage) -> None:
    """The bucket, made; another API process making it at the same time is no failure."""
    from botocore.exceptions import ClientError

    options = {} if storage.region == "us-east-1" else {
        "CreateBucketConfiguration": {"LocationConstraint": storage.region}}
    try:
        storage.client.create_bucket(Bucket=storage.bucket, **options)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise
    log.info("storage: made bucket %s (it was not there)", storage.bucket)
