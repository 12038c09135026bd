"""A job's live events: its state changes and its denoising progress, through Redis pub/sub.

Only hints, like the broker's messages: the job row says what happened. A follower (the API's
event stream, `sdqueue wait`, `Client.wait`) subscribes first, then reads the row, then takes
events as they come, and reads the row again at the end (or when no event came for a while), so a
missed event costs a little latency, never a wrong answer. Publishing is cheap: PUBLISH on a
connection kept open (a worker's events, from its relay thread, pipelined: what waits goes in one
round trip), and progress at most every SDQUEUE_PROGRESS_INTERVAL seconds per job.

Each event is a JSON object with `type` ("state" or "progress"), `job_id` and `at` (Unix time):
    {"type": "state", "job_id": ..., "state": "running", "at": ...}
    {"type": "progress", "job_id": ..., "step": 7, "steps": 25, "at": ...}
"""

from __future__ import annotations

import json
import logging
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

from models.settings import Settings

log = logging.getLogger(__name__)


def channel(job_id: str) -> str:
    """The pub/sub channel of a job's events (job ids are UUIDs: unique across deployments)."""
    return f"sdqueue:job:{job_id}"


def _redis(settings: Settings) -> Any:
    import redis

    return redis.Redis.from_url(settings.broker_url, socket_timeout=5, socket_connect_timeout=5)


class Publisher:
    """Publishes job events on one connection; progress throttled per job. Never raises: an event
    that cannot be published is only a hint lost."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.enabled = settings.broker_url.startswith(("redis://", "rediss://"))
        self._redis: Any = _redis(settings) if self.enabled else None
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()
        self._local = threading.local()  # .batch: the events `batched` gathers in this thread

    def state(self, job_id: str, state: str) -> None:
        self._last.pop(job_id, None)
        self._publish(job_id, {"type": "state", "job_id": job_id, "state": state, "at": time.time()})

    def progress(self, job_id: str, step: int, steps: int) -> None:
        """Step `step` of `steps` done; published if the job's last progress event is old enough
        (the last step always is)."""
        if self.progress_due(job_id, step, steps):
            self.send_progress(job_id, step, steps)

    def progress_due(self, job_id: str, step: int, steps: int) -> bool:
        """Whether step `step` of `steps` is worth an event (the job's last one is old enough, or it
        is the last step); if so, it counts as sent from now."""
        now = time.monotonic()
        with self._lock:
            if step < steps and now - self._last.get(job_id, float("-inf")) < self.settings.progress_interval:
                return False
            self._last[job_id] = now
        return True

    def send_progress(self, job_id: str, step: int, steps: int) -> None:
        """The event of a step `progress_due` said was due."""
        self._publish(job_id, {"type": "progress", "job_id": job_id, "step": step, "steps": steps, "at": time.time()})

    @contextmanager
    def batched(self) -> Iterator[None]:
        """What this thread publishes inside goes out at the end, in one round trip (a pipeline)."""
        self._local.batch = []
        try:
            yield
        finally:
            events, self._local.batch = self._local.batch, None
            if events and self.enabled:
                try:
                    pipe = self._redis.pipeline(transaction=False)
                    for name, payload in events:
                        pipe.publish(name, payload)
                    pipe.execute()
                except Exception as exc:  # the broker is down: followers read the rows instead
                    log.debug("%d event(s) not published: %s", len(events), exc)

    def _publish(self, job_id: str, event: dict[str, Any]) -> None:
        if not self.enabled:
            return
        batch = getattr(self._local, "batch", None)
        if batch is not None:
            batch.append((channel(job_id), json.dumps(event)))
            return
        try:
            self._redis.publish(channel(job_id), json.dumps(event))
        except Exception as exc:  # the broker is down: followers read the row instead
            log.debug("event of job %s not published: %s", job_id, exc)

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()


def publish_state(settings: Settings, job_ids: Iterable[str], state: str) -> None:
    """One-off state events (a producer's cancel): a connection for the call."""
    publisher = Publisher(settings)
    try:
        for job_id in job_ids:
            publisher.state(job_id, state)
    finally:
        publisher.close()


class Subscription:
    """The events of some jobs, from the moment it is made: `get(timeout)` gives the next one, or
    None after `timeout` seconds without one."""

    def __init__(self, settings: Settings, job_ids: Iterable[str]):
        self._redis = _redis(settings)
        self._pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        self._pubsub.subscribe(*(channel(job_id) for job_id in job_ids))

    def get(self, timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            message = self._pubsub.get_message(timeout=left)
            if message is None:
                continue
            try:
                return json.loads(message["data"])
            except (ValueError, TypeError):
                continue

    def close(self) -> None:
        try:
            self._pubsub.close()
        finally:
            self._redis.close()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
