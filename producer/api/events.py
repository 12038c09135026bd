"""GET /v1/jobs/{id}/events: a job's life as Server-Sent Events.

    event: state      the job's record, first as it is now, then at every change of state
    event: progress   {"step": 7, "steps": 25} while it denoises
    event: end        its final record, once it has ended; then the stream closes
    : keep-alive      a comment, after KEEPALIVE_SECONDS without an event (proxies close idle streams)

The stream subscribes to the job's events (models.events) before it reads the record, so nothing
that happens between the two is missed; and it reads the record again every REREAD_SECONDS, so a
lost event (they are hints) or a broker that stops answering costs latency, never a wrong end.

Redis pub/sub is read through redis-py, which blocks: each open stream holds a thread of its own
pool (STREAM_THREADS), not one of the pool the other routes use, so followers never starve
submits. The stream stops when the client goes away (Starlette cancels it; a blocked read ends
within POLL_SECONDS).

Each stream also holds a Redis connection: a key may have SDQUEUE_API_MAX_STREAMS_PER_KEY open at
once, across all API processes (limits.open_stream); one more is refused with 429. The place is
taken before the subscription, renewed at every re-read, and given back when the stream ends for
any reason (the client gone included). While the broker does not answer, streams are not counted:
they hold no connection of it then.

`POST /v1/jobs` with `Prefer: wait=N` (RFC 7240) waits here, the same way, for the job it made to
end (`wait_for_end`): at most MAX_WAIT_SECONDS, holding one of the key's stream places meanwhile.
"""

from __future__ import annotations

import json
import time
from typing import Any, AsyncIterator

import anyio
import anyio.to_thread
from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from models.events import Subscription
from models.tables import JobState
from producer.api import schemas
from producer.api.app import Backend, backend, root
from producer.api.auth import Caller, caller
from producer.api.errors import OUTAGES, TooManyRequests
from producer.api.jobs import read_record
from producer.api.limits import StreamPlace, open_stream

router = APIRouter(prefix="/v1", tags=["jobs"])

POLL_SECONDS = 1.0
REREAD_SECONDS = 5.0
KEEPALIVE_SECONDS = 15.0
# Threads for blocked pub/sub reads, shared by every stream of the process.
STREAM_THREADS = 512
# The longest `Prefer: wait=N` honoured: a larger N waits this long.
MAX_WAIT_SECONDS = 300


def frame(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def ended(state: str) -> bool:
    return JobState(state).terminal


@router.get("/jobs/{job_id}/events", response_model=None, summary="Follow a job (Server-Sent Events)",
            response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                             "description": "events `state`, `progress` and, last, `end`"},
                       **schemas.refusals(401, 404, 429, 503)})
async def follow(job_id: str, request: Request, who: Caller = Depends(caller),
                 shared: Backend = Depends(backend)) -> StreamingResponse:
    """The job's state and denoising progress as they happen, ending with its final record. A key
    may have SDQUEUE_API_MAX_STREAMS_PER_KEY streams open at once (16): one more is a 429."""
    limiter = threads(request)
    prefix = root(request)
    # 1. a place among the caller's open streams (429 when it has all of them open)
    place = await run_in_threadpool(take_place, shared, who)
    # 2. subscribe, then read: an event between the two is seen twice at worst, never missed
    subscription: Subscription | None = None
    try:
        try:
            subscription = await anyio.to_thread.run_sync(Subscription, shared.settings, [canonical_id(job_id)],
                                                          limiter=limiter)
        except Exception:  # the broker does not answer: the stream reads the record every REREAD_SECONDS
            subscription = None
        record = await run_in_threadpool(read_record, shared, who, job_id, prefix)
    except BaseException:
        if subscription is not None:
            subscription.close()
        await give_back(place)
        raise
    return PlacedStream(stream(shared, who, record, subscription, limiter, prefix, place), place,
                        media_type="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def take_place(shared: Backend, who: Caller) -> StreamPlace | None:
    """The stream's place among its key's; None when not counted (no key, or the broker away)."""
    if who.key_id is None:
        return None
    try:
        return open_stream(shared.redis, who, shared.settings.api_max_streams_per_key)
    except OUTAGES:  # the stream will hold no broker connection either: let it run uncounted
        return None


async def give_back(place: StreamPlace | None) -> None:
    """The place freed, even while the stream is being cancelled (its client went away)."""
    if place is None:
        return
    with anyio.CancelScope(shield=True):
        try:
            await anyio.to_thread.run_sync(place.release)
        except Exception:  # the broker does not answer: the place lapses after STREAM_LEASE_SECONDS
            pass


class PlacedStream(StreamingResponse):
    """A stream that gives its place back when it ends, whatever ends it: its last event, its
    client leaving, or its client leaving before the first event (the body never started)."""

    def __init__(self, content: AsyncIterator[bytes], place: StreamPlace | None, **kwargs: Any):
        super().__init__(content, **kwargs)
        self.place = place

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await give_back(self.place)


async def stream(shared: Backend, who: Caller, record: dict[str, Any], subscription: Subscription | None,
                 limiter: anyio.CapacityLimiter, prefix: str, place: StreamPlace | None) -> AsyncIterator[bytes]:
    try:
        # 3. the record as it is now
        yield frame("state", record)
        sent_state = record["state"]
        if ended(sent_state):
            yield frame("end", record)
            return
        last_sent = last_read = time.monotonic()
        while True:
            # 4. the next event, or a second without one
            event = None
            if subscription is not None:
                try:
                    event = await anyio.to_thread.run_sync(subscription.get, POLL_SECONDS, limiter=limiter)
                except Exception:  # the broker went away: the record, read every REREAD_SECONDS, carries on
                    subscription.close()
                    subscription = None
            else:
                await anyio.sleep(POLL_SECONDS)
            now = time.monotonic()
            kind = event.get("type") if isinstance(event, dict) else None
            if kind == "progress" and isinstance(event.get("step"), int) and isinstance(event.get("steps"), int):
                yield frame("progress", {"step": event["step"], "steps": event["steps"]})
                last_sent = now
            # 5. the record again at a change of state, and every REREAD_SECONDS whatever came
            #    (the stream's place renewed with it)
            if kind == "state" or now - last_read >= REREAD_SECONDS:
                last_read = now
                await renew(place, limiter)
                try:
                    record = await run_in_threadpool(read_record, shared, who, record["id"], prefix)
                except Exception:  # the database does not answer: try again at the next re-read
                    continue
                if record["state"] != sent_state:
                    yield frame("state", record)
                    sent_state, last_sent = record["state"], now
                if ended(sent_state):
                    yield frame("end", record)
                    return
            if now - last_sent >= KEEPALIVE_SECONDS:
                yield b": keep-alive\n\n"
                last_sent = now
    finally:
        if subscription is not None:
            subscription.close()


def preferred_wait(prefer: str | None) -> int | None:
    """The N of `Prefer: wait=N` (RFC 7240; among other preferences, comma-separated), at most
    MAX_WAIT_SECONDS; None when the header asks no wait, or not a whole number of seconds from 1
    (a preference the server may ignore, rather than a reason to refuse the submit)."""
    for preference in (prefer or "").split(","):
        name, _, value = preference.partition(";")[0].partition("=")
        if name.strip().lower() == "wait":
            value = value.strip().strip('"')
            if value.isascii() and value.isdigit() and int(value) >= 1:
                return min(int(value), MAX_WAIT_SECONDS)
            return None
    return None


async def wait_for_end(request: Request, shared: Backend, who: Caller, record: dict[str, Any], seconds: float,
                       prefix: str) -> tuple[dict[str, Any], bool]:
    """The job's record once it has ended, or as it is after `seconds`; and whether the wait was
    made (not when the key has all its stream places taken: the caller is answered at once).

    As the stream: subscribe, then read the record; wake at a state event, or every
    REREAD_SECONDS to read it anyway. The record is the answer, the events only say when to read.
    A client that leaves ends the wait within POLL_SECONDS."""
    if ended(record["state"]):
        return record, True
    limiter = threads(request)
    deadline = time.monotonic() + seconds
    try:
        place = await run_in_threadpool(take_place, shared, who)
    except TooManyRequests:
        return record, False
    subscription: Subscription | None = None
    try:
        try:
            subscription = await anyio.to_thread.run_sync(Subscription, shared.settings, [record["id"]],
                                                          limiter=limiter)
        except Exception:  # the broker does not answer: the record, read every REREAD_SECONDS
            subscription = None
        while True:
            # 1. the record: the answer once the job has ended, or once the time is up
            try:
                record = await run_in_threadpool(read_record, shared, who, record["id"], prefix)
            except Exception:  # the database does not answer: the job is made; answer with what was read
                pass
            now = time.monotonic()
            if ended(record["state"]) or now >= deadline:
                return record, True
            # 2. events until a change of state, the next read, the deadline, or the client gone
            wake = min(deadline, now + REREAD_SECONDS)
            while (left := wake - time.monotonic()) > 0:
                if await request.is_disconnected():
                    return record, True
                if subscription is None:
                    await anyio.sleep(min(left, POLL_SECONDS))
                    continue
                try:
                    event = await anyio.to_thread.run_sync(subscription.get, min(left, POLL_SECONDS),
                                                           limiter=limiter)
                except Exception:  # the broker went away: the record, read every REREAD_SECONDS
                    subscription.close()
                    subscription = None
                    continue
                if isinstance(event, dict) and event.get("type") == "state":
                    break
            await renew(place, limiter)
    finally:
        if subscription is not None:
            subscription.close()
        await give_back(place)


async def renew(place: Any, limiter: anyio.CapacityLimiter) -> None:
    """Push on a stream's place among its key's; if the broker does not answer, the place lapses
    and the stream (or wait) goes on."""
    if place is None:
        return
    try:
        await anyio.to_thread.run_sync(place.renew, limiter=limiter)
    except Exception:
        pass


def canonical_id(job_id: str) -> str:
    import uuid

    try:
        return str(uuid.UUID(job_id))
    except ValueError:
        return "-"  # read_record answers 404 for it


def threads(request: Request) -> anyio.CapacityLimiter:
    """The process's pool of threads for streams (made in the event loop, on first use)."""
    state = request.app.state
    if getattr(state, "stream_threads", None) is None:
        state.stream_threads = anyio.CapacityLimiter(STREAM_THREADS)
    return state.stream_threads  # type: ignore[no-any-return]
