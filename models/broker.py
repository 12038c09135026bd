"""What the sweeper and the cancel notices need of the Redis broker, beside Celery.

Celery's Redis transport (kombu) keeps a queue as a list of JSON messages (one list per priority
step, `QUEUE\\x06\\x16N`), and the messages a worker holds unacknowledged in the hash `unacked`.
A message of one job is sent with its job id as the task id; a message of several bulk jobs
(SDQUEUE_JOBS_PER_MESSAGE) names them in its `sdqueue_jobs` header. So the job ids with a live message
are those headers, or the `headers.id`, of those entries.
"""

from __future__ import annotations

import json
import time
from typing import Any

from models.constants import BULK_SUFFIX, JOBS_HEADER, worker_queues
from models.registry import REGISTRY, model_key
from models.settings import Settings

# Where cancellations are announced, so that a worker drops a running job's samples at once
# instead of at its next heartbeat. Only a hint: the job row says what is cancelled.
CANCEL_CHANNEL = "sdqueue:cancel"

_PRIORITY_SEP = "\x06\x16"
_UNACKED = "unacked"
_UNACKED_INDEX = "unacked_index"  # delivery tag -> when a worker took the message
_CHUNK = 1000

# Decoding in Redis keeps a deep queue's scan to the ids: 36 bytes a message instead of ~1 KB.
# Returns the number of entries in the range, then the ids found in them.
_IDS_IN_RANGE = """
local entries = redis.call('LRANGE', KEYS[1], ARGV[1], ARGV[2])
local out = {#entries}
for _, raw in ipairs(entries) do
  local ok, message = pcall(cjson.decode, raw)
  if ok and type(message) == 'table' and type(message['headers']) == 'table' then
    local jobs = message['headers']['sdqueue_jobs']
    if type(jobs) == 'table' then
      for _, id in ipairs(jobs) do
        if type(id) == 'string' then out[#out + 1] = id end
      end
    else
      local id = message['headers']['id']
      if type(id) == 'string' then out[#out + 1] = id end
    end
  end
end
return out
"""


def job_ids_of(headers: dict[str, Any]) -> list[str]:
    """The job ids a message carries, from its headers: its JOBS_HEADER, or its task id (the
    Python twin of _IDS_IN_RANGE's reading)."""
    jobs = headers.get(JOBS_HEADER)
    return jobs if isinstance(jobs, list) else [headers["id"]]


def uses_redis(settings: Settings) -> bool:
    return settings.broker_url.startswith(("redis://", "rediss://"))


def redis_client(settings: Settings) -> Any:
    import redis

    return redis.Redis.from_url(settings.broker_url, socket_timeout=10, socket_connect_timeout=5)


def live_job_ids(settings: Settings, queue: str) -> set[str]:
    """The job ids that have a live message in the broker: waiting in `queue`, or taken by a worker
    within the last `requeue_after` seconds."""
    client = redis_client(settings)
    try:
        ids_in_range = client.register_script(_IDS_IN_RANGE)
        found: set[str] = set()
        for key in [queue] + [f"{queue}{_PRIORITY_SEP}{n}" for n in range(1, 10)]:
            start = 0
            # Consumers pop from the right and producers push on the left: walking from the left
            # may see a message twice but never skips one. Popped ones are in `unacked`, read last.
            while True:
                entries, *ids = ids_in_range(keys=[key], args=[start, start + _CHUNK - 1])
                found.update(i.decode() if isinstance(i, bytes) else i for i in ids)
                if entries < _CHUNK:
                    break
                start += _CHUNK
        # A message a worker took but has held for longer than requeue_after without its job being
        # claimed (the job is still queued, or the caller would not ask) is not live: its worker
        # died between taking it and claiming the job, and Redis would give it back only after
        # the visibility timeout. A live worker claims a job the moment it takes its message (one
        # message per slot), so sending it again costs at most a second delivery that is dropped.
        fresh = {tag.decode() if isinstance(tag, bytes) else tag
                 for tag in client.zrangebyscore(_UNACKED_INDEX, time.time() - settings.requeue_after, "+inf")}
        for tag, raw in client.hscan_iter(_UNACKED, count=_CHUNK):
            if (tag.decode() if isinstance(tag, bytes) else tag) not in fresh:
                continue
            try:
                found.update(job_ids_of(json.loads(raw)[0]["headers"]))
            except (ValueError, LookupError, TypeError, AttributeError):
                continue
        return found
    finally:
        client.close()


def queue_depth(client: Any, queue: str) -> int:
    """Messages waiting in `queue`: the lengths of its lists, one per priority step."""
    pipe = client.pipeline(transaction=False)
    for key in [queue] + [f"{queue}{_PRIORITY_SEP}{n}" for n in range(1, 10)]:
        pipe.llen(key)
    return sum(pipe.execute())


def model_queue_depths(client: Any, settings: Settings) -> list[dict[str, Any]]:
    """The deployment's queues of every model that hold messages (a list exists in Redis only while
    it holds some), and the default model's even when empty: each as {"name", "model" (a registry
    name, or a folder's `folder-` route), "priority", "depth"}, by model, interactive first."""
    base = settings.queue
    names = set(worker_queues(base, model_key(settings.default_model)))
    for key in client.scan_iter(match=f"{base}.*", count=_CHUNK, _type="list"):
        name = (key.decode() if isinstance(key, bytes) else key).split(_PRIORITY_SEP)[0]
        route = name[len(base) + 1:].removesuffix(BULK_SUFFIX)
        if route in REGISTRY or route.startswith("folder-"):  # not another list under the base (webhooks')
            names.add(name)
    ordered = sorted(names, key=lambda name: (name.removesuffix(BULK_SUFFIX), name.endswith(BULK_SUFFIX)))
    return [{"name": name, "model": name[len(base) + 1:].removesuffix(BULK_SUFFIX),
             "priority": "bulk" if name.endswith(BULK_SUFFIX) else "interactive", "depth": queue_depth(client, name)}
            for name in ordered]


def take_turn(settings: Settings, what: str, seconds: float) -> bool:
    """True for one caller per `seconds` across every process of this deployment (its queue): so
    that of many workers' sweepers one reads a deep queue, not all of them."""
    client = redis_client(settings)
    try:
        return bool(client.set(f"sdqueue:{settings.queue}:turn:{what}", "1", nx=True, ex=max(1, round(seconds))))
    finally:
        client.close()


def announce_cancel(settings: Settings, job_id: str) -> None:
    """Tell running workers at once that `job_id` was cancelled (best effort: they also poll)."""
    if not uses_redis(settings):
        return
    client = redis_client(settings)
    try:
        client.publish(CANCEL_CHANNEL, job_id)
    finally:
        client.close()
