"""Per-key limits: submissions per minute (a sliding window in Redis) and jobs waiting at once.

The rate counts POSTs that submit (one for a batch, whatever its size), in any 60 seconds: a
sliding log of their times in one sorted set per key, trimmed and checked by one Lua script on
Redis's clock, so every API process of a deployment shares it and no minute boundary lets a burst
of twice the rate through. A refusal says when the oldest counted submit leaves the window.

The cap counts the key's jobs that are queued or running. Two submits racing past the check can
take a key a little over its cap (at most one job per concurrent request): a soft cap, checked
without a lock on the key, so that one key's submits never wait on each other.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models.errors import InvalidRequest
from models.tables import Job, JobState
from producer.api.auth import Caller
from producer.api.errors import TooManyRequests

WINDOW_SECONDS = 60
# A refusal for the cap cannot know when a job will end: retry after this long.
CAP_RETRY_SECONDS = 10

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
    they never could (a batch larger than the cap), else 429."""
    if caller.key_id is None or caller.max_queued is None:
        return
    if adding > caller.max_queued:
        raise InvalidRequest([f"requests=<{adding} requests>: more than this API key's max_queued of "
                              f"{caller.max_queued} jobs queued or running at once"])
    waiting = session.scalar(select(func.count()).select_from(Job).where(
        Job.api_key_id == caller.key_id, Job.state.in_([JobState.QUEUED.value, JobState.RUNNING.value])))
    if waiting + adding > caller.max_queued:
        raise TooManyRequests(f"this API key has {waiting} jobs queued or running, its cap is {caller.max_queued}: "
                              f"submit again once some have ended", retry_after=CAP_RETRY_SECONDS)
