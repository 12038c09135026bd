"""The live registry of workers, in Redis: what each one runs, for `sdqueue top`.

Each worker publishes its status, a JSON object, every SDQUEUE_STATUS_INTERVAL seconds under
`sdqueue:{queue}:worker:{name}`, which lives three intervals unless published again, and names
itself in the sorted set `sdqueue:{queue}:workers` (score: when it last published). A worker that
stops cleanly removes both (`forget`); a killed one's status expires, and its name is pruned from
the set by the next reader. Keys carry the deployment's queue, like the broker's other keys of a
deployment (models/broker.py `take_turn`): deployments that share a broker see only their own.

Only a display: publishing never raises (a broker outage must not touch a worker's jobs), and the
job rows say what really happened. A status holds:

    name          the worker's name, unique per process (also the owner of its leases)
    host, pid     where it runs
    model, device, dtype, batching
    queue         its base queue (it consumes QUEUE and QUEUE.bulk)
    started_at, updated_at   Unix times
    held          jobs it holds (claimed, until they end)
    waiting       held jobs not yet in a denoising loop or batch
    running       [{"job_id", "size": "WxH", "images", "step", "steps", "loop"}]: jobs denoising
                  now (step is None under window batching; loop: its index in `loops`)
    loops         [{"size": "WxH", "jobs", "samples"}]: its continuous loops (one per size and
                  prompt length), or the batch on the GPU under window batching
    images_done   images stored and recorded since it started
    images_per_s  over the last minute (or since it started, if that is less)
    draining      shutting down: it takes no new job
    quarantined   None, or why it takes no work: {"reason", "since" (Unix time), "probes" (failed so
                  far), "next_probe" (Unix time)}: it saw a fault of its host, gave back its jobs,
                  and takes work again once a short known job (the probe) passes
    spool         {"bytes", "max_bytes", "free_bytes", "disk_full"}: images waiting for the object
                  store, and the free space of the spool's disk (disk_full: no new batch starts)
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from models.broker import redis_client, uses_redis
from models.settings import Settings

log = logging.getLogger(__name__)

# A status lives this many publishing intervals: a worker that missed two is still shown.
TTL_INTERVALS = 3

# The status, its name in the set, and the set kept as long as its longest-lived member (a
# worker publishing a short time to live never cuts another's short).
_PUBLISH = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end
"""


def status_key(settings: Settings, name: str) -> str:
    return f"sdqueue:{settings.queue}:worker:{name}"


def registry_key(settings: Settings) -> str:
    return f"sdqueue:{settings.queue}:workers"


def status_ttl(settings: Settings) -> float:
    return TTL_INTERVALS * settings.status_interval


class WorkerRegistry:
    """The registry on one connection (a worker publishes through one for its whole life)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.enabled = uses_redis(settings)  # memory:// (the demo): nobody could read it
        self._redis: Any = redis_client(settings) if self.enabled else None
        self._publish: Any = self._redis.register_script(_PUBLISH) if self.enabled else None

    def publish(self, status: dict[str, Any], ttl: float | None = None) -> bool:
        """Store `status` (its `name` names it) for `ttl` seconds [three status intervals].
        Never raises: False when the broker could not take it."""
        if not self.enabled:
            return False
        ttl_ms = max(1, round(1000 * (status_ttl(self.settings) if ttl is None else ttl)))
        name = status["name"]
        try:
            # Atomic: a listed name always has its status. The score is when the status expires.
            self._publish(keys=[status_key(self.settings, name), registry_key(self.settings)],
                          args=[json.dumps(status), ttl_ms, time.time() + ttl_ms / 1000, name])
            return True
        except Exception as exc:
            log.debug("worker status of %s not published: %s", name, exc)
            return False

    def forget(self, name: str) -> None:
        """Remove a worker's status (it stops cleanly). Never raises: a status left expires."""
        if not self.enabled:
            return
        try:
            pipe = self._redis.pipeline(transaction=True)
            pipe.delete(status_key(self.settings, name))
            pipe.zrem(registry_key(self.settings), name)
            pipe.execute()
        except Exception as exc:
            log.debug("worker status of %s not removed: %s", name, exc)

    def workers(self) -> list[dict[str, Any]]:
        """Every live worker's status, by name. Raises the broker's error when it is unreachable."""
        if not self.enabled:
            return []
        key = registry_key(self.settings)
        # Scores are expiry times: names whose status has expired (killed workers) are pruned.
        # A worker publishing meanwhile scores itself in the future, so it is never pruned.
        self._redis.zremrangebyscore(key, "-inf", time.time())
        names = [n.decode() if isinstance(n, bytes) else n for n in self._redis.zrange(key, 0, -1)]
        if not names:
            return []
        found = []
        for raw in self._redis.mget([status_key(self.settings, name) for name in names]):
            if raw is None:
                continue  # expired, or forgotten, since the names were read
            try:
                found.append(json.loads(raw))
            except ValueError:
                continue
        return sorted(found, key=lambda status: str(status.get("name")))

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()


def publish_status(settings: Settings, status: dict[str, Any], ttl: float | None = None) -> bool:
    """One-off publish on a connection of its own; never raises."""
    try:
        registry = WorkerRegistry(settings)
    except Exception as exc:
        log.debug("worker status not published: %s", exc)
        return False
    try:
        return registry.publish(status, ttl)
    finally:
        registry.close()


def list_workers(settings: Settings) -> list[dict[str, Any]]:
    """The live workers of this deployment (its queue), sorted by name."""
    registry = WorkerRegistry(settings)
    try:
        return registry.workers()
    finally:
        registry.close()


def live_worker_names(settings: Settings) -> set[str]:
    """The names (lease owners) of the workers whose status is fresh in the registry; empty with the
    in-process broker, which has none. Raises the broker's error when it cannot be read."""
    if not uses_redis(settings):
        return set()
    return {str(status["name"]) for status in list_workers(settings) if status.get("name")}


def healthy_workers(settings: Settings) -> int:
    """How many live workers of this deployment are not quarantined (at least 1: the asker, or
    whoever will run the job next). 1 with the in-process broker, or when the registry cannot be
    read: one host's faults are then judged as if it were alone."""
    if not uses_redis(settings):
        return 1
    try:
        statuses = list_workers(settings)
    except Exception as exc:
        log.debug("worker registry not read: %s", exc)
        return 1
    return max(1, sum(1 for status in statuses if not status.get("quarantined")))


def forget(settings: Settings, name: str) -> None:
    registry = WorkerRegistry(settings)
    try:
        registry.forget(name)
    finally:
        registry.close()
