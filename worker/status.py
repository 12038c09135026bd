"""The worker's live status for `sdqueue top`, published from a thread of its own.

Every SDQUEUE_STATUS_INTERVAL seconds the reporter reads what the engine holds and runs and
publishes it to the registry (models/workers.py, which lists the fields). It reads the engine's
structures without its locks, copying them first: a race costs a display one stale or missing
entry, never a job anything. Publishing never raises.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from collections import deque
from typing import Any

from models.registry import model_key
from models.settings import Settings
from models.workers import WorkerRegistry

log = logging.getLogger(__name__)

# images/s is measured over this much of the recent past.
RATE_WINDOW = 60.0


class StatusReporter:
    def __init__(self, settings: Settings, engine: Any):  # engine: worker.engine.Engine
        self.settings = settings
        self.engine = engine
        self.registry = WorkerRegistry(settings)
        self.started_at = time.time()
        self._done: deque[tuple[float, int]] = deque([(time.monotonic(), engine.images_done)])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sdqueue-status", daemon=True)
        if self.registry.enabled:
            self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                self.registry.publish(self.status())
            except Exception:  # a display must never take the worker down
                log.debug("worker status not built", exc_info=True)
            if self._stop.wait(self.settings.status_interval):
                return

    def status(self) -> dict[str, Any]:
        engine, model = self.engine, self.engine.model
        return {
            "name": engine.hostname,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "model": model_key(self.settings.model),  # its key: what its queues are named by
            "device": model.device,
            "dtype": model.dtype_name,
            "batching": engine.batching,
            "queue": self.settings.queue,
            "started_at": self.started_at,
            "updated_at": time.time(),
            "held": len(engine.keeper.held()) if engine.keeper is not None else 0,
            "waiting": len(engine.batcher),
            **self._running(),
            "images_done": engine.images_done,
            "images_per_s": round(self._rate(), 3),
            "draining": engine.draining,
            "quarantined": engine.health.as_status(),
            "spool": self._spool(),
        }

    def _spool(self) -> dict[str, Any] | None:
        spool = self.engine.spool
        if spool is None:
            return None
        return {"bytes": spool.bytes, "max_bytes": spool.max_bytes, "free_bytes": spool.free_bytes,
                "disk_full": spool.disk_full}

    def _running(self) -> dict[str, list[dict[str, Any]]]:
        """The jobs denoising now, and the loops (or the window batch) they are in."""
        engine = self.engine
        running: list[dict[str, Any]] = []
        loops: list[dict[str, Any]] = []
        if engine.batching == "continuous":
            for _ in range(3):  # the GPU thread may change a dict being copied: copy again
                try:
                    groups = [list(members) for members in list(engine.loops.members.values())]
                    break
                except RuntimeError:
                    continue
            else:
                groups = []
            for members in groups:
                if not members:
                    continue
                key = members[0].work.key
                size = f"{key.width}x{key.height}"
                loops.append({"size": size, "jobs": len(members), "samples": sum(len(m.samples) for m in members)})
                for member in members:
                    if not member.samples:
                        continue
                    step, steps = _progress(member)
                    running.append({"job_id": member.work.job_id, "size": size, "images": len(member.work.samples),
                                    "step": step, "steps": steps, "loop": len(loops) - 1})
        else:
            batch = list(engine.on_gpu)
            if batch:
                key = batch[0].key
                size = f"{key.width}x{key.height}"
                loops.append({"size": size, "jobs": len(batch), "samples": sum(len(w.samples) for w in batch)})
                running = [{"job_id": w.job_id, "size": size, "images": len(w.samples), "step": None,
                            "steps": w.key.steps - w.key.start_step, "loop": 0} for w in batch]
        return {"running": running, "loops": loops}

    def _rate(self) -> float:
        """Images stored per second over the last RATE_WINDOW seconds (or since the start)."""
        now, done = time.monotonic(), self.engine.images_done
        self._done.append((now, done))
        while len(self._done) > 2 and now - self._done[1][0] >= RATE_WINDOW:
            self._done.popleft()
        then, before = self._done[0]
        return (done - before) / (now - then) if now > then else 0.0

    def stop(self) -> None:
        """Stop publishing and remove this worker's status (a clean shutdown)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.settings.status_interval + 10)
        self.registry.forget(self.engine.hostname)
        self.registry.close()


def _progress(member: Any) -> tuple[int, int]:
    """(steps done, steps) of a job in a loop, counted as the job's progress events count them."""
    first = member.samples[0]
    order = getattr(first.scheduler, "order", 1)
    return math.ceil(first.calls / order), math.ceil(len(first.timesteps) / order)
