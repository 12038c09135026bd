"""Quarantine: a worker that its host lets down stops taking work until a probe passes.

A worker enters quarantine when it sees a fault of its host (worker/blame.py), or when it failed
`streak` different jobs in a row with the same error while other workers succeed with jobs like
them (then the error is the host's, whatever it looks like). In quarantine it gives back what it
holds, uncharged, takes no job, says so in the worker registry (`sdqueue top`, the dashboard) and
in its metrics, logs why once, and probes itself: a short known job, first after
`probe_interval` seconds, then at twice the interval after each failure, up to `max_interval`.
A probe that passes ends the quarantine. With SDQUEUE_QUARANTINE_EXIT set, the worker exits with
that status instead of probing, so that its orchestrator restarts or replaces it.

The bookkeeping (`Health`) needs no torch; `probe` runs a short job through the worker's model.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

# The probe: a known prompt, the smallest size, two steps (the model's own sizes bound it).
PROBE_PROMPT = "a lighthouse on a cliff, (probe)"
PROBE_SIZE = 256


@dataclass
class Quarantine:
    reason: str
    features: dict[str, Any]  # what the probe exercises: the failing job's mode, compel, size
    since: float = field(default_factory=time.time)
    probes: int = 0  # failed so far
    interval: float = 0.0
    next_probe: float = 0.0  # time.monotonic()

    def as_status(self) -> dict[str, Any]:
        return {"reason": self.reason, "since": self.since, "probes": self.probes,
                "next_probe": time.time() + max(0.0, self.next_probe - time.monotonic())}


class Health:
    def __init__(self, streak: int = 3, probe_interval: float = 30.0, max_interval: float = 600.0):
        self.streak = streak
        self.probe_interval = probe_interval
        self.max_interval = max_interval
        self.state: Quarantine | None = None
        self._failures: list[tuple[str, str]] = []  # (job_id, error signature), the latest run of them
        self._lock = threading.Lock()

    @property
    def quarantined(self) -> bool:
        return self.state is not None

    def enter(self, reason: str, features: dict[str, Any] | None = None) -> bool:
        """Quarantine the worker; False when it already is (the first reason stands)."""
        with self._lock:
            if self.state is not None:
                return False
            self.state = Quarantine(reason, dict(features or {}), interval=self.probe_interval,
                                    next_probe=time.monotonic() + self.probe_interval)
            self._failures.clear()
            return True

    def failed(self, job_id: str, signature: str) -> list[str]:
        """A job failed here with an error of `signature`; returns the different jobs that failed in
        a row with that same error, this one included (a job failing again counts once)."""
        with self._lock:
            if self._failures and self._failures[-1][1] != signature:
                self._failures.clear()
            if job_id not in (j for j, _ in self._failures):
                self._failures.append((job_id, signature))
            return [j for j, _ in self._failures]

    def succeeded(self) -> None:
        """A job succeeded here: a run of failures is broken."""
        with self._lock:
            self._failures.clear()

    def probe_due(self) -> bool:
        state = self.state
        return state is not None and time.monotonic() >= state.next_probe

    def probe_failed(self) -> float:
        """The probe failed: the next one waits twice as long (up to max_interval); returns that wait."""
        with self._lock:
            state = self.state
            if state is None:
                return 0.0
            state.probes += 1
            state.interval = min(self.max_interval, state.interval * 2)
            state.next_probe = time.monotonic() + state.interval
            return state.interval

    def leave(self) -> Quarantine | None:
        with self._lock:
            state, self.state = self.state, None
            self._failures.clear()
            return state

    def as_status(self) -> dict[str, Any] | None:
        state = self.state
        return state.as_status() if state is not None else None


def probe(model: Any, generate: Callable[..., list[Any]], features: dict[str, Any]) -> None:
    """Run a short known job with the features of the one that failed (compel, img2img, a negative
    prompt) through `generate` (the engine's, with its out-of-memory handling) on `model`, with a
    text-conditioning cache of its own and no record. Raises when this host still cannot run it,
    or when its image is not finite."""
    import numpy as np
    from PIL import Image

    from worker.samples import ConditioningCache, compat_key, job_samples

    size = min(PROBE_SIZE, model.spec.native_size)
    params = {"prompt": PROBE_PROMPT, "negative_prompt": "blurry" if features.get("negative") else "",
              "num_images": 1, "num_inference_steps": 2, "guidance_scale": 7.5, "width": size, "height": size,
              "use_compel": bool(features.get("use_compel")), "strength": 0.5}
    # The failed job's mode; an inpainting, upscaler or depth model runs its own (the only one it
    # has; depth with its map estimated, what every depth job runs unless it brings its own).
    mode = features.get("mode")
    modes = model.spec.modes
    mode = mode if mode in modes else modes[0]
    init = mask = None
    if mode in ("img2img", "inpaint", "depth"):
        init = Image.new("RGB", (size, size), (90, 120, 160))
    if mode == "inpaint":
        mask = Image.new("L", (size, size), 255)
    if mode == "upscale":
        params["noise_level"] = 20
        init = Image.new("RGB", (size // 4, size // 4), (90, 120, 160))
    samples = job_samples("probe", params, 0, init, mask, depth=mode == "depth")
    conditioning = ConditioningCache(model).get([s.prompt for s in samples])
    for result in generate(compat_key(params, img2img=init is not None, inpaint=mask is not None,
                                      depth=mode == "depth"), samples, conditioning):
        if isinstance(result, BaseException):
            raise result
        if not np.isfinite(np.asarray(result, dtype=np.float32)).all():
            raise RuntimeError("the probe's image is not finite")
