"""Job events (models/events.py) published from a thread of their own, so that a broker that is
slow or away never holds a denoising step."""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable

from models.events import Publisher


# Events sent in one round trip at most.
BATCH = 256
# How long the relay lets events gather after the first before it sends them: they are hints, and
# a loop's steps come faster than round trips.
GATHER = 0.01


class EventRelay:
    """Publishes the jobs' events (models/events.py) from a thread of its own: the GPU thread only
    queues them, so a broker that is slow or away never holds a denoising step. One queue keeps a
    job's events in order (running, progress, its end); beyond `capacity` waiting, events are
    dropped: they are hints, and followers read the job's row."""

    def __init__(self, publisher: Publisher, capacity: int = 10_000):
        self.publisher = publisher
        self._queue: queue.Queue[tuple[Callable[..., None], tuple[Any, ...]] | None] = queue.Queue(capacity)
        self._thread = threading.Thread(target=self._run, name="sdqueue-events", daemon=True)
        self._thread.start()

    def state(self, job_id: str, state: str) -> None:
        self._put(self.publisher.state, (job_id, state))

    def progress(self, step: int, steps: int, job_ids: list[str]) -> None:
        """A step of `job_ids`: queued only for those whose event is due (the publisher throttles
        each job's progress; a dict look-up here, not a queue entry per job per step)."""
        due = [job_id for job_id in job_ids if self.publisher.progress_due(job_id, step, steps)]
        if due:
            self._put(self._progress, (step, steps, due))

    def _progress(self, step: int, steps: int, job_ids: list[str]) -> None:
        for job_id in job_ids:
            self.publisher.send_progress(job_id, step, steps)

    def _put(self, publish: Callable[..., None], args: tuple[Any, ...]) -> None:
        try:
            self._queue.put_nowait((publish, args))
        except queue.Full:
            pass

    def _run(self) -> None:
        """Each time, every event waiting (up to BATCH) in one round trip to the broker."""
        while True:
            items = [self._queue.get()]
            if items[-1] is not None:
                time.sleep(GATHER)
            while items[-1] is not None and len(items) < BATCH:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            with self.publisher.batched():
                for item in items:
                    if item is not None:
                        publish, args = item
                        publish(*args)  # never raises
            if items[-1] is None:
                return

    def close(self, timeout: float = 5.0) -> None:
        """Publish what is queued (for at most `timeout` seconds), then close the connection."""
        deadline = time.monotonic() + timeout
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(max(0.0, deadline - time.monotonic()))
        self.publisher.close()
