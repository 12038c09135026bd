"""Many continuous loops in one worker: admission under the pixel budget, and which loop steps next.

Each loop (worker/loop.py's ContinuousLoop for the diffusers pipeline, worker/standin.py's for the
stand-in GPU) holds the samples of one size and one text-conditioning length and makes one model
call per `step()`. `Loops` decides which jobs join which loop and which loop steps next; it is pure
bookkeeping, without torch, and the same whatever the model.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Hashable, Iterable

import numpy as np

from models.tables import utcnow
from worker.batcher import PixelBudget, Work, loop_group
from worker.samples import Conditioning, Sample, StepDone, UnetCall, is_out_of_memory

if TYPE_CHECKING:
    from worker.backend import Model

log = logging.getLogger(__name__)


@dataclass(eq=False)
class LoopSample:
    """One sample in the loop and its own place in its own schedule."""

    sample: Sample
    conditioning: Conditioning
    steps: int  # the num_inference_steps it was asked for
    strength: float | None  # img2img only
    scheduler: Any = field(repr=False)  # its own copy: timesteps set, begin index set for img2img
    timesteps: Any = field(repr=False)  # the timesteps it runs (img2img: from its start step): a tensor, or a range
    first_index: int  # the scheduler's step index at its first timestep
    latents: Any = field(repr=False)  # [1, C, h, w] (the stand-in's: None)
    # What the UNet takes beside the latents at every step, travelling with the sample whichever
    # loop step it is in: inpainting's mask and masked image's latents ([1, 5, h, w]), the
    # upscaler's noised input ([1, 3, h, w]), a depth map ([1, 1, h, w]).
    extra: Any = field(default=None, repr=False)
    # The x4 upscaler: its noise level, the UNet's class label ([1], long), beside `extra` (its
    # noised low-resolution image, [1, 3, h, w]).
    class_label: Any = field(default=None, repr=False)
    calls: int = 0  # model calls done so far
    shared_max: int = 0  # the most samples (itself included) of a model call it was in
    shared_total: int = 0  # the sum over its calls of the samples in each: shared_total / calls is the mean

    @property
    def job_id(self) -> str:
        return self.sample.job_id

    @property
    def done(self) -> bool:
        return self.calls >= len(self.timesteps)

    @property
    def t(self) -> Any:
        return self.timesteps[self.calls]

    @property
    def guided(self) -> bool:
        return self.sample.guidance_scale > 1.0



class SampleSet:
    """What every continuous loop keeps of its samples, whatever denoises them: the active ones,
    dropped between steps, and each one's count of calls once a step is made."""

    def __init__(self) -> None:
        self.active: list[LoopSample] = []

    def __len__(self) -> int:
        return len(self.active)

    def drop(self, job_ids: Iterable[str]) -> list[LoopSample]:
        """Remove the samples of `job_ids` (cancelled, lost); the others carry on unchanged."""
        gone = set(job_ids)
        return self.drop_samples(s for s in self.active if s.job_id in gone)

    def drop_samples(self, samples: Iterable[LoopSample]) -> list[LoopSample]:
        """Remove these samples (one claim's: a job claimed again may have another in the loop)."""
        gone = {id(s) for s in samples}
        dropped = [s for s in self.active if id(s) in gone]
        self.active = [s for s in self.active if id(s) not in gone]
        return dropped

    def stepped(self, active: list[LoopSample]) -> list[LoopSample]:
        """After one model call over `active`: each counts it and who shared it; those whose
        schedule ended leave, and are returned."""
        for s in active:
            s.calls += 1
            s.shared_max = max(s.shared_max, len(active))
            s.shared_total += len(active)
        finished = [s for s in active if s.done]
        self.active = [s for s in active if not s.done]
        return finished


@dataclass(eq=False)
class Member:
    """A job in a loop: its samples finish together (one schedule for all of a job's images)."""

    work: Work
    samples: list[LoopSample]
    admitted: float = field(default_factory=time.perf_counter)
    started_at: Any = field(default_factory=utcnow)


# A finished job (its Member: work, when it joined), its images in sample order (arrays, or a
# JobError per failed image), and per image what it shared: (steps run, most samples in one call,
# mean samples per call).
Finished = tuple[Member, list[Any], list[tuple[int, int, float]]]


class LoopFailed(Exception):
    """A model call failed for a loop's members (not out of memory): `members` are out of it."""

    def __init__(self, members: list[Member], cause: BaseException):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.members = members
        self.cause = cause


class Loops:
    """The worker's continuous loops, one per (width, height, conditioning length), plus a loop of
    its own for a job that must run alone (`Work.alone`, `Work.isolated`).

    Admission (`admit`): a job joins its loop when the loop's pixels plus its own fit the budget
    for that size (an empty loop takes any one job). Each `step()` runs one UNet call on one loop:
    the loop holding the interactive job that has waited longest since its creation (the oldest
    job when only bulk work runs), except that while a bulk-only loop waits, every `bulk_share`-th
    step goes to the loop of the oldest job whatever its priority. So a size never starves: a
    newer job of another size never overtakes an older one for long, as its loop only steps while
    it holds the oldest job.
    """

    def __init__(self, model: Model, budget: PixelBudget, unet_call: UnetCall | None = None,
                 bulk_share: int = 4):
        self.model = model
        self.budget = budget
        self.unet_call = unet_call
        self.bulk_share = bulk_share
        self.loops: dict[Hashable, Any] = {}  # the model's loops (worker.loop.ContinuousLoop)
        self.members: dict[Hashable, list[Member]] = {}
        self._ahead_of_bulk = 0
        # The last step's UNet call: (samples in it, seconds); None when it failed (the metrics).
        self.last_call: tuple[int, float] | None = None

    group = staticmethod(loop_group)

    def __len__(self) -> int:
        return sum(len(m) for m in self.members.values())

    @property
    def solo(self) -> str | None:
        """The suspect group in the loops (suspected of killing their worker, they run with nothing
        else), or None."""
        return next((m.work.suspects for ms in self.members.values() for m in ms if m.work.alone), None)

    def room(self, work: Work) -> tuple[int, int]:
        """(pixels in the loop `work` would join, the budget of its size)."""
        used = sum(m.work.pixels for m in self.members.get(self.group(work), []))
        return used, self.budget.for_key(work.key)

    # -- joining and leaving ------------------------------------------------------------------

    def admit(self, work: Work) -> Finished | None:
        """Put a prepared job into its loop from the next step. An img2img (or depth) job of strength
        0 runs no step: its images are its input, returned at once (as diffusers' img2img returns them)."""
        key = work.key
        if key.mode in ("img2img", "depth") and key.start_step >= key.steps:
            images = [np.asarray(s.init_image.convert("RGB")) for s in work.samples]
            return Member(work, []), images, [(0, 0, 0.0)] * len(images)
        group = self.group(work)
        loop = self.loops.get(group)
        if loop is None:
            loop = self.loops[group] = self.model.new_loop(key.width, key.height, work.tokens, self.unet_call)
            self.members[group] = []
        strength = work.params.get("strength") if key.mode in ("img2img", "inpaint", "depth") else None  # upscale: None
        try:
            samples = loop.admit(work.samples, work.conditioning or [], key.steps, strength)
        except Exception:
            self._forget_if_empty(group)
            raise
        self.members[group].append(Member(work, samples))
        return None

    def drop(self, which: Callable[[Work], bool]) -> list[Work]:
        """Take the jobs `which` picks out of their loops (cancelled, lost, given back)."""
        gone: list[Work] = []
        for group, members in list(self.members.items()):
            leaving = [m for m in members if which(m.work)]
            if leaving:
                self.loops[group].drop_samples(s for m in leaving for s in m.samples)
                self.members[group] = [m for m in members if m not in leaving]
                gone += [m.work for m in leaving]
                self._forget_if_empty(group)
        return gone

    def _forget_if_empty(self, group: Hashable) -> None:
        if not self.members[group]:
            del self.members[group], self.loops[group]

    # -- stepping -------------------------------------------------------------------------------

    def next_group(self) -> Hashable | None:
        def oldest(members: list[Member], interactive_first: bool) -> tuple[Any, ...]:
            if interactive_first:
                return min((m.work.bulk, m.work.created_at, m.work.arrived) for m in members)
            return min((m.work.created_at, m.work.arrived) for m in members)

        if not self.members:
            return None
        bulk_waits = any(all(m.work.bulk for m in ms) for ms in self.members.values())
        by_age = bulk_waits and self._ahead_of_bulk >= self.bulk_share - 1
        group = min(self.members, key=lambda g: oldest(self.members[g], not by_age))
        led_by_interactive = not all(m.work.bulk for m in self.members[group])
        self._ahead_of_bulk = self._ahead_of_bulk + 1 if bulk_waits and not by_age and led_by_interactive else 0
        return group

    def step(self, step_done: StepDone | None = None) -> tuple[list[Finished], list[Work]]:
        """One UNet call on the loop that goes next. Returns the jobs it finished, and the jobs it
        put out of the loop to start again later (out of memory: the newest ones, after the
        budget of their size shrank); a LoopFailed for any other error of the call."""
        group = self.next_group()
        if group is None:
            return [], []
        loop, members = self.loops[group], self.members[group]
        self.last_call, samples, clock = None, len(loop), time.perf_counter()
        try:
            finished = loop.step()
            self.last_call = samples, time.perf_counter() - clock
        except Exception as exc:
            if is_out_of_memory(exc) and len(members) > 1:
                return [], self._shed(group)
            del self.members[group], self.loops[group]
            raise LoopFailed(members, exc) from exc
        if step_done is not None:
            for m in members:
                first = m.samples[0]
                order = getattr(first.scheduler, "order", 1)
                steps = math.ceil(len(first.timesteps) / order)
                step_done(math.ceil(first.calls / order), steps, [m.work.job_id])
        if not finished:
            return [], []
        ending = [m for m in members if all(s.done for s in m.samples)]
        self.members[group] = [m for m in members if m not in ending]
        self._forget_if_empty(group)
        try:
            images = dict(zip(map(id, finished), loop.decode(finished)))
        except Exception as exc:
            raise LoopFailed(ending, exc) from exc
        done: list[Finished] = []
        for m in ending:
            stats = [(s.calls, s.shared_max, round(s.shared_total / max(1, s.calls), 3)) for s in m.samples]
            done.append((m, [images[id(s)] for s in m.samples], stats))
        return done, []

    def _shed(self, group: Hashable) -> list[Work]:
        """Out of memory: the size's budget shrinks below what the loop held, and its newest jobs
        leave until the rest fit; they start again later (same seeds, same images)."""
        members = self.members[group]
        used = sum(m.work.pixels for m in members)
        key = members[0].work.key
        self.budget.shrink(key, used)
        self.model.free_memory()
        limit = self.budget.for_key(key)
        shed: list[Member] = []
        while len(members) - len(shed) > 1 and used > limit:
            newest = max((m for m in members if m not in shed), key=lambda m: m.admitted)
            shed.append(newest)
            used -= newest.work.pixels
        log.warning("out of memory on %d samples of %dx%d: %d job(s) start again later; budget now %d px",
                    sum(len(m.samples) for m in members), key.width, key.height, len(shed), limit)
        return self.drop(lambda work: any(m.work is work for m in shed))
