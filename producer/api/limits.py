"""Per-key limits: submissions per minute (a sliding window in Redis), jobs waiting at once, and
event streams open at once.

The rate counts POSTs that submit (one for a batch, whatever its size), in any 60 seconds: a
sliding log of their times in one sorted set per key, trimmed, checked and added to by one Lua
script on Redis's clock (atomic: no two submits both take the last place), so every API process
of a deployment shares it and no minute boundary lets a burst of twice the rate through. A
refusal says when the oldest counted submit leaves the window.

The cap counts the key's jobs that are queued or running, in the transaction that inserts the new
ones, after `hold_key` has locked the key (its row FOR UPDATE on PostgreSQL; SQLite's one write
lock): a key's submits that race are counted one after the other, so no mix of them takes the key
past its cap. Only a capped key's submits wait on each other, and only for a count and an insert.

The streams of a key are leases in one sorted set per key (stream id -> when its lease ends, on
Redis's clock), shared by every API process: a stream takes a place when it opens, renews it while
it runs and gives it back when it ends; a process killed with streams open loses their places
STREAM_LEASE_SECONDS later. With SDQUEUE_API_AUTH=off there is no key, and no cap.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from models.errors import InvalidRequest
from models.tables import ApiKey, Job, JobState
from producer.api.auth import Caller
from producer.api.errors import TooManyRequests

WINDOW_SECONDS = 60
# A refusal for the cap cannot know when a job will end: retry after this long.
CAP_RETRY_SECONDS = 10
# A stream's place lasts this long unless renewed (every events.REREAD_SECONDS while it runs).
STREAM_LEASE_SECONDS = 60
# A refusal for the stream cap: retry after this long.
STREAMS_RETRY_SECONDS = 5

# KEYS[1]: the key's log. ARGV: window (ms), limit, a unique member. Returns {1, 0} when the
# submit is counted, {0, ms until a slot frees} when refused.
_SLIDING_WINDOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], window)
  return {1, 0}
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {0, tonumber(oldest[2]) + window - now}
"""


def rate_key(key_id: str) -> str:
    return f"sdqueue:api:rate:{key_id}"


def check_rate(redis: Any, caller: Caller) -> None:
    """Count one submit against the caller's rate; TooManyRequests (429) when over it."""
    if caller.key_id is None or caller.rate_per_minute is None:
        return
    allowed, wait_ms = redis.eval(_SLIDING_WINDOW, 1, rate_key(caller.key_id), WINDOW_SECONDS * 1000,
                                  caller.rate_per_minute, uuid.uuid4().hex)
    if not allowed:
        wait = int(wait_ms) / 1000
        raise TooManyRequests(f"this API key may submit {caller.rate_per_minute} times a minute; "
                              f"its next submit is allowed in {wait:.1f} s", retry_after=wait)


def check_cap(session: Session, caller: Caller, adding: int) -> None:
    """Refuse `adding` more jobs when they would take the caller past its max_queued: 422 when
    they never could (a batch larger than the cap), else 429. Atomic with the insert that follows
    in the same transaction only after `hold_key`."""
    if caller.key_id is None or caller.max_queued is None:
        return
    check_batch_size(caller, adding)
    waiting = session.scalar(select(func.count()).select_from(Job).where(
        Job.api_key_id == caller.key_id, Job.state.in_([JobState.QUEUED.value, JobState.RUNNING.value])))
    if waiting + adding > caller.max_queued:
        raise TooManyRequests(f"this API key has {waiting} jobs queued or running, its cap is {caller.max_queued}: "
                              f"submit again once some have ended", retry_after=CAP_RETRY_SECONDS)


def check_batch_size(caller: Caller, adding: int) -> None:
    """422 for more jobs in one submit than the caller's cap could ever take (no wait would help)."""
    if caller.key_id is not None and caller.max_queued is not None and adding > caller.max_queued:
        raise InvalidRequest([f"requests=<{adding} requests>: more than this API key's max_queued of "
                              f"{caller.max_queued} jobs queued or running at once"])


def hold_key(session: Session, caller: Caller) -> None:
    """Lock the caller's key until the session's transaction ends, when it has a cap to count:
    another submit of the key waits here, and counts after this one's rows are in.

    PostgreSQL locks the key's row (SELECT ... FOR UPDATE). SQLite has one writer at a time and
    begins a transaction at its first write, not its first read: a write that changes nothing takes
    the write lock now, before the count, which would otherwise be read outside any transaction."""
    if caller.key_id is None or caller.max_queued is None:
        return
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(ApiKey.id).where(ApiKey.id == caller.key_id).with_for_update())
    else:
        session.execute(update(ApiKey).where(ApiKey.id == caller.key_id).values(name=ApiKey.name))


# -- open event streams ------------------------------------------------------------------------

# KEYS[1]: the key's streams. ARGV: lease (ms), limit, the stream's id. Returns {1, n} when the
# stream takes a place, {0, n} when refused; n: the streams open before it.
_OPEN_STREAM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local open = redis.call('ZCARD', KEYS[1])
if open >= tonumber(ARGV[2]) then
  return {0, open}
end
redis.call('ZADD', KEYS[1], now + lease, ARGV[3])
redis.call('PEXPIRE', KEYS[1], lease)
return {1, open}
"""
# KEYS[1]: the key's streams. ARGV: lease (ms), the stream's id: its lease pushed on, if it holds one.
_RENEW_STREAM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('ZSCORE', KEYS[1], ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[2])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]))
end
return 1
"""


def streams_key(key_id: str) -> str:
    return f"sdqueue:api:streams:{key_id}"


class StreamPlace:
    """A place among the caller's open streams, held until `release`. Blocking (redis-py)."""

    def __init__(self, redis: Any, key_id: str):
        self.redis = redis
        self.key = streams_key(key_id)
        self.id = uuid.uuid4().hex

    def renew(self) -> None:
        self.redis.eval(_RENEW_STREAM, 1, self.key, STREAM_LEASE_SECONDS * 1000, self.id)

    def release(self) -> None:
        self.redis.zrem(self.key, self.id)


def open_stream(redis: Any, caller: Caller, limit: int) -> StreamPlace | None:
    """A place for one more stream of the caller's: TooManyRequests (429) when it has `limit` open;
    None when there is no key to count by (auth off)."""
    if caller.key_id is None:
        return None
    place = StreamPlace(redis, caller.key_id)
    taken, open_now = redis.eval(_OPEN_STREAM, 1, place.key, STREAM_LEASE_SECONDS * 1000, limit, place.id)
    if not taken:
        raise TooManyRequests(f"this API key has {open_now} event streams open, its cap is {limit} "
                              "(SDQUEUE_API_MAX_STREAMS_PER_KEY): close one, or read GET /v1/jobs/{id} instead",
                              retry_after=STREAMS_RETRY_SECONDS)
    return place
