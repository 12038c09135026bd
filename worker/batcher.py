"""Which jobs run together: grouping by compatibility key under a pixel budget; interactive jobs
first, then the oldest, and bulk jobs never starve.

Pure bookkeeping, no torch: the engine puts each claimed job here and asks for the next batch.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

from models.logs import about
from models.tables import Priority
from worker.samples import CompatKey, Sample


@dataclass(eq=False)
class Work:
    """One claimed job waiting for its batch; `future` resolves to its final state."""

    job_id: str
    key: CompatKey
    samples: list[Sample]
    created_at: float  # the job's creation time: the oldest job's group goes first
    priority: str = Priority.INTERACTIVE.value  # models.tables.Priority: interactive work goes before bulk
    params: dict[str, Any] = field(default_factory=dict)  # the job's request, for the image records
    input_sha256: str | None = None
    arrived: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)
    # Set by the engine before planning: samples whose conditioning lengths differ cannot share
    # a loop, so the group is (key, tokens).
    tokens: int | None = None
    conditioning: list[Any] | None = None
    lease: Any = None  # models.jobs.Lease of the claim that holds the job
    seed: int = 0
    input_key: str | None = None
    mask_key: str | None = None  # inpainting: its mask in storage, and the mask's digest
    mask_sha256: str | None = None
    depth_key: str | None = None  # depth-to-image: the caller's depth map in storage, and its digest
    depth_sha256: str | None = None
    run_id: str | None = None  # the run it belongs to, and its name, for the logs
    run_name: str | None = None
    # Its worker died while it shared the GPU: it runs with the other suspects of its group
    # (`suspect_group`) and nothing else in the process, so that if it is what kills workers it
    # is found without charging its batch mates (each death of a group splits it in halves).
    alone: bool = False
    suspect_group: str | None = None
    # A continuous loop it was in failed: it runs in a loop of its own (no database mark), so that
    # only the job that fails again is charged.
    isolated: bool = False

    @property
    def label(self) -> str:
        """The job as a log line's text names it: with its run's name when it is in one."""
        return f"job {self.job_id} (run {self.run_name})" if self.run_name else f"job {self.job_id}"

    def about(self, batch_id: str | None = None) -> dict[str, str]:
        """What a log line about this job names (models/logs.py): the job, its run, the batch."""
        return about(self.job_id, self.run_id, batch_id, run_name=self.run_name)

    @property
    def suspects(self) -> str | None:
        """The suspect group it runs with (None: not a suspect)."""
        return (self.suspect_group or self.job_id) if self.alone else None

    @property
    def group(self) -> Hashable:
        return (self.key, self.tokens, "suspects", self.suspects) if self.alone else (self.key, self.tokens)

    @property
    def pixels(self) -> int:
        return len(self.samples) * self.key.pixels

    @property
    def bulk(self) -> bool:
        return self.priority == Priority.BULK.value


def loop_group(work: Work) -> Hashable:
    """The continuous loop a job joins: its size and conditioning length (steps, strength and
    guidance may differ), or a loop of its own when it must run alone."""
    shape = (work.key.width, work.key.height, work.tokens)
    if work.isolated:
        return (*shape, work.job_id)
    return (*shape, "suspects", work.suspects) if work.alone else shape


class PixelBudget:
    """How many pixels one batch may hold: a default, shrunk per shape after out-of-memory."""

    def __init__(self, default: int):
        self.default = default
        self._shrunk: dict[tuple[int, int], int] = {}

    def for_key(self, key: CompatKey) -> int:
        return min(self.default, self._shrunk.get((key.width, key.height), self.default))

    def shrink(self, key: CompatKey, pixels: int) -> None:
        """A batch of `pixels` did not fit: allow at most that minus one sample from now on."""
        limit = max(key.pixels, pixels - key.pixels)
        self._shrunk[(key.width, key.height)] = min(limit, self.for_key(key))


def plan_batch(
    pending: list[Work], budget: PixelBudget, window: float, now: float, *, by_age: bool = False
) -> tuple[list[Work], float]:
    """The next batch from `pending`, or ([], seconds to wait) while its window is still open.

    The group of the oldest interactive job goes first (of the oldest bulk job when there is no
    interactive one); it fills with its interactive jobs, then its bulk ones, each in age order, up
    to the pixel budget (a job larger than the budget runs alone). `by_age` forgets priorities:
    the oldest job's group goes first and fills in age order (the turn that bulk work is owed).
    An unfilled batch waits for more compatible jobs until `window` seconds after the job that
    leads it arrived.
    """
    ready = [w for w in pending if w.tokens is not None]
    if not ready:
        return [], float("inf")  # nothing to wait for but new work
    if by_age:
        ready.sort(key=lambda w: (w.created_at, w.arrived))
    else:
        ready.sort(key=lambda w: (w.bulk, w.created_at, w.arrived))
    leader = ready[0]
    limit = budget.for_key(leader.key)
    batch, used, full = [], 0, False
    for work in (w for w in ready if w.group == leader.group):
        if batch and used + work.pixels > limit:
            full = True
            break
        batch.append(work)
        used += work.pixels
    full = full or used >= limit
    wait = leader.arrived + window - now
    if not full and wait > 0:
        return [], wait
    return batch, 0.0


class Batcher:
    """A thread-safe pending list: task threads put work, the GPU thread takes batches.

    Interactive work goes first, but while bulk work waits, at most `bulk_share - 1` batches in a
    row are led by interactive work: the next one is planned by age alone, so a flood of
    interactive jobs leaves bulk jobs at least one batch in `bulk_share`.
    """

    def __init__(self, budget: PixelBudget, window: float, bulk_share: int = 4):
        if bulk_share < 1:
            raise ValueError(f"bulk_share={bulk_share!r}: must be at least 1")
        self.budget = budget
        self.window = window
        self.bulk_share = bulk_share  # SDQUEUE_BULK_SHARE (4 is its default)
        self._pending: list[Work] = []
        self._ahead_of_bulk = 0  # batches in a row led by interactive work while bulk work waited
        self._changed = threading.Condition()

    def put(self, work: Work) -> Future:
        with self._changed:
            self._pending.append(work)
            self._changed.notify_all()
        return work.future

    def unprepared(self) -> list[Work]:
        with self._changed:
            return [w for w in self._pending if w.tokens is None]

    def remove(self, job_ids: set[str]) -> list[Work]:
        """Take the waiting work of `job_ids` out (cancelled, lost, given back); returns it."""
        with self._changed:
            gone = [w for w in self._pending if w.job_id in job_ids]
            self._pending = [w for w in self._pending if w.job_id not in job_ids]
            return gone

    def remove_claims(self, leases: set[Any]) -> list[Work]:
        """Take out the waiting work of these claims (models.jobs.Lease): lost, whatever other claim
        of the same job may wait here too."""
        with self._changed:
            gone = [w for w in self._pending if w.lease in leases]
            self._pending = [w for w in self._pending if w.lease not in leases]
            return gone

    def take(self, stop: threading.Event, timeout: float = 1.0) -> list[Work]:
        """The next batch, or [] after `timeout` (or on stop) so the caller can prepare new work."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not stop.is_set():
                now = time.monotonic()
                if any(w.tokens is None for w in self._pending):
                    return []  # the caller prepares these first
                bulk_waits, by_age = self._turn(self._pending)
                batch, wait = plan_batch(self._pending, self.budget, self.window, now, by_age=by_age)
                if batch:
                    return self._hand_out(batch, bulk_waits, by_age)
                if now >= deadline:
                    return []
                self._changed.wait(min(wait, deadline - now))
        return []

    def _turn(self, pending: list[Work]) -> tuple[bool, bool]:
        """(does bulk work wait, is it the turn that bulk work is owed: plan by age alone)."""
        bulk_waits = any(w.bulk for w in pending)
        return bulk_waits, bulk_waits and self._ahead_of_bulk >= self.bulk_share - 1

    def _hand_out(self, works: list[Work], bulk_waits: bool, by_age: bool) -> list[Work]:
        """Take `works` out of the pending list, counting interactive-led turns while bulk waits."""
        for work in works:
            self._pending.remove(work)
        ahead = bulk_waits and not by_age and not works[0].bulk
        self._ahead_of_bulk = self._ahead_of_bulk + 1 if ahead else 0
        return works

    def admit(self, room: Callable[[Work], tuple[int, int]], wait: float = 0.0,
              stop: threading.Event | None = None, running: int = 0, solo: str | None = None) -> list[Work]:
        """Continuous batching: the waiting prepared jobs that fit in their loops now, in priority
        order (interactive, then by age, with the bulk share kept as `take` keeps it). `room(work)`
        is (pixels in the loop it would join, that loop's budget); an empty loop takes any one job.
        Within a loop no job overtakes an older one that does not fit. With nothing to admit, waits
        up to `wait` seconds for new work (an idle worker starts a job the moment it arrives).
        Suspects (`Work.alone`: their worker died while they shared it) run with their suspect group
        and nothing else in the process: `running` jobs in the loops now, `solo` the group that runs
        (None: no suspects run). Once a suspect leads the order, nothing more is admitted until the
        loops are empty, so it cannot starve; then its whole group comes in.
        """
        deadline = time.monotonic() + wait
        with self._changed:
            while True:
                ready = [w for w in self._pending if w.tokens is not None]
                bulk_waits, by_age = self._turn(ready)
                ready.sort(key=(lambda w: (w.created_at, w.arrived)) if by_age
                           else (lambda w: (w.bulk, w.created_at, w.arrived)))
                admitted: list[Work] = []
                used: dict[Hashable, int] = {}
                blocked: set[Hashable] = set()
                leads_alone = bool(ready) and ready[0].alone
                if solo is not None:  # more of the group that runs, nothing else
                    ready = [w for w in ready if w.suspects == solo]
                elif leads_alone and running:
                    ready = []  # the loops drain first
                elif leads_alone:
                    ready = [w for w in ready if w.suspects == ready[0].suspects]
                else:  # one not first in line waits until it leads
                    ready = [w for w in ready if not w.alone]
                for work in ready:
                    group = loop_group(work)
                    if group in blocked:
                        continue
                    if group not in used:
                        used[group], limit = room(work)
                    else:
                        limit = room(work)[1]
                    if used[group] and used[group] + work.pixels > limit:
                        blocked.add(group)
                        continue
                    used[group] += work.pixels
                    admitted.append(work)
                if admitted:
                    return self._hand_out(admitted, bulk_waits, by_age)
                left = deadline - time.monotonic()
                if left <= 0 or (stop is not None and stop.is_set()) or any(w.tokens is None for w in self._pending):
                    return []
                self._changed.wait(left)

    def __len__(self) -> int:
        with self._changed:
            return len(self._pending)
